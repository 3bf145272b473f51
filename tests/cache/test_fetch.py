"""Misses through a fault injector in front of the real Orthanc.

Every body a viewer gets is intact (byte-identical to the upload) or it gets a
502 with a JSON reason — never a short or corrupted body.  Concurrent misses
for one instance cause one download, whatever API family asks.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.http.app import make_app
from dicomcache.http.keys import METRICS, STORE
from tests.conftest import Sample, SettingsFactory, metric_value

FAULTS = ["truncate_lying", "truncate", "close_early", "reset", "corrupt", "status_503"]


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator) -> TestClient:
    # Bodies as stored, so a corrupted one fails its MD5 (gzipped bodies:
    # tests/cache/test_receive.py and test_fetch_compression.py).
    return await aiohttp_client(make_app(make_settings(url=f"http://127.0.0.1:{wan.port}",
                                                       upstream={"compression": "json"})))


@pytest.mark.parametrize("fault", FAULTS)
async def test_always_failing_link_gives_502_never_a_bad_body(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample], fault: str) -> None:
    wan.set_profile(LinkProfile(**{fault: 1.0}, fault_paths=r"/file$", seed=1))
    s = ct_series[2]
    resp = await client.get(f"/instances/{s.orthanc_id}/file")
    assert resp.status == 502, fault
    body = await resp.json()
    assert body["attempts"] == 4  # the first try and upstream.retries = 3
    assert body["error"] and body["reason"]
    assert wan.requests[f"/instances/{s.orthanc_id}/file"] == 4
    if fault in ("truncate_lying", "corrupt"):
        # Caught by verification, not by HTTP: the "buffer overruns prevented".
        # (The MD5 is checked before the parse, so it names both.)
        assert metric_value(client.app[METRICS], "dicomcache_integrity_failures_total",
                            cause="md5_mismatch") == 4
    # Nothing unverified was stored: with the link healed, the next request is a clean miss.
    wan.set_profile(LinkProfile())
    resp = await client.get(f"/instances/{s.orthanc_id}/file")
    assert resp.status == 200 and await resp.read() == s.data


@pytest.mark.parametrize("fault", FAULTS)
async def test_flaky_link_bodies_are_intact_or_502(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample], fault: str) -> None:
    wan.set_profile(LinkProfile(**{fault: 0.5}, fault_paths=r"/file$", seed=7))
    results = await asyncio.gather(*(client.get(f"/instances/{s.orthanc_id}/file")
                                     for s in ct_series))
    ok = 0
    for s, resp in zip(ct_series, results, strict=True):
        body = await resp.read()
        if resp.status == 200:
            assert hashlib.md5(body).digest() == hashlib.md5(s.data).digest(), fault
            assert len(body) == len(s.data)
            ok += 1
        else:
            assert resp.status == 502, (fault, resp.status)
    assert ok >= len(ct_series) // 2, "with 3 retries at 50 % faults most should get through"
    assert wan.faults[fault] > 0


async def test_mixed_faults_every_family(client: TestClient, wan: WanEmulator,
                                         samples: dict[str, list[Sample]]) -> None:
    """20 % mixed faults on every upstream request, all three families, many syntaxes."""
    wan.set_profile(LinkProfile(truncate_lying=0.04, truncate=0.04, reset=0.04, corrupt=0.04,
                                status_503=0.04, seed=3))
    requests = []
    for items in samples.values():
        for s in items:
            requests.append((s, f"/instances/{s.orthanc_id}/file"))
            requests.append((s, f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
                                f"&objectUID={s.sop}&contentType=application/dicom"))
    for s, url in requests:
        resp = await client.get(url)
        body = await resp.read()
        assert resp.status in (200, 502)
        if resp.status == 200:
            assert body == s.data
    assert sum(wan.faults.values()) > 0


async def test_concurrent_misses_one_download(client: TestClient, wan: WanEmulator,
                                              ct_series: list[Sample]) -> None:
    wan.set_profile(LinkProfile(latency_ms=40))
    s = ct_series[5]
    urls = ([f"/instances/{s.orthanc_id}/file"] * 6
            + [f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
               f"&objectUID={s.sop}&contentType=application/dicom"] * 6
            + [f"/dicom-web/studies/{s.study}/series/{s.series}/instances/{s.sop}"] * 6)
    responses = await asyncio.gather(*(client.get(u, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        for u in urls))
    for resp in responses:
        assert resp.status == 200
        body = await resp.read()
        assert s.data in body
    assert wan.requests[f"/instances/{s.orthanc_id}/file"] == 1
    assert wan.requests["/tools/lookup"] <= 1
    assert metric_value(client.app[METRICS], "dicomcache_coalesced_requests_total") >= 5
    # And later requests are hits: no more upstream traffic at all.
    before = sum(wan.requests.values())
    for u in urls[::6]:
        assert (await client.get(u)).status == 200
    assert sum(wan.requests.values()) == before


async def test_client_headers_never_change_cached_bytes(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample]) -> None:
    s = ct_series[6]
    resp = await client.get(f"/instances/{s.orthanc_id}/file",
                            headers={"Accept-Encoding": "gzip, deflate, br",
                                     "Range": "bytes=0-10", "Cache-Control": "no-cache"})
    assert resp.status == 206
    resp = await client.get(f"/instances/{s.orthanc_id}/file")
    assert await resp.read() == s.data
    assert "Content-Encoding" not in resp.headers


async def test_upstream_404_is_404_not_retried(client: TestClient, wan: WanEmulator) -> None:
    oid = "00000000-11111111-22222222-33333333-44444444"
    resp = await client.get(f"/instances/{oid}/file")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not found"
    assert wan.requests[f"/instances/{oid}/file"] == 1
    resp = await client.get(
        "/wado?requestType=WADO&objectUID=1.2.3.4.5&contentType=application/dicom")
    assert resp.status == 404


async def test_wrong_credentials_are_a_clear_502(aiohttp_client, make_settings: SettingsFactory,
                                                  ct_series: list[Sample]) -> None:
    client = await aiohttp_client(make_app(make_settings(upstream={"password": "wrong"})))
    resp = await client.get(f"/instances/{ct_series[0].orthanc_id}/file")
    assert resp.status == 502
    body = await resp.json()
    assert "credentials" in body["reason"] and body["attempts"] == 1
    assert "wrong" not in await resp.text()


async def test_full_disk_still_serves_the_verified_instance(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample], monkeypatch,  # type: ignore[no-untyped-def]
        caplog: pytest.LogCaptureFixture) -> None:
    import errno

    from dicomcache.cache.store import Store
    from dicomcache.errors import StoreFull

    def full(self: Store, data: bytes) -> None:
        raise StoreFull(errno.ENOSPC, "cache disk full: No space left on device")

    monkeypatch.setattr(Store, "write_temp", full)
    s = ct_series[7]
    for _ in range(2):  # not cached: both are misses, both whole
        resp = await client.get(f"/instances/{s.orthanc_id}/file")
        assert resp.status == 200 and await resp.read() == s.data
        assert resp.headers["ETag"] == f'"{hashlib.md5(s.data).hexdigest()}"'
    assert wan.requests[f"/instances/{s.orthanc_id}/file"] == 2
    await client.app[STORE].drain()  # each was served before its disk copy was tried
    # The failed write degraded the cache: the next body is not even tried.  Counted
    # every time, logged once (a full disk would otherwise log every instance).
    metrics = client.app[METRICS]
    assert metric_value(metrics, "dicomcache_cache_write_failures_total", cause="disk_full") == 1
    assert metric_value(metrics, "dicomcache_cache_write_failures_total", cause="degraded") == 1
    assert metric_value(metrics, "dicomcache_cache_degraded", cause="disk_full") == 1
    assert caplog.text.count("cache disk full") == 1
    assert metrics.last_uncached is not None and metrics.last_uncached[1] == s.orthanc_id


async def test_corrupted_md5_answer_is_not_taken_for_no_md5(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample]) -> None:
    """Corruption of both the body and Orthanc's MD5 answer must not pass as 'no MD5'."""
    wan.set_profile(LinkProfile(corrupt=1.0, fault_paths=r"/file$|/md5$", seed=5))
    s = ct_series[8]
    resp = await client.get(f"/instances/{s.orthanc_id}/file")
    assert resp.status == 502
    wan.set_profile(LinkProfile())
    resp = await client.get(f"/instances/{s.orthanc_id}/file")
    assert resp.status == 200 and await resp.read() == s.data


async def test_a_viewer_gets_its_verified_instance_before_its_disk_copy(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A viewer's cold instance is answered once verified; its copy on the cache disk
    (a write and three fsyncs: slow on a busy disk) follows, and a lookup meanwhile
    waits for it instead of downloading again."""
    import threading

    from dicomcache.cache.instance import Instance
    from dicomcache.cache.store import Store

    release = threading.Event()
    commit_body = Store.commit_body

    def slow_disk(self: Store, body: Instance) -> Instance | None:
        release.wait(30)
        return commit_body(self, body)

    monkeypatch.setattr(Store, "commit_body", slow_disk)
    s = ct_series[6]
    try:
        resp = await asyncio.wait_for(client.get(f"/instances/{s.orthanc_id}/file"), 10)
        assert resp.status == 200 and await resp.read() == s.data
        again = asyncio.ensure_future(client.get(f"/instances/{s.orthanc_id}/file"))
        await asyncio.sleep(0.2)
        assert not again.done(), "a lookup did not wait for the disk copy under way"
    finally:
        release.set()
    resp = await again
    assert resp.status == 200 and await resp.read() == s.data
    store = client.app[STORE]
    await store.drain()
    stored = await store.get(s.orthanc_id)
    assert stored is not None and stored.path is not None and stored.path.exists()
    assert wan.requests[f"/instances/{s.orthanc_id}/file"] == 1
