"""dicomcache.cache.space: the min_free guard's decision (write / evict N / degrade) and what
a disk or index error says about the store, as tables."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from dicomcache.cache.index import SchemaMismatch
from dicomcache.cache.space import (
    INDEX_HEADROOM,
    MEANING,
    Degrade,
    Evict,
    Write,
    plan_space,
    trouble_of,
)
from dicomcache.errors import StoreTrouble

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


H = INDEX_HEADROOM  # planned with every write: the index's own growth


@pytest.mark.parametrize(("free", "min_free", "incoming", "evictable", "expected"), [
    # the guard off: always write (the disk may fill; the store degrades on ENOSPC)
    (0, 0, 10 * MiB, 0, Write()),
    # room for the body, the index's growth and min_free after them
    (10 * GiB, 2 * GiB, 512 * KiB, 0, Write()),
    (2 * GiB + 512 * KiB + H, 2 * GiB, 512 * KiB, 0, Write()),  # exactly enough
    # a re-check with nothing to write: above min_free
    (2 * GiB + H, 2 * GiB, 0, 0, Write()),
    # 1 byte short: evict what makes up the difference (a whole block for the body)
    (2 * GiB + 512 * KiB + H - 1, 2 * GiB, 512 * KiB, 10 * GiB, Evict(1)),
    # without the index's growth planned, the disk dipped below min_free
    (2 * GiB + 512 * KiB, 2 * GiB, 512 * KiB, 10 * GiB, Evict(H)),
    # below min_free with nothing to write: evict back to it
    (1 * GiB, 2 * GiB, 0, 5 * GiB, Evict(1 * GiB + H)),
    (1 * GiB, 2 * GiB, 512 * KiB, 5 * GiB, Evict(1 * GiB + 512 * KiB + H)),
    # evicting exactly all that may go restores it
    (1 * GiB, 2 * GiB, 0, 1 * GiB + H, Evict(1 * GiB + H)),
    # even evicting everything unpinned would not: degrade, evict nothing
    (1 * GiB, 2 * GiB, 0, 1 * GiB + H - 1, Degrade(1 * GiB + H)),
    (0, 2 * GiB, 512 * KiB, 0, Degrade(2 * GiB + 512 * KiB + H)),
    # a body is counted in whole blocks of the file system
    (2 * GiB + 4096 + H, 2 * GiB, 1, 0, Write()),
    (2 * GiB + 4096 + H, 2 * GiB, 4097, 0, Degrade(4096)),
])
def test_plan_space(free: int, min_free: int, incoming: int, evictable: int,
                    expected: Write | Evict | Degrade) -> None:
    assert plan_space(free=free, min_free=min_free, incoming=incoming,
                      evictable=evictable) == expected


def _sqlite_error(tmp_path: Path, make: str) -> sqlite3.Error:
    """A real error from SQLite (its result code is what is classified)."""
    path = tmp_path / "db.sqlite"
    if make == "notadb":
        path.write_bytes(b"not a database" * 100)
        db = sqlite3.connect(path)
        statement = "SELECT * FROM sqlite_master"
    else:  # readonly
        sqlite3.connect(path).executescript("CREATE TABLE t (x)")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        statement = "INSERT INTO t VALUES (1)"
    try:
        db.execute(statement)
    except sqlite3.Error as exc:
        return exc
    finally:
        db.close()
    raise AssertionError("no error")


@pytest.mark.parametrize(("error", "trouble"), [
    (OSError(errno.ENOSPC, "No space left on device"), StoreTrouble.DISK_FULL),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), StoreTrouble.DISK_FULL),
    (OSError(errno.EROFS, "Read-only file system"), StoreTrouble.READ_ONLY),
    (PermissionError(errno.EACCES, "Permission denied"), StoreTrouble.READ_ONLY),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), StoreTrouble.MISSING),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory"), StoreTrouble.MISSING),
    (OSError(errno.EIO, "Input/output error"), StoreTrouble.IO_ERROR),
    (SchemaMismatch("cache index has schema version 9"), StoreTrouble.INDEX_UNUSABLE),
    (sqlite3.OperationalError("no sqlite code"), StoreTrouble.INDEX_UNUSABLE),
])
def test_trouble_of(error: BaseException, trouble: StoreTrouble) -> None:
    assert trouble_of(error) is trouble


@pytest.mark.parametrize(("make", "trouble"), [
    ("notadb", StoreTrouble.INDEX_UNUSABLE),
    ("readonly", StoreTrouble.READ_ONLY),
])
def test_trouble_of_real_sqlite_errors(tmp_path: Path, make: str,
                                       trouble: StoreTrouble) -> None:
    assert trouble_of(_sqlite_error(tmp_path, make)) is trouble


def test_every_trouble_is_explained() -> None:
    assert set(MEANING) == set(StoreTrouble)
