"""The index's purge log: what a daemon learns of purges made by other processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomcache.cache import index as index_module
from dicomcache.cache.index import EVERY_STUDY, Index, read_only_mode


def test_purges_are_told_by_study_with_their_instances(tmp_path: Path) -> None:
    idx = Index(tmp_path)
    try:
        start = idx.generation()
        assert idx.purged_since(start) == {}
        first = idx.log_purge({"1.2.3": 4})
        idx.bump()  # a quarantine: a removal that purged no study
        idx.log_purge({"1.2.3": 1, "1.2.4": 2})
        assert idx.generation() == start + 3
        assert idx.purged_since(start) == {"1.2.3": 5, "1.2.4": 2}
        assert idx.purged_since(first) == {"1.2.3": 1, "1.2.4": 2}
        assert idx.purged_since(idx.generation()) == {}
    finally:
        idx.close()


def test_a_trimmed_log_says_every_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "MAX_PURGE_LOG", 2)
    idx = Index(tmp_path)
    try:
        for n in range(4):
            idx.log_purge({f"1.2.{n}": 1})
        # A daemon that last looked before the trimmed notes cannot know which studies.
        assert EVERY_STUDY in idx.purged_since(0)
        assert idx.purged_since(2) == {"1.2.2": 1, "1.2.3": 1}
    finally:
        idx.close()


@pytest.mark.parametrize(("wal_bytes", "shm", "mode"), [
    (None, False, "immutable=1"),   # a clean stop: mode=ro could not create the -shm
    (None, True, "immutable=1"),
    (0, True, "immutable=1"),       # an empty log holds nothing
    (0, False, "immutable=1"),
    (4096, True, "mode=ro"),        # a crash or a forced remount: the log holds rows
    (4096, False, None),            # rows SQLite cannot find without the -shm
])
def test_read_only_mode(wal_bytes: int | None, shm: bool, mode: str | None) -> None:
    assert read_only_mode(wal_bytes, shm) == mode
