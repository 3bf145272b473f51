"""The store degraded, not dead (dicomcache.cache.health, Store.for_serving, Store.recheck):
a directory it cannot use gives a store that indexes and writes nothing and says why;
the periodic re-check attaches it, keeps min_free, and notices trouble and its end."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from dicomcache.cache.index import INDEX_FILE
from dicomcache.cache.space import INDEX_HEADROOM
from dicomcache.cache.store import Store
from dicomcache.errors import StoreTrouble, StoreUnavailable
from tests.cache.test_store import blobs, verified

__all__ = ["blobs"]


def test_an_unusable_index_degrades_then_recheck_attaches(
        tmp_path: Path, blobs: list[bytes], caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / INDEX_FILE).write_bytes(b"garbage" * 1000)
    with pytest.raises(Exception, match="not a database"):  # the CLI's store: an error
        Store(directory, 1 << 30)
    store = Store.for_serving(directory, 1 << 30, 0)  # the daemon's: degraded
    state = store.health.degraded
    assert state is not None and state.trouble is StoreTrouble.INDEX_UNUSABLE
    assert "index.sqlite" in state.detail and "not a database" in state.detail
    assert "remove index.sqlite" in state.status
    assert not store.attached
    with pytest.raises(StoreUnavailable):
        store.commit_body(verified(blobs[0]))
    assert store.get(verified(blobs[0]).orthanc_id) is None
    store.resolve_as("1.2.3", None, None, ["x"])  # kept in memory only
    assert store.resolution("1.2.3") == ["x"]
    store.recheck()  # still garbage: still degraded, logged once
    assert store.health.degraded is not None
    assert caplog.text.count("cache degraded: index_unusable") == 1

    (directory / INDEX_FILE).unlink()
    store.recheck()
    assert store.attached and store.health.degraded is None
    assert "cache recovered" in caplog.text
    entry = store.commit_body(verified(blobs[0]))
    assert entry is not None and store.get(entry.orthanc_id) == entry
    store.close()


def test_a_cache_directory_removed_while_serving_is_made_again(
        tmp_path: Path, blobs: list[bytes]) -> None:
    directory = tmp_path / "cache"
    store = Store.for_serving(directory, 1 << 30, 0)
    first = store.commit_body(verified(blobs[0]))
    assert first is not None
    shutil.rmtree(directory)  # an operator's rm -rf
    store.recheck()
    state = store.health.degraded
    assert state is not None and state.trouble is StoreTrouble.MISSING
    assert store.get(first.orthanc_id) is None  # forgotten with the directory
    store.recheck()  # a new directory, a new index
    assert store.health.degraded is None and (directory / INDEX_FILE).exists()
    again = store.commit_body(verified(blobs[1]))
    assert again is not None and again.path is not None and again.path.exists()
    store.close()


def test_min_free_evicts_unpinned_least_recently_used_and_tells_listeners(
        tmp_path: Path, blobs: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """The file system's free space as the test says (statvfs is what the guard reads)."""
    store = Store.for_serving(tmp_path / "cache", 1 << 30, 1 << 20)
    removed: list[Path] = []
    store.removal_listeners.append(removed.append)
    entries = [store.commit_body(verified(b)) for b in blobs[:4]]
    assert all(entries)
    store.pin(str(entries[0].study_uid))  # type: ignore[union-attr]
    # Every blob is in one study: pinned, nothing may go.  A body and a half short (and
    # resuming wants a tenth of min_free more: two bodies go):
    real = os.statvfs
    short = (1 << 20) - len(blobs[0]) * 3 // 2 + INDEX_HEADROOM
    monkeypatch.setattr(os, "statvfs", lambda p: _Fs(short) if Path(p) == store.directory
                        else real(p))
    store.recheck()
    state = store.health.degraded
    assert state is not None and state.trouble is StoreTrouble.MIN_FREE
    assert store.stats()["entries"] == 4 and not removed
    with pytest.raises(StoreUnavailable):
        store.commit_body(verified(blobs[5]))

    store.unpin(str(entries[0].study_uid))  # type: ignore[union-attr]
    store.recheck()  # the two least recently used go
    assert store.health.degraded is None
    assert store.stats()["entries"] == 2 and store.space_evictions == 2
    assert removed == [e.path for e in entries[:2]]  # type: ignore[union-attr]
    store.close()


class _Fs:
    """What os.statvfs answers, with ``free`` bytes available (4 KiB blocks)."""

    def __init__(self, free: int) -> None:
        self.f_frsize = 4096
        self.f_bavail = free // 4096
        self.f_blocks = (1 << 30) // 4096


def test_health_logs_each_change_once(caplog: pytest.LogCaptureFixture) -> None:
    from dicomcache.cache.health import StoreHealth

    caplog.set_level(logging.INFO)
    health = StoreHealth()
    seen: list[object] = []
    health.listeners.append(seen.append)
    health.degrade(StoreTrouble.DISK_FULL, "first")
    since = health.degraded.since if health.degraded else 0.0
    health.degrade(StoreTrouble.DISK_FULL, "again")  # same cause: no new line
    assert health.degraded is not None and health.degraded.since == since
    assert health.degraded.detail == "again"
    health.degrade(StoreTrouble.READ_ONLY, "remounted")
    health.recover()
    health.recover()
    assert [r.levelname for r in caplog.records] == ["ERROR", "ERROR", "WARNING"]
    assert [getattr(s, "trouble", None) for s in seen] == [
        StoreTrouble.DISK_FULL, StoreTrouble.READ_ONLY, None]
