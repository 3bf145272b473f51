"""The circuit breaker: a dead link makes misses fail fast; the cache keeps serving.

Through the WAN emulator in front of the real Orthanc: the link goes down, the
circuit opens after ``breaker_failures`` failed requests, misses get ``503`` +
``Retry-After`` + a JSON reason without touching the link, hits stay ``200``;
the link comes back, the background probe closes the circuit.
"""

from __future__ import annotations

import time

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.devtools.wanem import WanEmulator
from dicomcache.errors import UpstreamUnavailable
from dicomcache.http.app import make_app
from dicomcache.http.keys import CLIENT, METRICS
from dicomcache.metrics import Metrics
from dicomcache.upstream.breaker import CircuitBreaker
from tests.conftest import Sample, SettingsFactory, eventually, metric_value


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator) -> TestClient:
    settings = make_settings(url=f"http://127.0.0.1:{wan.port}",
                             upstream={"retries": 1, "breaker_failures": 2,
                                       "breaker_probe_interval": 0.2})
    return await aiohttp_client(make_app(settings))


async def test_open_fail_fast_serve_cached_then_recover(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample]) -> None:
    cached, *others = ct_series
    assert (await client.get(f"/instances/{cached.orthanc_id}/file")).status == 200
    breaker = client.app[CLIENT].breaker
    assert breaker.state == "closed"

    wan.set_down(True)
    for s in others[:2]:  # two requests failing on every attempt open the circuit
        resp = await client.get(f"/instances/{s.orthanc_id}/file")
        assert resp.status == 502, await resp.text()
    assert breaker.state == "open"
    assert metric_value(client.app[METRICS], "dicomcache_upstream_up") == 0

    # Misses now fail fast, without going near the link.
    before = sum(wan.requests.values()), wan.stats.connections
    started = time.monotonic()
    resp = await client.get(f"/instances/{others[3].orthanc_id}/file")
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    body = await resp.json()
    assert body["error"] == "upstream unavailable" and "unreachable" in body["reason"]
    assert body["retry_after"] >= 1
    resp = await client.get(f"/instances/{ct_series[0].orthanc_id}/tags")  # read-through too
    assert resp.status == 503
    assert time.monotonic() - started < 0.5
    assert (sum(wan.requests.values()), wan.stats.connections) == before
    # What is cached stays available.
    resp = await client.get(f"/instances/{cached.orthanc_id}/file")
    assert resp.status == 200 and await resp.read() == cached.data
    assert client.app[METRICS].upstream_state is False

    # The link comes back: the background probe closes the circuit.
    wan.set_down(False)
    await eventually(lambda: breaker.state == "closed", what="the circuit closed")
    assert wan.requests["/system"] >= 1
    resp = await client.get(f"/instances/{others[3].orthanc_id}/file")
    assert resp.status == 200 and await resp.read() == others[3].data
    assert breaker.opened_count == 1 and breaker.rejected_count == 2
    assert metric_value(client.app[METRICS], "dicomcache_upstream_up") == 1


async def test_retries_stop_when_the_circuit_opens(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample]) -> None:
    """A miss waiting between retries gives up at once when others open the circuit."""
    breaker = client.app[CLIENT].breaker
    wan.set_down(True)
    breaker.failure("test")
    breaker.failure("test")
    assert breaker.state == "open"
    resp = await client.get(f"/instances/{ct_series[7].orthanc_id}/file")
    assert resp.status == 503
    wan.set_down(False)
    await eventually(lambda: breaker.state == "closed", what="the circuit closed")


async def test_breaker_unit_counts_consecutive_failures_only() -> None:
    probes: list[bool] = []

    async def probe() -> bool:
        probes.append(True)
        return len(probes) >= 2  # the second probe succeeds

    b = CircuitBreaker(3, 0.05, probe, Metrics(), "http://orthanc")
    b.failure("reset")
    b.failure("reset")
    b.success()  # a success in between: the count starts again
    b.failure("reset")
    b.failure("reset")
    assert b.state == "closed"
    b.failure("timeout")
    assert b.state == "open" and b.status()["reason"] == "timeout"
    with pytest.raises(UpstreamUnavailable) as info:
        b.check("GET /x")
    assert info.value.cause == "circuit_open"
    await eventually(lambda: b.state == "closed", timeout=5, what="the circuit closed")
    assert len(probes) == 2
    b.check("GET /x")
    await b.close()


async def test_disabled_breaker_never_opens() -> None:
    async def probe() -> bool:
        return False

    b = CircuitBreaker(0, 1, probe, Metrics(), "x")
    for _ in range(10):
        b.failure("reset")
    assert b.state == "closed"
    await b.close()
