"""DICOMweb metadata, QIDO, frames, rendered and CORS compared with Orthanc's own answers."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.http.app import make_app
from dicomcache.http.keys import STORE
from tests.conftest import Sample, SettingsFactory
from tests.http.dicomweb_support import (
    ANY_SYNTAX,
    get_parts,
    orthanc_answer,
    series_path,
    split_multipart,
    unlink,
)

FRAME_ACCEPTS = [
    None,
    'multipart/related; type="application/octet-stream"',
    'multipart/related; type="application/octet-stream"; transfer-syntax=*',
    'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2',
    "multipart/related; type=application/octet-stream; transfer-syntax=*",  # OHIF's, unquoted
    "*/*",
]


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory) -> TestClient:
    """The app with blockbuster watching: nothing may block the event loop."""
    return await aiohttp_client(make_app(make_settings(server={"allowed_hosts": [
        "127.0.0.1", "[::1]", "viewer.example"]})))


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
    resp = await client.get(
        path, headers={"Forwarded": 'for=1.2.3.4;host="pacs.example";proto=https'})
    assert unlink(await resp.json(content_type=None), "https://pacs.example/dicom-web") == want


async def test_metadata_public_url_bad_host_and_gzip(
        aiohttp_client, make_settings: SettingsFactory, samples: dict[str, list[Sample]]) -> None:
    client = await aiohttp_client(make_app(make_settings(
        dicomweb={"public_url": "https://dicomcache.clinic.example/pacs/"})))
    s = samples["explicit"][0]
    path = f"{series_path(s)}/metadata"
    resp = await client.get(path, headers={"Host": "evil.example"})
    assert resp.status == 421  # a name this service does not have (DNS rebinding)
    resp = await client.get(path, headers={"Accept-Encoding": "gzip"})
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
    from pydicom.uid import ExplicitVRLittleEndian

    from dicomcache.devtools.samples import encode, make_ct_series

    datasets = make_ct_series(3, rows=32, columns=32, seed=123, patient_id="PGROW")
    blobs = [encode(ds, ExplicitVRLittleEndian) for ds in datasets]
    await asyncio.to_thread(orthanc.upload, blobs[:2])
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
    await asyncio.to_thread(orthanc.upload, blobs[2:])
    assert await counts() == (2, 2, 2)  # still fresh: not asked again
    await asyncio.sleep(0.35)  # time passing: past metadata_fresh (0.3 s)
    assert await counts() == (3, 3, 3)


async def test_change_hook_expires_a_study_at_once(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess) -> None:
    """With Orthanc's /changes followed, a new instance shows up before metadata_fresh."""
    from pydicom.uid import ExplicitVRLittleEndian

    from dicomcache.devtools.samples import encode, make_ct_series
    from dicomcache.http.keys import STUDY_CHANGED
    from dicomcache.upstream.changes import StudyEvent

    datasets = make_ct_series(2, rows=32, columns=32, seed=124, patient_id="PHOOK")
    blobs = [encode(ds, ExplicitVRLittleEndian) for ds in datasets]
    await asyncio.to_thread(orthanc.upload, blobs[:1])
    st, se = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    client = await aiohttp_client(make_app(make_settings(dicomweb={"metadata_fresh": 600})))
    path = f"/dicom-web/studies/{st}/series/{se}/metadata"
    assert len(await (await client.get(path)).json(content_type=None)) == 1
    await asyncio.to_thread(orthanc.upload, blobs[1:])
    assert len(await (await client.get(path)).json(content_type=None)) == 1
    for hook in client.app[STUDY_CHANGED]:
        await hook(StudyEvent(str(st)))
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
        status, headers, direct = orthanc_answer(orthanc, path,
                                                 {"Accept": accept} if accept else {})
        for _ in range(2):
            resp = await client.get(path, headers={"Accept": accept} if accept else {})
            body = await resp.read()
            assert resp.status == status, (accept, body[:200])
            if status == 200:
                ctype = resp.headers["Content-Type"]
                theirs = headers["Content-Type"]
                assert ctype.split("; boundary=")[0] == theirs.split("; boundary=")[0]
                assert split_multipart(body, ctype) == split_multipart(direct, theirs)


async def test_frames_served_from_cache_without_orthanc(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        samples: dict[str, list[Sample]]) -> None:
    from dicomcache.devtools.wanem import LinkProfile, WanEmulator

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
        assert client.app[STORE].sync.peek(s.orthanc_id) is not None
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
    from dicomcache.devtools.wanem import LinkProfile, WanEmulator

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
    for frames, status in (("0", 400), ("99", 400), ("1,a", 400), ("", 400)):
        resp = await client.get(f"{base}/{frames}")
        assert resp.status == status, (frames, resp.status)
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
        writer.write(f"GET {raw} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                     .encode())
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
