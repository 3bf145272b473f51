"""Integrity checks for DICOM Part-10 bodies: length, MD5 and a strict parse.

The parse is a hand-written, bounds-checked walk over every element of the
file.  It exists so that a truncated or corrupted body (the cause of
dicomParser's "parseDicomDataSetExplicit: buffer overrun") is rejected before
it is stored or served.  It never copies pixel data and never loops over
pixel bytes in Python: values are skipped by their declared length, so the
cost depends on the number of elements, not on the size of the file.

What the walk enforces
----------------------
* 128-byte preamble, ``DICM``, a File Meta group (0002) in explicit VR little
  endian whose Group Length (0002,0000), when present, matches the group, and
  a Transfer Syntax UID (0002,0010).
* The data set in its transfer syntax: implicit VR LE, explicit VR LE (also
  every encapsulated syntax), explicit VR BE, and deflated explicit VR LE
  (inflated with raw deflate, then walked).
* Every element, item and fragment fits in what remains of the buffer and of
  its enclosing defined-length item or sequence; undefined lengths only for
  SQ, UN (walked as an implicit VR LE sequence, PS3.5 6.2.2) and encapsulated
  Pixel Data; undefined-length items and sequences end with their delimiter
  inside their container; nesting is limited to ``MAX_DEPTH`` data sets.
* Tags are strictly ascending inside each data set.
* Pixel Data (7FE0,0010), at any nesting level (an icon image is checked
  against its own Rows/Columns; in a nested item without image attributes it
  is opaque): native values have exactly the length given
  by the image attributes (plus one pad byte when that is odd); encapsulated
  values are a Basic Offset Table item, one or more fragments and a Sequence
  Delimitation Item, and a non-empty table has one entry per frame, each
  pointing at a fragment.
* The buffer ends exactly after the last element.
* A SOP Instance UID is present, and so is a SOP Class UID (from the File Meta
  if the data set has none).  A data set with Image Pixel attributes
  (0028,0002/0004/0100), or whose SOP class is in ``IMAGE_SOP_CLASSES``, has
  Pixel Data (or Float / Double Float Pixel Data): without this rule a body cut
  exactly at an element boundary before the pixels would pass, since nothing
  in a Part-10 file records its total length.  A header-only CT is rejected.
  The remaining blind spot: a non-image object (SR, RT plan...) cut exactly
  at a top-level element boundary still parses; only ``expected_length`` or
  ``expected_md5`` catch that.

Lenient parse
-------------
``parse_dicom(data, lenient=True)`` is the relay's reading of what a modality
sends (a PACS stores more than a viewer can use): tags out of order, a native
Pixel Data length that does not match the image attributes, missing or unusable
image attributes, a Basic Offset Table that does not match the fragments, and an
image without Pixel Data are listed in ``DicomSummary.problems`` (at most
``_MAX_PROBLEMS``) instead of raising.  Every bounds check stays: what does not
fit, lacks a delimiter, or has no SOP Instance UID or SOP Class UID still raises.
The cache never parses leniently: what it serves to a viewer passes every check.

Implicit VR and sequences
-------------------------
With implicit VR the VR is not in the file.  An element of undefined length is
walked as a sequence (the only other undefined-length element, encapsulated
Pixel Data, cannot occur in an implicit VR syntax but is accepted by tag).  An
element of *defined* length is walked as a sequence only when its tag is in
``KNOWN_SQ_TAGS``, a short list of common sequence attributes; any other
defined-length value is opaque, still bounds-checked by its length.

Deflated data sets
------------------
For Deflated Explicit VR Little Endian the walk runs over the inflated data
set, so offsets in reasons refer to the inflated bytes (the reason says so) and
``DicomSummary.pixel`` is ``None``: offsets into a buffer the caller does not
hold would be misleading.  The inflated size is capped at ``MAX_INFLATED``.
After the deflate stream only a NUL pad byte, or a gzip-style trailer whose
CRC-32 and size match the inflated data (seen in the wild), may follow.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import re
import struct
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn, TypeAlias

from pydicom.charset import convert_encodings, decode_bytes

from dicomcache.dicom import syntaxes
from dicomcache.dicom.uids import is_uid, orthanc_instance_id
from dicomcache.errors import Cause, IntegrityError

__all__ = [
    "IDENTITY_TAGS",
    "IMAGE_SOP_CLASSES",
    "KNOWN_SQ_TAGS",
    "MAX_DEPTH",
    "MAX_INFLATED",
    "DicomSummary",
    "IntegrityError",
    "PixelInfo",
    "identity_problem",
    "md5_hex",
    "parse_dicom",
    "verify_bytes",
    "verify_file",
]


Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap


@dataclass(frozen=True, slots=True)
class PixelInfo:
    """Where the top-level Pixel Data (7FE0,0010) lives in the file.

    ``offset`` is the file offset of the value (after the element header).
    For native data ``length`` is the value length and ``fragments`` is empty;
    for encapsulated data ``length`` is ``None`` and ``fragments`` lists the
    (offset, length) of each fragment value after the Basic Offset Table item.
    """

    offset: int
    length: int | None
    encapsulated: bool
    fragments: tuple[tuple[int, int], ...]
    basic_offset_table: tuple[int, ...]
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    number_of_frames: int


@dataclass(frozen=True, slots=True)
class DicomSummary:
    """What a successful parse learnt about a file.

    ``size`` is the size of the buffer given (the file, not an inflated data
    set).  ``pixel`` is ``None`` when there is no top-level Pixel Data or the
    transfer syntax is deflated.
    """

    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    size: int
    pixel: PixelInfo | None
    #: Patient ID (0010,0020) as Orthanc keys it: decoded by the data set's Specific
    #: Character Set, surrounding spaces and NULs removed.
    patient_id: str = ""
    #: Its bytes as stored (padding removed): other readings of a non-ASCII Patient ID.
    patient_id_bytes: bytes = b""
    #: What the strict walk would have refused, when a lenient parse read past it
    #: (``parse_dicom(..., lenient=True)``); always empty after a strict parse.
    problems: tuple[str, ...] = ()
    #: The SOP Class UID came from the data set (0008,0016), not from the File Meta.
    sop_class_in_dataset: bool = True

    def patient_id_readings(self) -> set[str]:
        """The texts the stored Patient ID can be read as: its Specific Character Set,
        Latin-1 (Orthanc's default when none is named) and UTF-8."""
        raw = self.patient_id_bytes
        return {self.patient_id, raw.decode("latin-1"), raw.decode("utf-8", "replace")}

    @property
    def orthanc_id(self) -> str:
        """The Orthanc instance ID these four identifiers give (what Orthanc keys it by)."""
        return orthanc_instance_id(self.patient_id, self.study_instance_uid or "",
                                   self.series_instance_uid or "", self.sop_instance_uid)

    @property
    def uids_conformant(self) -> bool:
        """Whether its identifying UIDs follow the UI grammar (PS3.5 §9.1).  A body whose
        UIDs do not is still served (it is what Orthanc holds) but never used as a name."""
        return all(is_uid(u or "") for u in (self.sop_instance_uid, self.study_instance_uid,
                                              self.series_instance_uid, self.sop_class_uid))


MAX_DEPTH = 64
"""Deepest nesting of data sets (items) accepted, against recursion bombs."""

MAX_INFLATED = 1 << 30
"""Largest inflated data set accepted for Deflated Explicit VR Little Endian."""


_PREAMBLE = 128
_UNDEFINED = 0xFFFFFFFF

_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD

_META_GROUP_LENGTH = 0x00020000
_MEDIA_SOP_CLASS = 0x00020002
_MEDIA_SOP_INSTANCE = 0x00020003
_TRANSFER_SYNTAX = 0x00020010

_PATIENT_ID = 0x00100020
_CHARSET = 0x00080005
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_SAMPLES_PER_PIXEL = 0x00280002
_PHOTOMETRIC = 0x00280004
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100
_FLOAT_PIXEL_DATA = 0x7FE00008
_DOUBLE_PIXEL_DATA = 0x7FE00009
_PIXEL_DATA = 0x7FE00010

_UID_TAGS = frozenset({_SOP_CLASS, _SOP_INSTANCE, _STUDY_UID, _SERIES_UID})
_US_TAGS = frozenset({_SAMPLES_PER_PIXEL, _ROWS, _COLUMNS, _BITS_ALLOCATED})
_PIXEL_TAGS = frozenset({_FLOAT_PIXEL_DATA, _DOUBLE_PIXEL_DATA, _PIXEL_DATA})
_IMAGE_PIXEL_TAGS = frozenset({_SAMPLES_PER_PIXEL, _PHOTOMETRIC, _BITS_ALLOCATED})
_INTERESTING = _UID_TAGS | _US_TAGS | _PIXEL_TAGS | {_PHOTOMETRIC, _NUMBER_OF_FRAMES,
                                                     _PATIENT_ID, _CHARSET}
_MAX_PROBLEMS = 16  # a lenient walk lists this many (a bound on what a sender makes us keep)
_NOT_AN_INTEGER = -1  # recorded for an unreadable Number of Frames; only fatal with Pixel Data

# VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO",
        b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)
#: Binary VRs whose value is a whole number of fixed-size numbers (PS3.5 6.2): a
#: length that is not a multiple is a damaged header (a flipped VR, a cut value),
#: which a viewer's parser would read past.
_VALUE_MULTIPLE = {
    b"FD": 8, b"SV": 8, b"UV": 8, b"OD": 8, b"OV": 8,
    b"FL": 4, b"SL": 4, b"UL": 4, b"AT": 4, b"OF": 4, b"OL": 4,
    b"SS": 2, b"US": 2, b"OW": 2,
}

KNOWN_SQ_TAGS = frozenset(
    {
        0x00080082,  # Institution Code Sequence
        0x00081032,  # Procedure Code Sequence
        0x00081084,  # Admitting Diagnoses Code Sequence
        0x00081110,  # Referenced Study Sequence
        0x00081111,  # Referenced Performed Procedure Step Sequence
        0x00081115,  # Referenced Series Sequence
        0x00081120,  # Referenced Patient Sequence
        0x00081140,  # Referenced Image Sequence
        0x00081199,  # Referenced SOP Sequence
        0x00081250,  # Related Series Sequence
        0x00082112,  # Source Image Sequence
        0x00089215,  # Derivation Code Sequence
        0x00101002,  # Other Patient IDs Sequence
        0x00189301,  # CT Acquisition Type Sequence
        0x00209111,  # Frame Content Sequence
        0x00209113,  # Plane Position Sequence
        0x00209116,  # Plane Orientation Sequence
        0x00209221,  # Dimension Organization Sequence
        0x00209222,  # Dimension Index Sequence
        0x00283000,  # Modality LUT Sequence
        0x00283010,  # VOI LUT Sequence
        0x00289110,  # Pixel Measures Sequence
        0x00289145,  # Pixel Value Transformation Sequence
        0x00321064,  # Requested Procedure Code Sequence
        0x00400008,  # Scheduled Protocol Code Sequence
        0x00400260,  # Performed Protocol Code Sequence
        0x00400275,  # Request Attributes Sequence
        0x00400555,  # Acquisition Context Sequence
        0x0040A043,  # Concept Name Code Sequence
        0x0040A168,  # Concept Code Sequence
        0x0040A730,  # Content Sequence
        0x00540016,  # Radiopharmaceutical Information Sequence
        0x00880200,  # Icon Image Sequence
        0x30060020,  # Structure Set ROI Sequence
        0x30060039,  # ROI Contour Sequence
        0x30060040,  # Contour Sequence
        0x300A00B0,  # Beam Sequence
        0x04000550,  # Modified Attributes Sequence
        0x04000561,  # Original Attributes Sequence
        0x52009229,  # Shared Functional Groups Sequence
        0x52009230,  # Per-Frame Functional Groups Sequence
    }
)
"""Tags walked as sequences when they have a defined length in implicit VR."""

IMAGE_SOP_CLASSES = frozenset(
    "1.2.840.10008.5.1.4.1.1." + suffix
    for suffix in (
        "1", "1.1", "1.1.1", "1.2", "1.2.1", "1.3", "1.3.1",  # CR, DX, MG, IO
        "2", "2.1", "2.2",  # CT, Enhanced CT, Legacy Converted Enhanced CT
        "3.1", "6.1", "6.2",  # US
        "4", "4.1", "4.3", "4.4",  # MR
        "7", "7.1", "7.2", "7.3", "7.4",  # Secondary Capture
        "12.1", "12.1.1", "12.2", "12.2.1",  # XA, XRF
        "13.1.3",  # Breast Tomosynthesis
        "20", "128", "128.1", "130",  # NM, PET
        "66.4",  # Segmentation
        "77.1.1", "77.1.2", "77.1.3", "77.1.4", "77.1.6",  # VL
        "481.1",  # RT Image
    )
)
"""Storage SOP classes whose instances must carry Pixel Data.

Together with "Image Pixel attributes imply Pixel Data", this catches a body
cut exactly at an element boundary before (7FE0,0010), which no length check
inside the file can see."""


_LE_TAG = struct.Struct("<HH")
_LE_TAG_LEN = struct.Struct("<HHI")
_LE_EXPLICIT = struct.Struct("<HH2sH")
_LE_U16 = struct.Struct("<H")
_LE_U32 = struct.Struct("<I")
_BE_TAG_LEN = struct.Struct(">HHI")
_BE_EXPLICIT = struct.Struct(">HH2sH")
_BE_U16 = struct.Struct(">H")
_BE_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class _Codec:
    """How elements are encoded at one point of the walk."""

    explicit: bool
    little: bool
    tag_len: struct.Struct  # tag + 4-byte length: items, and implicit VR elements
    header: struct.Struct  # explicit VR short header: tag, VR, 2-byte length
    u16: struct.Struct
    u32: struct.Struct


_IMPLICIT_LE = _Codec(False, True, _LE_TAG_LEN, _LE_EXPLICIT, _LE_U16, _LE_U32)
_EXPLICIT_LE = _Codec(True, True, _LE_TAG_LEN, _LE_EXPLICIT, _LE_U16, _LE_U32)
_EXPLICIT_BE = _Codec(True, False, _BE_TAG_LEN, _BE_EXPLICIT, _BE_U16, _BE_U32)


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _read(buf: Buffer, pos: int, size: int) -> bytes:
    """Copy ``size`` bytes at ``pos`` (callers have bounds-checked them)."""
    value: bytes = struct.unpack_from(f"{size}s", buf, pos)[0]
    return value


def _fail(reason: str) -> NoReturn:
    raise IntegrityError(Cause.PARSE_FAILURE, reason)


class _Walker:
    """One walk over a data set buffer; collects what the summary needs."""

    __slots__ = ("buf", "native", "pixel", "problems", "top", "uids", "where")

    def __init__(self, buf: Buffer, where: str, native: bool, lenient: bool = False) -> None:
        self.buf = buf
        #: Lenient walk: what :meth:`problem` notes (None: strict, a problem fails).
        self.problems: list[str] | None = [] if lenient else None
        self.where = where  # prefix for reasons ("" or "inflated data set: ")
        #: The transfer syntax is a native one: Pixel Data must not be encapsulated.
        self.native = native
        self.uids: dict[int, bytes] = {}
        self.pixel: PixelInfo | None = None
        self.top: dict[int, int] = {}  # image attributes of the top-level data set

    def fail(self, reason: str) -> NoReturn:
        _fail(self.where + reason)

    def problem(self, reason: str) -> None:
        """A problem a lenient walk can read past (the layout of the bytes is still
        known): noted when lenient, fatal when strict."""
        if self.problems is None:
            self.fail(reason)
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(self.where + reason)

    def dataset(self, pos: int, end: int, c: _Codec, depth: int, undefined: bool) -> int:
        """Walk a data set from ``pos``; return the offset just after it.

        A defined-length data set (``undefined`` false) must end exactly at
        ``end``; an undefined-length item must meet its Item Delimitation
        Item before ``end``.
        """
        if depth > MAX_DEPTH:
            self.fail(f"data set at offset {pos} is nested more than {MAX_DEPTH} levels deep")
        buf = self.buf
        start = pos
        prev = -1
        image: dict[int, int] = {}
        if depth == 0:
            self.top = image
        explicit = c.explicit
        while pos < end:
            if end - pos < 8:
                self.fail(
                    f"element header at offset {pos} needs 8 bytes but only {end - pos} remain"
                )
            if explicit:
                group, elem, vr, length = c.header.unpack_from(buf, pos)
            else:
                group, elem, length = c.tag_len.unpack_from(buf, pos)
                vr = b""
            tag = group << 16 | elem
            if group == 0xFFFE:
                if explicit:
                    length = c.u32.unpack_from(buf, pos + 4)[0]
                if tag == _ITEM_DELIM and undefined:
                    if length != 0:
                        self.fail(
                            f"Item Delimitation Item at offset {pos} has length {length}, not 0"
                        )
                    return pos + 8
                self.fail(f"unexpected delimiter tag {_tag(tag)} at offset {pos} in a data set")
            if tag <= prev:
                self.problem(
                    f"element {_tag(tag)} at offset {pos} is out of order: it follows {_tag(prev)}"
                )
            prev = max(prev, tag)
            if explicit:
                if vr in _LONG_VRS:
                    if end - pos < 12:
                        self.fail(
                            f"element {_tag(tag)} at offset {pos} with VR {vr.decode()} "
                            f"needs a 12-byte header but only {end - pos} bytes remain"
                        )
                    length = c.u32.unpack_from(buf, pos + 8)[0]
                    vpos = pos + 12
                elif vr in _SHORT_VRS:
                    vpos = pos + 8
                else:
                    self.fail(f"element {_tag(tag)} at offset {pos} has unknown VR {vr!r}")
                is_sq = vr == b"SQ"
            else:
                vpos = pos + 8
                is_sq = length == _UNDEFINED or tag in KNOWN_SQ_TAGS

            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and vr in (b"OB", b"OW", b""):
                    if self.native:
                        self.fail(f"encapsulated Pixel Data at offset {pos} under a native "
                                  "(uncompressed) transfer syntax")
                    pos = self.encapsulated(vpos, end, c, image, depth)
                elif is_sq:
                    pos = self.sequence(vpos, end, c, depth, True, tag, pos)
                elif vr == b"UN":
                    # PS3.5 6.2.2: an undefined-length UN is an implicit VR LE sequence.
                    pos = self.sequence(vpos, end, _IMPLICIT_LE, depth, True, tag, pos)
                else:
                    self.fail(
                        f"element {_tag(tag)} at offset {pos} has undefined length "
                        f"but VR {vr.decode()}"
                    )
                continue

            if length > end - vpos:
                self.fail(
                    f"element {_tag(tag)} at offset {pos} declares {length} bytes "
                    f"but only {end - vpos} remain"
                )
            if explicit and length % _VALUE_MULTIPLE.get(vr, 1):
                self.fail(
                    f"element {_tag(tag)} at offset {pos} has VR {vr.decode()} and "
                    f"{length} bytes, not a multiple of {_VALUE_MULTIPLE[vr]}"
                )
            if is_sq:
                self.sequence(vpos, vpos + length, c, depth, False, tag, pos)
            elif tag in _INTERESTING:
                self.interesting(tag, vpos, length, c, image, depth)
            pos = vpos + length
        if undefined:
            self.fail(
                f"item starting at offset {start} has no Item Delimitation Item "
                f"before offset {end}"
            )
        return pos

    def sequence(
        self, pos: int, end: int, c: _Codec, depth: int, undefined: bool, tag: int, at: int
    ) -> int:
        """Walk the items of sequence ``tag`` (header at ``at``); return its end."""
        buf = self.buf
        tag_len = c.tag_len
        while pos < end:
            if end - pos < 8:
                self.fail(
                    f"item header at offset {pos} in sequence {_tag(tag)} needs 8 bytes "
                    f"but only {end - pos} remain"
                )
            group, elem, length = tag_len.unpack_from(buf, pos)
            item_tag = group << 16 | elem
            if item_tag == _ITEM:
                vpos = pos + 8
                if length == _UNDEFINED:
                    pos = self.dataset(vpos, end, c, depth + 1, True)
                else:
                    if length > end - vpos:
                        self.fail(
                            f"item at offset {pos} in sequence {_tag(tag)} declares "
                            f"{length} bytes but only {end - vpos} remain"
                        )
                    pos = self.dataset(vpos, vpos + length, c, depth + 1, False)
            elif item_tag == _SEQ_DELIM and undefined:
                if length != 0:
                    self.fail(
                        f"Sequence Delimitation Item at offset {pos} has length {length}, not 0"
                    )
                return pos + 8
            else:
                self.fail(
                    f"unexpected tag {_tag(item_tag)} at offset {pos} in sequence {_tag(tag)}"
                )
        if undefined:
            self.fail(
                f"sequence {_tag(tag)} at offset {at} has no Sequence Delimitation Item "
                f"before offset {end}"
            )
        return pos

    def interesting(
        self, tag: int, vpos: int, length: int, c: _Codec, image: dict[int, int], depth: int
    ) -> None:
        """Record an attribute the summary or the pixel checks need."""
        if tag in _US_TAGS:
            if length >= 2:
                image[tag] = c.u16.unpack_from(self.buf, vpos)[0]
        elif tag == _NUMBER_OF_FRAMES:
            text = _read(self.buf, vpos, length).strip(b" \x00")
            if text:
                image[tag] = int(text) if text.isdigit() else _NOT_AN_INTEGER
        elif tag == _PHOTOMETRIC:
            # Only YBR_FULL_422 changes the native size (two samples per pixel).
            image[tag] = int(_read(self.buf, vpos, length).rstrip(b" \x00") == b"YBR_FULL_422")
        elif tag == _PIXEL_DATA:
            self.native_pixels(vpos, length, image, depth)
        elif tag in _PIXEL_TAGS:
            image[tag] = 1  # Float / Double Float Pixel Data: opaque
        elif depth == 0:
            self.uids[tag] = _read(self.buf, vpos, length)

    def image_attrs(self, at: int, image: dict[int, int]
                    ) -> tuple[int, int, int, int, int] | None:
        """Rows, Columns, Samples per Pixel, Bits Allocated, Number of Frames (None: a
        lenient walk noted that they are missing or unusable)."""
        missing = [
            name
            for name, tag in (
                ("Rows", _ROWS), ("Columns", _COLUMNS), ("Bits Allocated", _BITS_ALLOCATED)
            )
            if tag not in image
        ]
        if missing:
            self.problem(f"Pixel Data at offset {at} but no {', '.join(missing)} in its data set")
            return None
        frames = image.get(_NUMBER_OF_FRAMES, 1)
        if frames == _NOT_AN_INTEGER:
            self.problem(
                f"Pixel Data at offset {at} but Number of Frames (0028,0008) is not an integer"
            )
            return None
        if frames < 1:
            self.problem(f"Pixel Data at offset {at} but Number of Frames is {frames}")
            return None
        return (
            image[_ROWS],
            image[_COLUMNS],
            image.get(_SAMPLES_PER_PIXEL, 1),
            image[_BITS_ALLOCATED],
            frames,
        )

    def native_pixels(self, vpos: int, length: int, image: dict[int, int], depth: int) -> None:
        image[_PIXEL_DATA] = 1
        if depth > 0 and not {_ROWS, _COLUMNS, _BITS_ALLOCATED} <= image.keys():
            return  # Pixel Data in a (private) item that is not an image: opaque
        attrs = self.image_attrs(vpos, image)
        if attrs is None:
            return
        rows, columns, spp, bits, frames = attrs
        # YBR_FULL_422 stores Y1 Y2 Cb Cr per pair of pixels: 2 samples per pixel.
        samples = 2 if spp == 3 and image.get(_PHOTOMETRIC) else spp
        expected = (rows * columns * samples * frames * bits + 7) // 8
        if length != expected and not (expected % 2 == 1 and length == expected + 1):
            self.problem(
                f"Pixel Data (7FE0,0010) at offset {vpos} has {length} bytes but "
                f"{rows}x{columns}x{samples} samples x {bits} bits x {frames} frames "
                f"need {expected}"
            )
        if depth == 0:
            self.pixel = PixelInfo(
                vpos, length, False, (), (), rows, columns, spp, bits, frames
            )

    def encapsulated(
        self, vpos: int, end: int, c: _Codec, image: dict[int, int], depth: int
    ) -> int:
        """Walk encapsulated Pixel Data whose value starts at ``vpos``; return its end."""
        image[_PIXEL_DATA] = 1
        attrs = self.image_attrs(vpos, image)
        rows, columns, spp, bits, frames = attrs or (0, 0, 0, 0, 0)
        buf = self.buf
        tag_len = c.tag_len
        if end - vpos < 8:
            self.fail(
                f"Basic Offset Table item at offset {vpos} needs 8 bytes "
                f"but only {end - vpos} remain"
            )
        group, elem, bot_len = tag_len.unpack_from(buf, vpos)
        if group << 16 | elem != _ITEM:
            self.fail(
                f"encapsulated Pixel Data at offset {vpos} starts with "
                f"{_tag(group << 16 | elem)}, not a Basic Offset Table item"
            )
        if bot_len == _UNDEFINED or bot_len % 4:
            self.fail(
                f"Basic Offset Table at offset {vpos} has length {bot_len}, not a multiple of 4"
            )
        if bot_len > end - vpos - 8:
            self.fail(
                f"Basic Offset Table at offset {vpos} declares {bot_len} bytes "
                f"but only {end - vpos - 8} remain"
            )
        table_len = bot_len
        if bot_len and bot_len // 4 != frames:  # checked before unpacking a huge table
            if attrs is not None:
                self.problem(
                    f"Basic Offset Table at offset {vpos} has {bot_len // 4} entries "
                    f"but Number of Frames is {frames}"
                )
            table_len = 0  # read past unchecked: the fragments are walked all the same
        order = "<" if c.little else ">"
        bot: tuple[int, ...] = struct.unpack_from(f"{order}{table_len // 4}I", buf, vpos + 8)
        first: int = vpos + 8 + bot_len
        pos = first
        starts: list[int] = []
        fragments: list[tuple[int, int]] = []
        while True:
            if end - pos < 8:
                self.fail(
                    f"encapsulated Pixel Data: item header at offset {pos} needs 8 bytes "
                    f"but only {end - pos} remain (no Sequence Delimitation Item)"
                )
            group, elem, length = tag_len.unpack_from(buf, pos)
            item_tag = group << 16 | elem
            if item_tag == _SEQ_DELIM:
                if length != 0:
                    self.fail(
                        f"Sequence Delimitation Item at offset {pos} has length {length}, not 0"
                    )
                pos += 8
                break
            if item_tag != _ITEM:
                self.fail(
                    f"unexpected tag {_tag(item_tag)} at offset {pos} in encapsulated Pixel Data"
                )
            if length == _UNDEFINED:
                self.fail(f"fragment at offset {pos} has undefined length")
            if length > end - pos - 8:
                self.fail(
                    f"fragment at offset {pos} declares {length} bytes "
                    f"but only {end - pos - 8} remain"
                )
            starts.append(pos - first)
            fragments.append((pos + 8, length))
            pos += 8 + length
        if not fragments:
            self.fail(f"encapsulated Pixel Data at offset {vpos} has no fragments")
        if bot:
            if bot[0] != 0 or any(a >= b for a, b in itertools.pairwise(bot)):
                self.problem(
                    f"Basic Offset Table at offset {vpos} is not increasing from 0: {bot[:8]!r}"
                )
            known = set(starts)
            stray = [o for o in bot if o not in known]
            if stray:
                self.problem(
                    f"Basic Offset Table at offset {vpos} points at {stray[0]}, "
                    f"which is not the start of a fragment"
                )
        if depth == 0:
            self.pixel = PixelInfo(
                vpos, None, True, tuple(fragments), bot, rows, columns, spp, bits, frames
            )
        return pos


def _uid(raw: bytes | None, what: str) -> str | None:
    if raw is None:
        return None
    text = raw.rstrip(b"\x00 ").lstrip(b" ")
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        _fail(f"{what} is not ASCII: {raw!r}")


def _patient_id(raw: bytes, charset: bytes | None) -> str:
    """A Patient ID as Orthanc keys it: surrounding spaces and NULs removed, decoded by
    the Specific Character Set (0008,0005) as Orthanc does before it hashes the UTF-8
    text; Latin-1 (Orthanc's default encoding) when no set is named or it fails.  A
    reading that still differs from Orthanc's is settled against Orthanc's own tags
    (:mod:`dicomcache.cache.fetch`)."""
    if raw.isascii() and b"\x1b" not in raw:  # no ISO 2022 escape sequence either
        return raw.decode("ascii")
    terms = [t.strip(b" \x00").decode("ascii", "replace") for t in (charset or b"").split(b"\\")]
    if not any(terms):
        return raw.decode("latin-1")
    try:
        with warnings.catch_warnings():  # an unknown term: pydicom warns, then falls back
            warnings.simplefilter("ignore")
            return str(decode_bytes(raw, convert_encodings(terms), set()))
    except (LookupError, ValueError, UnicodeError):
        return raw.decode("latin-1")


def _inflate(data: Buffer, start: int) -> bytes:
    """Inflate the raw-deflate data set that starts at ``start``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    # Views are released on the way out, so a caller's mmap can be closed.
    with memoryview(data) as whole, whole[start:] as tail:
        try:
            out = inflater.decompress(tail, MAX_INFLATED + 1)
        except zlib.error as exc:
            _fail(f"deflated data set at offset {start} is corrupt: {exc}")
    if len(out) > MAX_INFLATED:
        _fail(f"deflated data set at offset {start} inflates to more than {MAX_INFLATED} bytes")
    if not inflater.eof:
        _fail(f"deflated data set at offset {start} is truncated: the deflate stream does not end")
    trailer = inflater.unused_data
    # A single pad byte is standard; some writers append a gzip trailer
    # (CRC-32 and size of the inflated data), accepted only when it matches.
    gzip_trailer = struct.pack("<II", zlib.crc32(out), len(out) & 0xFFFFFFFF)
    if trailer not in (b"", b"\x00", gzip_trailer):
        _fail(
            f"deflated data set at offset {start} is followed by "
            f"{len(trailer)} unexpected bytes"
        )
    return out


def _byte_view(data: Buffer) -> Buffer:
    if isinstance(data, memoryview) and (data.ndim != 1 or data.itemsize != 1):
        return data.cast("B")
    return data


def parse_dicom(data: Buffer, *, lenient: bool = False) -> DicomSummary:
    """Walk a whole Part-10 file and summarise it.

    Raises ``IntegrityError`` with cause ``"parse_failure"`` and a reason
    naming the offset and tag of the first problem.  See the module docstring
    for what is checked.  Nothing is copied except small attribute values
    (and the inflated data set for deflated files).

    ``lenient``: read past the problems that leave the layout of the bytes
    known — tags out of order, a Pixel Data length that does not match the
    image attributes, missing or unusable image attributes, a Basic Offset
    Table that does not match the fragments, an image without Pixel Data —
    and list them in ``DicomSummary.problems`` (what a PACS such as DCMTK's
    storescp or Orthanc stores all the same).  Everything else still raises:
    an element or item that does not fit, a missing delimiter, an unknown VR,
    no SOP Instance UID or SOP Class UID.
    """
    buf = _byte_view(data)
    size = len(buf)
    if size < _PREAMBLE + 4:
        _fail(f"file is {size} bytes, too short for the 128-byte preamble and 'DICM'")
    magic = _read(buf, _PREAMBLE, 4)
    if magic != b"DICM":
        _fail(f"no 'DICM' prefix at offset {_PREAMBLE}: found {magic!r}")

    # File Meta Information: always explicit VR little endian.
    pos = _PREAMBLE + 4
    prev = -1
    values: dict[int, bytes] = {}
    group_end: int | None = None
    while size - pos >= 8:
        group, elem, vr, length = _LE_EXPLICIT.unpack_from(buf, pos)
        if group != 0x0002:
            break
        tag = group << 16 | elem
        if tag <= prev:
            _fail(f"element {_tag(tag)} at offset {pos} is out of order: it follows {_tag(prev)}")
        prev = tag
        if vr in _LONG_VRS:
            if size - pos < 12:
                _fail(f"element {_tag(tag)} at offset {pos} needs a 12-byte header "
                      f"but only {size - pos} bytes remain")
            length = _LE_U32.unpack_from(buf, pos + 8)[0]
            vpos = pos + 12
        elif vr in _SHORT_VRS:
            vpos = pos + 8
        else:
            _fail(f"element {_tag(tag)} at offset {pos} has unknown VR {vr!r}")
        if length == _UNDEFINED:
            _fail(f"File Meta element {_tag(tag)} at offset {pos} has undefined length")
        if length > size - vpos:
            _fail(f"element {_tag(tag)} at offset {pos} declares {length} bytes "
                  f"but only {size - vpos} remain")
        if tag == _META_GROUP_LENGTH:
            if length != 4:
                _fail(
                    f"File Meta Information Group Length at offset {pos} "
                    f"has length {length}, not 4"
                )
            group_end = vpos + 4 + _LE_U32.unpack_from(buf, vpos)[0]
        elif tag in (_MEDIA_SOP_CLASS, _MEDIA_SOP_INSTANCE, _TRANSFER_SYNTAX):
            values[tag] = _read(buf, vpos, length)
        pos = vpos + length
    if group_end is not None and group_end != pos:
        _fail(f"File Meta Information Group Length says the group ends at offset {group_end} "
              f"but its elements end at offset {pos}")
    if _TRANSFER_SYNTAX not in values:
        _fail("File Meta Information has no Transfer Syntax UID (0002,0010)")
    ts = _uid(values[_TRANSFER_SYNTAX], "Transfer Syntax UID") or ""
    if not is_uid(ts):
        _fail(f"Transfer Syntax UID (0002,0010) is not a UID: {ts!r}")

    if ts == syntaxes.DEFLATED_LE:
        inflated = _inflate(buf, pos)
        walker = _Walker(inflated, "inflated data set: ", True, lenient)
        walker.dataset(0, len(inflated), _EXPLICIT_LE, 0, False)
        walker.pixel = None
    else:
        codec = {syntaxes.IMPLICIT_LE: _IMPLICIT_LE,
                 syntaxes.EXPLICIT_BE: _EXPLICIT_BE}.get(ts, _EXPLICIT_LE)
        walker = _Walker(buf, "", not syntaxes.is_encapsulated(ts), lenient)
        walker.dataset(pos, size, codec, 0, False)

    uids = walker.uids
    top = walker.top
    instance = _uid(uids.get(_SOP_INSTANCE), "SOP Instance UID")
    if not instance:
        _fail("data set has no SOP Instance UID (0008,0018)")
    own_class = _uid(uids.get(_SOP_CLASS), "SOP Class UID")
    sop_class = own_class or _uid(values.get(_MEDIA_SOP_CLASS), "Media Storage SOP Class UID")
    if not sop_class:
        _fail("data set has no SOP Class UID (0008,0016) and the File Meta has none either")
    if not _PIXEL_TAGS & top.keys():
        if _IMAGE_PIXEL_TAGS & top.keys():
            walker.problem(
                "data set has Image Pixel attributes (0028,xxxx) but no Pixel Data "
                "(7FE0,0010): truncated at an element boundary?"
            )
        elif sop_class in IMAGE_SOP_CLASSES:
            walker.problem(
                f"SOP Class {sop_class} is an image but the data set has no Pixel Data "
                "(7FE0,0010): truncated at an element boundary?"
            )
    patient = (uids.get(_PATIENT_ID) or b"").strip(b" \x00")
    return DicomSummary(
        transfer_syntax_uid=ts,
        sop_class_uid=sop_class,
        sop_instance_uid=instance,
        patient_id=_patient_id(patient, uids.get(_CHARSET)),
        patient_id_bytes=patient,
        study_instance_uid=_uid(uids.get(_STUDY_UID), "Study Instance UID"),
        series_instance_uid=_uid(uids.get(_SERIES_UID), "Series Instance UID"),
        size=size,
        pixel=walker.pixel,
        problems=tuple(walker.problems or ()),
        sop_class_in_dataset=bool(own_class),
    )


#: Orthanc's short names of the tags that identify an instance (``/instances/{id}/tags?short``).
IDENTITY_TAGS = {"patient": "0010,0020", "study": "0020,000d", "series": "0020,000e",
                 "sop": "0008,0018", "sop_class": "0008,0016"}


def identity_problem(summary: DicomSummary, orthanc_id: str,
                     tags: Mapping[str, object] | None = None) -> str | None:
    """Why a verified body is not Orthanc instance ``orthanc_id`` (``None``: it is).

    Orthanc names an instance by the hash of its Patient ID and three UIDs, so the
    body's must hash to ``orthanc_id``.  When they do not, either Orthanc read the
    Patient ID differently (a character set) or this is another instance's body —
    possibly the same image under another patient.  ``tags``, Orthanc's own tags of
    the instance, settle it when given: its UIDs and SOP Class must be the body's,
    its Patient ID one reading of the body's, and they must hash to ``orthanc_id``.
    """
    if summary.orthanc_id == orthanc_id:
        return None
    wrong = (f"asked for instance {orthanc_id}, received the body of {summary.orthanc_id} "
             f"(SOP {summary.sop_instance_uid}, patient {summary.patient_id!r})")
    if tags is None:
        return wrong
    theirs = {k: str(tags.get(tag, "")).strip() for k, tag in IDENTITY_TAGS.items()}
    ours = {"sop": summary.sop_instance_uid, "study": summary.study_instance_uid or "",
            "series": summary.series_instance_uid or "", "sop_class": summary.sop_class_uid}
    same = all(theirs[k] == v for k, v in ours.items()) \
        and theirs["patient"] in summary.patient_id_readings()
    named = orthanc_instance_id(theirs["patient"], theirs["study"], theirs["series"],
                                theirs["sop"])
    return None if same and named == orthanc_id else wrong


def md5_hex(data: Buffer) -> str:
    """Lower-case hex MD5 of ``data`` (bytes, memoryview or mmap)."""
    return hashlib.md5(_byte_view(data), usedforsecurity=False).hexdigest()


_MD5_RE = re.compile(r"[0-9a-fA-F]{32}")


def _check_expectations(expected_length: int | None, expected_md5: str | None) -> str | None:
    if expected_length is not None and expected_length < 0:
        raise ValueError(f"expected_length must be >= 0, not {expected_length}")
    if expected_md5 is None:
        return None
    md5 = expected_md5.strip().strip('"')
    if not _MD5_RE.fullmatch(md5):
        raise ValueError(f"expected_md5 is not 32 hex digits: {expected_md5!r}")
    return md5.lower()


def _check_length(size: int, expected_length: int | None) -> None:
    if expected_length is None or size == expected_length:
        return
    if size < expected_length:
        raise IntegrityError(Cause.SHORT_BODY,
            f"body is {size} bytes, {expected_length - size} short of {expected_length}",
        )
    raise IntegrityError(Cause.LENGTH_MISMATCH,
        f"body is {size} bytes, {size - expected_length} more than {expected_length}",
    )


def verify_bytes(
    data: Buffer, *, expected_length: int | None = None, expected_md5: str | None = None
) -> DicomSummary:
    """Check a body: length, then MD5, then a full parse.

    Raises ``IntegrityError`` with cause ``"short_body"`` (fewer bytes than
    expected), ``"length_mismatch"`` (more), ``"md5_mismatch"`` or
    ``"parse_failure"``.  A malformed ``expected_md5`` or a negative
    ``expected_length`` is a caller bug and raises plain ``ValueError``.
    ``expected_md5`` is compared case-insensitively; surrounding quotes
    (as in an ETag) are ignored.
    """
    md5 = _check_expectations(expected_length, expected_md5)
    buf = _byte_view(data)
    _check_length(len(buf), expected_length)
    if md5 is not None:
        actual = md5_hex(buf)
        if actual != md5:
            raise IntegrityError(Cause.MD5_MISMATCH, f"body MD5 is {actual}, expected {md5}")
    return parse_dicom(buf)


def verify_file(
    path: str | os.PathLike[str],
    *,
    expected_length: int | None = None,
    expected_md5: str | None = None,
) -> DicomSummary:
    """Check a file like ``verify_bytes``, reading it through a read-only mmap.

    The length check uses the file's size before anything is read.  An empty
    file fails (``short_body`` if a length was expected, else
    ``parse_failure``).  ``OSError`` from opening or mapping propagates.
    """
    md5 = _check_expectations(expected_length, expected_md5)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        _check_length(size, expected_length)
        if size == 0:  # mmap cannot map an empty file
            return verify_bytes(b"", expected_md5=md5)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return verify_bytes(mapped, expected_length=expected_length, expected_md5=md5)
