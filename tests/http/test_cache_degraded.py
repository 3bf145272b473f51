"""The cache disk in trouble at run time (a real, small tmpfs in front of the real
Orthanc): every instance still reaches the viewer verified, ``/readyz`` stays 200
and says "cache degraded", and caching resumes by itself once the disk recovers.

Also the ``[cache] min_free`` guard: least-recently-used entries (never pinned
ones) are evicted before the file system runs out, and when that cannot restore
``min_free`` new bodies are served without being cached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.cache.space import INDEX_HEADROOM
from dicomcache.http.app import make_app
from dicomcache.http.keys import METRICS, STORE
from tests.conftest import (
    Sample,
    SettingsFactory,
    eventually,
    fill_filesystem,
    free_bytes,
    metric_value,
    tmpfs,
)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MiB tmpfs (a dozen 512 KiB CT slices do not fit)."""
    with tmpfs(tmp_path / "disk", "size=6m") as where:
        yield where


async def fetch(client: TestClient, s: Sample, *, by_uids: bool = False) -> str:
    """GET the instance; assert it is whole and verified; its X-Cache."""
    path = (f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
            f"&objectUID={s.sop}&contentType=application/dicom" if by_uids
            else f"/instances/{s.orthanc_id}/file")
    resp = await client.get(path)
    body = await resp.read()
    assert resp.status == 200 and body == s.data, (path, resp.status, body[:300])
    return resp.headers.get("X-Cache", "")


async def readyz(client: TestClient) -> dict[str, Any]:
    resp = await client.get("/readyz")
    body: dict[str, Any] = await resp.json()
    assert resp.status == 200 and body["ready"] is True, body
    return body


async def test_a_cache_disk_that_fills_at_run_time_serves_then_recovers(
        aiohttp_client: Any, make_settings: SettingsFactory, disk: Path,
        ct_series: list[Sample]) -> None:
    settings = make_settings(cache={"directory": str(disk / "cache"), "max_size": "1GB",
                                    "min_free": 0})  # no guard: the disk really fills
    client = await aiohttp_client(make_app(settings))
    metrics = client.app[METRICS]
    for s in ct_series[:2]:  # cached while there is room
        assert await fetch(client, s) == "MISS"
        assert await fetch(client, s) == "HIT"
    assert (await readyz(client))["store"]["degraded"] is None

    filler = await asyncio.to_thread(fill_filesystem, disk)  # another program fills the disk
    for s in ct_series[2:5]:
        for by_uids in (False, True, False):
            assert await fetch(client, s, by_uids=by_uids) != "HIT"
    for s in ct_series[:2]:  # what is stored is still served from the disk
        assert await fetch(client, s) == "HIT"
        assert await fetch(client, s, by_uids=True) == "HIT"
    ready = await readyz(client)
    assert ready["store"]["degraded"] == "disk_full"
    assert "cache degraded: disk_full" in ready["store"]["status"]
    state = await (await client.get("/status.json")).json()
    assert state["cache"]["degraded"] == "disk_full"
    assert "cache degraded" in (await (await client.get("/")).text()).lower()
    assert metric_value(metrics, "dicomcache_cache_degraded", cause="disk_full") == 1

    await asyncio.to_thread(filler.unlink)  # space returns

    async def recovered() -> bool:
        return (await readyz(client))["store"]["degraded"] is None
    await eventually(recovered, timeout=30, interval=0.2, what="the cache recovered")
    assert metric_value(metrics, "dicomcache_cache_degraded", cause="disk_full") == 0
    s = ct_series[6]
    assert await fetch(client, s) == "MISS"
    assert await fetch(client, s) == "HIT"


async def test_min_free_evicts_least_recently_used_before_the_disk_fills(
        aiohttp_client: Any, make_settings: SettingsFactory, disk: Path,
        ct_series: list[Sample]) -> None:
    """12 slices of 512 KiB, a 6 MiB disk that must keep 2 MiB free: the oldest go."""
    min_free = 2 << 20
    settings = make_settings(cache={"directory": str(disk / "cache"), "max_size": "1GB",
                                    "min_free": "2MiB"})
    client = await aiohttp_client(make_app(settings))
    metrics = client.app[METRICS]
    for s in ct_series:
        assert await fetch(client, s) == "MISS"
        assert await asyncio.to_thread(free_bytes, disk) >= min_free
    assert metric_value(metrics, "dicomcache_cache_write_failures_total",
                        cause="disk_full") == 0
    assert (await readyz(client))["store"]["degraded"] is None
    stats = await client.app[STORE].stats()
    assert 0 < stats["entries"] < len(ct_series) and stats["min_free_evictions"] > 0
    assert await fetch(client, ct_series[-1]) == "HIT"  # the newest stay
    assert await fetch(client, ct_series[0]) == "MISS"  # the oldest went
    assert metric_value(metrics, "dicomcache_cache_min_free_bytes") == min_free
    assert await eventually(lambda: metric_value(metrics, "dicomcache_cache_disk_free_bytes")
                            >= min_free, what="the free-space gauge")


async def test_min_free_never_evicts_pinned_studies_it_serves_uncached(
        aiohttp_client: Any, make_settings: SettingsFactory, disk: Path,
        ct_series: list[Sample]) -> None:
    settings = make_settings(cache={"directory": str(disk / "cache"), "max_size": "1GB",
                                    "min_free": "2MiB"})
    client = await aiohttp_client(make_app(settings))
    store = client.app[STORE]
    for s in ct_series[:3]:
        assert await fetch(client, s) == "MISS"
    await store.drain()  # their disk copies follow the answers
    await asyncio.to_thread(store.sync.pin, ct_series[0].study)  # the whole CT is pinned
    # Just at what the guard keeps: min_free and the index's headroom.
    filler = await asyncio.to_thread(fill_filesystem, disk, (2 << 20) + INDEX_HEADROOM)
    for s in ct_series[3:6]:  # no room, nothing evictable: served, not cached
        assert await fetch(client, s) != "HIT"
        assert await fetch(client, s) != "HIT"
    ready = await readyz(client)
    assert ready["store"]["degraded"] == "min_free", ready
    for s in ct_series[:3]:  # pinned: kept and served
        assert await fetch(client, s) == "HIT"
    assert (await store.stats())["entries"] == 3
    assert metric_value(client.app[METRICS], "dicomcache_cache_degraded", cause="min_free") == 1

    await asyncio.to_thread(store.sync.unpin, ct_series[0].study)  # now evictable

    async def recovered() -> bool:
        return (await readyz(client))["store"]["degraded"] is None
    await eventually(recovered, timeout=30, interval=0.2, what="the guard evicted")
    assert await asyncio.to_thread(free_bytes, disk) >= 2 << 20
    assert await fetch(client, ct_series[7]) == "MISS"
    assert await fetch(client, ct_series[7]) == "HIT"
    await asyncio.to_thread(filler.unlink)


async def test_an_unusable_index_is_a_degraded_cache_not_a_dead_daemon(
        aiohttp_client: Any, make_settings: SettingsFactory, tmp_path: Path,
        ct_series: list[Sample]) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "index.sqlite").write_bytes(b"this is not a database" * 100)
    client = await aiohttp_client(make_app(make_settings()))
    ready = await readyz(client)
    assert ready["store"]["degraded"] == "index_unusable", ready
    assert "purge" in ready["store"]["status"] or "remove" in ready["store"]["status"]
    s = ct_series[8]
    assert await fetch(client, s) != "HIT"
    assert await fetch(client, s, by_uids=True) != "HIT"
    (directory / "index.sqlite").unlink()  # what the operator does (docs/operations.md)

    async def recovered() -> bool:
        return (await readyz(client))["store"]["degraded"] is None
    await eventually(recovered, timeout=30, interval=0.2, what="the index re-created")
    assert await fetch(client, s) == "MISS"
    assert await fetch(client, s) == "HIT"
