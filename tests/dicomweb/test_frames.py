"""dicomcache.dicomweb.frames: when to ask Orthanc for compressed frames, and what its
answer must be (pure, table-tested)."""

from __future__ import annotations

import pytest

from dicomcache.dicom import multipart
from dicomcache.dicom.syntaxes import (
    EXPLICIT_LE,
    JPEG_2000,
    JPEG_2000_LOSSLESS,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
)
from dicomcache.dicomweb.frames import transcoded_frames, transcoding_accept
from dicomcache.errors import IntegrityError

JLS = f'multipart/related; type="image/jls"; transfer-syntax={JPEG_LS_LOSSLESS}'


@pytest.mark.parametrize(("accept", "syntax", "expected"), [
    ("multipart/related; type=application/octet-stream; transfer-syntax=*",
     JPEG_LS_LOSSLESS, JLS),
    ('multipart/related; type="application/octet-stream; transfer-syntax=*"',
     JPEG_LS_LOSSLESS, JLS),
    ("multipart/related; type=application/octet-stream; transfer-syntax=*",
     JPEG_2000_LOSSLESS,
     f'multipart/related; type="image/jp2"; transfer-syntax={JPEG_2000_LOSSLESS}'),
    # off, lossy, or a syntax without a frame media type: never
    ("multipart/related; type=application/octet-stream; transfer-syntax=*", "", None),
    ("multipart/related; type=application/octet-stream; transfer-syntax=*", JPEG_2000, None),
    ("multipart/related; type=application/octet-stream; transfer-syntax=*", EXPLICIT_LE,
     None),
    # the viewer named a syntax, or none (Explicit VR Little Endian): what it named
    ("multipart/related; type=application/octet-stream", JPEG_LS_LOSSLESS, None),
    (f"multipart/related; type=application/octet-stream; transfer-syntax={EXPLICIT_LE}",
     JPEG_LS_LOSSLESS, None),
    (None, JPEG_LS_LOSSLESS, None),
    ("multipart/related; type=image/jls", JPEG_LS_LOSSLESS, None),
    ("image/jpeg", JPEG_LS_LOSSLESS, None),
])
def test_transcoding_accept(accept: str | None, syntax: str, expected: str | None) -> None:
    assert transcoding_accept(accept, syntax) == expected


JLS_FRAME = b"\xff\xd8\xff\xf7" + b"x" * 100 + b"\xff\xd9"
J2K_FRAME = b"\xff\x4f\xff\x51" + b"x" * 100 + b"\xff\xd9"
RLE_FRAME = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56) + b"\x00" * 9


def answer(parts: list[bytes], part_type: str) -> tuple[bytes, str]:
    boundary = "b" * 32
    return (multipart.write(boundary, part_type, parts),
            multipart.content_type(part_type, boundary))


@pytest.mark.parametrize(("syntax", "media", "frame"), [
    (JPEG_LS_LOSSLESS, "image/jls", JLS_FRAME),
    # an odd-length codestream padded to an even length, as Orthanc sends it
    (JPEG_LS_LOSSLESS, "image/jls", JLS_FRAME + b"x\xff\xd9\x00"),
    (JPEG_LS_LOSSLESS, "image/jls", JLS_FRAME + b"x\xff\xd9\xff"),  # any one pad byte
    (JPEG_2000_LOSSLESS, "image/jp2", J2K_FRAME),
    (JPEG_2000_LOSSLESS, "image/jp2", J2K_FRAME + b"x\xff\xd9\x00"),
    (RLE_LOSSLESS, "image/dicom-rle", RLE_FRAME),
])
def test_a_whole_answer_passes(syntax: str, media: str, frame: bytes) -> None:
    body, ctype = answer([frame, frame], f"{media}; transfer-syntax={syntax}")
    transcoded_frames(body, ctype, syntax, 2)


@pytest.mark.parametrize(("parts", "part_type", "count"), [
    ([JLS_FRAME], f"image/jls; transfer-syntax={JPEG_LS_LOSSLESS}", 2),  # a frame missing
    ([JLS_FRAME[:-1]], f"image/jls; transfer-syntax={JPEG_LS_LOSSLESS}", 1),  # cut short
    ([JLS_FRAME[2:]], f"image/jls; transfer-syntax={JPEG_LS_LOSSLESS}", 1),
    ([JLS_FRAME], f"application/octet-stream; transfer-syntax={EXPLICIT_LE}", 1),
    ([JLS_FRAME], f"image/jls; transfer-syntax={JPEG_2000_LOSSLESS}", 1),
    ([b""], f"image/jls; transfer-syntax={JPEG_LS_LOSSLESS}", 1),
    ([JLS_FRAME + b"\x00\x00"], f"image/jls; transfer-syntax={JPEG_LS_LOSSLESS}", 1),
    ([JLS_FRAME[:-1] + b"\x00"], f"image/jls; transfer-syntax={JPEG_LS_LOSSLESS}", 1),
])
def test_an_answer_that_is_not_whole_is_refused(parts: list[bytes], part_type: str,
                                                count: int) -> None:
    body, ctype = answer(parts, part_type)
    with pytest.raises(IntegrityError):
        transcoded_frames(body, ctype, JPEG_LS_LOSSLESS, count)


def test_a_multipart_cut_short_is_refused() -> None:
    body, ctype = answer([JLS_FRAME], f"image/jls; transfer-syntax={JPEG_LS_LOSSLESS}")
    with pytest.raises(IntegrityError):
        transcoded_frames(body[:-10], ctype, JPEG_LS_LOSSLESS, 1)


@pytest.mark.parametrize("frame", [RLE_FRAME[:60], bytes(64) + b"x",
                                   b"\xff" * 64,  # 4 billion segments: refused, not listed
                                   (1).to_bytes(4, "little") + (64).to_bytes(4, "little")
                                   + bytes(56)])
def test_rle_frames_need_their_segments(frame: bytes) -> None:
    body, ctype = answer([frame], f"image/dicom-rle; transfer-syntax={RLE_LOSSLESS}")
    with pytest.raises(IntegrityError):
        transcoded_frames(body, ctype, RLE_LOSSLESS, 1)
