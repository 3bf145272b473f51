"""Frame planning and cutting: pure functions, table-tested."""

from __future__ import annotations

import pytest

from dicomcache.dicom.frames import OCTET, FramePlan, frame_ranges, parse_frame_list, plan_frames
from dicomcache.dicom.syntaxes import EXPLICIT_LE as EXPLICIT_VR_LE
from dicomcache.dicom.syntaxes import IMPLICIT_LE as IMPLICIT_VR_LE
from dicomcache.dicom.verify import PixelInfo

RLE = "1.2.840.10008.1.2.5"
JLS = "1.2.840.10008.1.2.4.80"
J2K = "1.2.840.10008.1.2.4.90"
BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
MP = 'multipart/related; type="application/octet-stream"'


@pytest.mark.parametrize(("accept", "stored", "plan"), [
    (None, EXPLICIT_VR_LE, FramePlan(OCTET, EXPLICIT_VR_LE)),
    (None, IMPLICIT_VR_LE, FramePlan(OCTET, EXPLICIT_VR_LE)),  # same bytes, Orthanc's label
    ("*/*", EXPLICIT_VR_LE, FramePlan(OCTET, EXPLICIT_VR_LE)),
    (MP, IMPLICIT_VR_LE, FramePlan(OCTET, EXPLICIT_VR_LE)),
    (MP + "; transfer-syntax=*", IMPLICIT_VR_LE, FramePlan(OCTET, IMPLICIT_VR_LE)),
    (MP + "; transfer-syntax=*", RLE, FramePlan("image/dicom-rle", RLE)),
    (MP + "; transfer-syntax=*", JLS, FramePlan("image/jls", JLS)),
    (MP + "; transfer-syntax=*", J2K, FramePlan("image/jp2", J2K)),
    ('multipart/related; type="application/octet-stream; transfer-syntax=*"', RLE,
     FramePlan("image/dicom-rle", RLE)),
    (MP + f"; transfer-syntax={IMPLICIT_VR_LE}", IMPLICIT_VR_LE, FramePlan(OCTET, IMPLICIT_VR_LE)),
    # Orthanc decodes, transcodes, refuses or fails: read through.
    (None, RLE, None),
    (None, BIG, None),
    (MP + "; transfer-syntax=*", BIG, None),
    (MP + "; transfer-syntax=*", DEFLATED, None),
    (MP + "; transfer-syntax=*", JPEG_BASELINE, None),   # not compared with Orthanc: through
    (MP + f"; transfer-syntax={RLE}", RLE, None),
    (MP + f"; transfer-syntax={IMPLICIT_VR_LE}", EXPLICIT_VR_LE, None),
    ('multipart/related; type="image/jls"', JLS, None),
    ("application/json", EXPLICIT_VR_LE, None),
    (f"{MP}, */*", EXPLICIT_VR_LE, None),  # several ranges: leave the choice to Orthanc
])
def test_plan_frames(accept: str | None, stored: str, plan: FramePlan | None) -> None:
    assert plan_frames(accept, stored) == plan


@pytest.mark.parametrize(("text", "n", "want"), [
    ("1", 1, [1]), ("4,2", 4, [4, 2]), ("1%2C3", 3, [1, 3]), (" 2 ", 2, [2]),
    ("0", 4, None), ("5", 4, None), ("1,", 4, None), ("a", 4, None), ("-1", 4, None),
    ("", 4, None), ("1" * 12, 4, None), ("1.5", 4, None),
])
def test_parse_frame_list(text: str, n: int, want: list[int] | None) -> None:
    assert parse_frame_list(text, n) == want


def pixel(**kw: object) -> PixelInfo:
    base: dict[str, object] = dict(offset=1000, length=4 * 2 * 3 * 2, encapsulated=False,
                                   fragments=(), basic_offset_table=(), rows=2, columns=3,
                                   samples_per_pixel=1, bits_allocated=16, number_of_frames=4)
    base.update(kw)
    return PixelInfo(**base)  # type: ignore[arg-type]


def test_native_frames() -> None:
    p = pixel()
    assert frame_ranges(p, 1) == [(1000, 12)]
    assert frame_ranges(p, 4) == [(1036, 12)]
    assert frame_ranges(p, 5) is None
    assert frame_ranges(p, 0) is None
    assert frame_ranges(pixel(length=40), 4) is None      # value shorter than 4 frames
    assert frame_ranges(pixel(bits_allocated=1), 1) is None  # bit-packed: through Orthanc
    assert frame_ranges(pixel(number_of_frames=0, length=12), 1) == [(1000, 12)]


def test_encapsulated_frames() -> None:
    # one fragment per frame
    frags = ((108, 10), (126, 20), (154, 30))
    p = pixel(encapsulated=True, length=None, fragments=frags, number_of_frames=3)
    assert frame_ranges(p, 2) == [(126, 20)]
    # a single frame spread over several fragments
    assert frame_ranges(pixel(encapsulated=True, length=None, fragments=frags,
                              number_of_frames=1), 1) == list(frags)
    # two frames over three fragments: the Basic Offset Table decides
    # (item offsets relative to the first fragment item: 0, 18, 46)
    p = pixel(encapsulated=True, length=None, fragments=frags, number_of_frames=2,
              basic_offset_table=(0, 18))
    assert frame_ranges(p, 1) == [(108, 10)]
    assert frame_ranges(p, 2) == [(126, 20), (154, 30)]
    # ... and without one there is no telling: through Orthanc
    assert frame_ranges(pixel(encapsulated=True, length=None, fragments=frags,
                              number_of_frames=2), 1) is None
    assert frame_ranges(pixel(encapsulated=True, length=None, fragments=(),
                              number_of_frames=1), 1) is None
