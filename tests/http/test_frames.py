"""dicomcache.http.frames with ``upstream.frames_transfer_syntax``: a viewer's cold frames
asked from a real Orthanc in JPEG-LS Lossless, the cached original for the rest."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pydicom
import pytest

from dicomcache.devtools.wanem import WanEmulator
from dicomcache.dicom import multipart
from dicomcache.dicom.syntaxes import JPEG_2000_LOSSLESS, JPEG_LS_LOSSLESS, RLE_LOSSLESS
from dicomcache.dicomweb import state
from dicomcache.errors import IntegrityError
from dicomcache.http.app import make_app
from dicomcache.http.keys import DICOMWEB
from tests.conftest import Sample, SettingsFactory

#: What OHIF 3.13 asks for every frame (``omitQuotationForMultipartRequest: true``).
OHIF = "multipart/related; type=application/octet-stream; transfer-syntax=*"
METADATA = {"Accept": "application/dicom+json"}


def frame_path(s: Sample) -> str:
    return f"/dicom-web/studies/{s.study}/series/{s.series}/instances/{s.sop}/frames/1"


def pixels(s: Sample) -> Any:
    return pydicom.dcmread(io.BytesIO(s.data)).pixel_array


def decoded(body: bytes, content_type: str) -> tuple[str, Any]:
    """The one part's media type, and its pixels decoded (JPEG-LS by CharLS)."""
    import jpeg_ls

    (part,) = multipart.split(body, content_type)
    kind = part.headers["content-type"]
    if kind.startswith("image/jls"):
        data, info = jpeg_ls.decode_buffer(part.body)
        return kind, np.frombuffer(data, dtype="<u2" if info["bits_per_sample"] > 8
                                   else np.uint8).reshape(info["height"], info["width"])
    return kind, part.body


async def app_with(aiohttp_client: Any, make_settings: SettingsFactory, wan: WanEmulator,
                   syntax: str) -> Any:
    return await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", prefetch={"mode": "off"},
        upstream={"frames_transfer_syntax": syntax})))


def asked(wan: WanEmulator) -> list[str]:
    return [t for t in wan.targets if t != "/system"]


async def test_cold_frames_travel_as_jpeg_ls_and_decode_to_the_same_pixels(
        aiohttp_client: Any, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    """OHIF's cold frame: Orthanc transcodes it (~3x fewer bytes than the native frame on
    the link), the viewer gets JPEG-LS whose pixels are the original's.  Nothing of it
    is stored: the instance itself, asked whole, is the original, byte for byte."""
    s = ct_series[7]
    client = await app_with(aiohttp_client, make_settings, wan, JPEG_LS_LOSSLESS)
    resp = await client.get(f"/dicom-web/studies/{s.study}/series/{s.series}/metadata",
                            headers=METADATA)
    assert resp.status == 200
    wan.reset_stats()
    resp = await client.get(frame_path(s), headers={"Accept": OHIF})
    assert resp.status == 200
    body = await resp.read()
    kind, got = decoded(body, resp.headers["Content-Type"])
    assert kind == f"image/jls; transfer-syntax={JPEG_LS_LOSSLESS}"
    assert np.array_equal(got, pixels(s))
    assert asked(wan) == [frame_path(s)]  # the frame alone: no instance download
    assert wan.bytes_down < 512 * 512 * 2 / 2, wan.bytes_down
    # Byte-exact answers still come from the verified original.
    for path in (f"/instances/{s.orthanc_id}/file",
                 f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
                 f"&objectUID={s.sop}&contentType=application/dicom"):
        resp = await client.get(path)
        assert resp.status == 200 and await resp.read() == s.data
    # Once stored, frames are cut from it (as stored: native), no Orthanc request.
    wan.reset_stats()
    resp = await client.get(frame_path(s), headers={"Accept": OHIF})
    kind, got = decoded(await resp.read(), resp.headers["Content-Type"])
    assert kind.startswith("application/octet-stream") and got == s.data[-len(got):]
    assert asked(wan) == []


async def test_every_cold_frame_travels_transcoded(
        aiohttp_client: Any, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample], caplog: pytest.LogCaptureFixture) -> None:
    """Half of Orthanc's JPEG-LS frames are odd-length codestreams padded with one 0x00
    (a DICOM fragment's even length): whole frames all the same, none refused.

    A frame whose transcoded request failed upstream (a timeout on a loaded machine)
    gets the original's frame, as it should: that is no refusal of a whole answer."""
    caplog.set_level(logging.INFO, logger="dicomcache.http.frames")
    client = await app_with(aiohttp_client, make_settings, wan, JPEG_LS_LOSSLESS)
    transcoded = 0
    for s in ct_series:
        resp = await client.get(frame_path(s), headers={"Accept": OHIF})
        assert resp.status == 200
        kind, got = decoded(await resp.read(), resp.headers["Content-Type"])
        if kind.startswith("image/jls"):
            assert np.array_equal(got, pixels(s)), s.sop
            transcoded += 1
        else:
            assert s.data.endswith(got), s.sop
    instead = [r for r in caplog.records if "the original's frames instead" in r.getMessage()]
    assert len(instead) == len(ct_series) - transcoded, [r.getMessage() for r in instead]
    refused = [r.getMessage() for r in instead if isinstance(r.args[1], IntegrityError)]
    assert not refused
    assert transcoded > len(ct_series) // 2
    # Only a frame that fell back fetched its instance.
    assert sum(t.endswith("/file") for t in asked(wan)) == len(ct_series) - transcoded


@pytest.mark.parametrize("accept", [
    "multipart/related; type=application/octet-stream",
    "multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1",
])
async def test_a_viewer_naming_a_syntax_gets_it_from_the_original(
        aiohttp_client: Any, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample], accept: str) -> None:
    s = ct_series[8]
    client = await app_with(aiohttp_client, make_settings, wan, JPEG_LS_LOSSLESS)
    resp = await client.get(frame_path(s), headers={"Accept": accept})
    assert resp.status == 200
    kind, got = decoded(await resp.read(), resp.headers["Content-Type"])
    assert kind.startswith("application/octet-stream") and s.data.endswith(got)
    assert f"/instances/{s.orthanc_id}/file" in asked(wan)
    assert not any(t.endswith("/frames/1") for t in asked(wan))


@pytest.mark.parametrize("syntax", [RLE_LOSSLESS, JPEG_2000_LOSSLESS])
async def test_a_syntax_orthanc_cannot_make_falls_back_to_the_original(
        aiohttp_client: Any, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample], syntax: str) -> None:
    """Orthanc 1.10 answers 500 for RLE and JPEG 2000 frames: the viewer gets the
    original's frames, and after FRAMES_REFUSED_AFTER such answers Orthanc is no longer
    asked (no round trip lost per frame)."""
    client = await app_with(aiohttp_client, make_settings, wan, syntax)
    for s in ct_series[7:12]:
        resp = await client.get(frame_path(s), headers={"Accept": OHIF})
        assert resp.status == 200
        kind, got = decoded(await resp.read(), resp.headers["Content-Type"])
        assert kind.startswith("application/octet-stream") and s.data.endswith(got)
    assert client.app[DICOMWEB].frames_refused
    assert sum(t.endswith("/frames/1") for t in asked(wan)) == state.FRAMES_REFUSED_AFTER
