"""Frames cut out of a verified instance: the byte ranges planned by
:mod:`dicomcache.dicom.frames`, read from the stored file (``pread``, never the whole
file) or sliced from the bytes in memory.  And, opt-in, a viewer's cold frames asked
from Orthanc in a lossless compressed syntax (``upstream.frames_transfer_syntax``):
when to ask, and what such an answer must look like before it is passed on."""

from __future__ import annotations

import asyncio
import os

from dicomcache.cache.instance import Instance
from dicomcache.cache.store import Store
from dicomcache.dicom import multipart
from dicomcache.dicom.accept import OCTET, frame_request, parse
from dicomcache.dicom.syntaxes import JPEG_2000_LOSSLESS, JPEG_LS_LOSSLESS, RLE_LOSSLESS, SYNTAXES
from dicomcache.errors import Cause, IntegrityError

#: Byte ranges of each frame: ``[(offset, length), …]`` per frame (fragments of one frame).
Ranges = list[list[tuple[int, int]]]


def _pread_all(store: Store, found: Instance, ranges: Ranges) -> list[bytes]:
    fd, _st = store.open_checked(found)
    path = found.path
    try:
        out = []
        for frame in ranges:
            chunks = []
            for off, length in frame:
                chunk = os.pread(fd, length, off)
                if len(chunk) != length:
                    raise FileNotFoundError(f"{path} is shorter than its index says")
                chunks.append(chunk)
            out.append(b"".join(chunks))
        return out
    finally:
        os.close(fd)


async def read_frames(store: Store, found: Instance, ranges: Ranges) -> list[bytes]:
    """The bytes of each frame; ``FileNotFoundError`` when a stored file is gone, cut or
    bad (checked the first time this process reads it: :meth:`Store.open_checked`)."""
    if found.path is not None:
        return await asyncio.to_thread(_pread_all, store, found, ranges)
    data = found.content()
    return [b"".join(data[off:off + length] for off, length in frame) for frame in ranges]


def transcoding_accept(accept: str | None, syntax: str) -> str | None:
    """The ``Accept`` that asks Orthanc for frames in ``syntax``
    (``upstream.frames_transfer_syntax``), or ``None``: ask as the viewer asked.

    Only when the viewer takes any syntax for its frames (``transfer-syntax=*``, as
    OHIF asks): a viewer that names a syntax, or none (Explicit VR Little Endian by
    default), gets what it named.  Orthanc 1.10's DICOMweb plugin transcodes frames
    only when asked for the syntax's own media type (``image/jls``), never for
    ``application/octet-stream``.
    """
    known = SYNTAXES.get(syntax)
    if known is None or not known.encapsulated or known.lossy or not known.frame_media_type:
        return None
    asked = frame_request(accept)
    if asked is None or asked.media not in ("*/*", OCTET) or asked.transfer_syntax != "*":
        return None
    return f'multipart/related; type="{known.frame_media_type}"; transfer-syntax={syntax}'


def _whole_codestream(syntax: str, frame: bytes) -> bool:
    """Does ``frame`` look like one whole compressed frame of ``syntax``?  Begins and ends
    with the codestream's markers (JPEG-LS: SOI … EOI; JPEG 2000: SOC, or a JP2 box …
    EOC; either maybe padded with one 0x00 to an even length, as a DICOM fragment is),
    or, RLE, a 64-byte header whose segments lie inside it.  Catches a frame cut
    short; the pixels themselves have no checksum to compare."""
    if syntax in (JPEG_LS_LOSSLESS, JPEG_2000_LOSSLESS):
        # The pad byte is 0x00 in what Orthanc sends; any one byte after EOI at an
        # even length is a pad (EOI cannot occur inside the scan data: 0xFF is stuffed).
        end = frame[:-1] if len(frame) % 2 == 0 and frame[-3:-1] == b"\xff\xd9" else frame
        starts = (b"\xff\xd8",) if syntax == JPEG_LS_LOSSLESS else (
            b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")
        return frame.startswith(starts) and end.endswith(b"\xff\xd9")
    if syntax == RLE_LOSSLESS:
        count = int.from_bytes(frame[:4], "little")
        if len(frame) < 64 or not 1 <= count <= 15:
            return False
        offsets = [int.from_bytes(frame[4 + 4 * i:8 + 4 * i], "little") for i in range(count)]
        return offsets[0] == 64 and offsets == sorted(offsets) and offsets[-1] < len(frame)
    return False


def transcoded_frames(body: bytes, content_type: str, syntax: str, count: int) -> None:
    """Check Orthanc's answer to :func:`transcoding_accept` before it is passed on:
    a complete multipart of ``count`` parts, each the asked media type and syntax,
    each a whole codestream.  :class:`IntegrityError` otherwise."""
    media = SYNTAXES[syntax].frame_media_type
    try:
        parts = multipart.split(body, content_type)
    except multipart.MultipartError as exc:
        raise IntegrityError(Cause.SHORT_BODY, f"transcoded frames: {exc}") from exc
    if len(parts) != count:
        raise IntegrityError(Cause.PARSE_FAILURE, f"{len(parts)} frames where {count} were "
                             "asked")
    for part in parts:
        (kind,) = parse(part.headers.get("content-type"))[:1]
        if kind.media != media or kind.transfer_syntax not in (None, syntax):
            raise IntegrityError(Cause.PARSE_FAILURE, f"a transcoded frame is "
                                 f"{part.headers.get('content-type')!r}, not {media} in "
                                 f"{syntax}")
        if not _whole_codestream(syntax, part.body):
            raise IntegrityError(Cause.SHORT_BODY, f"a transcoded frame ({len(part.body)} "
                                 f"bytes, {part.body[:4].hex()}…{part.body[-4:].hex()}) is "
                                 f"not a whole {SYNTAXES[syntax].name} codestream")
