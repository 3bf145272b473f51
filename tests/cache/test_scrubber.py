"""The background scrubber: every stored file re-verified, a bad one quarantined and fetched
again; and the daemon's store forgets what another process purged or quarantined."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from dicomcache.cache.instance import Instance
from dicomcache.cache.scrubber import Scrubber
from dicomcache.cache.store import AsyncStore, Store
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom.verify import parse_dicom
from dicomcache.metrics import Metrics
from tests.conftest import metric_value


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    return [encode(ds, ds.file_meta.TransferSyntaxUID)
            for ds in make_ct_series(4, rows=64, columns=64, seed=41)]


def fill(store: Store, blobs: list[bytes]) -> list[Instance]:
    out = []
    for blob in blobs:
        body = Instance.verified(parse_dicom(blob), hashlib.md5(blob).hexdigest(), blob)
        stored = store.commit(store.write_temp(blob), body)
        assert stored is not None
        out.append(stored)
    return out


async def test_a_pass_quarantines_a_rotten_file_and_fetches_it_again(
        tmp_path: Path, blobs: list[bytes]) -> None:
    store = AsyncStore(await asyncio.to_thread(Store, tmp_path, 1 << 30))
    entries = await asyncio.to_thread(fill, store.sync, blobs)
    rotten = entries[2]
    assert rotten.path is not None
    data = bytearray(await asyncio.to_thread(rotten.path.read_bytes))
    data[-10] ^= 0x40
    await asyncio.to_thread(rotten.path.write_bytes, bytes(data))
    refetched: list[str] = []

    async def refetch(oid: str) -> None:
        refetched.append(oid)

    metrics = Metrics()
    scrubber = Scrubber(store, metrics, period=0.5, refetch=refetch)
    await scrubber.one_pass()
    await asyncio.sleep(0)  # the refetch task runs
    assert scrubber.checked == 4 and scrubber.bad == 1
    assert refetched == [rotten.orthanc_id]
    assert await store.get(rotten.orthanc_id) is None
    assert all([await store.get(e.orthanc_id) for e in entries if e is not rotten])
    assert list((tmp_path / "quarantine").glob("*.dcm"))
    assert metric_value(metrics, "dicomcache_cache_bad_files_total", found_by="scrub") == 1
    assert metric_value(metrics, "dicomcache_cache_scrubbed_bytes_total") == \
        sum(e.size for e in entries)


def test_another_process_removing_entries_is_noticed(tmp_path: Path, blobs: list[bytes]) -> None:
    daemon = Store(tmp_path, 1 << 30)
    entries = fill(daemon, blobs)
    assert daemon.peek(entries[0].orthanc_id) is not None
    assert daemon.refresh() is None  # nothing changed
    cli = Store(tmp_path, 1 << 30)  # `dicomcache purge` next to the daemon
    assert cli.purge([entries[0]]) == (1, entries[0].size)
    cli.close()
    assert daemon.refresh() == {entries[0].study_uid: 1}  # what it purged, for the daemon
    assert daemon.peek(entries[0].orthanc_id) is None  # no stale copy in memory
    assert daemon.get(entries[0].orthanc_id) is None
    assert daemon.get(entries[1].orthanc_id) is not None
