"""The store: commit/lookup, group commits, LRU eviction at the bound, restart, crash safety."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dicomcache import durable
from dicomcache.cache.instance import Instance
from dicomcache.cache.store import AsyncStore, Store, StoreClosed
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom.verify import parse_dicom, verify_file
from dicomcache.errors import StoreTrouble, StoreUnavailable
from tests.conftest import eventually, tmpfs


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    """Ten 256 KiB instances."""
    return [encode(ds, ds.file_meta.TransferSyntaxUID)
            for ds in make_ct_series(10, rows=256, columns=512, seed=3)]


def commit(store: Store, blob: bytes, oid: str | None = None) -> Instance:
    stored = store.commit(store.write_temp(blob), verified(blob, oid))
    assert stored is not None
    return stored


def test_commit_and_get(tmp_path: Path, blobs: list[bytes]) -> None:
    store = Store(tmp_path, 1 << 30)
    entry = commit(store, blobs[0], "aaaaaaaa-bbbbbbbb-cccccccc-dddddddd-eeeeeeee")
    got = store.get(entry.orthanc_id)
    assert got == entry
    assert got.path.read_bytes() == blobs[0]
    assert got.size == len(blobs[0]) and got.md5 == hashlib.md5(blobs[0]).hexdigest()
    assert store.get("aaaaaaaa-bbbbbbbb-cccccccc-dddddddd-eeeeeeee") == entry
    assert store.by_uids(entry.sop_uid) == [entry]
    assert store.get("00000000-00000000-00000000-00000000-00000000") is None
    assert list(store.tmp_dir.iterdir()) == []  # the temp file was renamed, not copied


def test_recommit_replaces_without_losing_the_file(tmp_path: Path, blobs: list[bytes]) -> None:
    store = Store(tmp_path, 1 << 30)
    first = commit(store, blobs[0])
    second = commit(store, blobs[0])
    assert second.path != first.path and not first.path.exists()
    assert store.get(first.orthanc_id).path.read_bytes() == blobs[0]  # type: ignore[union-attr]
    assert store.stats()["entries"] == 1


def test_eviction_keeps_under_bound_least_recently_used_first(tmp_path: Path,
                                                               blobs: list[bytes]) -> None:
    size = len(blobs[0])
    store = Store(tmp_path, 4 * size + (256 << 10))  # room for ~4 plus the sqlite file
    entries = [commit(store, b) for b in blobs[:4]]
    time.sleep(0.01)  # time passing: the touch below gets a later access time
    assert store.get(entries[0].orthanc_id) is not None  # touch the oldest: now most recent
    for b in blobs[4:6]:  # two more: two must go, and not the one just used
        commit(store, b)
    stats = store.stats()
    assert stats["size_bytes"] <= store.max_size
    assert stats["evictions"] == 2
    assert store.get(entries[0].orthanc_id) is not None, "recently used entry was evicted"
    assert store.get(entries[1].orthanc_id) is None
    on_disk = list((tmp_path / "objects").rglob("*.dcm"))
    assert len(on_disk) == stats["entries"], "evicted files must be unlinked"


def test_survives_restart(tmp_path: Path, blobs: list[bytes]) -> None:
    store = Store(tmp_path, 1 << 30)
    entry = commit(store, blobs[1], "11111111-22222222-33333333-44444444-55555555")
    store.close()
    again = Store(tmp_path, 1 << 30)
    assert again.get(entry.orthanc_id) == entry
    assert again.get("11111111-22222222-33333333-44444444-55555555") == entry


def test_vanished_file_is_a_miss(tmp_path: Path, blobs: list[bytes]) -> None:
    store = Store(tmp_path, 1 << 30)
    entry = commit(store, blobs[2])
    entry.path.unlink()
    assert store.get(entry.orthanc_id) is None
    assert store.stats()["entries"] == 0


def test_sweep_removes_leftovers(tmp_path: Path, blobs: list[bytes]) -> None:
    store = Store(tmp_path, 1 << 30)
    kept = commit(store, blobs[3])
    stale_tmp = store.write_temp(b"partial")
    orphan = tmp_path / "objects" / "zz" / "1.2.3.dead.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"renamed but never indexed")
    assert store.sweep(min_age=0) == 2
    assert not stale_tmp.exists() and not orphan.exists()
    assert store.get(kept.orthanc_id) is not None


def test_full_disk_is_reported(tmp_path: Path, blobs: list[bytes], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import errno

    from dicomcache.errors import StoreFull

    store = Store(tmp_path, 1 << 30)

    def no_space(*_a, **_k):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StoreFull):
        store.write_temp(blobs[0])
    assert list(store.tmp_dir.iterdir()) == []


def verified(blob: bytes, oid: str | None = None) -> Instance:
    return Instance.verified(parse_dicom(blob), hashlib.md5(blob).hexdigest(), blob, oid)


def oid_of(n: int) -> str:
    return "-".join([f"{n:08x}"] * 5)


def test_commit_group_syncs_each_directory_once_and_indexes_all(
        tmp_path: Path, blobs: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path, 1 << 30)
    synced: list[Path] = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    results = store.commit_group([verified(b, oid_of(i)) for i, b in enumerate(blobs)])
    assert all(isinstance(r, Instance) for r in results)
    entries = [r for r in results if isinstance(r, Instance)]
    assert sorted(synced) == sorted({e.path.parent for e in entries})  # once per directory
    for i, (entry, blob) in enumerate(zip(entries, blobs, strict=True)):
        assert store.get(entry.orthanc_id) == entry and entry.path.read_bytes() == blob
        assert entry.orthanc_id == oid_of(i)
    assert list(store.tmp_dir.iterdir()) == []
    store.close()
    again = Store(tmp_path, 1 << 30)  # durable: indexed, found after a restart
    assert [again.get(e.orthanc_id) for e in entries] == entries


def test_commit_group_keeps_the_others_when_one_body_fails(
        tmp_path: Path, blobs: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from dicomcache.errors import StoreFull

    store = Store(tmp_path, 1 << 30)
    real = Store.write_temp

    def full_for_the_third(self: Store, data: bytes) -> Path:
        if data == blobs[2]:
            raise StoreFull(errno.ENOSPC, "cache disk full: No space left on device")
        return real(self, data)

    monkeypatch.setattr(Store, "write_temp", full_for_the_third)
    results = store.commit_group([verified(b) for b in blobs[:4]])
    assert isinstance(results[2], StoreFull)
    assert [isinstance(r, Instance) for r in results] == [True, True, False, True]
    assert store.stats()["entries"] == 3
    assert len(list((tmp_path / "objects").rglob("*.dcm"))) == 3


def test_commit_remakes_object_directories_an_eviction_removed(tmp_path: Path,
                                                                blobs: list[bytes]) -> None:
    store = Store(tmp_path, 1 << 30)
    for d in (tmp_path / "objects").iterdir():  # an operator may remove empty directories
        d.rmdir()
    [entry] = store.commit_group([verified(blobs[0])])
    assert isinstance(entry, Instance) and entry.path.read_bytes() == blobs[0]
    assert commit(store, blobs[1]).path.read_bytes() == blobs[1]


def test_closed_store_abandons_a_group_without_writing(tmp_path: Path,
                                                       blobs: list[bytes]) -> None:
    store = Store(tmp_path, 1 << 30)
    store.close()
    results = store.commit_group([verified(b) for b in blobs[:3]])
    assert all(isinstance(r, StoreClosed) for r in results)
    assert list(store.tmp_dir.iterdir()) == []
    assert list((tmp_path / "objects").rglob("*.dcm")) == []


async def test_queued_commits_are_grouped_and_found_while_pending(
        tmp_path: Path, blobs: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Bodies queued while a group is written form the next group; lookups wait for them."""
    store = AsyncStore(await asyncio.to_thread(Store, tmp_path, 1 << 30))
    groups: list[int] = []
    release = threading.Event()
    real = Store.commit_group

    def slow_group(self: Store, bodies: list[Instance]) -> list[object]:
        groups.append(len(bodies))
        assert release.wait(30)
        return real(self, bodies)

    monkeypatch.setattr(Store, "commit_group", slow_group)
    try:
        first = store.queue_commit(verified(blobs[0], oid_of(0)))
        await eventually(lambda: groups, what="the first group being written (and held)")
        rest = [store.queue_commit(verified(b, oid_of(i))) for i, b in enumerate(blobs[1:], 1)]
        sop = parse_dicom(blobs[5]).sop_instance_uid
        by_sop = asyncio.ensure_future(store.by_uids(sop))
        by_oid = asyncio.ensure_future(store.get(oid_of(5)))
        # Time passing: long enough for a miss to come back from the index; none may.
        await asyncio.sleep(0.05)
        assert not by_sop.done() and not by_oid.done()  # waiting for the commit, not a miss
        # A viewer's own download does not queue behind the held group.
        [ds] = make_ct_series(1, rows=64, columns=64, seed=99)
        other = verified(encode(ds, ds.file_meta.TransferSyntaxUID), oid_of(99))
        mine = await asyncio.wait_for(store.commit_now(other), 10)
        assert mine is not None and mine.path.exists()
    finally:
        release.set()
    entry = await first
    assert entry is not None
    assert all(isinstance(r, Instance) for r in await asyncio.gather(*rest))
    assert groups == [1, len(blobs) - 1]
    [found] = await by_sop
    assert found is not None and found.sop_uid == sop and await by_oid == found
    await store.drain()


async def test_shutdown_abandons_queued_commits_cleanly(tmp_path: Path, blobs: list[bytes],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The committer cancelled (shutdown): the group in its thread completes, the queue is
    not written, and every waiter is told (StoreClosed), none hangs."""
    store = AsyncStore(await asyncio.to_thread(Store, tmp_path, 1 << 30))
    started = threading.Event()
    release = threading.Event()
    real = Store.write_temp

    # Held inside the group (under its lock), so close() must wait for it: holding
    # before commit_group took the lock let close() win the race in CI.
    def held(self: Store, data: bytes) -> Path:
        started.set()
        assert release.wait(30)
        return real(self, data)

    monkeypatch.setattr(Store, "write_temp", held)
    writing = store.queue_commit(verified(blobs[0]))
    assert await asyncio.to_thread(started.wait, 10)
    queued = [store.queue_commit(verified(b)) for b in blobs[1:3]]
    committer = store.committer
    assert committer is not None
    committer.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await committer
    for fut in (writing, *queued):
        with pytest.raises(StoreClosed):
            await fut
    await asyncio.to_thread(store.sync.close)  # waits for the group still in its thread

    def reopened() -> None:
        again = Store(tmp_path, 1 << 30)
        assert again.get(parse_dicom(blobs[0]).orthanc_id) is not None  # complete
        for b in blobs[1:3]:
            assert again.get(parse_dicom(b).orthanc_id) is None  # never started
        assert again.stats()["entries"] == 1
    await asyncio.to_thread(reopened)


_WRITER = textwrap.dedent("""
    import hashlib, sys
    from dicomcache.devtools.samples import encode, make_ct_series
    from dicomcache.cache.instance import Instance
    from dicomcache.cache.store import Store
    from dicomcache.dicom.verify import parse_dicom
    store = Store(sys.argv[1], 1 << 30)
    blobs = [encode(ds, ds.file_meta.TransferSyntaxUID)
             for ds in make_ct_series(40, rows=128, columns=128, seed=7)]
    first = True
    while True:
        if sys.argv[2] == "group":
            for i in range(0, len(blobs), 8):
                store.commit_group([Instance.verified(parse_dicom(b), hashlib.md5(b).hexdigest(),
                                                      b) for b in blobs[i:i + 8]])
                if first:  # the kill comes after this, at a chosen delay
                    print("ready", flush=True)
                    first = False
            continue
        for b in blobs:
            store.commit(store.write_temp(b), Instance.verified(
                parse_dicom(b), hashlib.md5(b).hexdigest(), b))
            if first:
                print("ready", flush=True)
                first = False
""")


@pytest.mark.parametrize("mode", ["single", "group"])
@pytest.mark.parametrize("delay", [0.05, 0.13, 0.31, 0.57])
def test_kill_9_leaves_a_consistent_store(tmp_path: Path, delay: float, mode: str) -> None:
    with subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), mode],
                          stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        time.sleep(delay)  # the chosen kill delay (time passing, the test's parameter)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = Store(tmp_path, 1 << 30)
    entries = list(store.entries())
    assert entries, "the writer committed nothing before the kill"
    for entry in entries:
        summary = verify_file(entry.path, expected_length=entry.size, expected_md5=entry.md5)
        assert summary.sop_instance_uid == entry.sop_uid
    store.sweep(min_age=0)
    indexed = {e.path for e in store.entries()}
    assert set((tmp_path / "objects").rglob("*.dcm")) == indexed
    assert list(store.tmp_dir.iterdir()) == []


def test_a_store_of_the_previous_version_is_adopted(tmp_path: Path, blobs: list[bytes]) -> None:
    """dicomcache 0.1 kept a diskcache index (cache.db, JSON values), keyed entries by SOP
    Instance UID and named files after it: entries are parsed again for their full
    identity and adopted under new names, pins kept; an entry whose body is not the
    instance it was fetched as is dropped, a file outside objects/ never adopted."""
    import json
    import sqlite3

    legacy = sqlite3.connect(tmp_path / "cache.db")
    legacy.execute("CREATE TABLE Cache (rowid INTEGER PRIMARY KEY, key BLOB, raw INTEGER, "
                   "store_time REAL, expire_time REAL, access_time REAL, access_count INTEGER, "
                   "tag BLOB, size INTEGER, mode INTEGER, filename TEXT, value BLOB)")
    legacy.execute("CREATE TABLE Pinned (study_uid TEXT PRIMARY KEY, pinned_at REAL NOT NULL)")
    (tmp_path / "objects" / "ab").mkdir(parents=True)
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(blobs[2])
    kept = []
    for i, (blob, rel) in enumerate([(blobs[0], None), (blobs[1], None),
                                     (blobs[2], "objects/ab/../../elsewhere.dcm")]):
        summary = parse_dicom(blob)
        if rel is None:
            rel = f"objects/ab/{summary.sop_instance_uid}.0000000{i}.dcm"
            (tmp_path / rel).write_bytes(blob)
            kept.append(summary)
        meta = {"sop_uid": summary.sop_instance_uid, "size": len(blob),
                "md5": hashlib.md5(blob).hexdigest(),
                "transfer_syntax": summary.transfer_syntax_uid,
                "study_uid": summary.study_instance_uid,
                "series_uid": summary.series_instance_uid,
                # the second was fetched as another instance than its body is: dropped
                "orthanc_id": summary.orthanc_id if i != 1 else oid_of(i),
                "stored_at": 1000.0 + i, "file": rel}
        legacy.execute("INSERT INTO Cache (key, raw, access_time, mode, filename, value) "
                       "VALUES (?, 1, ?, 1, ?, ?)", (summary.sop_instance_uid, 2000.0 + i, rel,
                                                     json.dumps(meta)))
    legacy.execute("INSERT INTO Pinned VALUES (?, 5.0)", (kept[0].study_instance_uid,))
    legacy.commit()
    legacy.close()

    store = Store(tmp_path, 1 << 30)
    assert not (tmp_path / "cache.db").exists()
    assert store.stats()["entries"] == 1
    assert store.get(kept[1].orthanc_id) is None and store.get(oid_of(1)) is None
    for summary, blob in zip(kept[:1], blobs[:1], strict=True):
        entry = store.get(summary.orthanc_id)
        assert entry is not None and entry.patient_id == summary.patient_id
        assert entry is not None and entry.path is not None
        assert entry.path.read_bytes() == blob
        assert summary.sop_instance_uid not in entry.path.name  # named by us, not by data
    assert store.pinned() == {kept[0].study_instance_uid: 5.0}
    assert outside.read_bytes() == blobs[2]  # never adopted, never moved
    store.sweep(min_age=0)
    assert {e.path for e in store.entries()} == set((tmp_path / "objects").rglob("*.dcm"))


#: The tables of an index of schema version 1 that the migration reads.
_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
CREATE TABLE instances (
    id INTEGER PRIMARY KEY, sop_uid TEXT NOT NULL UNIQUE, orthanc_id TEXT, study_uid TEXT,
    series_uid TEXT, transfer_syntax TEXT NOT NULL, md5 TEXT NOT NULL, size INTEGER NOT NULL,
    file TEXT NOT NULL UNIQUE, stored_at REAL NOT NULL, used_at REAL NOT NULL);
CREATE TABLE pinned (study_uid TEXT PRIMARY KEY, pinned_at REAL NOT NULL);
"""


def test_an_index_of_schema_version_1_is_adopted(tmp_path: Path, blobs: list[bytes]) -> None:
    """Schema version 1 keyed entries by SOP Instance UID alone: its files are parsed again
    for their full identity; a file flipped on disk and an entry fetched as another
    instance than its body are dropped; its WAL is read (a daemon killed mid-write)."""
    import shutil
    import sqlite3

    old = tmp_path / "old"
    old.mkdir()
    v1 = sqlite3.connect(old / "index.sqlite", isolation_level=None)
    v1.execute("PRAGMA journal_mode = WAL")
    v1.executescript(_V1_SCHEMA)
    (tmp_path / "objects" / "ab").mkdir(parents=True)
    summaries = []
    for i, blob in enumerate(blobs[:3]):
        summary = parse_dicom(blob)
        summaries.append(summary)
        rel = f"objects/ab/{i:032x}.dcm"
        (tmp_path / rel).write_bytes(blob if i != 2 else blob[:-1] + bytes([blob[-1] ^ 1]))
        v1.execute("INSERT INTO instances VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (summary.sop_instance_uid, summary.orthanc_id if i != 1 else oid_of(1),
                    summary.study_instance_uid, summary.series_instance_uid,
                    summary.transfer_syntax_uid, hashlib.md5(blob).hexdigest(), len(blob), rel,
                    1000.0 + i, 2000.0 + i))
    v1.execute("INSERT INTO pinned VALUES (?, 5.0)", (summaries[0].study_instance_uid,))
    # The files as a daemon killed mid-write leaves them: the rows still in the WAL.
    assert (old / "index.sqlite-wal").stat().st_size > 0
    for name in ("index.sqlite", "index.sqlite-wal"):
        shutil.copy(old / name, tmp_path / name)
    v1.close()
    store = Store(tmp_path, 1 << 30)
    assert not list(tmp_path.glob("index-old.sqlite*"))
    assert store.stats()["entries"] == 1
    entry = store.get(summaries[0].orthanc_id)
    assert entry is not None and entry.path is not None
    assert entry.patient_id == summaries[0].patient_id
    assert entry.path.read_bytes() == blobs[0]
    assert store.get(summaries[1].orthanc_id) is None and store.get(summaries[2].orthanc_id) \
        is None
    assert store.pinned() == {summaries[0].study_instance_uid: 5.0}
    store.close()
    assert Store(tmp_path, 1 << 30).stats()["entries"] == 1  # adopted once, kept


@pytest.mark.parametrize("ended", ["closed", "crashed"])
def test_a_read_only_cache_directory_serves_its_entries_and_writes_nothing(
        tmp_path: Path, blobs: list[bytes], ended: str) -> None:
    """A file system remounted read-only (a real tmpfs): the index is opened read-only, its
    entries are found and served; nothing is written (no recency, no new entry, no
    purge); once it is writable again the store caches, and what was purged meanwhile
    goes for good."""
    with tmpfs(tmp_path / "disk", "size=8m") as disk:
        before = Store(disk / "cache", 1 << 30)
        kept, purged = commit(before, blobs[0]), commit(before, blobs[1])
        if ended == "crashed":  # the -wal and -shm are left, as a crash leaves them
            # (mode=ro); the process's own connection must be gone for the remount.
            left = {n: (disk / "cache" / n).read_bytes()
                    for n in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm")}
        before.close()  # a clean stop: no write-ahead log left (immutable=1)
        if ended == "crashed":
            for name, data in left.items():
                (disk / "cache" / name).write_bytes(data)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        try:
            store = Store.for_serving(disk / "cache", 1 << 30, 0)
            assert store.read_only and store.attached
            assert (store.index.path is not None) and ((disk / "cache" / "index.sqlite-wal")
                                                      .exists() == (ended == "crashed"))
            assert store.health.degraded is not None
            assert store.health.degraded.trouble is StoreTrouble.READ_ONLY
            got = store.get(kept.orthanc_id)
            assert got is not None and got.path is not None
            fd, _ = store.open_checked(got)  # checked against its MD5, as every hit
            os.close(fd)
            assert store.by_uids(kept.sop_uid) == [got]
            store.peek(kept.orthanc_id)
            assert store.flush_touches() == 1  # recency kept in memory only
            with pytest.raises(StoreUnavailable):
                store.commit_body(verified(blobs[2]))
            assert store.purge([purged]) == (1, purged.size)
            assert store.get(purged.orthanc_id) is None
            assert store.sweep(min_age=0) == 0
            store.recheck()  # still read-only: nothing changes
            assert store.read_only and store.get(kept.orthanc_id) == got
            assert store.stats()["entries"] == 2
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        store.recheck()
        assert not store.read_only and store.health.degraded is None
        assert store.get(purged.orthanc_id) is None and not purged.path.exists()  # type: ignore[union-attr]
        assert store.get(kept.orthanc_id) is not None
        assert store.commit_body(verified(blobs[2])) is not None
        assert store.stats()["entries"] == 2
        store.close()


def test_an_index_that_cannot_be_read_on_a_read_only_disk_serves_nothing_from_it(
        tmp_path: Path, blobs: list[bytes]) -> None:
    """A write-ahead log without its -shm cannot be read consistently: the store stays
    unattached (served from Orthanc, uncached), as before."""
    with tmpfs(tmp_path / "disk", "size=8m") as disk:
        before = Store(disk / "cache", 1 << 30)
        commit(before, blobs[0])
        before.close()
        (disk / "cache" / "index.sqlite-wal").write_bytes(b"\0" * 4096)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        try:
            store = Store.for_serving(disk / "cache", 1 << 30, 0)
            assert not store.attached and not store.read_only
            assert store.health.degraded is not None
            assert store.health.degraded.trouble is StoreTrouble.READ_ONLY
            assert store.stats()["entries"] == 0
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
