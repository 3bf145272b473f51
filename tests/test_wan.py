"""The whole WAN story at once: prefetch, faults, a link that dies and comes back."""

from __future__ import annotations

import hashlib

from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.http.app import make_app
from dicomcache.http.keys import CLIENT, METRICS, PREFETCHER, STORE
from tests.conftest import Sample, SettingsFactory, eventually


def wado(s: Sample) -> str:
    return (f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}&objectUID={s.sop}"
            "&contentType=application/dicom")


async def test_mixed_faults_with_prefetch_every_body_intact(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    """20 % mixed faults on every request (listings too) while prefetch and a viewer run."""
    wan.set_profile(LinkProfile(latency_ms=2, truncate_lying=0.04, truncate=0.04, reset=0.04,
                                corrupt=0.04, status_503=0.04, seed=5))
    settings = make_settings(url=f"http://127.0.0.1:{wan.port}",
                             prefetch={"mode": "series", "parallel": 3})
    client = await aiohttp_client(make_app(settings))
    delivered = 0
    for s in ct_series:  # a viewer scrolling, while prefetch runs ahead of it
        resp = await client.get(wado(s))
        body = await resp.read()
        assert resp.status in (200, 502), resp.status
        if resp.status == 200:
            assert hashlib.md5(body).digest() == hashlib.md5(s.data).digest()
            delivered += 1
    assert delivered >= len(ct_series) - 1
    assert await client.app[PREFETCHER].idle(60)
    assert sum(wan.faults.values()) > 0
    # Everything stored is intact too.
    store = client.app[STORE]
    for s in ct_series:
        entry = await store.get(s.orthanc_id)
        if entry is not None:
            assert entry.path.read_bytes() == s.data


async def test_link_dies_during_prefetch_then_comes_back(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    wan.set_profile(LinkProfile(latency_ms=5, bandwidth_mbit=40))
    settings = make_settings(url=f"http://127.0.0.1:{wan.port}",
                             upstream={"retries": 1, "breaker_failures": 1,
                                       "breaker_probe_interval": 0.2},
                             prefetch={"mode": "series", "parallel": 2})
    client = await aiohttp_client(make_app(settings))
    first = ct_series[0]
    assert (await client.get(wado(first))).status == 200
    prefetcher = client.app[PREFETCHER]
    await eventually(lambda: wan.requests[f"/instances/{ct_series[2].orthanc_id}/file"],
                     what="prefetch under way")

    wan.set_down(True)
    assert await prefetcher.idle(10), "prefetch kept waiting on a dead link"
    breaker = client.app[CLIENT].breaker
    assert breaker.state == "open"
    missing = [s for s in ct_series if await client.app[STORE].get(s.orthanc_id) is None]
    assert missing, "prefetch finished before the link went down"
    resp = await client.get(wado(missing[-1]))
    assert resp.status == 503 and "Retry-After" in resp.headers
    resp = await client.get(wado(first))  # cached: still served
    assert resp.status == 200 and await resp.read() == first.data

    wan.set_down(False)
    await eventually(lambda: breaker.state == "closed", what="the circuit closed")
    resp = await client.get(wado(missing[-1]))
    assert resp.status == 200 and await resp.read() == missing[-1].data
    # That touch restarted the interrupted prefetch: the series completes.
    assert await prefetcher.idle(30)
    for s in ct_series:
        assert await client.app[STORE].get(s.orthanc_id) is not None
    assert breaker.opened_count >= 1
    assert client.app[METRICS].upstream_state is True
