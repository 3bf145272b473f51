"""The coherence rules as decisions (the behaviour against a real Orthanc is in
tests/http/test_coherence.py)."""

from __future__ import annotations

import asyncio
import hashlib
import math
from pathlib import Path

import pytest

from dicomcache.cache.coherence import (
    Coherence,
    needs_md5_check,
    needs_series_check,
    recently_confirmed,
)
from dicomcache.cache.instance import Instance
from dicomcache.cache.store import AsyncStore, Store
from dicomcache.config import CacheSettings, UpstreamSettings
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom.verify import parse_dicom
from dicomcache.metrics import Metrics
from dicomcache.upstream.changes import StudyEvent
from dicomcache.upstream.client import OrthancClient
from tests.conftest import metric_value


@pytest.mark.parametrize(("confirmed_at", "now", "interval", "expected"), [
    (None, 100.0, 1.0, True),        # never confirmed since start
    (99.0, 100.0, 1.0, False),       # confirmed a second ago: in use, no wait
    (98.0, 100.0, 1.0, False),       # twice the interval: still fine
    (97.9, 100.0, 1.0, True),        # older: confirm before serving
    (None, 100.0, 0.0, False),       # confirmation off
    (-math.inf, 100.0, 1.0, True),
])
def test_needs_series_check(confirmed_at: float | None, now: float, interval: float,
                            expected: bool) -> None:
    assert needs_series_check(confirmed_at, now, interval) is expected


@pytest.mark.parametrize(("entry_confirmed_at", "now", "after", "expected"), [
    (0.0, 86_400.0, 86_400.0, False),
    (0.0, 86_401.0, 86_400.0, True),
    (0.0, 1e9, 0.0, False),          # 0: never compared again
])
def test_needs_md5_check(entry_confirmed_at: float, now: float, after: float,
                         expected: bool) -> None:
    assert needs_md5_check(entry_confirmed_at, now, after) is expected


@pytest.mark.parametrize(("entry_confirmed_at", "now", "interval", "expected"), [
    (100.0, 101.0, 1.0, True),       # just downloaded: its series need not be asked
    (100.0, 102.5, 1.0, False),
    (100.0, 100.0, 0.0, True),
])
def test_recently_confirmed(entry_confirmed_at: float, now: float, interval: float,
                            expected: bool) -> None:
    assert recently_confirmed(entry_confirmed_at, now, interval) is expected


async def test_a_deleted_change_purges_at_its_level(tmp_path: Path) -> None:
    """Orthanc versions that report ``Deleted`` in the feed: the store follows at once,
    at the instance, series and study level, and the study hooks are told."""
    blobs = [encode(ds, ds.file_meta.TransferSyntaxUID)
             for ds in make_ct_series(3, rows=16, columns=16, seed=61, patient_id="PDEL")]
    store = AsyncStore(await asyncio.to_thread(Store, tmp_path, 1 << 30))
    entries = await asyncio.to_thread(fill, store.sync, blobs)
    told: list[StudyEvent] = []

    async def hook(event: StudyEvent) -> None:
        told.append(event)

    metrics = Metrics()
    client = OrthancClient(UpstreamSettings(url="http://127.0.0.1:9"), metrics)
    coherence = Coherence(CacheSettings(directory=tmp_path), client, store, metrics, [hook])
    try:
        await coherence.changed("Deleted", "Instance", entries[0].orthanc_id)
        assert await store.get(entries[0].orthanc_id) is None
        await coherence.changed("Deleted", "Series", entries[1].series_oid)
        assert await store.get(entries[1].orthanc_id) is None
        assert await store.get(entries[2].orthanc_id) is None
        assert told == [StudyEvent(entries[0].study_uid, removed=True)] * 2
        assert metric_value(metrics, "dicomcache_cache_purged_total",
                            cause="deleted_upstream") == 3
    finally:
        await client.close()
        await asyncio.to_thread(store.sync.close)


def fill(store: Store, blobs: list[bytes]) -> list[Instance]:
    out = []
    for blob in blobs:
        body = Instance.verified(parse_dicom(blob), hashlib.md5(blob).hexdigest(), blob)
        stored = store.commit(store.write_temp(blob), body)
        assert stored is not None
        out.append(stored)
    return out


@pytest.mark.parametrize("level", ["Series", "Study"])
async def test_a_deleted_series_or_study_takes_what_is_being_committed_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: str) -> None:
    """A body served to its viewer while its disk copy is under way
    (:meth:`AsyncStore.commit_soon`) is purged with its series or study: a deletion
    read while it was being written must not leave it in the store."""
    import threading

    (blob,) = [encode(ds, ds.file_meta.TransferSyntaxUID)
               for ds in make_ct_series(1, rows=16, columns=16, seed=62, patient_id="PDEL2")]
    store = AsyncStore(await asyncio.to_thread(Store, tmp_path, 1 << 30))
    body = Instance.verified(parse_dicom(blob), hashlib.md5(blob).hexdigest(), blob)
    release = threading.Event()
    commit_body = Store.commit_body

    def slow_disk(self: Store, b: Instance) -> Instance | None:
        release.wait(30)
        return commit_body(self, b)

    monkeypatch.setattr(Store, "commit_body", slow_disk)
    metrics = Metrics()
    client = OrthancClient(UpstreamSettings(url="http://127.0.0.1:9"), metrics)
    coherence = Coherence(CacheSettings(directory=tmp_path), client, store, metrics, [])
    try:
        committing = store.commit_soon(body)
        resource = body.series_oid if level == "Series" else body.study_oid
        deleted = asyncio.ensure_future(coherence.changed("Deleted", level, resource))
        await asyncio.sleep(0.2)
        release.set()
        await asyncio.wait_for(deleted, 10)
        await committing
        assert await store.get(body.orthanc_id) is None
    finally:
        release.set()
        await client.close()
        await asyncio.to_thread(store.sync.close)
