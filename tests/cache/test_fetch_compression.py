"""``upstream.compression = "auto"`` over the WAN emulator in front of the real Orthanc.

Behaviour, not timing: the emulated link is made ten times slower than gzip's
break-even (or left as fast as loopback), and what crosses it is counted at the
emulator (each instance body's ``Content-Encoding``).  Every body the viewer gets,
cold and from the cache, is the one Orthanc stores, whatever crossed the link.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.dicom import syntaxes
from dicomcache.http.app import make_app
from dicomcache.http.keys import METRICS
from dicomcache.upstream.link import WINDOW
from tests.conftest import SettingsFactory, eventually, metric_value

#: Bodies per phase: more than half the window, so its median follows the new link.
PHASE = WINDOW // 2 + 6
#: 4.7x below the break-even with the priors (≈ 47 Mbit/s); loopback is far above it.
SLOW_MBIT = 10.0


@pytest.fixture(scope="module")
def slices(orthanc: OrthancProcess) -> Iterator[list[tuple[str, bytes]]]:
    """Three phases' worth of 512×512 CT slices (514 KiB each, ≈ 2.3× smaller gzipped)."""
    datasets = make_ct_series(3 * PHASE, seed=1616, patient_id="PAUTOGZ")
    blobs = [encode(ds, syntaxes.EXPLICIT_LE) for ds in datasets]
    ids = orthanc.upload(blobs)
    yield list(zip(ids, blobs, strict=True))
    for oid in ids:
        orthanc.request("DELETE", f"/instances/{oid}")


async def fetch_cold(client: TestClient, wan: WanEmulator, oid: str, blob: bytes) -> str:
    """A viewer's cold instance: the body is Orthanc's; how it crossed the link."""
    wan.reset_stats()
    resp = await client.get(f"/instances/{oid}/file")
    assert resp.status == 200 and resp.headers["X-Cache"] == "MISS"
    assert await resp.read() == blob
    (encoding,) = [e for (path, e), n in wan.stats.encodings.items()
                   for _ in range(n) if path == f"/instances/{oid}/file"]
    return encoding


async def test_auto_asks_gzip_on_a_slow_link_and_identity_on_a_fast_one(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        slices: list[tuple[str, bytes]]) -> None:
    client: TestClient = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"compression": "auto"})))
    metrics = client.app[METRICS]
    phases = [slices[i:i + PHASE] for i in range(0, len(slices), PHASE)]
    seen: list[list[str]] = []
    for profile, phase in zip([LinkProfile(), LinkProfile(bandwidth_mbit=SLOW_MBIT),
                               LinkProfile()], phases, strict=True):
        wan.set_profile(profile)
        seen.append([await fetch_cold(client, wan, oid, blob) for oid, blob in phase])
    fast, slow, fast_again = seen
    # Nothing measured yet: gzip, as a browser gets from Orthanc; then the fast link.
    assert fast[0] == "gzip", seen
    assert fast[-3:] == ["identity"] * 3, seen
    # Slowed: gzip once the window's median is the slow link's, and it stays.
    assert slow[0] == "identity" and slow[-3:] == ["gzip"] * 3, seen
    # Fast again: back to identity.
    assert fast_again[0] == "gzip" and fast_again[-3:] == ["identity"] * 3, seen
    assert metric_value(metrics, "dicomcache_upstream_body_encoding", encoding="identity") == 1
    assert metric_value(metrics, "dicomcache_upstream_body_encoding", encoding="gzip") == 0
    assert metric_value(metrics, "dicomcache_upstream_link_throughput_bytes") > (
        SLOW_MBIT * 1e6 / 8)
    total = sum(map(len, seen))
    assert metric_value(metrics, "dicomcache_upstream_instance_bodies_total",
                        encoding="gzip") == sum(s.count("gzip") for s in seen)
    assert metric_value(metrics, "dicomcache_upstream_instance_bodies_total",
                        encoding="identity") == total - sum(s.count("gzip") for s in seen)
    status = await (await client.get("/status.json")).json()
    shown = status["upstream"]["compression"]
    assert shown["mode"] == "auto" and shown["choice"] == "identity"
    assert shown["bytes_per_second"] > SLOW_MBIT * 1e6 / 8 and shown["gzip_ratio"] > 1.5
    page = await (await client.get("/")).text()
    assert '<span id="body-encoding">identity</span>' in page
    # What was stored is what Orthanc stores, however it crossed: served from the cache.
    for oid, blob in slices[::7]:
        resp = await client.get(f"/instances/{oid}/file")
        assert resp.headers["X-Cache"] == "HIT" and await resp.read() == blob


@pytest.mark.parametrize(("mode", "expected"), [("json", "identity"), ("all", "gzip")])
async def test_fixed_modes_ask_the_same_whatever_the_link(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        slices: list[tuple[str, bytes]], mode: str, expected: str) -> None:
    client: TestClient = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"compression": mode})))
    got = [await fetch_cold(client, wan, oid, blob) for oid, blob in slices[:4]]
    assert got == [expected] * 4
    status = await (await client.get("/status.json")).json()
    assert status["upstream"]["compression"]["choice"] == expected


async def test_a_body_that_timed_out_gzipped_is_retried_as_stored(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        slices: list[tuple[str, bytes]]) -> None:
    """Orthanc gzips a whole file before its first byte; for a large multi-frame that
    can outlast ``read_timeout``, and every retry would time out the same way."""
    oid, blob = slices[-1]
    client: TestClient = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}",
        upstream={"compression": "all", "read_timeout": 1, "retries": 2})))
    wan.reset_stats()
    wan.set_profile(LinkProfile(stall=1.0, stall_seconds=3, fault_paths=r"/file$"))
    task = asyncio.create_task(client.get(f"/instances/{oid}/file"))
    await eventually(lambda: wan.faults["stall"] >= 1, what="the gzipped body stalled")
    wan.set_profile(LinkProfile())
    resp = await task
    assert resp.status == 200 and await resp.read() == blob
    path = f"/instances/{oid}/file"
    assert {e: n for (p, e), n in wan.stats.encodings.items() if p == path} == {
        "gzip": 1, "identity": 1}
