"""Per-client limits on the viewer port: one client cannot take everyone's share.

Before (issue 15): nothing bounded one client.  A script sending requests as fast
as it could, or hundreds of cold misses at once, was served in full, holding the
upstream connections, Orthanc's HTTP threads and the worker threads the other
viewers needed.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.http.app import make_app
from dicomcache.http.audit import TrustedProxies
from dicomcache.http.keys import METRICS
from dicomcache.http.limits import (
    QUEUE_FACTOR,
    Admission,
    Bucket,
    ClientLimits,
    ConnectionGate,
    admission,
    longest_idle,
    take,
)
from dicomcache.metrics import Metrics
from tests.conftest import SettingsFactory, metric_value


@pytest.mark.parametrize("bucket, now, expected_tokens, expected_wait", [
    (None, 100.0, 9.0, 0.0),                    # a new client starts with a full burst
    (Bucket(0.0, 100.0), 100.0, 0.0, 0.5),      # empty: one token takes 1/rate
    (Bucket(0.0, 100.0), 100.25, 0.5, 0.25),    # half refilled: the rest
    (Bucket(0.0, 100.0), 100.5, 0.0, 0.0),      # refilled one token: admitted
    (Bucket(3.0, 100.0), 1000.0, 9.0, 0.0),     # long quiet: capped at the burst
    (Bucket(0.5, 100.0), 99.0, 0.5, 0.25),      # a clock step back adds nothing
])
def test_token_bucket(bucket: Bucket | None, now: float, expected_tokens: float,
                      expected_wait: float) -> None:
    after, wait = take(bucket, now, rate=2.0, burst=10.0)
    assert after == Bucket(expected_tokens, now)
    assert wait == pytest.approx(expected_wait)


async def test_many_clients_bound_the_table_not_the_memory() -> None:
    limits = ClientLimits(4, 10.0, 10, capacity=100)
    busy = limits.client("busy")
    assert await limits.turn(busy)
    for i in range(1000):
        entry = limits.client(f"10.0.{i // 256}.{i % 256}")
        limits.rate_wait(entry, 0.0)
    assert len(limits) <= 100
    assert limits.client("busy") is busy  # a client with a request in progress stays
    limits.done(busy)


async def test_waiters_take_their_turns_in_order_and_cancelled_ones_give_theirs_back() -> None:
    limits = ClientLimits(1, 0.0, 1)
    entry = limits.client("a")
    assert await limits.turn(entry)
    order: list[int] = []

    async def request(i: int) -> None:
        assert await limits.turn(entry)
        order.append(i)
        limits.done(entry)

    waiting = [asyncio.create_task(request(i)) for i in range(3)]
    cancelled = asyncio.create_task(request(99))
    await asyncio.sleep(0)
    cancelled.cancel()
    limits.done(entry)
    await asyncio.gather(*waiting)
    assert order == [0, 1, 2]
    assert entry.running == 0 and not entry.waiters


#: A search read through to Orthanc every time (no patient has this ID).
QIDO = "/dicom-web/studies?PatientID=NOBODY-LIMITS"


def from_(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def test_a_client_sending_too_fast_is_answered_429_and_others_are_not(
        aiohttp_client, make_settings: SettingsFactory) -> None:
    client: TestClient = await aiohttp_client(make_app(make_settings(
        server={"client_rate": 0.5, "client_burst": 3},
        audit={"trusted_proxies": ["127.0.0.1"]})))
    for _ in range(3):
        assert (await client.get(QIDO, headers=from_("10.1.1.1"))).status == 200
    refused = await client.get(QIDO, headers=from_("10.1.1.1"))
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "2"
    body = await refused.json()
    assert "server.client_rate" in body["reason"]
    # Another viewer (named by the trusted proxy) is served all the same.
    assert (await client.get(QIDO, headers=from_("10.1.1.2"))).status == 200
    assert metric_value(client.app[METRICS], "dicomcache_client_limited_total",
                        limit="rate") == 1


async def test_one_clients_burst_of_cold_requests_waits_its_turn_and_others_go_ahead(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator) -> None:
    """One client with 12 requests at once through a slow link, one in progress at a
    time: one runs, eight wait (in order), three are refused at once; another client's
    request is answered while the first one's queue is still being worked off."""
    wan.set_profile(LinkProfile(latency_ms=150))
    client: TestClient = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", server={"max_requests_per_client": 1},
        audit={"trusted_proxies": ["127.0.0.1"]})))
    finished: list[int] = []

    async def greedy() -> int:
        resp = await client.get(QIDO, headers=from_("10.2.2.2"))
        await resp.read()
        finished.append(resp.status)
        return resp.status

    burst = [asyncio.create_task(greedy()) for _ in range(12)]
    await asyncio.sleep(0.1)
    other = await client.get(QIDO, headers=from_("10.2.2.3"))
    assert other.status == 200
    assert finished.count(200) < 1 + QUEUE_FACTOR  # the burst is still being worked off
    statuses = await asyncio.gather(*burst)
    assert statuses.count(200) == 1 + QUEUE_FACTOR
    assert statuses.count(429) == 12 - 1 - QUEUE_FACTOR
    assert metric_value(client.app[METRICS], "dicomcache_client_limited_total",
                        limit="in_flight") == 12 - 1 - QUEUE_FACTOR


async def test_no_limits_when_turned_off(aiohttp_client, make_settings: SettingsFactory) -> None:
    client: TestClient = await aiohttp_client(make_app(make_settings(
        server={"client_rate": 0, "max_requests_per_client": 0})))
    statuses = await asyncio.gather(*(client.get("/healthz") for _ in range(50)))
    assert {r.status for r in statuses} == {200}


# --- connections per client (the listener's part: tests/http/test_connection_limits.py) ---
@pytest.mark.parametrize(("idle_since", "want"), [
    ([], None),
    ([None, None], None),                 # every one answering a request
    ([5.0, None, 3.0, 4.0], 2),           # idle the longest
    ([None, 7.0], 1),
    ([2.0, 2.0], 0),                      # a tie: the first accepted
])
def test_longest_idle(idle_since: list[float | None], want: int | None) -> None:
    assert longest_idle(idle_since) == want


@pytest.mark.parametrize(("idle_since", "limit", "want"), [
    ([], 64, (Admission.ADMIT, None)),
    ([1.0] * 63, 64, (Admission.ADMIT, None)),
    ([None] * 63, 64, (Admission.ADMIT, None)),          # busy or not, below the bound
    ([3.0, 1.0, 2.0], 3, (Admission.CLOSE_IDLE, 1)),     # at it: the longest idle goes
    ([None, None, 2.0], 3, (Admission.CLOSE_IDLE, 2)),
    ([None, None, None], 3, (Admission.REFUSE, None)),   # none idle: the new one goes
    ([None] * 500, 0, (Admission.ADMIT, None)),          # 0: no limit
])
def test_admission(idle_since: list[float | None], limit: int,
                   want: tuple[Admission, int | None]) -> None:
    assert admission(idle_since, limit) == want


class _Transport(asyncio.Transport):
    """Just what the gate reads of a transport: its write buffer, and abort()."""

    def __init__(self, buffered: int = 0) -> None:
        super().__init__()
        self.buffered, self.aborted = buffered, False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted = True


def test_gate_closes_a_clients_longest_idle_connection_then_refuses_when_all_are_busy(
        ) -> None:
    metrics = Metrics()
    gate = ConnectionGate(2, TrustedProxies.parse(["10.9.9.9"]), metrics)
    first, second = gate.accept("10.0.0.1"), gate.accept("10.0.0.1")
    assert first is not None and second is not None
    t1, t2 = _Transport(), _Transport()
    gate.made(first, t1)
    gate.made(second, t2)
    first.last_used, second.last_used = 1.0, 2.0
    # A third: the first (idle the longest) is closed and forgotten, the third admitted.
    third = gate.accept("10.0.0.1")
    assert third is not None and t1.aborted and not t2.aborted
    assert gate.of(t1) is None and gate.of(t2) is second
    # Both in use (a request; an answer still in the write buffer): a fourth is refused.
    second.busy = 1
    t3 = _Transport(buffered=100)
    gate.made(third, t3)
    assert gate.accept("10.0.0.1") is None
    assert metric_value(metrics, "dicomcache_client_limited_total", limit="connections") == 2
    # Another client is not affected; a trusted proxy is exempt.
    assert gate.accept("10.0.0.2") is not None
    assert all(gate.accept("10.9.9.9") is not None for _ in range(5))
    # The table remembers a client only while it has connections open.
    gate.lost(second)
    gate.lost(third)
    gate.lost(second)  # twice is harmless
    assert len(gate) == 2  # 10.0.0.2 and the proxy: 10.0.0.1 is forgotten
