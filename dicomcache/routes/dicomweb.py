"""DICOMweb WADO-RS retrieve of one instance from the verified store.

Orthanc's plugin sends the stored bytes when the ``Accept`` header says
``transfer-syntax=*`` (or names the stored syntax), and transcodes to Explicit
VR Little Endian when it names none.  The store holds the stored bytes, so a
request is answered locally exactly when Orthanc would send those bytes;
otherwise it is read through (Orthanc does the transcoding).
"""

from __future__ import annotations

from aiohttp import hdrs, web

from ..fetch import Fetched
from ..store import Entry
from .common import DICOM, FETCHER, OUTCOME, STORE, boundary, dicom_uid, family_of
from .serve import IMMUTABLE, read_instance
from .passthrough import passthrough
from .wado_uri import _check_parents

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def wanted_syntax(accept: str | None) -> str | None:
    """The transfer syntax an ``Accept`` header asks of a DICOM instance retrieve.

    Returns ``"*"`` (as stored), a UID, ``EXPLICIT_VR_LE`` when a DICOM type is
    accepted without a syntax (Orthanc's default), or ``None`` when the header
    asks for something other than ``application/dicom`` parts.
    """
    if not accept:
        return EXPLICIT_VR_LE
    for item in accept.split(","):
        params = [p.strip() for p in item.split(";")]
        media = params[0].lower()
        values = {k.strip().lower(): v.strip().strip('"')
                  for k, _, v in (p.partition("=") for p in params[1:])}
        if media in ("*/*", "multipart/*") or (
                media == "multipart/related" and values.get("type", DICOM).lower() == DICOM):
            return values.get("transfer-syntax", EXPLICIT_VR_LE)
    return None


def _serves(stored: str, wanted: str | None) -> bool:
    return wanted == "*" or wanted == stored


async def instance(request: web.Request) -> web.StreamResponse:
    study = dicom_uid(request.match_info["study"], "StudyInstanceUID")
    series = dicom_uid(request.match_info["series"], "SeriesInstanceUID")
    sop = dicom_uid(request.match_info["sop"], "SOPInstanceUID")
    wanted = wanted_syntax(request.headers.get(hdrs.ACCEPT))
    if wanted is None:
        return await passthrough(request)
    family_of(request, "dicomweb")
    entry = await request.app[STORE].get(sop)
    request[OUTCOME] = "miss" if entry is None else "hit"
    found = entry or await request.app[FETCHER].instance_by_sop(sop)
    _check_parents(found.study_uid, found.series_uid, study, series, sop)
    if not _serves(found.transfer_syntax, wanted):
        request[OUTCOME] = "passthrough"
        return await passthrough(request)
    return await _multipart(request, found)


async def _multipart(request: web.Request, found: Entry | Fetched) -> web.StreamResponse:
    """One ``application/dicom`` part, framed exactly as Orthanc frames it."""
    md5 = found.md5
    etag = f'"{md5}-mp"'
    headers = {hdrs.CACHE_CONTROL: IMMUTABLE, hdrs.ETAG: etag}
    if etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers=headers)
    data = await read_instance(found)
    b = boundary()
    head = (f"--{b}\r\nContent-Type: {DICOM}\r\nContent-Length: {len(data)}\r\n"
            f"MIME-Version: 1.0\r\n\r\n").encode()
    tail = f"\r\n--{b}--\r\n".encode()
    resp = web.Response(body=head + data + tail, headers=headers)
    resp.content_type = "multipart/related"
    resp.headers[hdrs.CONTENT_TYPE] = f'multipart/related; type="{DICOM}"; boundary={b}'
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_get("/dicom-web/studies/{study}/series/{series}/instances/{sop}", instance)
