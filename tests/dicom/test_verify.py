"""dicomcache.dicom.verify: a strict, bounds-checked walk that rejects cut or damaged bodies."""

from __future__ import annotations

import fnmatch
import hashlib
import io
import mmap
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.encaps import generate_fragments
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicomcache.devtools.samples import CodecUnavailableError, encode, make_ct_series
from dicomcache.dicom.verify import (
    MAX_DEPTH,
    DicomSummary,
    IntegrityError,
    md5_hex,
    parse_dicom,
    verify_bytes,
    verify_file,
)
from dicomcache.errors import IntegrityError as ErrorsIntegrityError

SYNTAXES = {
    "implicit": ImplicitVRLittleEndian,
    "explicit": ExplicitVRLittleEndian,
    "bigendian": ExplicitVRBigEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
}


def _generate(label: str, *, frames: int = 1, size: int = 8, n: int = 2) -> bytes:
    syntax = SYNTAXES[label]
    if syntax == JPEG2000Lossless:
        size = max(size, 32)  # openjpeg's minimum
    try:
        ds = make_ct_series(n, rows=size, columns=size, frames=frames, transfer_syntax=syntax)[0]
    except CodecUnavailableError as exc:
        pytest.skip(str(exc))
    return encode(ds, syntax)


_cache: dict[tuple[str, int, int], bytes] = {}


def small(label: str, frames: int = 1, size: int = 8) -> bytes:
    """A small generated instance (cached for the module)."""
    key = (label, frames, size)
    if key not in _cache:
        _cache[key] = _generate(label, frames=frames, size=size)
    return _cache[key]


def rejects(data: bytes | memoryview, *fragments: str, **kwargs: object) -> IntegrityError:
    """Assert a parse failure whose reason contains every fragment."""
    with pytest.raises(IntegrityError) as info:
        verify_bytes(data, **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert err.cause == "parse_failure", err
    for fragment in fragments:
        assert fragment in err.reason, (fragment, err.reason)
    return err


def read(data: bytes) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data))


# --- hand-built files: exact control over every byte -------------------------

LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
UNDEF = 0xFFFFFFFF


def el(group: int, elem: int, vr: str, value: bytes = b"", length: int | None = None) -> bytes:
    """An explicit VR little endian element."""
    n = len(value) if length is None else length
    if vr in LONG:
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), n) + value


def iel(group: int, elem: int, value: bytes = b"", length: int | None = None) -> bytes:
    """An implicit VR little endian element (also item and delimiter headers)."""
    n = len(value) if length is None else length
    return struct.pack("<HHI", group, elem, n) + value


def item(body: bytes, *, undefined: bool = False) -> bytes:
    if undefined:
        return iel(0xFFFE, 0xE000, body, UNDEF) + ITEM_END
    return iel(0xFFFE, 0xE000, body)


ITEM_END = iel(0xFFFE, 0xE00D)
SEQ_END = iel(0xFFFE, 0xE0DD)


def ui(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" * (len(raw) % 2)


def meta(ts: str, *, group_length: bool = True, with_ts: bool = True) -> bytes:
    body = el(0x0002, 0x0001, "OB", b"\0\1")
    body += el(0x0002, 0x0002, "UI", ui("1.2.840.10008.5.1.4.1.1.7"))
    body += el(0x0002, 0x0003, "UI", ui("1.2.3.4"))
    if with_ts:
        body += el(0x0002, 0x0010, "UI", ui(ts))
    if group_length:
        body = el(0x0002, 0x0000, "UL", struct.pack("<I", len(body))) + body
    return b"\0" * 128 + b"DICM" + body


SOP = el(0x0008, 0x0016, "UI", ui("1.2.840.10008.5.1.4.1.1.7"))
SOP += el(0x0008, 0x0018, "UI", ui("1.2.3.4"))
IMAGE = (
    el(0x0028, 0x0002, "US", b"\1\0")
    + el(0x0028, 0x0010, "US", b"\2\0")
    + el(0x0028, 0x0011, "US", b"\2\0")
    + el(0x0028, 0x0100, "US", b"\x10\0")
)
PIXELS = el(0x7FE0, 0x0010, "OW", bytes(8))


def part10(body: bytes, ts: str = ExplicitVRLittleEndian, **kwargs: bool) -> bytes:
    return meta(ts, **kwargs) + body


def image(*middle: bytes, pixels: bytes = PIXELS) -> bytes:
    """SOP UIDs, then ``middle`` (groups between 0008 and 0028), then a 2x2 image."""
    return part10(SOP + b"".join(middle) + IMAGE + pixels)


# --- valid inputs ------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("label", SYNTAXES)
def test_generated_instances_verify_and_agree_with_pydicom(label: str, frames: int) -> None:
    data = small(label, frames)
    summary = verify_bytes(data, expected_length=len(data), expected_md5=md5_hex(data))
    ds = read(data)
    assert summary == parse_dicom(data)
    assert summary.sop_instance_uid == ds.SOPInstanceUID
    assert summary.sop_class_uid == ds.SOPClassUID
    assert summary.study_instance_uid == ds.StudyInstanceUID
    assert summary.series_instance_uid == ds.SeriesInstanceUID
    assert summary.transfer_syntax_uid == SYNTAXES[label]
    assert summary.size == len(data)
    if label == "deflated":
        assert summary.pixel is None  # offsets would point into the inflated data set
        return
    pixel = summary.pixel
    assert pixel is not None
    assert (pixel.rows, pixel.columns, pixel.samples_per_pixel) == (ds.Rows, ds.Columns, 1)
    assert (pixel.bits_allocated, pixel.number_of_frames) == (16, frames)
    if pixel.encapsulated:
        assert pixel.length is None
        got = [data[off : off + n] for off, n in pixel.fragments]
        assert got == list(generate_fragments(ds.PixelData))[1:]  # [0] is the BOT
        assert len(pixel.basic_offset_table) == frames  # pydicom writes a BOT
        starts = [0]
        for _, n in pixel.fragments[:-1]:
            starts.append(starts[-1] + 8 + n)
        assert list(pixel.basic_offset_table) == starts  # one fragment per frame
    else:
        assert pixel.length is not None and pixel.length == ds.Rows * ds.Columns * 2 * frames
        assert pixel.fragments == () and pixel.basic_offset_table == ()
        assert data[pixel.offset : pixel.offset + pixel.length] == ds.PixelData


def test_big_ct_pixel_info_points_at_the_pixels() -> None:
    ds = make_ct_series(1)[0]
    data = encode(ds, ExplicitVRLittleEndian)
    pixel = verify_bytes(data).pixel
    assert pixel is not None and pixel.length == 512 * 512 * 2
    assert pixel.offset + pixel.length == len(data)
    assert data[pixel.offset :] == ds.PixelData


_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"

# Local pydicom test files that verify rejects, first match wins, with why.
REJECTED = {
    "MR_small_padded.dcm": "has 8320 bytes but",  # Pixel Data longer than the image
    "MR_truncated.dcm": "declares 8192 bytes but only 8130 remain",
    "rtplan_truncated.dcm": "(300A,00B0) at offset 1410 declares 976 bytes",
    "dicomdirtests/DICOMDIR-nooffset": "declares 248 bytes but only 224 remain",
    "SC_rgb_jpeg.dcm": "unknown VR",  # implicit VR body under an explicit syntax
    "badVR.dcm": "Number of Frames (0028,0008) is not an integer",
    "meta_missing_tsyntax.dcm": "no Transfer Syntax UID",
    "nested_priv_SQ.dcm": "no Rows, Columns, Bits Allocated",
    "dicomdirtests/TINY_ALPHA/PT*/IM*": "is an image but the data set has no Pixel Data",
    "*DICOMDIR*": "no SOP Instance UID",
    "UN_sequence.dcm": "no SOP Instance UID",
    "empty_charset_LEI.dcm": "no SOP Instance UID",
    "no_meta_group_length.dcm": "no SOP Instance UID",
    "priv_SQ.dcm": "no SOP Instance UID",
}


def _local_test_files() -> list[str]:
    """pydicom's bundled files (only those inside the wheel: no downloads)."""
    found = {
        Path(p).relative_to(_TEST_FILES).as_posix()
        for p in pydicom.data.get_testdata_files()
        if Path(p).is_file() and Path(p).is_relative_to(_TEST_FILES)
    }
    return sorted(found)


def _expected_rejection(name: str) -> str | None:
    for pattern, reason in REJECTED.items():
        if fnmatch.fnmatch(name, pattern):
            return reason
    return None


def _is_part10(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(132)[128:] == b"DICM"


PART10 = [n for n in _local_test_files() if _is_part10(_TEST_FILES / n)]
NOT_PART10 = [n for n in _local_test_files() if not _is_part10(_TEST_FILES / n)]


def test_the_bundled_corpus_is_big_enough() -> None:
    accepted = [n for n in PART10 if _expected_rejection(n) is None]
    assert len(accepted) >= 80 and len(NOT_PART10) >= 5
    for pattern in REJECTED:  # every expectation still applies to some file
        assert any(fnmatch.fnmatch(n, pattern) for n in PART10), pattern


@pytest.mark.parametrize("name", PART10)
def test_pydicom_test_files(name: str) -> None:
    path = _TEST_FILES / name
    reason = _expected_rejection(name)
    if reason is not None:
        with pytest.raises(IntegrityError) as info:
            verify_file(path)
        assert info.value.cause == "parse_failure"
        assert reason in info.value.reason
        return
    summary = verify_file(path)
    data = path.read_bytes()
    assert summary == verify_bytes(data, expected_length=len(data), expected_md5=md5_hex(data))
    ds = read(data)
    assert summary.sop_instance_uid == ds.SOPInstanceUID
    assert summary.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID


@pytest.mark.parametrize("name", NOT_PART10)
def test_pydicom_files_without_dicm_are_rejected(name: str) -> None:
    err = rejects((_TEST_FILES / name).read_bytes())
    assert "DICM" in err.reason


# --- truncation ----------------------------------------------------------------


def _assert_every_cut_rejected(data: bytes, cuts: range | list[int]) -> None:
    view = memoryview(data)  # slicing a view copies nothing
    pad_only = _deflate_pad_only(data)
    for cut in cuts:
        if cut == pad_only:
            continue
        short = view[:cut]
        for kwargs in ({}, {"expected_length": cut}):  # a lying length does not help
            with pytest.raises(IntegrityError) as cut_short:
                verify_bytes(short, **kwargs)  # type: ignore[arg-type]
            assert cut_short.value.cause == "parse_failure", (cut, cut_short.value)
        with pytest.raises(IntegrityError) as info:
            verify_bytes(short, expected_length=len(data))
        assert info.value.cause == "short_body"


def _deflate_pad_only(data: bytes) -> int | None:
    """The cut that drops only the NUL pad after a deflate stream (loses nothing)."""
    summary = parse_dicom(data)
    if summary.transfer_syntax_uid != DeflatedExplicitVRLittleEndian or data[-1:] != b"\0":
        return None
    try:
        parse_dicom(data[:-1])
    except IntegrityError:
        return None
    return len(data) - 1


@pytest.mark.parametrize(
    ("label", "frames"), [(label, 1) for label in SYNTAXES] + [("rle", 3), ("explicit", 3)]
)
def test_every_truncation_of_a_small_file_is_rejected(label: str, frames: int) -> None:
    data = small(label, frames)
    _assert_every_cut_rejected(data, range(len(data)))


@pytest.mark.parametrize(("label", "frames", "size"), [("explicit", 1, 512), ("implicit", 1, 512),
                                                      ("bigendian", 1, 256), ("rle", 3, 128)])
def test_many_truncations_of_a_big_file_are_rejected(label: str, frames: int, size: int) -> None:
    data = small(label, frames, size)
    pixel = parse_dicom(data).pixel
    assert pixel is not None
    rng = random.Random(1)
    cuts = set(range(pixel.offset + 64))  # every byte of the header, sequences included
    cuts.update(rng.randrange(pixel.offset, len(data)) for _ in range(300))
    cuts.update(range(len(data) - 24, len(data)))
    for off, _ in pixel.fragments:  # around every fragment's item header
        cuts.update(range(off - 12, off + 4))
    _assert_every_cut_rejected(data, sorted(cuts))


def test_cut_exactly_before_pixel_data_is_rejected() -> None:
    data = small("explicit")
    pixel = parse_dicom(data).pixel
    assert pixel is not None
    rejects(data[: pixel.offset - 12], "no Pixel Data")
    # ...and before the Image Pixel attributes, for an image SOP class
    rows = data.index(struct.pack("<HH2s", 0x0028, 0x0002, b"US"))
    rejects(data[:rows], "is an image but", "no Pixel Data")


# --- length and digest ----------------------------------------------------------


def test_checks_run_in_order_length_md5_parse() -> None:
    data = small("explicit")
    good = md5_hex(data)
    with pytest.raises(IntegrityError) as info:
        verify_bytes(data[:-1], expected_length=len(data), expected_md5=good)
    assert info.value.cause == "short_body" and "1 short" in info.value.reason
    with pytest.raises(IntegrityError) as info:
        verify_bytes(data + b"\0\0", expected_length=len(data), expected_md5=good)
    assert info.value.cause == "length_mismatch"
    garbage = bytes(len(data))
    with pytest.raises(IntegrityError) as info:
        verify_bytes(garbage, expected_length=len(data), expected_md5=good)
    assert info.value.cause == "md5_mismatch" and good in info.value.reason
    rejects(garbage, "DICM", expected_length=len(data), expected_md5=md5_hex(garbage))


@pytest.mark.parametrize("label", ["explicit", "rle", "deflated"])
def test_corruption_keeping_the_length_is_caught_by_md5(label: str) -> None:
    data = small(label)
    good = md5_hex(data)
    for where in (len(data) - 3, len(data) // 2):
        corrupt = bytearray(data)
        corrupt[where] ^= 0x01
        with pytest.raises(IntegrityError) as info:
            verify_bytes(corrupt, expected_length=len(data), expected_md5=good)
        assert info.value.cause == "md5_mismatch"
    # In native pixels a flipped bit parses fine: only the digest can tell.
    if label == "explicit":
        corrupt = bytearray(data)
        corrupt[-3] ^= 0x01
        assert verify_bytes(corrupt).sop_instance_uid == parse_dicom(data).sop_instance_uid


def test_md5_forms() -> None:
    data = small("explicit")
    digest = hashlib.md5(data).hexdigest()
    assert md5_hex(data) == digest
    assert md5_hex(memoryview(data)) == digest
    verify_bytes(data, expected_md5=digest.upper())
    verify_bytes(data, expected_md5=f'"{digest}"')  # as in an ETag
    with pytest.raises(ValueError, match="32 hex digits") as info:
        verify_bytes(data, expected_md5="abc")
    assert not isinstance(info.value, IntegrityError)
    with pytest.raises(ValueError, match=">= 0"):
        verify_bytes(data, expected_length=-1)


def test_integrity_error_is_the_shared_one() -> None:
    assert IntegrityError is ErrorsIntegrityError
    err = rejects(b"")
    assert isinstance(err, ValueError) and str(err).startswith("parse_failure: ")


@pytest.mark.parametrize(
    "wrap",
    [bytes, bytearray, memoryview, lambda b: memoryview(b).cast("H")],
    ids=["bytes", "bytearray", "memoryview", "memoryview-H"],
)
def test_buffer_types(wrap: Callable[[bytes], bytes | bytearray | memoryview]) -> None:
    data = small("explicit")
    summary = verify_bytes(wrap(data), expected_length=len(data), expected_md5=md5_hex(data))
    assert summary.size == len(data)


def test_mmap_input(tmp_path: Path) -> None:
    data = small("rle")
    path = tmp_path / "a.dcm"
    path.write_bytes(data)
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert verify_bytes(mapped) == parse_dicom(data)
        with pytest.raises(IntegrityError):
            verify_bytes(mapped, expected_md5="0" * 32)


# --- verify_file -------------------------------------------------------------------


def test_verify_file(tmp_path: Path) -> None:
    data = small("explicit")
    path = tmp_path / "ok.dcm"
    path.write_bytes(data)
    summary = verify_file(path, expected_length=len(data), expected_md5=md5_hex(data))
    assert summary == verify_file(str(path)) == parse_dicom(data)
    with pytest.raises(IntegrityError) as info:
        verify_file(path, expected_length=len(data) + 10)
    assert info.value.cause == "short_body"
    with pytest.raises(IntegrityError) as info:
        verify_file(path, expected_md5="0" * 32)
    assert info.value.cause == "md5_mismatch"
    with pytest.raises(FileNotFoundError):
        verify_file(tmp_path / "missing.dcm")


def test_verify_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(IntegrityError) as info:
        verify_file(path)
    assert info.value.cause == "parse_failure" and "0 bytes" in info.value.reason
    with pytest.raises(IntegrityError) as info:
        verify_file(path, expected_length=100)
    assert info.value.cause == "short_body"
    with pytest.raises(IntegrityError) as info:
        verify_file(path, expected_length=0, expected_md5=md5_hex(b"x"))
    assert info.value.cause == "md5_mismatch"


@pytest.mark.parametrize("label", ["explicit", "deflated", "rle"])
def test_verify_file_failures_leave_no_mapping_behind(tmp_path: Path, label: str) -> None:
    # If a view into the mmap survived the failure, closing it would raise BufferError.
    data = small(label)
    for i, cut in enumerate((len(data) - 1, len(data) // 2, 200)):
        path = tmp_path / f"cut{i}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(IntegrityError) as info:
            verify_file(path)
        assert info.value.cause == "parse_failure"


# --- targeted corruptions of generated files ---------------------------------


def _find(data: bytes, group: int, elem: int, vr: bytes = b"", *, start: int = 132) -> int:
    pixel = parse_dicom(data).pixel
    end = pixel.offset if pixel is not None else len(data)
    return data.index(struct.pack("<HH", group, elem) + vr, start, end)


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def test_short_element_length_running_past_the_end() -> None:
    data = small("explicit")
    at = _find(data, 0x0028, 0x0010, b"US")
    err = rejects(_patch(data, at + 6, struct.pack("<H", 0xFFF0)), "(0028,0010)", f"offset {at}")
    assert f"element (0028,0010) at offset {at} declares 65520 bytes but only" in err.reason


def test_long_element_length_running_past_the_end() -> None:
    data = small("explicit")
    pixel = parse_dicom(data).pixel
    assert pixel is not None and pixel.length is not None
    at = pixel.offset - 12
    rejects(_patch(data, at + 8, struct.pack("<I", pixel.length + 2)),
            f"element (7FE0,0010) at offset {at} declares {pixel.length + 2} bytes but only "
            f"{pixel.length} remain")


def test_wrong_native_pixel_length() -> None:
    data = small("explicit")
    pixel = parse_dicom(data).pixel
    assert pixel is not None and pixel.length is not None
    short = _patch(data, pixel.offset - 4, struct.pack("<I", pixel.length - 2))
    rejects(short, "Pixel Data (7FE0,0010)", f"has {pixel.length - 2} bytes",
            f"need {pixel.length}")
    ds = make_ct_series(1, rows=8, columns=8)[0]
    ds.Rows = 9  # attributes no longer match the pixels
    rejects(encode(ds, ExplicitVRLittleEndian), "has 128 bytes", "9x8x1 samples", "need 144")


def test_native_pixel_length_rules() -> None:
    # 1-bit pixels round up to whole bytes; one pad byte is allowed for odd lengths.
    one_bit = el(0x0028, 0x0002, "US", b"\1\0") + el(0x0028, 0x0010, "US", b"\3\0")
    one_bit += el(0x0028, 0x0011, "US", b"\3\0") + el(0x0028, 0x0100, "US", b"\1\0")
    assert verify_bytes(part10(SOP + one_bit + el(0x7FE0, 0x0010, "OB", bytes(2))))
    rejects(part10(SOP + one_bit + el(0x7FE0, 0x0010, "OB", bytes(4))), "need 2")
    odd = IMAGE.replace(el(0x0028, 0x0100, "US", b"\x10\0"), el(0x0028, 0x0100, "US", b"\x08\0"))
    odd = odd.replace(el(0x0028, 0x0010, "US", b"\2\0"), el(0x0028, 0x0010, "US", b"\3\0"))
    odd = odd.replace(el(0x0028, 0x0011, "US", b"\2\0"), el(0x0028, 0x0011, "US", b"\3\0"))
    assert verify_bytes(part10(SOP + odd + el(0x7FE0, 0x0010, "OB", bytes(10))))  # 9 + pad
    rejects(part10(SOP + odd + el(0x7FE0, 0x0010, "OB", bytes(12))), "need 9")
    three = IMAGE[:10] + el(0x0028, 0x0008, "IS", b"3 ") + IMAGE[10:]  # after (0028,0002)
    assert verify_bytes(part10(SOP + three + el(0x7FE0, 0x0010, "OW", bytes(24))))
    rejects(part10(SOP + three + PIXELS), "3 frames", "need 24")
    bad = IMAGE[:10] + el(0x0028, 0x0008, "IS", b"x ") + IMAGE[10:]
    rejects(part10(SOP + bad + PIXELS), "Number of Frames (0028,0008) is not an integer")


def test_pixel_data_without_image_attributes() -> None:
    no_rows = IMAGE.replace(el(0x0028, 0x0010, "US", b"\2\0"), b"")
    rejects(part10(SOP + no_rows + PIXELS), "Pixel Data at offset", "no Rows")
    no_bits = IMAGE.replace(el(0x0028, 0x0100, "US", b"\x10\0"), b"")
    rejects(part10(SOP + no_bits + PIXELS), "no Bits Allocated")


def test_removed_sequence_delimiter() -> None:
    data = small("explicit")
    at = _find(data, 0x0008, 0x1032, b"SQ")  # Procedure Code Sequence, undefined length
    end = data.index(SEQ_END, at)
    rejects(data[:end] + data[end + 8 :], "in sequence (0008,1032)")
    # Same length: the delimiter overwritten, so only the parse can see it.
    rejects(_patch(data, end, bytes(8)), "unexpected tag (0000,0000)", "in sequence (0008,1032)",
            expected_length=len(data))


def test_removed_item_delimiter() -> None:
    data = small("explicit")
    at = _find(data, 0x0008, 0x1032, b"SQ")
    end = data.index(ITEM_END, at)
    rejects(data[:end] + data[end + 8 :], "unexpected delimiter tag (FFFE,E0DD)")


def test_missing_delimiters_at_the_end_of_the_buffer() -> None:
    seq = el(0x0008, 0x1032, "SQ", item(el(0x0008, 0x0100, "SH", b"AB"), undefined=True), UNDEF)
    rejects(part10(SOP + seq), "sequence (0008,1032)", "no Sequence Delimitation Item")
    code = el(0x0008, 0x0100, "SH", b"AB")
    open_item = el(0x0008, 0x1032, "SQ", iel(0xFFFE, 0xE000, code, UNDEF), UNDEF)
    rejects(part10(SOP + open_item), "no Item Delimitation Item")
    rejects(part10(SOP + seq[:-8] + iel(0xFFFE, 0xE00D, b"", 4) + b"\0" * 4 + SEQ_END),
            "Item Delimitation Item", "has length 4")


def test_descending_tag() -> None:
    data = small("explicit")
    at = _find(data, 0x0020, 0x0013, b"IS")  # Instance Number
    rejects(_patch(data, at, struct.pack("<HH", 0x0020, 0x0001)),
            f"element (0020,0001) at offset {at} is out of order: it follows")
    rejects(part10(el(0x0008, 0x0018, "UI", ui("1.2")) + el(0x0008, 0x0016, "UI", ui("1.2"))),
            "(0008,0016)", "out of order", "follows (0008,0018)")
    rejects(part10(SOP + el(0x0008, 0x0018, "UI", ui("1.2"))), "(0008,0018)", "out of order")


def test_descending_tag_big_endian() -> None:
    data = small("bigendian")
    at = data.index(struct.pack(">HH", 0x0020, 0x0013) + b"IS", 132)
    rejects(_patch(data, at, struct.pack(">HH", 0x0020, 0x0001)), "(0020,0001)", "out of order")


def test_bad_preamble_and_prefix() -> None:
    data = small("explicit")
    rejects(_patch(data, 128, b"DICN"), "no 'DICM' prefix at offset 128")
    rejects(data[:131], "too short")
    rejects(b"", "0 bytes")


def test_file_meta_problems() -> None:
    body = SOP + IMAGE + PIXELS
    assert verify_bytes(part10(body, group_length=False))
    rejects(part10(body, with_ts=False), "no Transfer Syntax UID (0002,0010)")
    good = part10(body)
    length = struct.unpack_from("<I", good, 140)[0]
    rejects(_patch(good, 140, struct.pack("<I", length + 2)), "Group Length", "ends at offset")
    rejects(_patch(good, 140, struct.pack("<I", length - 2)), "Group Length")
    rejects(part10(body, ExplicitVRLittleEndian + "x"), "is not a UID")
    undefined_meta = meta(ExplicitVRLittleEndian).replace(
        el(0x0002, 0x0001, "OB", b"\0\1"), el(0x0002, 0x0001, "OB", b"", UNDEF) + b"\0\1")
    rejects(undefined_meta + body, "File Meta element (0002,0001)", "undefined length")
    bad_vr = meta(ExplicitVRLittleEndian).replace(b"\2\0\1\0OB", b"\2\0\1\0XX")
    rejects(bad_vr + body,
            "unknown VR")


def test_unknown_vr() -> None:
    data = small("explicit")
    at = _find(data, 0x0028, 0x0010, b"US")
    rejects(_patch(data, at + 4, b"XX"), f"element (0028,0010) at offset {at} has unknown VR b'XX'")


def test_undefined_length_only_where_allowed() -> None:
    rejects(image(el(0x0020, 0x4000, "UT", b"", UNDEF) + bytes(8)),
            "(0020,4000)", "undefined length but VR UT")
    rejects(image(el(0x0011, 0x1010, "OB", b"", UNDEF) + SEQ_END),
            "(0011,1010)", "undefined length but VR OB")


def test_un_of_undefined_length_is_an_implicit_sequence() -> None:
    inner = iel(0x0011, 0x0010, b"ABCD") + iel(0x0011, 0x1001, b"\1\0\0\0")
    un = el(0x0011, 0x0010, "LO", b"ABCD")
    un += el(0x0011, 0x1010, "UN", item(inner, undefined=True) + SEQ_END, UNDEF)
    assert verify_bytes(image(un))
    rejects(image(el(0x0011, 0x1010, "UN", item(inner, undefined=True), UNDEF)),
            "unexpected tag (0028,0002)", "in sequence (0011,1010)")
    rejects(part10(SOP + el(0x0011, 0x1010, "UN", item(inner, undefined=True), UNDEF)),
            "sequence (0011,1010)", "no Sequence Delimitation Item")
    # Inside the UN, implicit VR rules apply: a cut item is still caught.
    rejects(image(el(0x0011, 0x1010, "UN", iel(0xFFFE, 0xE000, inner, 10_000) + SEQ_END, UNDEF)),
            "in sequence (0011,1010) declares 10000 bytes")
    lying = iel(0xFFFE, 0xE000, inner, len(inner) + 2)
    rejects(image(el(0x0011, 0x1010, "UN", lying + SEQ_END, UNDEF)),
            "needs 8 bytes but only 2 remain")


def test_defined_length_sequences_must_sum_exactly() -> None:
    data = small("explicit")
    at = _find(data, 0x0040, 0x0275, b"SQ")  # Request Attributes Sequence, defined length
    length = struct.unpack_from("<I", data, at + 8)[0]
    rejects(_patch(data, at + 8, struct.pack("<I", length - 2)), "in sequence (0040,0275) declares")
    rejects(_patch(data, at + 8, struct.pack("<I", length + 8)), "in sequence (0040,0275)")
    item_at = at + 12
    item_len = struct.unpack_from("<I", data, item_at + 4)[0]
    rejects(_patch(data, item_at + 4, struct.pack("<I", item_len - 2)))
    body = el(0x0040, 0x0275, "SQ", item(el(0x0008, 0x0100, "SH", b"AB")) + b"\xfe\xff\x00\xe0")
    rejects(image(body), "item header at offset",
            "in sequence (0040,0275) needs 8 bytes but only 4 remain")


def test_implicit_vr_known_sequences_with_defined_length_are_walked() -> None:
    data = small("implicit")
    at = data.index(struct.pack("<HH", 0x0040, 0x0275), 132)
    item_at = at + 8
    assert struct.unpack_from("<HH", data, item_at) == (0xFFFE, 0xE000)
    item_len = struct.unpack_from("<I", data, item_at + 4)[0]
    # The outer length still fits; only walking the items finds the lie.
    rejects(_patch(data, item_at + 4, struct.pack("<I", item_len + 2)),
            "in sequence (0040,0275) declares")


def test_nesting_depth_is_bounded() -> None:
    def nested(depth: int) -> bytes:
        body = el(0x0008, 0x0100, "SH", b"AB")
        for _ in range(depth):
            body = el(0x0008, 0x1032, "SQ", item(body, undefined=True) + SEQ_END, UNDEF)
        return body

    assert verify_bytes(image(nested(MAX_DEPTH)))
    rejects(image(nested(MAX_DEPTH + 1)), f"nested more than {MAX_DEPTH} levels deep")
    bomb = (el(0x0008, 0x1032, "SQ", b"", UNDEF) + iel(0xFFFE, 0xE000, b"", UNDEF)) * 100_000
    rejects(image(bomb), "nested more than")  # not a RecursionError


def test_trailing_bytes_after_the_last_element() -> None:
    data = small("explicit")
    rejects(data + b"\0", f"element header at offset {len(data)} needs 8 bytes but only 1 remain")
    rejects(data + bytes(8), "(0000,0000)", "out of order", "follows (7FE0,0010)")
    padded = data + el(0xFFFC, 0xFFFC, "OB", bytes(6))  # Data Set Trailing Padding is fine
    assert verify_bytes(padded)


def test_missing_sop_instance_uid() -> None:
    rejects(part10(el(0x0008, 0x0016, "UI", ui("1.2.3")) + IMAGE + PIXELS),
            "no SOP Instance UID (0008,0018)")
    rejects(part10(el(0x0008, 0x0018, "UI", b"\0\0") + IMAGE + PIXELS), "no SOP Instance UID")
    summary = verify_bytes(part10(el(0x0008, 0x0018, "UI", ui("1.2.3.4")) + IMAGE + PIXELS))
    assert summary.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"  # from the File Meta
    assert summary.study_instance_uid is None and summary.series_instance_uid is None


def test_uids_are_stripped() -> None:
    body = el(0x0008, 0x0016, "UI", b"1.2.3\0") + el(0x0008, 0x0018, "UI", b" 1.2.4 ")
    body += el(0x0020, 0x000D, "UI", b"1.5\0") + el(0x0020, 0x000E, "UI", b"1.6 ")
    body += IMAGE + PIXELS
    summary = verify_bytes(part10(body))
    assert (summary.sop_class_uid, summary.sop_instance_uid) == ("1.2.3", "1.2.4")
    assert (summary.study_instance_uid, summary.series_instance_uid) == ("1.5", "1.6")


# --- encapsulated pixel data -------------------------------------------------------


def _pixel(data: bytes) -> tuple[int, tuple[tuple[int, int], ...], tuple[int, ...]]:
    pixel = parse_dicom(data).pixel
    assert pixel is not None and pixel.encapsulated
    return pixel.offset, pixel.fragments, pixel.basic_offset_table


def test_fragment_length_running_past_the_end() -> None:
    data = small("rle")
    _, fragments, _ = _pixel(data)
    at = fragments[0][0] - 8
    rejects(_patch(data, at + 4, struct.pack("<I", 10_000)),
            f"fragment at offset {at} declares 10000 bytes but only")
    rejects(_patch(data, at + 4, struct.pack("<I", UNDEF)),
            f"fragment at offset {at} has undefined length")


def test_missing_sequence_delimiter_for_encapsulated_pixel_data() -> None:
    data = small("rle")
    assert data.endswith(SEQ_END)
    rejects(data[:-8], "no Sequence Delimitation Item")
    rejects(_patch(data, len(data) - 8, bytes(8)),
            "unexpected tag (0000,0000)", "in encapsulated Pixel Data",
            expected_length=len(data))
    rejects(_patch(data, len(data) - 4, b"\1\0\0\0"), "Sequence Delimitation Item", "has length 1")


def test_basic_offset_table_rules() -> None:
    data = small("rle", frames=3)
    offset, _fragments, bot = _pixel(data)
    assert len(bot) == 3
    frames_at = _find(data, 0x0028, 0x0008, b"IS")
    assert data[frames_at + 8 : frames_at + 10] == b"3 "
    rejects(_patch(data, frames_at + 8, b"2 "),
            "Basic Offset Table", "3 entries but Number of Frames is 2")
    rejects(_patch(data, offset + 12, struct.pack("<I", bot[1] + 2)), "not the start of a fragment")
    rejects(_patch(data, offset + 12, struct.pack("<I", bot[2])), "not increasing")
    rejects(_patch(data, offset + 4, struct.pack("<I", 10)), "Basic Offset Table", "length 10")
    rejects(_patch(data, offset, struct.pack("<HH", 0xFFFE, 0xE00D)),
            "not a Basic Offset Table item")


def _encapsulated(*items: bytes, frames: int = 1) -> bytes:
    attrs = IMAGE
    if frames > 1:
        attrs = IMAGE[:10] + el(0x0028, 0x0008, "IS", f"{frames} ".encode()) + IMAGE[10:]
    return part10(SOP + attrs + el(0x7FE0, 0x0010, "OB", b"".join(items), UNDEF), RLELossless)


def test_hand_built_encapsulated_pixel_data() -> None:
    empty_bot = iel(0xFFFE, 0xE000)
    frag = iel(0xFFFE, 0xE000, b"abcd")
    summary = verify_bytes(_encapsulated(empty_bot, frag, frag, SEQ_END))
    assert summary.pixel is not None
    assert summary.pixel.basic_offset_table == () and len(summary.pixel.fragments) == 2
    data = _encapsulated(empty_bot, frag, frag, SEQ_END)
    off, n = summary.pixel.fragments[1]
    assert data[off : off + n] == b"abcd"
    rejects(_encapsulated(empty_bot, SEQ_END), "has no fragments")
    bot = iel(0xFFFE, 0xE000, struct.pack("<2I", 0, 12))
    rejects(_encapsulated(bot, frag, frag, SEQ_END), "2 entries but Number of Frames is 1")
    two = verify_bytes(_encapsulated(bot, frag, frag, SEQ_END, frames=2))
    assert two.pixel is not None and two.pixel.basic_offset_table == (0, 12)
    rejects(_encapsulated(empty_bot, frag, iel(0x0008, 0x0010, b""), SEQ_END),
            "unexpected tag (0008,0010)")
    rejects(_encapsulated(empty_bot, frag), "no Sequence Delimitation Item")
    rejects(_encapsulated(iel(0xFFFE, 0xE000, b"", 12)), "Basic Offset Table", "declares 12 bytes")
    rejects(_encapsulated(empty_bot[:6]), "Basic Offset Table item", "needs 8 bytes")


# --- deflated ----------------------------------------------------------------------


def test_deflated_problems() -> None:
    data = small("deflated")
    start = 144 + struct.unpack_from("<I", data, 140)[0]  # after the File Meta group
    body = zlib.decompress(data[start:], -zlib.MAX_WBITS)
    rejects(data[: len(data) - 12], "deflate stream does not end")
    rejects(data + b"junk", "unexpected bytes")
    corrupt = bytearray(data)
    corrupt[start + 3] ^= 0xFF
    with pytest.raises(IntegrityError) as info:
        verify_bytes(bytes(corrupt))
    assert info.value.cause == "parse_failure"
    # Problems inside the inflated data set say where they are.
    damaged = body.replace(b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00XX")
    rewrapped = data[:start] + zlib.compress(damaged, wbits=-zlib.MAX_WBITS)
    rejects(rewrapped, "inflated data set: ", "unknown VR")
    gzip_trailer = struct.pack("<II", zlib.crc32(body), len(body))
    assert verify_bytes(data[:start] + zlib.compress(body, wbits=-zlib.MAX_WBITS) + gzip_trailer)


def test_reasons_name_the_problem_not_a_generic_error() -> None:
    # Every parse failure is an IntegrityError: never struct.error, IndexError or RecursionError.
    data = small("explicit")
    rng = random.Random(7)
    for _ in range(3000):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            corrupt[rng.randrange(128, len(data))] = rng.randrange(256)
        try:
            outcome: DicomSummary | IntegrityError = verify_bytes(corrupt)
        except IntegrityError as err:
            outcome = err
        if isinstance(outcome, IntegrityError):
            assert outcome.cause == "parse_failure" and outcome.reason
        else:
            assert isinstance(outcome, DicomSummary)


# --- mutants found by fuzzing (issue: patient safety) ---------------------------------------

def test_a_vr_flipped_to_one_with_fixed_size_values_is_rejected() -> None:
    """UT -> UV is one bit: the value of a UV must be whole 8-byte numbers, and a text
    value read as one would make a viewer's parser read past it."""
    text = el(0x0018, 0x1030, "UT", b"PROTOCOL X ")  # 12 bytes... then flipped
    good = image(text)
    verify_bytes(good)
    flipped = good.replace(b"UT", b"UV", 1)
    assert flipped != good
    err = rejects(flipped, "VR UV", "not a multiple of 8")
    assert err.cause == "parse_failure"
    for vr, size in (("US", 3), ("UL", 6), ("FD", 12), ("OW", 5)):
        rejects(image(el(0x0018, 0x9999, vr, bytes(size))), f"VR {vr}", "not a multiple")


def test_encapsulated_pixel_data_under_a_native_syntax_is_rejected() -> None:
    fragments = iel(0xFFFE, 0xE000) + iel(0xFFFE, 0xE000, bytes(8)) + SEQ_END
    pixels = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, UNDEF) + fragments
    rejects(image(pixels=pixels), "encapsulated Pixel Data", "native")


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.1.x", "01.2.840.10008.1.2.1",
                                "1.2.840.10008..1.2.1", "1.2.840.10008.1.2.1/../x",
                                "1." + "2" * 70])
def test_a_transfer_syntax_uid_that_is_not_a_uid_is_rejected(ts: str) -> None:
    rejects(meta(ts) + SOP + IMAGE + PIXELS, "Transfer Syntax UID")


def test_the_summary_knows_the_patient_and_the_orthanc_id() -> None:
    from dicomcache.dicom.uids import orthanc_instance_id

    patient = el(0x0010, 0x0020, "LO", b"PAT 42 ")
    summary = verify_bytes(part10(SOP + patient + el(0x0020, 0x000D, "UI", ui("1.2.5"))
                                  + el(0x0020, 0x000E, "UI", ui("1.2.5.6")) + IMAGE + PIXELS))
    assert summary.patient_id == "PAT 42"
    assert summary.orthanc_id == orthanc_instance_id("PAT 42", "1.2.5", "1.2.5.6", "1.2.3.4")
    assert summary.uids_conformant
    odd = verify_bytes(part10(el(0x0008, 0x0016, "UI", ui("1.2.840.10008.5.1.4.1.1.7"))
                              + el(0x0008, 0x0018, "UI", ui("1.2/../x")) + IMAGE + PIXELS))
    assert not odd.uids_conformant  # served as Orthanc holds it, never used as a name


@pytest.mark.parametrize(("charset", "raw", "expected"), [
    (None, b"PAT 42 ", "PAT 42"),                     # ASCII, padding removed
    (None, b"P\xc9REZ", "P\u00c9REZ"),                 # no set named: Latin-1, as Orthanc
    (b"ISO_IR 100", b"P\xc9REZ", "P\u00c9REZ"),
    (b"ISO_IR 192", "患者".encode(), "患者"),
    (b"\\ISO 2022 IR 87", b"\x1b$B45<T\x1b(B1", "患者1"),  # escapes are ASCII bytes
    (b"ISO_IR 144", b"\xbf\xd0", "Па"),
    (b"NOT A SET", b"P\xc9", "P\u00c9"),               # unknown: Latin-1, never an error
])
def test_the_patient_id_is_read_in_its_character_set(charset: bytes | None, raw: bytes,
                                                      expected: str) -> None:
    """Orthanc hashes the Patient ID decoded by (0008,0005): the Orthanc ID must agree."""
    head = el(0x0008, 0x0005, "CS", charset + b" " * (len(charset) % 2)) if charset else b""
    value = raw + b" " * (len(raw) % 2)
    summary = verify_bytes(part10(head + SOP + el(0x0010, 0x0020, "LO", value)
                                  + IMAGE + PIXELS))
    assert summary.patient_id == expected
    assert expected in summary.patient_id_readings()


def _twin(patient: bytes) -> DicomSummary:
    return verify_bytes(part10(SOP + el(0x0010, 0x0020, "LO", patient)
                               + el(0x0020, 0x000D, "UI", ui("1.2.5"))
                               + el(0x0020, 0x000E, "UI", ui("1.2.5.6")) + IMAGE + PIXELS))


def _tags(patient: str, sop: str = "1.2.3.4") -> dict[str, object]:
    return {"0010,0020": patient, "0020,000d": "1.2.5", "0020,000e": "1.2.5.6",
            "0008,0018": sop, "0008,0016": "1.2.840.10008.5.1.4.1.1.7"}


def _oid(patient: str) -> str:
    from dicomcache.dicom.uids import orthanc_instance_id

    return orthanc_instance_id(patient, "1.2.5", "1.2.5.6", "1.2.3.4")


@pytest.mark.parametrize(("body", "asked", "tags", "ok"), [
    (b"PA", _oid("PA"), None, True),                   # the hash agrees: no tags needed
    (b"PB", _oid("PA"), None, False),                  # the same image, another patient
    (b"PB", _oid("PA"), _tags("PA"), False),           # Orthanc's tags do not make it PA
    (b"PB", _oid("PB"), _tags("PB"), True),
    # A Patient ID Orthanc reads in UTF-8 where the data set names no character set:
    (b"P\xc3\xa9", _oid("Pé"), None, False),           # read as Latin-1 here: "PÃ©"
    (b"P\xc3\xa9", _oid("Pé"), _tags("Pé"), True),     # Orthanc's reading is one of ours
    (b"P\xc3\xa9", _oid("Pé"), _tags("Pé", sop="1.2.3.5"), False),  # other UIDs
    (b"P\xc3\xa9", _oid("PX"), _tags("PX"), False),    # not a reading of the body's
])
def test_identity_problem(body: bytes, asked: str, tags: dict[str, object] | None,
                          ok: bool) -> None:
    from dicomcache.dicom.verify import identity_problem

    problem = identity_problem(_twin(body + b" " * (len(body) % 2)), asked, tags)
    assert (problem is None) == ok, problem


# --- lenient parse: what a PACS stores all the same ---------------------------

SOP_REVERSED = el(0x0008, 0x0018, "UI", ui("1.2.3.4")) + \
    el(0x0008, 0x0016, "UI", ui("1.2.840.10008.5.1.4.1.1.7"))


@pytest.mark.parametrize(("data", "problem"), [
    pytest.param(part10(SOP_REVERSED + IMAGE + PIXELS), "(0008,0016) at offset",
                 id="tags out of order"),
    pytest.param(image(pixels=el(0x7FE0, 0x0010, "OW", bytes(10))), "has 10 bytes",
                 id="Pixel Data 2 bytes more"),
    pytest.param(image(pixels=el(0x7FE0, 0x0010, "OW", bytes(6))), "has 6 bytes",
                 id="Pixel Data 2 bytes less"),
    pytest.param(part10(SOP + IMAGE), "Image Pixel attributes (0028,xxxx) but no Pixel Data",
                 id="image attributes without Pixel Data"),
    pytest.param(part10(SOP), "is an image but the data set has no Pixel Data",
                 id="image SOP class without Pixel Data"),
    pytest.param(part10(SOP + PIXELS), "no Rows, Columns, Bits Allocated",
                 id="Pixel Data without image attributes"),
])
def test_lenient_parse_reads_past_what_a_pacs_stores(data: bytes, problem: str) -> None:
    rejects(data, problem)
    summary = parse_dicom(data, lenient=True)
    assert summary.sop_instance_uid == "1.2.3.4"
    assert summary.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert len(summary.problems) == 1 and problem in summary.problems[0]
    assert parse_dicom(data, lenient=True).problems == summary.problems


@pytest.mark.parametrize(("data", "reason"), [
    pytest.param(part10(SOP + el(0x0010, 0x0010, "PN", b"AB", length=100)), "declares 100",
                 id="element longer than what is left"),
    pytest.param(part10(SOP + el(0x0010, 0x0010, "XX", b"AB")), "unknown VR", id="unknown VR"),
    pytest.param(part10(el(0x0008, 0x0016, "UI", ui("1.2.840.10008.5.1.4.1.1.66"))),
                 "no SOP Instance UID", id="no SOP Instance UID"),
    pytest.param(part10(SOP + el(0x0040, 0xA730, "SQ", item(b"", undefined=True), UNDEF)),
                 "no Sequence Delimitation Item", id="sequence without its delimiter"),
])
def test_lenient_parse_still_refuses_what_cannot_be_read(data: bytes, reason: str) -> None:
    rejects(data, reason)
    with pytest.raises(IntegrityError, match=reason):
        parse_dicom(data, lenient=True)


def test_a_strict_parse_has_no_problems_and_knows_where_the_sop_class_came_from() -> None:
    assert parse_dicom(image()).problems == ()
    assert parse_dicom(image()).sop_class_in_dataset
    only_meta = parse_dicom(part10(el(0x0008, 0x0018, "UI", ui("1.2.3.4"))), lenient=True)
    assert only_meta.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"  # the File Meta's
    assert not only_meta.sop_class_in_dataset


def test_lenient_problems_are_bounded() -> None:
    """A sender cannot make the relay keep an unbounded list: 500 tags out of order."""
    body = b"".join(el(0x0009, 0x1000 - n, "LO", b"ab") for n in range(500))
    summary = parse_dicom(part10(SOP + body + IMAGE + PIXELS), lenient=True)
    assert 0 < len(summary.problems) <= 16
