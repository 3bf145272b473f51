"""DICOMweb through the fault injector: never a short multipart; stale copies while Orthanc
is away."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.dicomweb import retrieve
from dicomcache.http.app import make_app
from tests.conftest import Sample, SettingsFactory
from tests.http.dicomweb_support import ANY_SYNTAX, split_multipart, unlink


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator) -> TestClient:
    return await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}",
        dicomweb={"metadata_fresh": 0.2, "qido_fresh": 0.2, "retrieve_concurrency": 2},
        upstream={"breaker_failures": 0})))


@pytest.fixture
def single_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """No upstream series stream: these tests are about the per-instance path
    (the stream and its fallback: test_dicomweb_stream.py)."""
    monkeypatch.setattr(retrieve, "STREAM_MIN_MISSING", 1 << 30)


def series_path(s: Sample) -> str:
    return f"/dicom-web/studies/{s.study}/series/{s.series}"


@pytest.mark.parametrize("fault", ["reset", "truncate_lying", "corrupt", "status_503"])
async def test_unobtainable_instance_breaks_the_stream(
        client: TestClient, single_downloads: None,
        wan: WanEmulator, ct_series: list[Sample], fault: str) -> None:
    """Instance 6 of 12 never arrives intact: the viewer sees a broken body, not a short one."""
    bad = ct_series[5]
    wan.set_profile(LinkProfile(**{fault: 1.0}, fault_paths=f"/instances/{bad.orthanc_id}/file$",
                                seed=1))
    resp = await client.get(series_path(bad), headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200  # the first parts were already on their way
    assert "Content-Length" not in resp.headers  # chunked: a cut is visible to the client
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert wan.requests[f"/instances/{bad.orthanc_id}/file"] == 4  # first try + 3 retries


async def test_first_instance_unobtainable_is_a_json_error(
        client: TestClient, single_downloads: None,
        wan: WanEmulator, ct_series: list[Sample]) -> None:
    bad = ct_series[0]
    wan.set_profile(LinkProfile(reset=1.0, fault_paths=f"/instances/{bad.orthanc_id}/file$"))
    resp = await client.get(series_path(bad), headers={"Accept": ANY_SYNTAX})
    assert resp.status == 502
    body = await resp.json()
    assert body["attempts"] == 4 and body["reason"]


async def test_flaky_link_still_gives_whole_verified_series(
        client: TestClient, single_downloads: None,
        wan: WanEmulator, ct_series: list[Sample]) -> None:
    wan.set_profile(LinkProfile(truncate_lying=0.1, corrupt=0.05, reset=0.05,
                                fault_paths=r"/file$", seed=5))
    resp = await client.get(series_path(ct_series[0]), headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200
    parts = split_multipart(await resp.read(), resp.headers["Content-Type"])
    assert [body for _, body in parts] == [s.data for s in ct_series]
    assert sum(wan.faults.values()) > 0


async def test_stale_metadata_and_qido_served_when_orthanc_is_down(
        client: TestClient, wan: WanEmulator, samples: dict[str, list[Sample]]) -> None:
    s = samples["explicit"][0]
    paths = {"series": series_path(s) + "/metadata",
             "study": f"/dicom-web/studies/{s.study}/metadata",
             "instance": f"{series_path(s)}/instances/{s.sop}/metadata",
             "qido": f"/dicom-web/studies?PatientID={'PEXPLICIT'}"}
    first = {}
    for name, path in paths.items():
        resp = await client.get(path)
        assert resp.status == 200, name
        assert "Warning" not in resp.headers
        first[name] = await resp.read()
    retrieve = await client.get(series_path(s), headers={"Accept": ANY_SYNTAX})
    whole = split_multipart(await retrieve.read(), retrieve.headers["Content-Type"])

    wan.set_down(True)
    await asyncio.sleep(0.25)  # time passing: past metadata_fresh and qido_fresh
    for name, path in paths.items():
        resp = await client.get(path)
        assert resp.status == 200, name
        assert await resp.read() == first[name]
        # instance metadata too: an instance can be deleted or replaced in Orthanc
        assert resp.headers["Warning"].startswith("110 "), name
        assert int(resp.headers["Age"]) >= 0
    # The whole series still comes from the store, on a stale instance list.
    retrieve = await client.get(series_path(s), headers={"Accept": ANY_SYNTAX})
    assert split_multipart(await retrieve.read(), retrieve.headers["Content-Type"]) == whole
    # Nothing cached: an honest error, never an empty answer.
    other = samples["rle"][0]
    resp = await client.get(series_path(other) + "/metadata")
    assert resp.status in (502, 503, 504)
    assert json.loads(await resp.read())["reason"]

    wan.set_down(False)
    resp = await client.get(paths["series"])
    assert resp.status == 200 and "Warning" not in resp.headers


async def test_stale_copies_have_a_limit(aiohttp_client, make_settings: SettingsFactory,
                                         wan: WanEmulator,
                                         samples: dict[str, list[Sample]]) -> None:
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}",
        dicomweb={"metadata_fresh": 0.1, "stale_if_error": 0.1},
        upstream={"breaker_failures": 0})))
    s = samples["explicit"][0]
    path = series_path(s) + "/metadata"
    assert (await client.get(path)).status == 200
    wan.set_down(True)
    await asyncio.sleep(0.3)  # time passing: past metadata_fresh + stale_if_error
    assert (await client.get(path)).status in (502, 503, 504)


async def test_restart_while_orthanc_is_down_keeps_metadata(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        samples: dict[str, list[Sample]]) -> None:
    """Metadata, searches and instance lists survive a restart on disk: a clinic whose WAN
    is down when dicomcache restarts can still open the studies it had cached."""
    settings = make_settings(url=f"http://127.0.0.1:{wan.port}",
                             dicomweb={"metadata_fresh": 0.2, "qido_fresh": 0.2},
                             upstream={"breaker_failures": 0})
    s = samples["multiframe"][0]
    paths = [series_path(s) + "/metadata", f"{series_path(s)}/instances/{s.sop}/metadata",
             f"/dicom-web/studies/{s.study}/series"]
    first = await aiohttp_client(make_app(settings))
    before = [await (await first.get(p)).read() for p in paths]
    retrieve = await first.get(series_path(s), headers={"Accept": ANY_SYNTAX})
    whole = await retrieve.read()
    await first.close()

    wan.set_down(True)
    await asyncio.sleep(0.25)  # time passing: past metadata_fresh and qido_fresh
    second = await aiohttp_client(make_app(settings))
    for path, body in zip(paths, before, strict=True):
        resp = await second.get(path)
        assert resp.status == 200, path
        # (a new server, a new port: the links follow it)
        assert unlink(json.loads(await resp.read())) == unlink(json.loads(body))
        assert resp.headers["Warning"].startswith("110 ")
    resp = await second.get(series_path(s), headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200 and resp.headers["Content-Length"]
    parts = split_multipart(await resp.read(), resp.headers["Content-Type"])
    assert parts == split_multipart(whole, retrieve.headers["Content-Type"])
