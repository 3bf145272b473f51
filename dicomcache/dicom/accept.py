"""``Accept`` and ``Accept-Encoding`` headers of DICOMweb requests, parsed once (no I/O).

DICOMweb puts the interesting parameters inside ``multipart/related``:
``multipart/related; type="application/octet-stream"; transfer-syntax=*``, or
nested in a quoted ``type`` (``type="application/octet-stream;
transfer-syntax=*"``, as OHIF sends without ``omitQuotationForMultipartRequest``).
:func:`parse` unwraps both into one :class:`MediaRange` per item, in the
header's order (Orthanc considers the first item only, and so do the routes
that must answer as Orthanc would).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dicomcache.dicom.syntaxes import EXPLICIT_LE

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET = "application/octet-stream"
MULTIPART = "multipart/related"
_JSON_TYPES = ("*/*", "application/*", "application/json", DICOM_JSON)


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One item of an ``Accept`` header; ``multipart/related`` keeps its ``type`` apart."""

    media: str
    params: Mapping[str, str] = field(default_factory=dict)
    #: For ``multipart/related``: the media type of the parts (``type``), else ``None``.
    part_type: str | None = None

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _params(items: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key.strip():
            params[key.strip().lower()] = value.strip().strip('"').strip()
    return params


def parse(header: str | None) -> list[MediaRange]:
    """Every media range of ``header`` in order; no header means ``*/*``."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    for item in _split(header, ","):
        pieces = _split(item, ";")
        media = pieces[0].strip().lower()
        if not media:
            continue
        params = _params(pieces[1:])
        part_type = None
        if media == MULTIPART:
            inner = params.pop("type", "")
            inner_pieces = inner.split(";")
            part_type = inner_pieces[0].strip().lower() or None
            for key, value in _params(inner_pieces[1:]).items():
                params.setdefault(key, value)
        ranges.append(MediaRange(media, params, part_type))
    return ranges or [MediaRange("*/*")]


def instance_syntax(header: str | None) -> str | None:
    """The transfer syntax a WADO-RS instance/series/study retrieve asks for.

    ``"*"`` (as stored), a UID, Explicit VR Little Endian when DICOM parts are
    accepted without a syntax (Orthanc's default), or ``None`` when the header
    asks for something other than ``application/dicom`` parts.
    """
    for r in parse(header):
        if r.media in ("*/*", "multipart/*") or (
                r.media == MULTIPART and (r.part_type or DICOM) == DICOM):
            return r.transfer_syntax or EXPLICIT_LE
    return None


def frame_request(header: str | None) -> MediaRange | None:
    """The one media range of a frames or bulk-data request, parts unwrapped.

    ``multipart/related; type=X`` becomes ``X`` with the multipart's parameters;
    ``None`` when the header lists several ranges (Orthanc then decides).
    """
    ranges = parse(header)
    if len(ranges) != 1:
        return None
    r = ranges[0]
    if r.media == MULTIPART:
        return MediaRange(r.part_type or OCTET, r.params)
    return r


def accepts_json(header: str | None) -> bool:
    """Whether a metadata/QIDO ``Accept`` is satisfied by DICOM JSON (else read through)."""
    return any(r.media in _JSON_TYPES for r in parse(header))


def accepts_gzip(header: str | None) -> bool:
    """Whether an ``Accept-Encoding`` takes gzip (``q=0`` refuses it)."""
    for item in (header or "").split(","):
        pieces = item.strip().split(";")
        if pieces[0].strip().lower() in ("gzip", "x-gzip", "*"):
            q = _params(pieces[1:]).get("q", "1")
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False
