"""Re-encode a spooled instance in the transfer syntax a peer accepted.

Pure apart from CPU: bytes in, a data set (written out and read back) out.

What is supported
-----------------
* between uncompressed syntaxes, Big Endian included: pydicom refuses to
  switch endianness itself (``save_as``), so OW/OF/OL/OD/OV values are
  byte-swapped here (every other VR is converted to Python values on read) and
  the data set is written with ``dcmwrite``;
* Deflated → any uncompressed syntax (pydicom inflates on read);
* compressed → uncompressed: ``decompress(generate_instance_uid=False)``
  (pydicom would otherwise mint a new SOP Instance UID, and the peer would see
  a different instance); a lossy source keeps ``LossyImageCompression = 01``;
* uncompressed (or decompressed) → lossless compression we can encode: RLE
  (pydicom), JPEG-LS (pyjpegls), JPEG 2000 (pylibjpeg-openjpeg) and JPEG
  Lossless SV1 (python-gdcm, the only encoder of it installable from PyPI);
* lossy re-compression (JPEG-LS near-lossless, JPEG 2000) only when the
  caller allows it, which the forwarder does only for ``extended`` peers with
  ``allow_lossy_recompression``; it sets ``LossyImageCompression = 01`` and
  appends the method and ratio (pydicom does not).

Whatever is produced is written out and parsed back (with
:func:`dicomcache.dicom.verify.parse_dicom`) before it is returned: switching VR
encoding in memory is where nested sequences get corrupted, reading the
result back is the cheap proof that they were not.  The read-back is strict
unless the source itself had problems the relay accepted
(:mod:`dicomcache.relay.acceptance`): those may remain, nothing else may appear.
"""

from __future__ import annotations

import functools
import io
import logging
import multiprocessing as mp
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from dicomcache.dicom import syntaxes
from dicomcache.dicom.verify import parse_dicom
from dicomcache.errors import DicomcacheError, IntegrityError

log = logging.getLogger(__name__)

# VRs holding binary words whose byte order follows the transfer syntax.
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}

_LOSSY_METHOD = {syntaxes.JPEG_LS_NEAR_LOSSLESS: "ISO_14495_1",
                 syntaxes.JPEG_2000: "ISO_15444_1"}


class TranscodeError(DicomcacheError, ValueError):
    """An instance cannot be produced in the requested syntax (a data problem:
    undecodable pixel data, no encoder, an inconsistent image description)."""


@functools.cache
def encodable_syntaxes() -> frozenset[str]:
    """Compressed syntaxes this installation can encode (decided once, by plugin availability)."""
    from pydicom.pixels.encoders.base import get_encoder

    out: set[str] = set()
    for ts in (*syntaxes.LOSSLESS, *syntaxes.LOSSY):
        try:
            if get_encoder(ts).is_available:
                out.add(ts)
        except NotImplementedError:
            pass
    if _gdcm() is not None:
        out.add(syntaxes.JPEG_LOSSLESS_SV1)
    return frozenset(out)


def _decoder_for(ts: str) -> str:
    """pylibjpeg first: it decodes every syntax here (12-bit JPEG Extended too), while
    pydicom's default order tries gdcm first, which fails on some and logs a traceback."""
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return "pylibjpeg" if "pylibjpeg" in get_decoder(ts)._available else ""
    except NotImplementedError:
        return ""


def _has_plugin(ts: str, plugin: str) -> bool:
    from pydicom.pixels.encoders.base import get_encoder

    return plugin in get_encoder(ts)._available


@functools.cache
def _gdcm() -> Any:
    try:
        import gdcm
    except ImportError:
        return None
    return gdcm


def transcode(data: bytes, target: str, *, allow_lossy: bool = False) -> Dataset:
    """Return the Part-10 ``data`` as a data set encoded in ``target``.

    The returned data set's ``file_meta.TransferSyntaxUID`` is ``target`` and
    it was read back from its encoded form.  Raises :class:`TranscodeError`
    when that is impossible (never a bare pydicom/codec exception).
    """
    return _read(transcode_bytes(data, target, allow_lossy=allow_lossy))


def transcode_bytes(data: bytes, target: str, *, allow_lossy: bool = False) -> bytes:
    """Like :func:`transcode`, returning the encoded Part-10 bytes."""
    try:
        return _transcode(data, target, allow_lossy)
    except TranscodeError:
        raise
    except DicomcacheError as exc:  # e.g. IntegrityError on the read-back
        raise TranscodeError(f"cannot produce {syntaxes.name(target)}: {exc}") from exc
    except Exception as exc:
        raise TranscodeError(
            f"cannot produce {syntaxes.name(target)}: {type(exc).__name__}: {exc}") from exc


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _transcode(data: bytes, target: str, allow_lossy: bool) -> bytes:
    ds = _read(data)
    source = str(ds.file_meta.TransferSyntaxUID)
    if source == target:
        return data
    if target in syntaxes.LOSSY and not allow_lossy:
        raise TranscodeError(f"lossy re-compression to {syntaxes.name(target)} is not allowed")
    has_pixels = "PixelData" in ds
    current = source
    if UID(source).is_compressed:
        if has_pixels:
            ds.decompress(generate_instance_uid=False, decoding_plugin=_decoder_for(source))
            if source in syntaxes.LOSSY:
                ds.LossyImageCompression = "01"  # PS3.3 C.7.6.1.1.5: once lossy, always lossy
        # Encapsulated syntaxes encode everything but pixel data as Explicit VR LE.
        current = syntaxes.EXPLICIT_LE
        ds.file_meta.TransferSyntaxUID = UID(syntaxes.EXPLICIT_LE)
    elif source == syntaxes.DEFLATED_LE:
        current = syntaxes.EXPLICIT_LE  # pydicom inflated it on read

    target_uid = UID(target)
    little = target_uid.is_little_endian if not target_uid.is_compressed else True
    if UID(current).is_little_endian != little:
        _swap_binary_values(ds)

    if target_uid.is_compressed and has_pixels:
        _interleave(ds)
        _compress(ds, target)
    ds.file_meta.TransferSyntaxUID = target_uid
    out = io.BytesIO()
    ds.preamble = b"\x00" * 128
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    encoded = out.getvalue()
    try:
        problems = parse_dicom(encoded, lenient=True).problems
    except IntegrityError as exc:
        raise TranscodeError(
            f"the {syntaxes.name(target)} result does not parse: {exc.reason}") from exc
    # What the relay accepted with problems (a CT without Pixel Data…) keeps them when
    # re-encoded; a problem the source did not have is the re-encoding's fault.
    if problems and not parse_dicom(data, lenient=True).problems:
        raise TranscodeError(
            f"the {syntaxes.name(target)} result does not parse: {problems[0]}")
    return encoded


def _swap_binary_values(ds: Dataset) -> None:
    """Swap the byte order of OW/OF/OL/OD/OV values, everywhere in ``ds``.

    Numeric VRs (US, SL, FD…) became Python numbers when read, so the writer
    encodes them in the new byte order itself; only these opaque words keep
    the order they were read in.  Pixel Data is swapped by its Bits Allocated
    (32-bit pixels in an OW element are 32-bit big-endian values, as pydicom
    reads them; 8-bit samples in OW are swapped in pairs, OB is never swapped).  UN
    values cannot be swapped: their structure is unknown.
    """
    for tag in list(ds.keys()):
        elem = ds[tag]  # converts a raw element in place
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_binary_values(item)
            continue
        width = _SWAP_WIDTH.get(str(elem.VR))
        if tag == 0x7FE00010 and elem.VR == "OW":
            bits = int(ds.get("BitsAllocated", 16) or 16)
            width = bits // 8 if bits in (32, 64) else 2
        if width and isinstance(elem.value, bytes | bytearray) and elem.value:
            value = bytes(elem.value)
            if len(value) % width:
                raise TranscodeError(
                    f"{elem.tag} ({elem.VR}) has {len(value)} bytes, not a multiple of {width}")
            elem.value = np.frombuffer(value, dtype=f"u{width}").byteswap().tobytes()


def _interleave(ds: Dataset) -> None:
    """Native colour-by-plane pixel data → colour-by-pixel (what encoders expect)."""
    spp = int(ds.get("SamplesPerPixel", 1))
    if spp < 2 or int(ds.get("PlanarConfiguration", 0) or 0) != 1:
        return
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    size = max(int(ds.BitsAllocated) // 8, 1)
    need = frames * spp * rows * cols * size
    pixels = bytes(ds.PixelData)
    if len(pixels) < need:
        raise TranscodeError(f"Pixel Data has {len(pixels)} bytes, {need} needed")
    arr = np.frombuffer(pixels[:need], dtype=f"u{size}").reshape(frames, spp, rows * cols)
    ds.PixelData = arr.transpose(0, 2, 1).copy().tobytes()
    ds.PlanarConfiguration = 0


def _compress(ds: Dataset, target: str) -> None:
    """Encode native little-endian pixel data of ``ds`` as ``target``."""
    before = len(ds.PixelData)
    if target not in encodable_syntaxes():
        raise TranscodeError(f"no encoder installed for {syntaxes.name(target)}")
    if target == syntaxes.JPEG_LOSSLESS_SV1:
        ds.PixelData = encapsulate(_gdcm_jpeg_lossless_frames(ds))
        ds["PixelData"].VR = "OB"
    else:
        kwargs: dict[str, object] = {}
        if target == syntaxes.JPEG_LS_NEAR_LOSSLESS:
            kwargs["jls_error"] = 2
        elif target == syntaxes.JPEG_2000:
            kwargs["j2k_cr"] = [10]
        if target == syntaxes.RLE_LOSSLESS:
            # Not gdcm (pydicom's first choice): its RLE codec aborts the process on odd sizes.
            kwargs["encoding_plugin"] = ("pylibjpeg" if _has_plugin(target, "pylibjpeg")
                                         else "pydicom")
        ds.compress(target, generate_instance_uid=False, **kwargs)  # type: ignore[arg-type]
    if target in syntaxes.LOSSY:
        after = max(len(ds.PixelData), 1)
        ds.LossyImageCompression = "01"
        methods = list(ds.get("LossyImageCompressionMethod", []) or [])
        ratios = list(ds.get("LossyImageCompressionRatio", []) or [])
        if isinstance(ds.get("LossyImageCompressionMethod"), str):
            methods = [ds.LossyImageCompressionMethod]
        if ratios and not isinstance(ratios, list):
            ratios = [ratios]
        ds.LossyImageCompressionMethod = [*methods, _LOSSY_METHOD[target]]
        ds.LossyImageCompressionRatio = [*ratios, f"{before / after:.2f}"[:16]]


_GDCM_PI = ("MONOCHROME1", "MONOCHROME2", "RGB")
_pool_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


def _gdcm_pool() -> ProcessPoolExecutor:
    """One spawned worker process for gdcm.

    gdcm reports some bad inputs with a C++ exception that aborts the whole
    process (seen with its RLE codec on odd-sized images): in a child, that
    costs one transcoding (``BrokenProcessPool`` → :class:`TranscodeError`),
    not the relay.  Spawned, not forked: the relay runs many threads.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
        return _pool


def shutdown_pool() -> None:
    """Stop the gdcm worker process, if one was started."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _gdcm_jpeg_lossless_frames(ds: Dataset) -> list[bytes]:
    """JPEG Lossless SV1 frames from native little-endian pixel data (via python-gdcm)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1))
    bits = int(ds.BitsAllocated)
    stored = int(ds.get("BitsStored", bits))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pi_name = str(ds.get("PhotometricInterpretation", ""))
    planar = int(ds.get("PlanarConfiguration", 0) or 0)
    # Only inputs gdcm's JPEG codec handles; anything else is refused here.
    if bits not in (8, 16) or not 1 < stored <= bits:
        raise TranscodeError(f"JPEG Lossless needs 8 or 16 bits allocated, not {bits}/{stored}")
    if (spp, pi_name) not in ((1, "MONOCHROME1"), (1, "MONOCHROME2"), (3, "RGB")):
        raise TranscodeError(f"JPEG Lossless of {spp} sample(s) {pi_name!r} is not supported")
    if rows < 1 or cols < 1 or frames < 1:
        raise TranscodeError("empty image")
    frame_len = rows * cols * spp * bits // 8
    pixels = bytes(ds.PixelData)
    if len(pixels) < frame_len * frames:
        raise TranscodeError(f"Pixel Data has {len(pixels)} bytes, {frame_len * frames} needed")
    chunks = []
    for i in range(frames):
        chunk = pixels[i * frame_len:(i + 1) * frame_len]
        if spp > 1 and planar == 1:  # JPEG wants colour-by-pixel
            plane = np.frombuffer(chunk, dtype=f"u{bits // 8}").reshape(spp, rows * cols)
            chunk = plane.T.copy().tobytes()
        chunks.append(chunk)
    if spp > 1:
        ds.PlanarConfiguration = 0
    params = (rows, cols, spp, bits, stored, int(ds.get("PixelRepresentation", 0)), pi_name)
    try:
        return _gdcm_pool().submit(_gdcm_encode, params, chunks).result(timeout=300)
    except BrokenProcessPool as exc:
        shutdown_pool()
        raise TranscodeError("the gdcm JPEG Lossless encoder crashed on this image") from exc


def _gdcm_encode(params: tuple[int, int, int, int, int, int, str], chunks: list[bytes]
                 ) -> list[bytes]:
    """Runs in the gdcm worker process: encode each frame as JPEG Lossless SV1."""
    import gdcm

    rows, cols, spp, bits, stored, pixrep, pi_name = params
    g: Any = gdcm
    out: list[bytes] = []
    for chunk in chunks:
        # The image must be owned by a gdcm object (as in pydicom's own gdcm
        # plugin): a Python-owned gdcm.Image aborts the process on release.
        writer = g.ImageWriter()
        image = writer.GetImage()
        image.SetNumberOfDimensions(2)
        image.SetDimensions((cols, rows, 1))
        image.SetPhotometricInterpretation(
            g.PhotometricInterpretation(g.PhotometricInterpretation.GetPIType(pi_name)))
        image.SetPixelFormat(g.PixelFormat(spp, bits, stored, stored - 1, pixrep))
        if spp > 1:
            image.SetPlanarConfiguration(0)
        image.SetTransferSyntax(g.TransferSyntax(g.TransferSyntax.ExplicitVRLittleEndian))
        elem = g.DataElement(g.Tag(0x7FE0, 0x0010))
        elem.SetByteStringValue(chunk)
        image.SetDataElement(elem)
        change = g.ImageChangeTransferSyntax()
        change.SetTransferSyntax(g.TransferSyntax(g.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(image)
        if not change.Change():
            raise TranscodeError("gdcm could not encode the frame as JPEG Lossless")
        seq = change.GetOutput().GetDataElement().GetSequenceOfFragments()
        if seq is None or seq.GetNumberOfFragments() != 1:
            raise TranscodeError("gdcm produced an unexpected number of JPEG fragments")
        buf = seq.GetFragment(0).GetByteValue().GetBuffer()
        # python-gdcm hands binary out as str; surrogateescape restores the bytes.
        out.append(buf.encode("utf-8", "surrogateescape"))
    return out
