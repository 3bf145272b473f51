"""Transfer syntaxes: one table of what dicomcache knows about each (PS3.5 §10, Annex A).

Everything else (verification, frames, WADO-RS, the relay's negotiation and
transcoding) reads its facts from here: the UID, a short name, whether the
pixel data is native or encapsulated, whether it may have lost information,
and the media type Orthanc's DICOMweb plugin gives a stored frame of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_LOSSLESS_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"


@dataclass(frozen=True, slots=True)
class Syntax:
    """What dicomcache knows about one transfer syntax."""

    uid: str
    name: str
    #: Pixel data stored as fragments (PS3.5 A.4) rather than as one native value.
    encapsulated: bool
    #: The pixel data may have lost information (PS3.5 8.2).
    lossy: bool = False
    #: Explicit VR (every syntax but Implicit VR Little Endian).
    explicit_vr: bool = True
    little_endian: bool = True
    #: The data set is deflated (PS3.5 A.5).
    deflated: bool = False
    #: Part media type of a stored frame in a DICOMweb answer (PS3.18 8.7.3.3.2);
    #: ``None`` when dicomcache leaves such frames to Orthanc.
    frame_media_type: str | None = None


_TABLE = (
    Syntax(IMPLICIT_LE, "Implicit VR Little Endian", False, explicit_vr=False,
           frame_media_type="application/octet-stream"),
    Syntax(EXPLICIT_LE, "Explicit VR Little Endian", False,
           frame_media_type="application/octet-stream"),
    Syntax(DEFLATED_LE, "Deflated Explicit VR Little Endian", False, deflated=True),
    Syntax(EXPLICIT_BE, "Explicit VR Big Endian", False, little_endian=False),
    Syntax(JPEG_BASELINE, "JPEG Baseline (Process 1)", True, lossy=True),
    Syntax(JPEG_EXTENDED, "JPEG Extended (Process 2 and 4)", True, lossy=True),
    Syntax(JPEG_LOSSLESS, "JPEG Lossless (Process 14)", True),
    Syntax(JPEG_LOSSLESS_SV1, "JPEG Lossless (Process 14, SV1)", True),
    Syntax(JPEG_LS_LOSSLESS, "JPEG-LS Lossless", True, frame_media_type="image/jls"),
    Syntax(JPEG_LS_NEAR_LOSSLESS, "JPEG-LS Near-Lossless", True, lossy=True,
           frame_media_type="image/jls"),
    Syntax(JPEG_2000_LOSSLESS, "JPEG 2000 Lossless", True, frame_media_type="image/jp2"),
    Syntax(JPEG_2000, "JPEG 2000", True, lossy=True, frame_media_type="image/jp2"),
    Syntax(HTJ2K_LOSSLESS, "HTJ2K Lossless", True),
    Syntax(HTJ2K_LOSSLESS_RPCL, "HTJ2K Lossless RPCL", True),
    Syntax(HTJ2K, "HTJ2K", True, lossy=True),
    Syntax(RLE_LOSSLESS, "RLE Lossless", True, frame_media_type="image/dicom-rle"),
)

#: Every transfer syntax dicomcache knows, by UID.
SYNTAXES: Mapping[str, Syntax] = {s.uid: s for s in _TABLE}

#: Native (uncompressed) encodings, in the order the relay prefers to send them.
UNCOMPRESSED: tuple[str, ...] = (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE)
#: Native little-endian encodings: a frame can be cut from the stored bytes as is.
NATIVE_LE: tuple[str, ...] = (IMPLICIT_LE, EXPLICIT_LE)
#: Lossless compressions, cheapest to encode first.
LOSSLESS: tuple[str, ...] = (
    RLE_LOSSLESS, JPEG_LS_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG_LOSSLESS, JPEG_2000_LOSSLESS,
    HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL,
)
#: Syntaxes whose pixel data may have lost information.
LOSSY: tuple[str, ...] = tuple(s.uid for s in _TABLE if s.lossy)


def name(uid: str) -> str:
    """A short human name for logs ("Explicit VR Little Endian"); the UID if unknown."""
    known = SYNTAXES.get(uid)
    return known.name if known is not None else uid


def is_encapsulated(uid: str) -> bool:
    """Whether Pixel Data is encapsulated in ``uid``: every syntax but the native four,
    unknown ones included (PS3.5 A.4: a private compressed syntax is encapsulated)."""
    known = SYNTAXES.get(uid)
    return known.encapsulated if known is not None else True
