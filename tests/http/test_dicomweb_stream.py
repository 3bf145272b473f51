"""Cold series retrieves fed by one upstream series stream (dicomcache.dicomweb.series_stream)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import threading
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from dicomcache.cache.instance import Instance
from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import make_ct_series
from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.http.app import make_app
from dicomcache.http.keys import DICOMWEB, STORE
from tests.conftest import Sample, SettingsFactory, eventually, metric_value
from tests.http.dicomweb_support import ANY_SYNTAX, orthanc_answer, split_multipart

SERIES_STREAM = r"/dicom-web/studies/[^/]*/series/[^/]*$"  # not /series/{id} (the listing)


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator) -> TestClient:
    return await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}",
        dicomweb={"retrieve_concurrency": 2},
        upstream={"breaker_failures": 0})))


@pytest.fixture
def held_commits(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Group commits wait until the returned event is set (the disk "busy")."""
    from dicomcache.cache.store import Store

    release = threading.Event()
    real = Store.commit_group

    def held(self: Store, bodies: list[Instance]) -> list[object]:
        assert release.wait(60)
        return real(self, bodies)

    monkeypatch.setattr(Store, "commit_group", held)
    return release


def series_path(s: Sample) -> str:
    return f"/dicom-web/studies/{s.study}/series/{s.series}"


def file_requests(wan: WanEmulator) -> int:
    return sum(n for path, n in wan.requests.items() if path.endswith("/file"))


def test_orthanc_instance_id_is_sha1_of_the_uids(ct_series: list[Sample]) -> None:
    """Orthanc's instance ID: SHA-1 of PatientID|Study|Series|SOP in 5 groups of 8 hex digits."""
    ds = make_ct_series(12, seed=99, patient_id="PBIG")[0]  # the fixture's first dataset
    h = hashlib.sha1(f"{ds.PatientID}|{ds.StudyInstanceUID}|{ds.SeriesInstanceUID}|"
                     f"{ds.SOPInstanceUID}".encode()).hexdigest()
    assert "-".join(h[i:i + 8] for i in range(0, 40, 8)) == ct_series[0].orthanc_id


async def test_cold_series_retrieve_by_stream_identical_to_orthanc(
        client: TestClient, wan: WanEmulator, orthanc: OrthancProcess,
        ct_series: list[Sample]) -> None:
    path = series_path(ct_series[0])
    status, headers, direct = orthanc_answer(orthanc, path, {"Accept": ANY_SYNTAX})
    assert status == 200
    resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200
    body = await resp.read()
    # Orthanc's stored sizes announce the length of a cold retrieve (no chunks).
    assert resp.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in resp.headers
    ours = split_multipart(body, resp.headers["Content-Type"])
    theirs = split_multipart(direct, headers["Content-Type"])
    assert [b for _, b in ours] == [b for _, b in theirs] == [s.data for s in ct_series]
    assert wan.requests[path] == 1  # one series stream…
    assert file_requests(wan) == 0  # …and no single downloads
    from dicomcache.http.keys import METRICS

    registry = client.app[METRICS].registry
    for kind in ("series", "md5_lookups"):  # timed although read outside the loop
        assert registry.get_sample_value(
            "dicomcache_upstream_request_duration_seconds_count", {"kind": kind}) == 1
    store = client.app[STORE]
    for s in ct_series:  # every part stored, verified
        entry = await store.get(s.orthanc_id)
        assert entry is not None and entry.orthanc_id == s.orthanc_id
        assert entry.md5 == hashlib.md5(s.data).hexdigest()
    # Warm: from the store, no upstream request at all.
    before = sum(wan.requests.values())
    resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert [b for _, b in split_multipart(await resp.read(), resp.headers["Content-Type"])] \
        == [s.data for s in ct_series]
    assert sum(wan.requests.values()) == before


async def test_cold_retrieve_with_the_cache_disk_full_sends_every_part(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC on every commit: each verified part is still sent, whole and once; nothing
    is cached (the next retrieve streams again), and the log says why, once."""
    from dicomcache.cache.store import Store
    from dicomcache.errors import StoreFull

    def full(self: Store, data: bytes) -> None:
        raise StoreFull(errno.ENOSPC, "cache disk full: No space left on device")

    monkeypatch.setattr(Store, "write_temp", full)
    path = series_path(ct_series[0])
    for round_ in (1, 2):
        resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
        assert resp.status == 200
        body = await resp.read()
        assert resp.headers["Content-Length"] == str(len(body))
        parts = split_multipart(body, resp.headers["Content-Type"])
        assert [b for _, b in parts] == [s.data for s in ct_series]
        await client.app[STORE].drain()
        assert wan.requests[path] == round_  # a stream each time: nothing was cached
    assert file_requests(wan) == 0
    assert await client.app[STORE].get(ct_series[0].orthanc_id) is None
    from dicomcache.http.keys import METRICS

    # Each part counted: those that failed, and those not tried once that degraded the
    # cache; logged once, not per instance.
    failed = metric_value(client.app[METRICS], "dicomcache_cache_write_failures_total",
                          cause="disk_full")
    skipped = metric_value(client.app[METRICS], "dicomcache_cache_write_failures_total",
                           cause="degraded")
    assert failed >= 1 and failed + skipped == 2 * len(ct_series)
    assert caplog.text.count("cache disk full") == 1


@pytest.mark.parametrize("fault", ["truncate", "reset", "truncate_lying"])
async def test_cut_series_stream_falls_back_to_single_downloads(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample], fault: str) -> None:
    wan.set_profile(LinkProfile(**{fault: 1.0}, fault_paths=SERIES_STREAM, seed=3))
    path = series_path(ct_series[0])
    resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200
    parts = split_multipart(await resp.read(), resp.headers["Content-Type"])
    assert [b for _, b in parts] == [s.data for s in ct_series]
    assert wan.faults and sum(wan.faults.values()) >= 1
    assert 0 < file_requests(wan) <= len(ct_series)  # only what the stream did not deliver
    for s in ct_series:
        assert wan.requests[f"/instances/{s.orthanc_id}/file"] <= 1


async def test_cold_retrieve_is_chunked_when_orthanc_gives_no_sizes(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample]) -> None:
    wan.set_profile(LinkProfile(status_503=1.0, fault_paths=r"^/series/[^/]+/instances$"))
    resp = await client.get(series_path(ct_series[0]), headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200
    assert "Content-Length" not in resp.headers
    assert resp.headers["Transfer-Encoding"] == "chunked"
    parts = split_multipart(await resp.read(), resp.headers["Content-Type"])
    assert [b for _, b in parts] == [s.data for s in ct_series]
    assert wan.faults["status_503"] == 1


@pytest.mark.parametrize("wrong", [0, 5])
async def test_a_part_of_another_size_than_announced_is_never_sent(
        client: TestClient, monkeypatch: pytest.MonkeyPatch, ct_series: list[Sample],
        wrong: int) -> None:
    """Orthanc's listing lying about one instance's size (stood in for by a mock)."""
    from dicomcache.dicomweb.state import DicomWeb

    real = DicomWeb.file_sizes

    async def lying(self: DicomWeb, oid: str, level: str) -> dict[str, int] | None:
        sizes = await real(self, oid, level)
        assert sizes is not None
        sizes[ct_series[wrong].orthanc_id] += 1
        return sizes

    monkeypatch.setattr(DicomWeb, "file_sizes", lying)
    resp = await client.get(series_path(ct_series[0]), headers={"Accept": ANY_SYNTAX})
    if wrong == 0:  # before the first byte: no length announced, every part verified
        assert resp.status == 200 and "Content-Length" not in resp.headers
        parts = split_multipart(await resp.read(), resp.headers["Content-Type"])
        assert [b for _, b in parts] == [s.data for s in ct_series]
        return
    assert resp.status == 200
    expected = int(resp.headers["Content-Length"])
    with pytest.raises(aiohttp.ClientPayloadError):  # broken off, never passed as complete
        await resp.read()
    assert expected > 0


async def test_corrupted_stream_part_is_never_sent(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample]) -> None:
    wan.set_profile(LinkProfile(corrupt=1.0, fault_paths=SERIES_STREAM, seed=7))
    path = series_path(ct_series[0])
    resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200
    parts = split_multipart(await resp.read(), resp.headers["Content-Type"])
    assert [b for _, b in parts] == [s.data for s in ct_series]  # the good copy, not the bad
    assert wan.faults.get("corrupt", 0) >= 1
    assert file_requests(wan) >= 1  # the corrupted one (at least) came again on its own
    store = client.app[STORE]
    for s in ct_series:
        entry = await store.get(s.orthanc_id)
        assert entry is not None
        assert await asyncio.to_thread(entry.path.read_bytes) == s.data


async def test_concurrent_instance_request_waits_for_the_stream(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample]) -> None:
    """A viewer asking for one of the series' instances mid-stream: no second download."""
    wan.set_profile(LinkProfile(latency_ms=20))
    path = series_path(ct_series[0])
    late = ct_series[-1]

    async def whole() -> list[bytes]:
        resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
        return [b for _, b in split_multipart(await resp.read(), resp.headers["Content-Type"])]

    async def one() -> bytes:
        await eventually(lambda: wan.requests[path], interval=0.01,
                         what="the series stream asked for")
        assert wan.requests[path] == 1
        resp = await client.get(f"{path}/instances/{late.sop}", headers={"Accept": ANY_SYNTAX})
        assert resp.status == 200
        [(_, body)] = split_multipart(await resp.read(), resp.headers["Content-Type"])
        return body

    series_parts, single = await asyncio.gather(whole(), one())
    assert series_parts == [s.data for s in ct_series]
    assert single == late.data
    assert wan.requests[path] == 1
    assert file_requests(wan) == 0
    assert wan.requests.get(f"/instances/{late.orthanc_id}/attachments/dicom/md5", 0) == 1


async def test_cold_retrieve_does_not_wait_for_durability(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample],
        held_commits: threading.Event) -> None:
    """Every verified part is sent while the disk is still busy; meanwhile the series is
    sent again from memory, and a request for one instance waits for its commit (no
    second download, no miss)."""
    release = held_commits
    path = series_path(ct_series[0])
    late = ct_series[-1]
    try:
        resp = await asyncio.wait_for(client.get(path, headers={"Accept": ANY_SYNTAX}), 30)
        parts = split_multipart(await asyncio.wait_for(resp.read(), 30),
                                resp.headers["Content-Type"])
        assert [b for _, b in parts] == [s.data for s in ct_series]  # all sent, none durable
        store = client.app[STORE]
        assert store.sync.peek(late.orthanc_id) is None
        # The whole series again: its verified bytes are still in memory, sent from
        # there (with the length) rather than after the commits.
        before = sum(wan.requests.values())
        again = await asyncio.wait_for(client.get(path, headers={"Accept": ANY_SYNTAX}), 10)
        body = await asyncio.wait_for(again.read(), 10)
        assert again.headers["Content-Length"] == str(len(body))
        assert [b for _, b in split_multipart(body, again.headers["Content-Type"])] == \
            [s.data for s in ct_series]
        assert sum(wan.requests.values()) == before and store.sync.peek(late.orthanc_id) is None
        single = asyncio.ensure_future(client.get(f"/instances/{late.orthanc_id}/file"))
        # Time passing: long enough for a miss or a second download to answer; it must
        # still be waiting for the commit.
        await asyncio.sleep(0.2)
        assert not single.done()  # waiting for the commit
    finally:
        release.set()
    resp = await single
    assert resp.status == 200 and await resp.read() == late.data
    assert file_requests(wan) == 0 and wan.requests[path] == 1
    for s in ct_series:  # durable now, and found without a trip upstream
        entry = await store.get(s.orthanc_id)
        assert entry is not None and await asyncio.to_thread(entry.path.read_bytes) == s.data
    from dicomcache.http.keys import DICOMWEB

    # the app-wide commit backlog is given back once all are durable
    await eventually(lambda: client.app[DICOMWEB].commit_backlog.held == 0, timeout=5,
                     interval=0.05, what="the commit backlog given back")
    assert client.app[DICOMWEB].commit_backlog.held == 0


async def test_shutdown_right_after_a_cold_retrieve_keeps_every_part(
        client: TestClient, ct_series: list[Sample], held_commits: threading.Event,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts sent before they were durable are committed before the store closes."""
    from dicomcache.cache.store import Store
    from dicomcache.http.keys import SETTINGS

    release = held_commits
    directory = client.app[SETTINGS].cache.directory
    try:
        resp = await asyncio.wait_for(client.get(series_path(ct_series[0]),
                                                 headers={"Accept": ANY_SYNTAX}), 30)
        assert len(split_multipart(await resp.read(), resp.headers["Content-Type"])) == \
            len(ct_series)
        closing = asyncio.ensure_future(client.close())  # shutdown while commits are held
        # Time passing: long enough for a shutdown that did not wait to finish.
        await asyncio.sleep(0.2)
        assert not closing.done()  # the store waits for them
    finally:
        release.set()
    await asyncio.wait_for(closing, 30)
    monkeypatch.undo()
    store = await asyncio.to_thread(Store, directory, 1 << 30)
    try:
        for s in ct_series:
            entry = await asyncio.to_thread(store.get, s.orthanc_id)
            assert entry is not None and await asyncio.to_thread(entry.path.read_bytes) == s.data
    finally:
        await asyncio.to_thread(store.close)


def streams_of(app: web.Application) -> set[asyncio.Future[None]]:
    """The upstream series streams in flight."""
    return {s for s in app[DICOMWEB].streams if not s.done()}


async def test_shutdown_ends_a_stream_stalled_upstream_at_once(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,  # type: ignore[no-untyped-def]
        ct_series: list[Sample]) -> None:
    """A stream blocked in a stalled read is ended at shutdown, not after read_timeout."""
    wan.set_profile(LinkProfile(stall=1.0, stall_seconds=60, fault_paths=SERIES_STREAM))
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"read_timeout": 60})))
    app = client.app
    retrieve = asyncio.ensure_future(client.get(series_path(ct_series[0]),
                                                headers={"Accept": ANY_SYNTAX}))
    await eventually(lambda: wan.faults["stall"] and streams_of(app), timeout=5, interval=0.05,
                     what="a series stream stalled upstream")
    assert wan.faults["stall"] == 1 and streams_of(app)
    # Time passing: the stall goes on, and the stream now sits in its read of the body.
    await asyncio.sleep(0.3)
    started = time.monotonic()
    retrieve.cancel()
    await asyncio.wait_for(client.close(), 30)
    assert not streams_of(app)
    assert time.monotonic() - started < 10  # not the 60 s stall nor the read timeout
