"""OrthancClient.warm_up: connections opened ahead of a viewer's next requests."""

from __future__ import annotations

import asyncio

from dicomcache.devtools.wanem import WanEmulator
from dicomcache.dicom import multipart
from dicomcache.http.app import make_app
from dicomcache.http.keys import METRICS
from dicomcache.metrics import Metrics
from tests.conftest import Sample, SettingsFactory, eventually

JSON = {"Accept": "application/dicom+json"}
FRAME = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}


def warmed(wan: WanEmulator) -> int:
    """``GET /system`` answered across the link (warm-ups; the start-up check too)."""
    return sum(e.target == "/system" for e in wan.stats.exchanges)


def warm_ups(metrics: Metrics) -> float:
    """Warm-up requests done, as ``/metrics`` counts them."""
    return metrics.registry.get_sample_value(
        "dicomcache_upstream_request_duration_seconds_count", {"kind": "warm"}) or 0.0


async def test_a_search_opens_the_connections_its_frames_then_use(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    """OHIF searches, then asks each series' metadata and frames at once; each frame is
    a body and its MD5 from Orthanc, on connections opened while it searched (straight
    to Orthanc, a browser opens them as it goes: one round trip each)."""
    s = ct_series[3]
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"warm_connections": 4},
        prefetch={"mode": "off"})))
    await asyncio.sleep(1.0)  # the start-up's own connections closed: idle for longer
    wan.reset_stats()
    resp = await client.get(f"/dicom-web/studies?StudyInstanceUID={s.study}", headers=JSON)
    assert resp.status == 200
    await eventually(lambda: warmed(wan) >= 4, what="four connections opened ahead")
    opened = wan.stats.connections
    assert opened >= 4
    resp = await client.get(
        f"/dicom-web/studies/{s.study}/series/{s.series}/instances/{s.sop}/frames/1",
        headers=FRAME)
    assert resp.status == 200
    assert s.data.endswith(multipart.split(await resp.read(), resp.headers["Content-Type"])[0]
                           .body)
    assert {f"/instances/{s.orthanc_id}/file",
            f"/instances/{s.orthanc_id}/attachments/dicom/md5"} <= set(wan.targets)
    assert wan.stats.connections == opened, "a frame waited for a new connection"


async def test_warm_ups_are_spaced_and_can_be_turned_off(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    """Searches in quick succession warm once; ``warm_connections = 0`` never does."""
    s = ct_series[4]
    search = f"/dicom-web/studies?StudyInstanceUID={s.study}"
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"warm_connections": 2},
        prefetch={"mode": "off"})))
    metrics = client.app[METRICS]
    answers = await asyncio.gather(*(client.get(search, headers=JSON) for _ in range(3)))
    assert [r.status for r in answers] == [200] * 3
    await eventually(lambda: warm_ups(metrics) >= 2, what="two connections opened ahead")
    assert warm_ups(metrics) == 2

    off = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"warm_connections": 0},
        prefetch={"mode": "off"})))
    assert (await off.get(search, headers=JSON)).status == 200
    assert (await off.get(f"/dicom-web/studies/{s.study}/series/{s.series}/metadata",
                          headers=JSON)).status == 200
    assert warm_ups(off.app[METRICS]) == 0
