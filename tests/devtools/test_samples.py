"""dicomcache.devtools.samples: deterministic, valid synthetic CT instances in every syntax
we serve."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.pixels.encoders import base as pydicom_encoders
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from dicomcache.devtools.samples import (
    COMPRESSED_SYNTAXES,
    SUPPORTED_SYNTAXES,
    CodecUnavailableError,
    encode,
    make_ct_series,
    require_encoder,
    write_series,
)
from dicomcache.dicom.verify import md5_hex, verify_bytes, verify_file


@pytest.fixture
def strict_pydicom(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Reading raises on any invalid value, and any warning is an error."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def strict_read(data: bytes) -> pydicom.Dataset:
    ds = pydicom.dcmread(io.BytesIO(data))
    for elem in ds.iterall():  # converting every raw element validates its value
        _ = elem.value
    return ds


def _series(syntax: str, **kwargs: object) -> list[pydicom.Dataset]:
    try:
        return make_ct_series(transfer_syntax=syntax, **kwargs)  # type: ignore[arg-type]
    except CodecUnavailableError as exc:
        pytest.skip(str(exc))


def test_default_series_is_a_512_kib_per_slice_ct() -> None:
    series = make_ct_series(3)
    assert len(series) == 3
    for i, ds in enumerate(series):
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (512, 512, 16, 12)
        assert len(ds.PixelData) == 512 * 1024
        assert ds.PatientID == "DEMO0001" and ds.PatientName == "DEMO^CT"
        assert ds.AccessionNumber == ""
        assert ds.InstanceNumber == i + 1
        z = float(ds.ImagePositionPatient[2])
        assert z == pytest.approx(float(ds.SliceLocation)) == pytest.approx(i * 2.5)
        assert ds.StudyInstanceUID == series[0].StudyInstanceUID
        assert ds.SeriesInstanceUID == series[0].SeriesInstanceUID
        assert ds.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    assert len({ds.SOPInstanceUID for ds in series}) == 3
    arr = series[0].pixel_array
    assert arr.dtype == np.uint16 and arr.min() >= 0 and arr.max() <= 4095


def test_arguments_are_honoured() -> None:
    (ds,) = make_ct_series(1, rows=64, columns=48, study_uid="1.2.3", series_uid="1.2.3.4",
                           patient_id="P9", patient_name="X^Y", accession_number="ACC1",
                           modality="OT")
    assert (ds.Rows, ds.Columns) == (64, 48) and ds.pixel_array.shape == (64, 48)
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == ("1.2.3", "1.2.3.4")
    assert (ds.PatientID, ds.PatientName) == ("P9", "X^Y")
    assert (ds.AccessionNumber, ds.Modality) == ("ACC1", "OT")
    assert make_ct_series(0) == []


def test_output_is_deterministic_and_seeded() -> None:
    a = [encode(ds, ExplicitVRLittleEndian) for ds in make_ct_series(2, rows=32, columns=32)]
    b = [encode(ds, ExplicitVRLittleEndian) for ds in make_ct_series(2, rows=32, columns=32)]
    assert a == b
    other = make_ct_series(2, rows=32, columns=32, seed=1)
    first = make_ct_series(2, rows=32, columns=32)
    assert other[0].SOPInstanceUID != first[0].SOPInstanceUID
    assert other[0].StudyInstanceUID != first[0].StudyInstanceUID
    assert not np.array_equal(other[0].pixel_array, first[0].pixel_array)
    # A different size under the same UIDs would poison a UID-keyed cache: UIDs differ.
    bigger = make_ct_series(2, rows=64, columns=64, study_uid="1.2.3", series_uid="1.2.3.4")
    smaller = make_ct_series(2, rows=32, columns=32, study_uid="1.2.3", series_uid="1.2.3.4")
    assert bigger[0].SOPInstanceUID != smaller[0].SOPInstanceUID


def test_phantom_varies_along_the_series() -> None:
    series = make_ct_series(21, rows=128, columns=128)
    # pixels within the noise of the sphere's value (180 HU + 1024)
    sphere = [int(np.count_nonzero(np.abs(ds.pixel_array.astype(int) - 1204) <= 12))
              for ds in series]
    assert sphere[10] > sphere[0] and sphere[10] > sphere[20]  # a sphere centred mid-series
    air = series[0].pixel_array[0, 0]
    assert air < 100  # -1000 HU + 1024, plus a little noise


def test_nested_sequences_with_both_length_encodings(strict_pydicom: None) -> None:
    series = make_ct_series(2, rows=16, columns=16)
    ds = strict_read(encode(series[0], ExplicitVRLittleEndian))
    assert ds["ProcedureCodeSequence"].is_undefined_length
    assert ds.ProcedureCodeSequence[0].is_undefined_length_sequence_item
    assert not ds["RequestAttributesSequence"].is_undefined_length
    assert not ds.RequestAttributesSequence[0].is_undefined_length_sequence_item
    assert ds.RequestAttributesSequence[0]["ScheduledProtocolCodeSequence"].is_undefined_length
    assert len(ds.ReferencedPerformedProcedureStepSequence) == 0
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == series[1].SOPInstanceUID
    block = ds.private_block(0x0009, "DICOMCACHE SAMPLES")
    assert block[0x10].VR == "SQ" and block[0x10].value[0].TextValue == "slice 1"
    (single,) = make_ct_series(1, rows=16, columns=16)
    assert "ReferencedImageSequence" not in single


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("syntax", SUPPORTED_SYNTAXES, ids=lambda s: s.name)
def test_every_syntax_round_trips_through_pydicom(
    strict_pydicom: None, syntax: str, frames: int
) -> None:
    series = _series(syntax, n=2, rows=32, columns=32, frames=frames)
    reference = make_ct_series(2, rows=32, columns=32, frames=frames)
    for ds, ref in zip(series, reference, strict=True):
        assert ds.file_meta.TransferSyntaxUID == syntax
        data = encode(ds, syntax)
        back = strict_read(data)
        assert back.file_meta.TransferSyntaxUID == syntax
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        np.testing.assert_array_equal(back.pixel_array, ref.pixel_array)  # lossless
        summary = verify_bytes(data, expected_length=len(data), expected_md5=md5_hex(data))
        assert summary.sop_instance_uid == ds.SOPInstanceUID
        if syntax in COMPRESSED_SYNTAXES:
            assert summary.pixel is not None and summary.pixel.encapsulated
            assert len(summary.pixel.basic_offset_table) == frames


def test_multiframe_is_enhanced_ct(strict_pydicom: None) -> None:
    series = make_ct_series(2, rows=32, columns=32, frames=4)
    first, second = (strict_read(encode(ds, ExplicitVRLittleEndian)) for ds in series)
    assert first.SOPClassUID == EnhancedCTImageStorage
    assert first.NumberOfFrames == 4 and first.pixel_array.shape == (4, 32, 32)
    assert len(first.PerFrameFunctionalGroupsSequence) == 4
    shared = first.SharedFunctionalGroupsSequence[0]
    assert shared.PixelMeasuresSequence[0].PixelSpacing[0] > 0
    z = [float(g.PlanePositionSequence[0].ImagePositionPatient[2])
         for ds in (first, second) for g in ds.PerFrameFunctionalGroupsSequence]
    assert z == pytest.approx([i * 2.5 for i in range(8)])  # slices continue across instances
    positions = [g.FrameContentSequence[0].InStackPositionNumber
                 for ds in (first, second) for g in ds.PerFrameFunctionalGroupsSequence]
    assert positions == list(range(1, 9))


def test_eight_bit(strict_pydicom: None) -> None:
    (ds,) = make_ct_series(1, rows=16, columns=16, bits_allocated=8)
    for syntax in (ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian):
        back = strict_read(encode(ds, syntax))
        assert back.pixel_array.dtype == np.uint8 and back.BitsStored == 8
        np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
    assert len(ds.PixelData) == 256


def test_encode_converts_and_leaves_the_input_alone(strict_pydicom: None) -> None:
    (ds,) = make_ct_series(1, rows=32, columns=32)
    before = (ds.file_meta.TransferSyntaxUID, ds.PixelData)
    for syntax in SUPPORTED_SYNTAXES:
        try:
            data = encode(ds, syntax)
        except CodecUnavailableError:
            continue
        back = strict_read(data)
        assert back.file_meta.TransferSyntaxUID == syntax
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
        verify_bytes(data)
    assert (ds.file_meta.TransferSyntaxUID, ds.PixelData) == before
    # From a compressed source as well.
    (rle,) = _series(RLELossless, n=1, rows=32, columns=32)
    for syntax in (ExplicitVRBigEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        back = strict_read(encode(rle, syntax))
        np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
    assert rle.file_meta.TransferSyntaxUID == RLELossless


def test_write_series(tmp_path: Path) -> None:
    series = make_ct_series(3, rows=16, columns=16, transfer_syntax=ImplicitVRLittleEndian)
    paths = write_series(series, tmp_path / "new" / "dir")
    assert [p.name for p in paths] == [f"{ds.SOPInstanceUID}.dcm" for ds in series]
    for path, ds in zip(paths, series, strict=True):
        assert path.read_bytes() == encode(ds, ImplicitVRLittleEndian)
        assert verify_file(path).sop_instance_uid == ds.SOPInstanceUID
    assert write_series(series[:1], str(tmp_path / "new" / "dir")) == paths[:1]  # overwrites


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bits_allocated"):
        make_ct_series(1, bits_allocated=12)
    with pytest.raises(ValueError, match="Enhanced CT"):
        make_ct_series(1, frames=2, bits_allocated=8)
    with pytest.raises(ValueError, match="positive"):
        make_ct_series(1, rows=0)
    with pytest.raises(ValueError, match="cannot generate"):
        make_ct_series(1, transfer_syntax=JPEGBaseline8Bit)
    with pytest.raises(ValueError, match=">= 32"):
        make_ct_series(1, rows=16, columns=16, transfer_syntax=JPEG2000Lossless)
    (tiny,) = make_ct_series(1, rows=16, columns=16)
    with pytest.raises(ValueError, match=">= 32"):
        encode(tiny, JPEG2000Lossless)


def test_require_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_encoder(ExplicitVRBigEndian) == ""
    assert require_encoder(RLELossless) in ("pylibjpeg", "pydicom")  # RLE always has numpy's
    # No encoding plugin installed, as pydicom would report it.
    monkeypatch.setattr(pydicom_encoders, "get_encoder",
                        lambda uid: SimpleNamespace(available_plugins=()))
    with pytest.raises(CodecUnavailableError, match="install") as info:
        make_ct_series(1, rows=8, columns=8, transfer_syntax=RLELossless)
    assert isinstance(info.value, RuntimeError)
