"""DICOMweb retrieve, metadata, QIDO, frames and CORS compared with Orthanc's own answers."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
from pathlib import Path
from typing import BinaryIO

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from dicomcache.app import make_app
from dicomcache.orthanc import OrthancProcess
from dicomcache.routes.common import METRICS, STORE
from tests.conftest import Sample, SettingsFactory
from tests.routes.dicomweb_support import (ANY_SYNTAX, orthanc_answer, split_multipart,
                                           unlink)

FRAME_ACCEPTS = [
    None,
    'multipart/related; type="application/octet-stream"',
    'multipart/related; type="application/octet-stream"; transfer-syntax=*',
    'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2',
    "multipart/related; type=application/octet-stream; transfer-syntax=*",  # OHIF's, unquoted
    "*/*",
]


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory, no_blocking: None) -> TestClient:
    """The app with blockbuster watching: nothing may block the event loop."""
    return await aiohttp_client(make_app(make_settings()))


def series_path(s: Sample) -> str:
    return f"/dicom-web/studies/{s.study}/series/{s.series}"


async def get_parts(client: TestClient, path: str, accept: str | None
                    ) -> tuple[aiohttp.ClientResponse, list[tuple[dict[str, str], bytes]]]:
    resp = await client.get(path, headers={"Accept": accept} if accept else {})
    assert resp.status == 200, await resp.text()
    return resp, split_multipart(await resp.read(), resp.headers["Content-Type"])


# --- WADO-RS retrieve ---------------------------------------------------------------------

@pytest.mark.parametrize(("label", "accept"), [
    ("explicit", ANY_SYNTAX), ("rle", ANY_SYNTAX), ("j2k", ANY_SYNTAX),
    ("multiframe", ANY_SYNTAX), ("bigendian", ANY_SYNTAX),
    ("explicit", None),       # stored syntax = Orthanc's default: from the store
    ("implicit", None),       # Orthanc transcodes to Explicit VR LE: fetched transcoded
])
async def test_series_retrieve_identical_to_orthanc(
        client: TestClient, orthanc: OrthancProcess, samples: dict[str, list[Sample]],
        label: str, accept: str | None) -> None:
    s = samples[label][0]
    path = series_path(s)
    status, headers, direct = orthanc_answer(orthanc, path, {"Accept": accept} if accept else {})
    assert status == 200
    want = split_multipart(direct, headers["Content-Type"])
    assert len(want) == len(samples[label])
    for round_ in ("cold", "warm"):
        resp, got = await get_parts(client, path, accept)
        assert resp.headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
        assert [body for _, body in got] == [body for _, body in want], round_
        assert all(h["content-type"] == "application/dicom" for h, _ in got)
        if accept == ANY_SYNTAX and round_ == "warm":
            # Assembled from the store only: the length is known and exact.
            assert resp.headers["Content-Length"] == str(resp.content_length)
    if accept == ANY_SYNTAX:
        assert {body for _, body in got} == {x.data for x in samples[label]}


async def test_retrieve_sends_stored_parts_from_files_and_after_restart(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        ct_series: list[Sample], monkeypatch: pytest.MonkeyPatch, no_blocking: None) -> None:
    from dicomcache.routes import wado_rs as routes

    sendfiles: list[bool] = []
    real_sendfile = routes._sendfile

    async def spy(*args: object) -> bool:
        sendfiles.append(await real_sendfile(*args))  # type: ignore[arg-type]
        return sendfiles[-1]

    monkeypatch.setattr(routes, "_sendfile", spy)
    monkeypatch.setattr(routes, "CHUNK", 100_000)  # read in several chunks when not sent whole
    settings = make_settings()
    path = series_path(ct_series[0])
    client = await aiohttp_client(make_app(settings))
    _, cold = await get_parts(client, path, ANY_SYNTAX)
    await client.close()
    assert sendfiles == []  # cold parts are sent from memory
    # A new process on the same cache: entries are found in the index, not the hot map,
    # the answer is assembled locally with an exact length, every part by sendfile.
    client = await aiohttp_client(make_app(settings))
    served = client.app[METRICS].served_bytes
    resp, warm = await get_parts(client, path, ANY_SYNTAX)
    assert resp.headers["Content-Length"] == str(resp.content_length)
    assert sendfiles == [True] * len(ct_series)
    assert served._value.get() == sum(len(s.data) for s in ct_series)
    # One instance gone from the store: its length is unknown, the answer is chunked,
    # and the stored parts are read from their files in chunks.
    await asyncio.to_thread(client.app[STORE].sync.forget, ct_series[3].sop)
    sendfiles.clear()
    resp, mixed = await get_parts(client, path, ANY_SYNTAX)
    assert "Content-Length" not in resp.headers
    assert set(sendfiles) == {False} and len(sendfiles) >= len(ct_series) - 1
    assert [b for _, b in cold] == [b for _, b in warm] == [b for _, b in mixed] \
        == [s.data for s in ct_series]


async def test_retrieve_of_a_stored_file_cut_on_disk_breaks_the_connection(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        ct_series: list[Sample]) -> None:
    """A stored file shorter than its index says (disk trouble): never a complete multipart."""
    client = await aiohttp_client(make_app(make_settings()))
    path = series_path(ct_series[0])
    await get_parts(client, path, ANY_SYNTAX)
    store = client.app[STORE]
    await store.drain()
    entry = await store.get(ct_series[5].sop)
    assert entry is not None
    with entry.path.open("r+b") as f:
        f.truncate(entry.size // 2)
    resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200 and resp.content_length is not None
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


def open_files_under(directory: Path) -> list[str]:
    """This process's open files under ``directory`` (the test server runs in-process)."""
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(directory)):
                out.append(target)
    return out


async def test_retrieve_refetches_a_stored_file_deleted_on_disk(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        ct_series: list[Sample]) -> None:
    settings = make_settings()
    client = await aiohttp_client(make_app(settings))
    path = series_path(ct_series[0])
    await get_parts(client, path, ANY_SYNTAX)
    store = client.app[STORE]
    await store.drain()
    entry = await store.get(ct_series[4].sop)
    assert entry is not None
    entry.path.unlink()
    _, got = await get_parts(client, path, ANY_SYNTAX)  # opened in a batch: that one fails
    assert [b for _, b in got] == [s.data for s in ct_series]
    again = await store.get(ct_series[4].sop)
    assert again is not None and again.path.read_bytes() == ct_series[4].data
    assert open_files_under(settings.cache.directory / "objects") == []


async def test_aborted_warm_retrieve_closes_its_files(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        ct_series: list[Sample]) -> None:
    """A viewer gone mid-answer: the stored files opened ahead (in batches) are all closed."""
    settings = make_settings(dicomweb={"retrieve_concurrency": 2})
    client = await aiohttp_client(make_app(settings))
    path = series_path(ct_series[0])
    await get_parts(client, path, ANY_SYNTAX)
    await client.app[STORE].drain()
    for _ in range(3):
        resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
        assert resp.status == 200 and resp.content_length is not None
        await resp.content.readexactly(100_000)
        resp.close()  # the connection dropped, most parts unsent
    for _ in range(100):
        if not open_files_under(settings.cache.directory / "objects"):
            break
        await asyncio.sleep(0.05)
    assert open_files_under(settings.cache.directory / "objects") == []


async def test_a_part_given_up_while_its_batch_opens_closes_its_file(tmp_path: Path) -> None:
    from dicomcache.routes import wado_rs as routes

    path = tmp_path / "x.dcm"
    path.write_bytes(b"x" * 10)
    gate = asyncio.Event()
    files: list[BinaryIO] = []

    async def opening() -> list[routes.Opened]:
        await gate.wait()
        files.append(path.open("rb"))
        return [(files[0], 10)]

    batch = asyncio.ensure_future(opening())
    claim = asyncio.ensure_future(routes._claim(batch, 0))
    await asyncio.sleep(0)
    claim.cancel()  # the retrieve gave up (viewer gone, another part failed)
    with pytest.raises(asyncio.CancelledError):
        await claim
    gate.set()
    await batch
    await asyncio.sleep(0)  # done-callbacks run
    assert files[0].closed


async def test_single_instance_sent_from_its_file(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        samples: dict[str, list[Sample]], monkeypatch: pytest.MonkeyPatch,
        no_blocking: None) -> None:
    """A stored instance is framed around its file (sendfile), never read whole; HEAD
    announces the same length; a file cut on disk breaks the connection."""
    from dicomcache.routes import wado_rs as routes

    sendfiles: list[bool] = []
    real_sendfile = routes._sendfile

    async def spy(*args: object) -> bool:
        sendfiles.append(await real_sendfile(*args))  # type: ignore[arg-type]
        return sendfiles[-1]

    monkeypatch.setattr(routes, "_sendfile", spy)
    client = await aiohttp_client(make_app(make_settings()))
    s = samples["multiframe"][0]
    path = f"{series_path(s)}/instances/{s.sop}"
    _, direct = (await get_parts(client, path, ANY_SYNTAX))[1][0]
    assert direct == s.data
    await client.app[STORE].drain()
    sendfiles.clear()
    served = client.app[METRICS].served_bytes._value.get()
    resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
    body = await resp.read()
    assert sendfiles == [True]
    assert client.app[METRICS].served_bytes._value.get() == served + len(s.data)
    assert int(resp.headers["Content-Length"]) == len(body)
    [(headers, data)] = split_multipart(body, resp.headers["Content-Type"])
    assert data == s.data and headers["content-length"] == str(len(s.data))
    boundary = resp.headers["Content-Type"].rsplit("boundary=", 1)[1]
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    head = await client.head(path, headers={"Accept": ANY_SYNTAX})
    assert head.status == 200 and await head.read() == b""
    assert head.headers["Content-Length"] == resp.headers["Content-Length"]
    entry = await client.app[STORE].get(s.sop)
    assert entry is not None
    with entry.path.open("r+b") as f:
        f.truncate(entry.size // 2)
    resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_study_retrieve_identical_to_orthanc(
        client: TestClient, orthanc: OrthancProcess, samples: dict[str, list[Sample]]) -> None:
    s = samples["rle"][0]
    path = f"/dicom-web/studies/{s.study}"
    _, headers, direct = orthanc_answer(orthanc, path, {"Accept": ANY_SYNTAX})
    want = [body for _, body in split_multipart(direct, headers["Content-Type"])]
    for _ in range(2):
        _, got = await get_parts(client, path, ANY_SYNTAX)
        assert [body for _, body in got] == want


async def test_retrieve_errors(client: TestClient, samples: dict[str, list[Sample]]) -> None:
    s = samples["explicit"][0]
    other = samples["rle"][0]
    resp = await client.get(f"/dicom-web/studies/{other.study}/series/{s.series}",
                            headers={"Accept": ANY_SYNTAX})
    assert resp.status == 404, await resp.text()
    resp = await client.get("/dicom-web/studies/1.2.3.999/series/1.2.3.998")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not found"
    for bad in ("1..2", "1.2.a", "9" * 65):
        resp = await client.get(f"/dicom-web/studies/{bad}/series/{s.series}")
        assert resp.status == 400, bad
    resp = await client.get(f"/dicom-web/studies/{s.study}/series/{s.series}/instances/1.2..3/frames/1")
    assert resp.status == 400


# --- metadata -----------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["study", "series", "instance"])
async def test_metadata_equal_to_orthanc_with_links_on_dicomcache(
        client: TestClient, orthanc: OrthancProcess, samples: dict[str, list[Sample]],
        level: str) -> None:
    s = samples["multiframe"][0]
    path = {"study": f"/dicom-web/studies/{s.study}",
            "series": series_path(s),
            "instance": f"{series_path(s)}/instances/{s.sop}"}[level] + "/metadata"
    _, headers, direct = orthanc_answer(orthanc, path)
    want = unlink(json.loads(direct), orthanc.url + "/dicom-web")
    for host in ("viewer.example:8443", "127.0.0.1:1", "[::1]:8080"):
        resp = await client.get(path, headers={"Host": host})
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == headers["Content-Type"] == "application/dicom+json"
        body = await resp.read()
        assert orthanc.url.encode() not in body
        assert unlink(json.loads(body), f"http://{host}/dicom-web") == want
    resp = await client.get(path, headers={"Forwarded": 'for=1.2.3.4;host="pacs.example";proto=https'})
    assert unlink(await resp.json(content_type=None), "https://pacs.example/dicom-web") == want


async def test_metadata_public_url_bad_host_and_gzip(
        aiohttp_client, make_settings: SettingsFactory, samples: dict[str, list[Sample]]) -> None:
    client = await aiohttp_client(make_app(make_settings(
        dicomweb={"public_url": "https://dicomcache.clinic.example/pacs/"})))
    s = samples["explicit"][0]
    path = f"{series_path(s)}/metadata"
    resp = await client.get(path, headers={"Accept-Encoding": "gzip", "Host": "evil.example"})
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    assert resp.headers["Vary"] == "Accept-Encoding"
    body = await resp.read()  # aiohttp decompressed it
    unlink(json.loads(body), "https://dicomcache.clinic.example/pacs/dicom-web")
    raw = await client.get(path, headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    gz = await raw.read()
    assert json.loads(gzip.decompress(gz)) == json.loads(body)
    assert len(gz) < len(body) / 2
    etag = raw.headers["ETag"]
    resp = await client.get(path, headers={"Accept-Encoding": "gzip", "If-None-Match": etag})
    assert resp.status == 304
    plain = await client.get(path, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers and plain.headers["ETag"] != etag

    plain_client = await aiohttp_client(make_app(make_settings()))
    for host in ('a"b', "x.example/evil", "a b", "x\\y"):
        resp = await plain_client.get(path, headers={"Host": host})
        assert resp.status == 400, host


async def test_growing_series_shows_up_after_revalidation(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess) -> None:
    from dicomcache.samples import encode, make_ct_series
    from pydicom.uid import ExplicitVRLittleEndian

    datasets = make_ct_series(3, rows=32, columns=32, seed=123, patient_id="PGROW")
    blobs = [encode(ds, ExplicitVRLittleEndian) for ds in datasets]
    orthanc.upload(blobs[:2])
    s = datasets[0]
    base = f"/dicom-web/studies/{s.StudyInstanceUID}/series/{s.SeriesInstanceUID}"
    client = await aiohttp_client(make_app(make_settings(dicomweb={"metadata_fresh": 0.3})))

    async def counts() -> tuple[int, int, int]:
        meta = await (await client.get(base + "/metadata")).json(content_type=None)
        study = await (await client.get(f"/dicom-web/studies/{s.StudyInstanceUID}/metadata")).json(
            content_type=None)
        _, parts = await get_parts(client, base, ANY_SYNTAX)
        return len(meta), len(study), len(parts)

    assert await counts() == (2, 2, 2)
    orthanc.upload(blobs[2:])
    assert await counts() == (2, 2, 2)  # still fresh: not asked again
    await asyncio.sleep(0.35)
    assert await counts() == (3, 3, 3)


async def test_change_hook_expires_a_study_at_once(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess) -> None:
    """With Orthanc's /changes followed, a new instance shows up before metadata_fresh."""
    from dicomcache.changes import STUDY_CHANGED
    from dicomcache.samples import encode, make_ct_series
    from pydicom.uid import ExplicitVRLittleEndian

    datasets = make_ct_series(2, rows=32, columns=32, seed=124, patient_id="PHOOK")
    blobs = [encode(ds, ExplicitVRLittleEndian) for ds in datasets]
    orthanc.upload(blobs[:1])
    st, se = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    client = await aiohttp_client(make_app(make_settings(dicomweb={"metadata_fresh": 600})))
    path = f"/dicom-web/studies/{st}/series/{se}/metadata"
    assert len(await (await client.get(path)).json(content_type=None)) == 1
    orthanc.upload(blobs[1:])
    assert len(await (await client.get(path)).json(content_type=None)) == 1
    for hook in client.app[STUDY_CHANGED]:
        await hook(str(st))
    assert len(await (await client.get(path)).json(content_type=None)) == 2


# --- QIDO ---------------------------------------------------------------------------------

async def test_qido_equal_to_orthanc_and_cached(
        client: TestClient, orthanc: OrthancProcess, samples: dict[str, list[Sample]]) -> None:
    s = samples["jpegls"][0]
    for path in ("/dicom-web/studies?PatientID=PJPEGLS",
                 f"/dicom-web/studies/{s.study}/series",
                 f"/dicom-web/studies/{s.study}/series/{s.series}/instances?limit=2",
                 "/dicom-web/series?Modality=CT&PatientID=PJPEG*"):
        _, headers, direct = orthanc_answer(orthanc, path)
        want = unlink(json.loads(direct), orthanc.url + "/dicom-web")
        assert want, path
        for _ in range(2):
            resp = await client.get(path, headers={"Accept": "application/dicom+json"})
            assert resp.status == 200, path
            assert resp.headers["Content-Type"] == headers["Content-Type"]
            base = f"{resp.url.origin()}/dicom-web"
            assert unlink(await resp.json(content_type=None), base) == want, path


async def test_qido_bad_query_keeps_orthanc_status(client: TestClient) -> None:
    resp = await client.get("/dicom-web/studies?limit=notanumber")
    assert 400 <= resp.status < 500
    assert (await resp.json())["reason"]


# --- frames -------------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["explicit", "implicit", "bigendian", "deflated", "rle",
                                   "jpegls", "j2k", "multiframe"])
async def test_frames_identical_to_orthanc(
        client: TestClient, orthanc: OrthancProcess, samples: dict[str, list[Sample]],
        label: str) -> None:
    s = samples[label][1]
    frame_lists = ["1", "4,2", "1,3"] if label == "multiframe" else ["1"]
    # Cache the instance first, so that local cutting is what is compared.
    resp = await client.get(f"{series_path(s)}/instances/{s.sop}", headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200
    base = f"{resp.url.origin()}/dicom-web"
    for frames in frame_lists:
        path = f"{series_path(s)}/instances/{s.sop}/frames/{frames}"
        for accept in FRAME_ACCEPTS:
            status, headers, direct = orthanc_answer(orthanc, path,
                                                     {"Accept": accept} if accept else {})
            resp = await client.get(path, headers={"Accept": accept} if accept else {})
            body = await resp.read()
            assert resp.status == status, (accept, body[:200])
            if status != 200:
                continue
            ctype = resp.headers["Content-Type"]
            assert ctype.split("; boundary=")[0] == headers["Content-Type"].split("; boundary=")[0]
            want = split_multipart(direct, headers["Content-Type"])
            got = split_multipart(body, ctype)
            assert [b for _, b in got] == [b for _, b in want], accept
            for (gh, _), (wh, _) in zip(got, want, strict=True):
                assert gh["content-type"] == wh["content-type"]
                assert gh["content-location"].removeprefix(base) == \
                    wh["content-location"].removeprefix(orthanc.url + "/dicom-web")


@pytest.mark.parametrize("label", ["explicit", "implicit", "bigendian", "deflated", "rle",
                                   "multiframe"])
async def test_bulk_pixel_data_identical_to_orthanc(
        client: TestClient, orthanc: OrthancProcess, samples: dict[str, list[Sample]],
        label: str) -> None:
    s = samples[label][2]
    path = f"{series_path(s)}/instances/{s.sop}/bulk/7fe00010"
    for accept in (None, 'multipart/related; type="application/octet-stream"',
                   'multipart/related; type="*/*"', "application/json"):
        status, headers, direct = orthanc_answer(orthanc, path, {"Accept": accept} if accept else {})
        for _ in range(2):
            resp = await client.get(path, headers={"Accept": accept} if accept else {})
            body = await resp.read()
            assert resp.status == status, (accept, body[:200])
            if status == 200:
                ctype = resp.headers["Content-Type"]
                assert ctype.split("; boundary=")[0] == headers["Content-Type"].split("; boundary=")[0]
                assert split_multipart(body, ctype) == split_multipart(direct, headers["Content-Type"])


async def test_frames_served_from_cache_without_orthanc(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        samples: dict[str, list[Sample]]) -> None:
    from dicomcache.wanem import LinkProfile, WanEmulator

    s = samples["multiframe"][0]
    async with WanEmulator("127.0.0.1", orthanc.http_port, LinkProfile()) as wan:
        client = await aiohttp_client(make_app(make_settings(url=f"http://127.0.0.1:{wan.port}")))
        path = f"{series_path(s)}/instances/{s.sop}/frames/2,3"
        first = await client.get(path)  # miss: the whole instance is fetched and verified
        assert first.status == 200
        wan.set_down(True)
        again = await client.get(path)
        assert again.status == 200
        assert [b for _, b in split_multipart(await again.read(), again.headers["Content-Type"])] \
            == [b for _, b in split_multipart(await first.read(), first.headers["Content-Type"])]
        assert client.app[STORE].sync.peek(s.sop) is not None
        bulk = await client.get(f"{series_path(s)}/instances/{s.sop}/bulk/7fe00010")
        assert bulk.status == 200  # the pixel data a BulkDataURI names, from the store
        every = await client.get(f"{series_path(s)}/instances/{s.sop}/frames/1,2,3,4")
        frames = split_multipart(await every.read(), every.headers["Content-Type"])
        value = split_multipart(await bulk.read(), bulk.headers["Content-Type"])[0][1]
        assert value == b"".join(body for _, body in frames)


# --- rendered, HEAD, odd inputs --------------------------------------------------------------

async def test_rendered_identical_to_orthanc_and_cached(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        samples: dict[str, list[Sample]]) -> None:
    from dicomcache.wanem import LinkProfile, WanEmulator

    s = samples["explicit"][0]
    paths = [f"{series_path(s)}/instances/{s.sop}/rendered",
             f"{series_path(s)}/instances/{s.sop}/frames/1/rendered",
             f"{series_path(s)}/rendered?quality=50"]
    async with WanEmulator("127.0.0.1", orthanc.http_port, LinkProfile()) as wan:
        client = await aiohttp_client(make_app(make_settings(url=f"http://127.0.0.1:{wan.port}")))
        for path in paths:
            for accept in (None, "image/png"):
                hdrs = {"Accept": accept} if accept else {}
                status, headers, direct = orthanc_answer(orthanc, path, hdrs)
                assert status == 200
                for _ in range(2):
                    resp = await client.get(path, headers=hdrs)
                    assert resp.status == 200
                    assert resp.headers["Content-Type"] == headers["Content-Type"]
                    assert await resp.read() == direct
        # once per (path, Accept): the second round came from the cache
        assert all(n == 2 for t, n in wan.requests.items() if "rendered" in t), wan.requests
        # thumbnails: Orthanc's plugin has none; its 404 is kept, nothing cached
        resp = await client.get(f"{series_path(s)}/instances/{s.sop}/thumbnail")
        assert resp.status == 404


async def test_head_and_odd_inputs(client: TestClient, samples: dict[str, list[Sample]]) -> None:
    s = samples["explicit"][0]
    resp = await client.head(series_path(s), headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("multipart/related")
    assert await resp.read() == b""
    resp = await client.head(series_path(s) + "/metadata")
    assert resp.status == 200 and await resp.read() == b""
    # Not a DICOM part type: read through, Orthanc decides (bulk data of the series).
    resp = await client.get(series_path(s), headers={"Accept": "application/json"})
    assert resp.status >= 400
    # Metadata as XML: not cached, read through
    resp = await client.get(series_path(s) + "/metadata",
                            headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert resp.status != 500
    base = f"{series_path(s)}/instances/{s.sop}/frames"
    for frames, status in (("0", 400), ("99", 400), ("1,a", 400), ("", 404)):
        resp = await client.get(f"{base}/{frames}")
        assert 400 <= resp.status < 500, (frames, resp.status)
    # an instance under the wrong series
    other = samples["rle"][0]
    resp = await client.get(f"{series_path(other)}/instances/{s.sop}/frames/1")
    assert resp.status == 404
    resp = await client.get(f"{series_path(other)}/instances/{s.sop}/metadata")
    assert resp.status == 404
    # QIDO with encoded slashes or dot segments never reaches Orthanc
    resp = await client.get("/dicom-web/studies?PatientID=%2F..%2F")
    assert resp.status in (200, 400)
    for raw in ("/dicom-web/studies/1.2.3/series/%2E%2E/metadata",
                "/dicom-web/studies/1.2.3/series/1.2%2F3/metadata",
                "/dicom-web/studies/1.2.3/series?x=%00"):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(f"GET {raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status_line = await reader.readline()
        writer.close()
        assert status_line.split()[1] in (b"400", b"404"), (raw, status_line)


# --- CORS ---------------------------------------------------------------------------------

async def test_cors_closed_by_default(client: TestClient, samples: dict[str, list[Sample]]) -> None:
    s = samples["explicit"][0]
    resp = await client.options(f"{series_path(s)}/metadata", headers={
        "Origin": "https://ohif.example", "Access-Control-Request-Method": "GET"})
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.get(f"{series_path(s)}/metadata", headers={"Origin": "https://ohif.example"})
    assert resp.status == 200
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_allowed_origin(aiohttp_client, make_settings: SettingsFactory,
                                   samples: dict[str, list[Sample]]) -> None:
    client = await aiohttp_client(make_app(make_settings(
        cors={"allowed_origins": ["https://ohif.example"], "max_age": 120})))
    s = samples["explicit"][0]
    path = f"{series_path(s)}/metadata"
    resp = await client.options(path, headers={
        "Origin": "https://ohif.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, accept, range"})
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://ohif.example"
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "accept", "range"} <= allowed
    assert resp.headers["Access-Control-Max-Age"] == "120"
    for origin, method, hdr in (("https://evil.example", "GET", ""),
                                ("https://ohif.example", "DELETE", ""),
                                ("https://ohif.example", "GET", "x-custom")):
        resp = await client.options(path, headers={
            "Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": hdr})
        assert resp.status == 403, (origin, method, hdr)
        assert resp.headers.get("Access-Control-Allow-Origin") != origin or origin.startswith(
            "https://ohif")
    # Actual requests: metadata, a streamed retrieve, an instance file, an error.
    for url in (path, series_path(s), f"/instances/{s.orthanc_id}/file",
                "/dicom-web/studies/1.2.3.4/metadata"):
        resp = await client.get(url, headers={"Origin": "https://ohif.example",
                                              "Accept": ANY_SYNTAX if url == series_path(s)
                                              else "*/*"})
        await resp.read()
        assert resp.headers["Access-Control-Allow-Origin"] == "https://ohif.example", url
        assert "Origin" in resp.headers["Vary"]
        assert "Warning" in resp.headers["Access-Control-Expose-Headers"]
    resp = await client.get(path, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers
