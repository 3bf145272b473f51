"""Cutting frames out of a stored instance, as Orthanc's DICOMweb plugin sends them.

Pure functions over :class:`~dicomcache.dicom.verify.PixelInfo` (where the Pixel
Data lives in the file) and the ``Accept`` header; the route does the I/O.

What Orthanc 1.10 + DICOMweb 1.7 answers for ``…/frames/{list}`` (measured,
see test_frames_identical_to_orthanc in tests/routes/test_dicomweb.py):

* no ``transfer-syntax`` in ``Accept`` (or ``*/*``): the frame decoded to
  Explicit VR Little Endian, part type ``application/octet-stream;
  transfer-syntax=1.2.840.10008.1.2.1``.  For native little-endian instances
  that is the stored frame bytes, so it is cut locally; compressed and
  big-endian instances are read through (Orthanc decodes).
* ``transfer-syntax=*``: the stored frame, typed by the stored syntax
  (``image/dicom-rle``, ``image/jls``, ``image/jp2``, or
  ``application/octet-stream`` for native little endian).  Big endian and
  deflated instances make Orthanc answer 500: read through.
* a named syntax equal to the stored native little-endian syntax: the stored
  frame; any other named syntax is read through (Orthanc refuses or transcodes).
"""

from __future__ import annotations

from dataclasses import dataclass

from dicomcache.dicom.accept import OCTET, frame_request
from dicomcache.dicom.syntaxes import EXPLICIT_LE, NATIVE_LE, SYNTAXES
from dicomcache.dicom.verify import PixelInfo


@dataclass(frozen=True, slots=True)
class FramePlan:
    """How to answer a frames request locally: part media type and transfer syntax."""

    media_type: str
    transfer_syntax: str

    @property
    def part_type(self) -> str:
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"


def plan_frames(accept: str | None, stored_syntax: str) -> FramePlan | None:
    """The local answer for a frames request, or ``None`` to read it through.

    Only the first media range of ``Accept`` is considered (Orthanc does the same
    for the frame type); see the module docstring for the table.
    """
    asked = frame_request(accept)
    if asked is None:
        return None
    wanted = asked.transfer_syntax
    if asked.media not in ("*/*", OCTET):
        return None  # image/jls etc. asked for by name: Orthanc decides
    if wanted is None:
        return FramePlan(OCTET, EXPLICIT_LE) if stored_syntax in NATIVE_LE else None
    if wanted == "*":
        if stored_syntax in NATIVE_LE:
            return FramePlan(OCTET, stored_syntax)
        known = SYNTAXES.get(stored_syntax)
        media_type = known.frame_media_type if known is not None and known.encapsulated else None
        return FramePlan(media_type, stored_syntax) if media_type else None
    if wanted == stored_syntax and stored_syntax in NATIVE_LE:
        return FramePlan(OCTET, stored_syntax)
    return None


def parse_frame_list(text: str, number_of_frames: int) -> list[int] | None:
    """``"1,3"`` → ``[1, 3]`` (1-based); ``None`` when any number is malformed or out of range."""
    out: list[int] = []
    for part in text.replace("%2C", ",").replace("%2c", ",").split(","):
        part = part.strip()
        if not part.isdigit() or len(part) > 9:
            return None
        n = int(part)
        if not 1 <= n <= number_of_frames:
            return None
        out.append(n)
    return out or None


def frame_ranges(pixel: PixelInfo, frame: int) -> list[tuple[int, int]] | None:
    """File ``(offset, length)`` ranges holding 1-based ``frame``, or ``None`` if unknown.

    Native data: ``rows × columns × samples × bits/8`` bytes per frame (whole
    bytes only).  Encapsulated: one fragment per frame when the counts match, a
    single frame spans every fragment, otherwise the Basic Offset Table decides.
    """
    n = max(1, pixel.number_of_frames)
    if not 1 <= frame <= n:
        return None
    if not pixel.encapsulated:
        if pixel.bits_allocated % 8 or pixel.length is None:
            return None
        size = pixel.rows * pixel.columns * pixel.samples_per_pixel * pixel.bits_allocated // 8
        if size <= 0 or size * n > pixel.length:
            return None
        return [(pixel.offset + (frame - 1) * size, size)]
    frags = pixel.fragments
    if not frags:
        return None
    if n == 1:
        return list(frags)
    if len(frags) == n:
        return [frags[frame - 1]]
    bot = pixel.basic_offset_table
    if len(bot) != n:
        return None
    first_item = frags[0][0] - 8  # each fragment value follows an 8-byte item header
    start = bot[frame - 1]
    end = bot[frame] if frame < n else None
    picked = [(off, length) for off, length in frags
              if (off - 8 - first_item) >= start
              and (end is None or (off - 8 - first_item) < end)]
    return picked or None
