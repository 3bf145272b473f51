"""The ``[cache] min_free`` guard as pure decisions: whether the store may write a body,
must first evict, or must stop caching; and what a disk error says about the store.

Like nginx's ``proxy_cache_path … min_free``, the guard keeps the cache from filling
its file system, whatever else lives on it (the relay's spool, the audit trail,
logs): before a body is written, and on every periodic re-check, the free space
left afterwards must stay at least ``min_free``.  When it would not, the least
recently used entries (never those of pinned studies) are evicted to make up the
difference; when even evicting all of them would not, nothing is evicted (the
cache would be emptied for nothing: something else fills the disk) and the store
stops caching until space returns.  ``min_free = 0`` turns the guard off.
"""

from __future__ import annotations

import errno
import sqlite3
from dataclasses import dataclass

from dicomcache.errors import StoreTrouble


@dataclass(frozen=True, slots=True)
class Write:
    """Enough room: write."""


@dataclass(frozen=True, slots=True)
class Evict:
    """Evict at least ``nbytes`` of least-recently-used entries, then write."""

    nbytes: int


@dataclass(frozen=True, slots=True)
class Degrade:
    """Evicting every evictable entry would not leave ``min_free``: do not write."""

    short: int


SpacePlan = Write | Evict | Degrade

#: What the index may grow by between two looks at the free space (SQLite's WAL takes a
#: few 4 KiB pages per commit, evictions included; it is checkpointed at
#: :data:`WAL_PAGES` and cut back to this size): planned for with every body, so the
#: file system does not dip below ``min_free`` by the index's growth (seen: 44 and
#: 124 KiB on a 6 MiB disk without it).
INDEX_HEADROOM = 1 << 20
#: SQLite pages (4 KiB) in the index's WAL before it is checkpointed.
WAL_PAGES = 256


def plan_space(*, free: int, min_free: int, incoming: int, evictable: int,
               block: int = 4096) -> SpacePlan:
    """What to do before writing ``incoming`` bytes (0: a re-check with nothing to write).

    ``free``: bytes the service may still use on the file system; ``evictable``: bytes
    of entries eviction may take (not pinned); ``block``: the file system's block size
    (a file takes whole blocks).
    """
    if min_free <= 0:
        return Write()
    needed = min_free + -(-incoming // block) * block + INDEX_HEADROOM - free
    if needed <= 0:
        return Write()
    if needed <= evictable:
        return Evict(needed)
    return Degrade(needed)


#: SQLite's primary result codes that say something about the disk (``sqlite3.Error``'s
#: ``sqlite_errorcode`` & 0xff).
_SQLITE_TROUBLE = {
    13: StoreTrouble.DISK_FULL,       # SQLITE_FULL
    8: StoreTrouble.READ_ONLY,        # SQLITE_READONLY
    10: StoreTrouble.IO_ERROR,        # SQLITE_IOERR
    14: StoreTrouble.MISSING,         # SQLITE_CANTOPEN
    11: StoreTrouble.INDEX_UNUSABLE,  # SQLITE_CORRUPT
    26: StoreTrouble.INDEX_UNUSABLE,  # SQLITE_NOTADB
}
_ERRNO_TROUBLE = {
    errno.ENOSPC: StoreTrouble.DISK_FULL,
    errno.EDQUOT: StoreTrouble.DISK_FULL,
    errno.EROFS: StoreTrouble.READ_ONLY,
    errno.EACCES: StoreTrouble.READ_ONLY,
    errno.EPERM: StoreTrouble.READ_ONLY,
    errno.ENOENT: StoreTrouble.MISSING,
    errno.ENOTDIR: StoreTrouble.MISSING,
}


def trouble_of(exc: BaseException) -> StoreTrouble:
    """What a failed disk or index operation says about the store."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _SQLITE_TROUBLE:
            return _SQLITE_TROUBLE[code & 0xFF]
        return StoreTrouble.INDEX_UNUSABLE
    if isinstance(exc, OSError) and exc.errno in _ERRNO_TROUBLE:
        return _ERRNO_TROUBLE[exc.errno]
    if isinstance(exc, OSError):
        return StoreTrouble.IO_ERROR
    return StoreTrouble.INDEX_UNUSABLE  # SchemaMismatch: another version's index


#: What each trouble means, for people (the status page, /readyz, the log).
MEANING = {
    StoreTrouble.DISK_FULL: "the cache's file system is full",
    StoreTrouble.MIN_FREE: "free space on the cache's file system is below cache.min_free and "
                           "evicting unpinned entries cannot restore it",
    StoreTrouble.READ_ONLY: "the cache directory cannot be written (a read-only file system, "
                            "or permission denied)",
    StoreTrouble.MISSING: "the cache directory does not exist and cannot be created",
    StoreTrouble.INDEX_UNUSABLE: "the cache index cannot be used: remove index.sqlite (with "
                                 "index.sqlite-wal and -shm) from the cache directory, and "
                                 "dicomcache starts a new, empty one by itself",
    StoreTrouble.IO_ERROR: "the cache disk reports I/O errors",
}
