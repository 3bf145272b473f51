"""``/metrics`` scraped with prometheus-client's own parser after known traffic.

Traffic goes through the real app, a WAN emulator and the real Orthanc; the
counters must move by exactly what that traffic implies.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.http.app import make_app
from dicomcache.metrics import FAILURE_CAUSES, INSTANCE_FAMILIES, INTEGRITY_CAUSES
from tests.conftest import Sample, SettingsFactory, eventually

Key = tuple[str, frozenset[tuple[str, str]]]


class Scrape:
    """One parsed scrape: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = list(text_string_to_metric_families(text))
        self.values: dict[Key, float] = {}
        for family in self.families:
            for s in family.samples:
                self.values[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        """The sample's value (0 when absent), summed over labels not given."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and want <= ls)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.values


async def scrape(client: TestClient) -> Scrape:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type.startswith("text/plain")
    return Scrape(await resp.text())


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator) -> TestClient:
    # Bodies as stored: a corrupted one is counted as an MD5 mismatch.
    return await aiohttp_client(make_app(make_settings(url=f"http://127.0.0.1:{wan.port}",
                                                       upstream={"compression": "json"})))


def wado(s: Sample) -> str:
    return (f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
            f"&objectUID={s.sop}&contentType=application/dicom")


async def test_counters_move_by_exactly_the_traffic(client: TestClient, wan: WanEmulator,
                                                    ct_series: list[Sample]) -> None:
    a, b, c = ct_series[7], ct_series[8], ct_series[9]
    before = await scrape(client)

    # A miss, then two hits through two API families.
    for path in (f"/instances/{a.orthanc_id}/file", f"/instances/{a.orthanc_id}/file",
                 wado(a)):
        resp = await client.get(path)
        assert resp.status == 200 and await resp.read() == a.data
    # Five concurrent misses for one instance over a slow link: one download.
    wan.set_profile(LinkProfile(latency_ms=150))
    responses = await asyncio.gather(
        *(client.get(f"/instances/{b.orthanc_id}/file") for _ in range(5)))
    for resp in responses:
        assert resp.status == 200 and await resp.read() == b.data
    # Faults at rate 1.0 on one instance: every attempt (1 + 3 retries) fails.
    only_c = re.escape(c.orthanc_id) + "/file$"
    for fault in ("truncate_lying", "corrupt", "status_503"):
        wan.set_profile(LinkProfile(**{fault: 1.0}, fault_paths=only_c))
        resp = await client.get(f"/instances/{c.orthanc_id}/file")
        assert resp.status == 502, fault
    assert dict(wan.faults) == {"truncate_lying": 4, "corrupt": 4, "status_503": 4}
    after_faults = await scrape(client)
    assert after_faults.get("dicomcache_upstream_up") == 0  # a 503 on every attempt
    wan.set_profile(LinkProfile())
    assert (await client.get(f"/instances/{c.orthanc_id}/file")).status == 200
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("dicomcache_cache_hits_total", family="orthanc") == 1
    assert delta("dicomcache_cache_hits_total", family="wado_uri") == 1
    assert delta("dicomcache_cache_hits_total") == 2
    assert delta("dicomcache_cache_misses_total", family="orthanc") == 1 + 5 + 1
    assert delta("dicomcache_cache_misses_total") == 7
    assert delta("dicomcache_coalesced_requests_total") == 4
    hist = "dicomcache_http_request_duration_seconds_count"
    assert delta(hist, family="orthanc", outcome="hit") == 1
    assert delta(hist, family="orthanc", outcome="miss") == 7
    assert delta(hist, family="orthanc", outcome="error") == 3
    assert delta(hist, family="wado_uri", outcome="hit") == 1
    sizes = [len(a.data), len(b.data), len(c.data)]
    assert delta("dicomcache_upstream_fetched_bytes_total") == sum(sizes)
    assert delta("dicomcache_served_bytes_total") == 3 * sizes[0] + 5 * sizes[1] + sizes[2]
    # Verification caught both body faults (the MD5 is checked before the parse).
    assert delta("dicomcache_integrity_failures_total", cause="md5_mismatch") == 8
    assert delta("dicomcache_integrity_failures_total") == 8
    assert delta("dicomcache_upstream_failures_total", cause="md5_mismatch") == 8
    assert delta("dicomcache_upstream_failures_total", cause="http_5xx") == 4
    assert delta("dicomcache_upstream_failures_total") == 12
    assert delta("dicomcache_upstream_retries_total", cause="md5_mismatch") == 6
    assert delta("dicomcache_upstream_retries_total", cause="http_5xx") == 3
    assert delta("dicomcache_upstream_retries_total") == 9
    file_requests = sum(n for path, n in wan.requests.items() if path.endswith("/file"))
    assert file_requests == 1 + 1 + 12 + 1
    assert delta("dicomcache_upstream_request_duration_seconds_count", kind="instance") == 15
    assert after.get("dicomcache_upstream_up") == 1
    # The store's gauges follow within a second or two (they are refreshed in the background).
    async def gauges_refreshed() -> Scrape | None:
        now = await scrape(client)
        return now if now.get("dicomcache_cache_entries") == 3 else None

    after = await eventually(gauges_refreshed, timeout=5, interval=0.1,
                             what="the store's gauges refreshed")
    assert after.get("dicomcache_cache_entries") == 3
    assert after.get("dicomcache_cache_size_bytes") >= sum(sizes)
    assert after.get("dicomcache_cache_max_bytes") == 1 << 30


async def test_every_label_value_is_exported_from_the_start(client: TestClient) -> None:
    """Zeros, not "no data": dashboards and rate() work before the first event."""
    s = await scrape(client)
    for family in INSTANCE_FAMILIES:
        assert s.has("dicomcache_cache_hits_total", family=family)
        assert s.has("dicomcache_cache_misses_total", family=family)
    for cause in FAILURE_CAUSES:
        assert s.has("dicomcache_upstream_failures_total", cause=cause)
        assert s.has("dicomcache_upstream_retries_total", cause=cause)
    for cause in INTEGRITY_CAUSES:
        assert s.has("dicomcache_integrity_failures_total", cause=cause)
    assert s.get("dicomcache_build_info") == 1
    assert s.get("dicomcache_start_time_seconds") > 0
    assert s.get("process_resident_memory_bytes") > 0


async def test_names_follow_prometheus_conventions(client: TestClient) -> None:
    s = await scrape(client)
    # (The text format carries each counter's creation time as a gauge of its own.)
    ours = [f for f in s.families
            if f.name.startswith("dicomcache_") and not f.name.endswith("_created")]
    assert len(ours) >= 30
    for family in ours:
        assert family.documentation, family.name
        assert re.fullmatch(r"dicomcache_[a-z0-9_]+", family.name), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if "bytes" in family.name or "size" in family.name:
            assert re.search(r"_bytes$", family.name), family.name
        if "seconds" in family.name or "duration" in family.name or "age" in family.name:
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name.endswith("_total"), sample.name
