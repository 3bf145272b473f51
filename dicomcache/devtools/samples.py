"""Synthetic, valid DICOM CT instances for the demo, the tests and benchmarks.

Output is deterministic: the same arguments give byte-identical files,
including the UIDs, which are derived from every argument (pass another
``seed`` for a distinct series).  The phantom is a body ellipse with lungs,
a spine, a table and a sphere whose cross-section changes along the series,
plus a fixed noise field; its pieces are cached, so 200 native 512x512 slices
build in well under a second.

Every instance carries nested sequences, with both length encodings, so
parsers see them all: a Procedure Code Sequence (sequence and item of
undefined length), a Request Attributes Sequence (defined lengths) holding a
Scheduled Protocol Code Sequence (undefined lengths), a Referenced Image
Sequence to the neighbouring instance when there is one (undefined sequence,
defined item), a private sequence (undefined, so that implicit VR readers
still see a sequence) and an empty Referenced Performed Procedure Step
Sequence (undefined: just a delimiter).

Single-frame instances are CT Image Storage.  With ``frames > 1`` they are
Enhanced CT Image Storage with shared and per-frame functional groups (the
legacy CT IOD has no multi-frame module); Orthanc stores either.
"""

from __future__ import annotations

import copy
import functools
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, FileMetaDataset, dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "COMPRESSED_SYNTAXES",
    "NATIVE_SYNTAXES",
    "SUPPORTED_SYNTAXES",
    "CodecUnavailableError",
    "encode",
    "make_ct_series",
    "require_encoder",
    "write_series",
]

NATIVE_SYNTAXES: tuple[UID, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)
COMPRESSED_SYNTAXES: tuple[UID, ...] = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
SUPPORTED_SYNTAXES: tuple[UID, ...] = NATIVE_SYNTAXES + COMPRESSED_SYNTAXES

# Encoder plugins to use, fastest first ("" lets pydicom choose).
_PLUGINS: dict[UID, tuple[str, ...]] = {
    RLELossless: ("pylibjpeg", "pydicom"),
    JPEGLSLossless: ("pyjpegls",),
    JPEG2000Lossless: ("pylibjpeg",),
}
_PACKAGES: dict[UID, str] = {
    RLELossless: "numpy (pydicom's own encoder) or pylibjpeg + pylibjpeg-rle",
    JPEGLSLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg + pylibjpeg-openjpeg",
}

_PRIVATE_CREATOR = "DICOMCACHE SAMPLES"
_PRIVATE_GROUP = 0x0009
_FOV_MM = 350.0
_SLICE_MM = 2.5
_STUDY_DATE = "20240102"
_STUDY_TIME = "093000"


class CodecUnavailableError(RuntimeError):
    """The encoder for a requested transfer syntax is not installed."""


def require_encoder(transfer_syntax: str) -> str:
    """Return the pydicom encoding plugin to use for ``transfer_syntax``.

    Returns ``""`` for native syntaxes.  Raises ``CodecUnavailableError``
    naming the packages to install when no plugin is available, and
    ``ValueError`` for a syntax this module does not generate.
    """
    uid = UID(transfer_syntax)
    if uid in NATIVE_SYNTAXES:
        return ""
    if uid not in COMPRESSED_SYNTAXES:
        raise ValueError(f"cannot generate transfer syntax {uid} ({uid.name})")
    from pydicom.pixels.encoders.base import get_encoder

    available = get_encoder(uid).available_plugins
    for plugin in _PLUGINS[uid]:
        if plugin in available:
            return plugin
    raise CodecUnavailableError(
        f"no encoder for {uid.name} ({uid}): install {_PACKAGES[uid]}"
    )


def _uid(*parts: object) -> UID:
    """A UID derived from ``parts``: equal inputs give equal UIDs."""
    return generate_uid(entropy_srcs=["dicomcache.samples", *(repr(p) for p in parts)])


# --- phantom -----------------------------------------------------------------

Array = npt.NDArray[np.int32]


@functools.lru_cache(maxsize=8)
def _phantom(rows: int, columns: int, seed: int) -> tuple[Array, Array, Array]:
    """Static anatomy (stored values, HU + 1024), the sphere's squared radius
    map and a noise field.  Cached and read-only."""
    y, x = np.ogrid[0:rows, 0:columns]
    cy, cx = (rows - 1) / 2, (columns - 1) / 2
    sy, sx = rows / 512, columns / 512

    def inside(ey: float, ex: float, ry: float, rx: float) -> npt.NDArray[np.bool_]:
        mask: npt.NDArray[np.bool_] = ((y - ey) / ry) ** 2 + ((x - ex) / rx) ** 2 <= 1.0
        return mask

    hu = np.full((rows, columns), -1000, dtype=np.int32)  # air
    hu[inside(cy + 10 * sy, cx, 170 * sy, 220 * sx)] = 40  # soft tissue
    hu[inside(cy - 5 * sy, cx - 95 * sx, 95 * sy, 70 * sx)] = -850  # right lung
    hu[inside(cy - 5 * sy, cx + 95 * sx, 95 * sy, 70 * sx)] = -850  # left lung
    hu[inside(cy + 125 * sy, cx, 26 * sy, 24 * sx)] = 700  # vertebra
    hu[inside(cy + 125 * sy, cx, 11 * sy, 10 * sx)] = 60  # spinal canal
    table = (y >= cy + 200 * sy) & (y <= cy + 208 * sy) & (np.abs(x - cx) <= 230 * sx)
    hu[table] = 300
    sphere_r2 = ((y - (cy + 30 * sy)) / sy) ** 2 + ((x - (cx + 20 * sx)) / sx) ** 2
    noise = np.random.default_rng(seed).integers(-12, 13, size=rows * columns, dtype=np.int32)
    arrays = (hu + 1024, np.asarray(sphere_r2, dtype=np.int32), noise)
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _slice_pixels(
    rows: int, columns: int, seed: int, index: int, total: int, bits_allocated: int
) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]:
    base, sphere_r2, noise = _phantom(rows, columns, seed)
    img = base.copy()
    # A sphere (radius 80 px at 512) centred on the middle slice of the series.
    dz = (index - (total - 1) / 2) * 6.0
    r2 = 80.0**2 - dz**2
    if r2 > 0:
        img[sphere_r2 <= r2] = 1024 + 180
    img += np.roll(noise, index * 7919 % noise.size).reshape(rows, columns)
    np.clip(img, 0, 4095, out=img)
    if bits_allocated == 8:
        return (img >> 4).astype(np.uint8)
    return img.astype(np.uint16)


# --- datasets ----------------------------------------------------------------


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "99DCMCACHE"
    item.CodeMeaning = meaning
    return item


def _lengths(ds: Dataset, key: str | int, *, sequence: bool, items: bool) -> None:
    """Choose undefined (True) or defined lengths for sequence ``key`` and its items.

    pydicom writes defined lengths unless told otherwise."""
    elem = ds[key]
    elem.is_undefined_length = sequence
    for item in elem.value:
        item.is_undefined_length_sequence_item = items


def _common(ds: Dataset, *, study_uid: UID, series_uid: UID, patient_id: str,
            patient_name: str, accession_number: str, modality: str, index: int,
            frame_of_reference: UID) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = _STUDY_DATE
    ds.StudyTime = ds.SeriesTime = _STUDY_TIME
    seconds = (9 * 3600 + 30 * 60 + index) % 86400  # one second per instance from 09:30
    ds.ContentTime = ds.AcquisitionTime = (
        f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    )
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = "dicomcache"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "dicomcache synthetic study"
    ds.SeriesDescription = "synthetic phantom"
    ds.ProcedureCodeSequence = DicomSequence([_code("DCC001", "Synthetic phantom")])
    _lengths(ds, "ProcedureCodeSequence", sequence=True, items=True)
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    _lengths(ds, "ReferencedPerformedProcedureStepSequence", sequence=True, items=True)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SliceThickness = f"{_SLICE_MM}"
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""
    request = Dataset()
    request.RequestedProcedureID = "RP1"
    request.ScheduledProcedureStepID = "SPS1"
    request.ScheduledProtocolCodeSequence = DicomSequence([_code("DCC002", "Phantom protocol")])
    _lengths(request, "ScheduledProtocolCodeSequence", sequence=True, items=True)
    ds.RequestAttributesSequence = DicomSequence([request])
    _lengths(ds, "RequestAttributesSequence", sequence=False, items=False)
    block = ds.private_block(_PRIVATE_GROUP, _PRIVATE_CREATOR, create=True)
    note = Dataset()
    note.TextValue = f"slice {index + 1}"
    block.add_new(0x10, "SQ", DicomSequence([note]))
    _lengths(ds, block.get_tag(0x10), sequence=True, items=True)


def _image_pixel_module(ds: Dataset, rows: int, columns: int, bits_allocated: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = 12 if bits_allocated == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0


def _position(rows: int, columns: int, spacing: float, z: float) -> list[str]:
    """Image Position (Patient): the image centred on the axis, at height ``z``."""
    return [f"{-spacing * columns / 2:.4f}", f"{-spacing * rows / 2:.4f}", f"{z:.4f}"]


def _single_frame(ds: Dataset, *, index: int, rows: int, columns: int, spacing: float,
                  bits_allocated: int) -> None:
    z = index * _SLICE_MM
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = _position(rows, columns, spacing, z)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = f"{z:.4f}"
    ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "16" if bits_allocated == 8 else "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"


def _multi_frame(ds: Dataset, *, first_slice: int, frames: int, rows: int, columns: int,
                 spacing: float, series_uid: UID) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.AcquisitionDateTime = _STUDY_DATE + _STUDY_TIME
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.NumberOfFrames = frames
    organization = Dataset()
    organization.DimensionOrganizationUID = _uid("dimension organization", series_uid)
    ds.DimensionOrganizationSequence = DicomSequence([organization])
    ds.DimensionOrganizationType = "3D"
    index_items = []
    for pointer in (0x00209056, 0x00209057):  # Stack ID, In-Stack Position Number
        item = Dataset()
        item.DimensionOrganizationUID = organization.DimensionOrganizationUID
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
        index_items.append(item)
    ds.DimensionIndexSequence = DicomSequence(index_items)

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    measures.SliceThickness = f"{_SLICE_MM}"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    transformation = Dataset()
    transformation.RescaleIntercept = "-1024"
    transformation.RescaleSlope = "1"
    transformation.RescaleType = "HU"
    shared.PixelValueTransformationSequence = DicomSequence([transformation])
    voi = Dataset()
    voi.WindowCenter = "40"
    voi.WindowWidth = "400"
    shared.FrameVOILUTSequence = DicomSequence([voi])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    for f in range(frames):
        z = (first_slice + f) * _SLICE_MM
        group = Dataset()
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = first_slice + f + 1
        content.DimensionIndexValues = [1, first_slice + f + 1]
        group.FrameContentSequence = DicomSequence([content])
        position = Dataset()
        position.ImagePositionPatient = _position(rows, columns, spacing, z)
        group.PlanePositionSequence = DicomSequence([position])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _lengths(ds, "PerFrameFunctionalGroupsSequence", sequence=True, items=True)


def make_ct_series(
    n: int,
    *,
    rows: int = 512,
    columns: int = 512,
    bits_allocated: int = 16,
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "DEMO0001",
    patient_name: str = "DEMO^CT",
    frames: int = 1,
    seed: int = 0,
    accession_number: str | None = None,
    modality: str = "CT",
) -> list[Dataset]:
    """Build ``n`` CT instances of one series, encoded in ``transfer_syntax``.

    Each instance has ``frames`` frames (Enhanced CT when ``frames > 1``,
    which requires ``bits_allocated == 16``); slices are numbered
    consecutively across instances (Instance Number, Image Position (Patient)
    and Slice Location agree).  Datasets carry ``file_meta`` for
    ``write_series``/``encode``.  ``accession_number`` defaults to empty.

    Raises ``ValueError`` for bad sizes or an unsupported syntax and
    ``CodecUnavailableError`` when the syntax's encoder is not installed.
    """
    if n < 0 or rows < 1 or columns < 1 or frames < 1:
        raise ValueError(
            f"need n >= 0 and positive rows, columns, frames; got {n}, {rows}, {columns}, {frames}"
        )
    if rows > 0xFFFF or columns > 0xFFFF:
        raise ValueError("rows and columns must fit in 16 bits")
    if bits_allocated not in (8, 16):
        raise ValueError(f"bits_allocated must be 8 or 16, not {bits_allocated}")
    if frames > 1 and bits_allocated != 16:
        raise ValueError("Enhanced CT (frames > 1) requires bits_allocated == 16")
    syntax = UID(transfer_syntax)
    _check_size(syntax, rows, columns)
    plugin = require_encoder(syntax)
    accession = "" if accession_number is None else accession_number
    params = (n, rows, columns, bits_allocated, str(syntax), patient_id, patient_name,
              frames, seed, accession, modality)
    study = UID(study_uid) if study_uid else _uid("study", *params)
    series = UID(series_uid) if series_uid else _uid("series", study, *params)
    frame_of_reference = _uid("frame of reference", study, series, *params)
    sop_class = EnhancedCTImageStorage if frames > 1 else CTImageStorage
    instance_uids = [_uid("instance", study, series, i, *params) for i in range(n)]
    spacing = _FOV_MM / max(rows, columns)
    total = n * frames

    datasets = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = instance_uids[i]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = instance_uids[i]
        _common(ds, study_uid=study, series_uid=series, patient_id=patient_id,
                patient_name=patient_name, accession_number=accession, modality=modality,
                index=i, frame_of_reference=frame_of_reference)
        if n > 1:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = instance_uids[i - 1 if i else 1]
            ds.ReferencedImageSequence = DicomSequence([ref])
            _lengths(ds, "ReferencedImageSequence", sequence=True, items=False)
        _image_pixel_module(ds, rows, columns, bits_allocated)
        if frames > 1:
            _multi_frame(ds, first_slice=i * frames, frames=frames, rows=rows,
                         columns=columns, spacing=spacing, series_uid=series)
        else:
            _single_frame(ds, index=i, rows=rows, columns=columns, spacing=spacing,
                          bits_allocated=bits_allocated)
        planes = [_slice_pixels(rows, columns, seed, i * frames + f, total, bits_allocated)
                  for f in range(frames)]
        arr = planes[0] if frames == 1 else np.stack(planes)
        _set_pixels(ds, arr, syntax, plugin)
        datasets.append(ds)
    return datasets


def _check_size(syntax: UID, rows: int, columns: int) -> None:
    if syntax == JPEG2000Lossless and min(rows, columns) < 32:
        # openjpeg's encoder always uses 6 resolution levels: 2**5 pixels minimum.
        raise ValueError(f"JPEG 2000 needs rows and columns >= 32, got {rows}x{columns}")


def _set_pixels(ds: Dataset, arr: npt.NDArray[np.generic], syntax: UID, plugin: str) -> None:
    """Store ``arr`` (native byte order) as Pixel Data encoded in ``syntax``."""
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]
    if syntax in COMPRESSED_SYNTAXES:
        ds.compress(syntax, arr, encoding_plugin=plugin, generate_instance_uid=False)
        return
    order: Literal["<", ">"] = ">" if syntax == ExplicitVRBigEndian else "<"
    ds.PixelData = arr.astype(arr.dtype.newbyteorder(order), copy=False).tobytes()
    elem = ds["PixelData"]
    elem.VR = "OW" if arr.dtype.itemsize > 1 else "OB"
    elem.is_undefined_length = False
    ds.file_meta.TransferSyntaxUID = syntax


def encode(ds: Dataset, transfer_syntax: str) -> bytes:
    """Return ``ds`` as a Part-10 file in ``transfer_syntax``.

    ``ds`` is not modified.  When its current syntax differs, the pixels are
    decoded and re-encoded on a copy (SOP Instance UID kept).  Built for
    ``make_ct_series`` datasets; datasets read from files (even big endian or
    RLE ones) convert too, but only generated ones are covered by the tests.
    """
    syntax = UID(transfer_syntax)
    plugin = require_encoder(syntax)
    file_meta = getattr(ds, "file_meta", None)
    current = None if file_meta is None else file_meta.get("TransferSyntaxUID")
    if current != syntax:
        _check_size(syntax, int(ds.Rows), int(ds.Columns))
        arr = ds.pixel_array
        ds = copy.deepcopy(ds)
        _set_pixels(ds, arr, syntax, plugin)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_series(datasets: Iterable[Dataset], directory: str | os.PathLike[str]) -> list[Path]:
    """Write each dataset as ``<SOPInstanceUID>.dcm`` in ``directory`` (created
    if needed), as a Part-10 file in its ``file_meta`` syntax; return the paths
    in input order."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
