"""The store: commit/lookup, LRU eviction at the bound, restart, crash safety."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dicomcache.samples import encode, make_ct_series
from dicomcache.store import Store
from dicomcache.verify import parse_dicom, verify_file


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    """Ten 256 KiB instances."""
    return [encode(ds, ds.file_meta.TransferSyntaxUID)
            for ds in make_ct_series(10, rows=256, columns=512, seed=3)]


def commit(store: Store, blob: bytes, oid: str | None = None):  # type: ignore[no-untyped-def]
    return store.commit(store.write_temp(blob), parse_dicom(blob),
                        hashlib.md5(blob).hexdigest(), oid)


def test_commit_and_get(tmp_path: Path, blobs: list[bytes]) -> None:
    store = Store(tmp_path, 1 << 30)
    entry = commit(store, blobs[0], "aaaaaaaa-bbbbbbbb-cccccccc-dddddddd-eeeeeeee")
    got = store.get(entry.sop_uid)
    assert got == entry
    assert got.path.read_bytes() == blobs[0]
    assert got.size == len(blobs[0]) and got.md5 == hashlib.md5(blobs[0]).hexdigest()
    assert store.resolve("aaaaaaaa-bbbbbbbb-cccccccc-dddddddd-eeeeeeee") == entry.sop_uid
    assert store.get_by_orthanc_id("aaaaaaaa-bbbbbbbb-cccccccc-dddddddd-eeeeeeee") == entry
    assert store.get("1.2.3") is None
    assert list(store.tmp_dir.iterdir()) == []  # the temp file was renamed, not copied


def test_recommit_replaces_without_losing_the_file(tmp_path: Path, blobs: list[bytes]) -> None:
    store = Store(tmp_path, 1 << 30)
    first = commit(store, blobs[0])
    second = commit(store, blobs[0])
    assert second.path != first.path and not first.path.exists()
    assert store.get(first.sop_uid).path.read_bytes() == blobs[0]  # type: ignore[union-attr]
    assert store.stats()["entries"] == 1


def test_eviction_keeps_under_bound_least_recently_used_first(tmp_path: Path,
                                                               blobs: list[bytes]) -> None:
    size = len(blobs[0])
    store = Store(tmp_path, 4 * size + (256 << 10))  # room for ~4 plus the sqlite file
    entries = [commit(store, b) for b in blobs[:4]]
    time.sleep(0.01)
    assert store.get(entries[0].sop_uid) is not None  # touch the oldest: now most recent
    for b in blobs[4:6]:  # two more: two must go, and not the one just used
        commit(store, b)
    stats = store.stats()
    assert stats["size_bytes"] <= store.max_size
    assert stats["evictions"] == 2
    assert store.get(entries[0].sop_uid) is not None, "recently used entry was evicted"
    assert store.get(entries[1].sop_uid) is None
    on_disk = list((tmp_path / "objects").rglob("*.dcm"))
    assert len(on_disk) == stats["entries"], "evicted files must be unlinked"


def test_survives_restart(tmp_path: Path, blobs: list[bytes]) -> None:
    store = Store(tmp_path, 1 << 30)
    entry = commit(store, blobs[1], "11111111-22222222-33333333-44444444-55555555")
    store.close()
    again = Store(tmp_path, 1 << 30)
    assert again.get(entry.sop_uid) == entry
    assert again.resolve("11111111-22222222-33333333-44444444-55555555") == entry.sop_uid


def test_vanished_file_is_a_miss(tmp_path: Path, blobs: list[bytes]) -> None:
    store = Store(tmp_path, 1 << 30)
    entry = commit(store, blobs[2])
    entry.path.unlink()
    assert store.get(entry.sop_uid) is None
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
    assert store.get(kept.sop_uid) is not None


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


_WRITER = textwrap.dedent("""
    import hashlib, sys
    from dicomcache.samples import encode, make_ct_series
    from dicomcache.store import Store
    from dicomcache.verify import parse_dicom
    store = Store(sys.argv[1], 1 << 30)
    blobs = [encode(ds, ds.file_meta.TransferSyntaxUID)
             for ds in make_ct_series(40, rows=128, columns=128, seed=7)]
    print("ready", flush=True)
    while True:
        for b in blobs:
            store.commit(store.write_temp(b), parse_dicom(b), hashlib.md5(b).hexdigest(), None)
""")


@pytest.mark.parametrize("delay", [0.05, 0.13, 0.31, 0.57])
def test_kill_9_leaves_a_consistent_store(tmp_path: Path, delay: float) -> None:
    with subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                          stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        time.sleep(delay)
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
