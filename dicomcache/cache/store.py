"""The verified on-disk store of DICOM instances.

Guarantees:

* **Only verified bytes.** :meth:`Store.commit` is only ever handed bodies that
  passed :mod:`dicomcache.dicom.verify`; nothing else is written under ``objects/``.
* **Crash-safe.** A body is written to ``tmp/``, fsynced, renamed into
  ``objects/`` (and the directory fsynced) *before* the index row that points
  to it is inserted.  A ``kill -9`` at any moment leaves either no entry or a
  complete one; leftovers (temp files, renamed files the index never learned)
  are swept at start-up.
* **Size-bounded, least recently used first.** The index is a
  :class:`diskcache.Cache` with the ``least-recently-used`` policy and
  ``size_limit = max_size``: diskcache does the accounting and eviction, and a
  small :class:`diskcache.Disk` subclass makes it adopt our already-written
  files instead of copying them (its eviction then unlinks them).
* **Group commit** for series streams: :meth:`AsyncStore.queue_commit` queues a
  verified body (its future settles once it is durable); bodies queued while a
  group is being written go into the next group (:meth:`Store.commit_group`),
  written in one thread hop:
  each file is still fsynced and renamed, but each directory touched is
  fsynced once per group, the index rows are inserted in a row (under one
  lock, no thread contending for sqlite) and the Orthanc ID aliases in one
  transaction per group.  While
  queued or being written, an instance is found by :meth:`AsyncStore.get`
  (which waits for its commit), so a retrieve answered before its parts were
  durable is followed by lookups that see them.  A viewer's own download is
  committed at once by :meth:`AsyncStore.commit_bytes`, never behind a group.
* **Keyed by immutable identity.** Entries are keyed by SOPInstanceUID; Orthanc
  instance IDs are aliases learned from what is fetched, so the REST, WADO-URI
  and DICOMweb forms of one instance share one file.

All methods touching sqlite or the disk are synchronous and meant to run in a
worker thread; :class:`AsyncStore` wraps them with :func:`asyncio.to_thread` so
lookups never block the event loop.  Hits are answered from an in-memory map of
entries already looked up (:meth:`Store.peek`): no thread hop and no sqlite
write per hit.  Their recency is written back to the index in batches
(:meth:`Store.flush_touches`, every second), which is what LRU eviction reads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diskcache

from dicomcache.dicom.verify import DicomSummary
from dicomcache.errors import StoreFull

log = logging.getLogger(__name__)

#: diskcache's MODE_RAW: the sqlite ``value`` column holds our JSON metadata as text.
_MODE_RAW = 1

# Studies eviction must skip live in a table of the index's own sqlite file,
# so a pin made by the CLI is seen at once by a running daemon.
_CREATE_PINNED = ("CREATE TABLE IF NOT EXISTS Pinned "
                  "(study_uid TEXT PRIMARY KEY, pinned_at REAL NOT NULL)")
_STUDY_OF_ROW = ("CASE WHEN Cache.mode = 1 AND json_valid(Cache.value) "
                 "THEN json_extract(Cache.value, '$.study_uid') END")
#: The least recently used entry not in a pinned study (diskcache's LRU order).
_SELECT_EVICTABLE = (
    "SELECT rowid, filename FROM Cache WHERE NOT EXISTS "
    f"(SELECT 1 FROM Pinned WHERE Pinned.study_uid = {_STUDY_OF_ROW}) "
    "ORDER BY access_time LIMIT 1")


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored, verified instance."""

    sop_uid: str
    path: Path
    size: int
    md5: str
    transfer_syntax: str
    study_uid: str | None
    series_uid: str | None
    orthanc_id: str | None
    stored_at: float

    @property
    def etag(self) -> str:
        return f'"{self.md5}"'


@dataclass(frozen=True, slots=True)
class _Pending:
    """What :meth:`Store.commit` hands to diskcache: a file already in ``objects/``."""

    file: str
    meta: dict[str, Any]


class _AdoptingDisk(diskcache.Disk):  # type: ignore[misc]
    """A diskcache ``Disk`` that adopts our verified file instead of writing one.

    diskcache would otherwise copy the value into a file of its own; adopting
    the file keeps the write single and lets diskcache's eviction and deletion
    (``Disk.remove``) unlink our files.
    """

    def store(self, value: Any, read: bool, key: Any = None) -> tuple[int, int, str | None, Any]:
        if not isinstance(value, _Pending):
            return super().store(value, read, key=key)  # type: ignore[no-any-return]
        # The file is already in place (Store.commit renamed and synced it):
        # the row only records its name, size and metadata.
        meta = dict(value.meta, file=value.file)
        return int(meta["size"]), _MODE_RAW, value.file, json.dumps(meta, separators=(",", ":"))

    def remove(self, file_path: str) -> None:
        super().remove(file_path)
        hook = getattr(self, "on_remove", None)
        if hook is not None:
            hook(file_path)


@dataclass(frozen=True, slots=True)
class Verified:
    """A body that passed :mod:`dicomcache.dicom.verify`, waiting to be committed."""

    data: bytes
    summary: DicomSummary
    md5: str
    orthanc_id: str | None


@dataclass(frozen=True, slots=True)
class _Placed:
    """A body renamed into ``objects/``, not yet indexed."""

    index: int
    rel: str
    meta: dict[str, Any]


#: What :meth:`Store.commit_group` gives for each body.
Committed = Entry | None | OSError


class StoreClosed(OSError):
    """The store was closed (shutting down): the commit was abandoned, nothing written."""


def _rename_into(temp: Path, full: Path) -> None:
    """Rename ``temp`` to ``full``, making its directory if it is missing.

    The directory usually exists (made at start), but diskcache removes object
    directories left empty by an eviction, possibly between two attempts here.
    """
    for attempt in range(3):
        try:
            os.rename(temp, full)
            return
        except FileNotFoundError:
            if attempt == 2 or not temp.exists():
                raise
            full.parent.mkdir(parents=True, exist_ok=True)


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """Synchronous store API (call from worker threads); see the module docstring."""

    def __init__(self, directory: Path, max_size: int) -> None:
        self.directory = Path(directory)
        self.max_size = max_size
        self.tmp_dir = self.directory / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # The index's sqlite file lives at the store root, so the relative
        # names _AdoptingDisk returns (objects/xx/...) resolve there.
        self._index = diskcache.Cache(
            str(self.directory),
            disk=_AdoptingDisk,
            size_limit=max_size,
            eviction_policy="least-recently-used",
            # diskcache culls in batches (10 at a time, or cull_limit per set);
            # we evict one least-recently-used entry at a time instead, just
            # enough to get back under the bound (see _evict_to_bound).
            cull_limit=0,
        )
        self._aliases = diskcache.Cache(
            str(self.directory / "aliases"),
            size_limit=256 << 20,
            eviction_policy="least-recently-stored",
        )
        self._index.disk.on_remove = self._forget_file
        self._commit_lock = threading.Lock()
        #: Held while a group is written; close() takes it, so it never cuts a group.
        self._group_lock = threading.Lock()
        self._closed = False
        self._make_object_dirs()
        self.evictions = 0
        # The hot map: plain dicts, read on the event loop, written by worker
        # threads (single dict operations are atomic under the GIL).
        self._hot: dict[str, Entry] = {}
        self._hot_oid: dict[str, str] = {}
        self._file_to_sop: dict[str, str] = {}
        self._touched: dict[str, None] = {}
        self._init_pins()

    # --- lifecycle -------------------------------------------------------------------
    def _make_object_dirs(self) -> None:
        """Make the 256 object directories now, not one by one during a cold retrieve."""
        objects = self.directory / "objects"
        dirs = [objects / f"{i:02x}" for i in range(256)]
        if not all(d.is_dir() for d in dirs):
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
            _fsync_dir(objects)

    def close(self) -> None:
        """Close the index; waits for a group being written, refuses later ones."""
        with self._group_lock:
            self._closed = True
            self._index.close()
            self._aliases.close()

    def sweep(self, min_age: float = 60.0) -> int:
        """Remove leftovers of interrupted writes: temp files and unindexed objects.

        Returns the number of files removed.  Safe to run while serving: files
        younger than a minute are left alone (they may be mid-commit).
        """
        removed = 0
        cutoff = time.time() - min_age
        for tmp in self.tmp_dir.iterdir():
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink(missing_ok=True)
                removed += 1
        known = {str(self.directory / json.loads(v)["file"])
                 for v in self._raw_values()}
        objects = self.directory / "objects"
        if objects.exists():
            for path in objects.rglob("*.dcm"):
                if str(path) not in known and path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info("store sweep removed %d leftover file(s) of interrupted writes", removed)
        return removed

    def _raw_values(self) -> Iterator[str]:
        con = self._index._con
        for (value,) in con.execute("SELECT value FROM Cache WHERE mode = ?", (_MODE_RAW,)):
            if isinstance(value, str):
                yield value

    # --- temp files ----------------------------------------------------------------------
    def temp_path(self) -> Path:
        """A fresh path in ``tmp/`` (same file system as ``objects/``, so rename is atomic)."""
        return self.tmp_dir / f"{secrets.token_hex(8)}.part"

    def write_temp(self, data: bytes | memoryview) -> Path:
        """Write ``data`` to a new temp file and fsync it; raises :class:`StoreFull` on ENOSPC."""
        path = self.temp_path()
        try:
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)
            _raise_if_full(exc)
            raise
        return path

    # --- entries -------------------------------------------------------------------------
    def commit(self, temp: Path, summary: DicomSummary, md5: str, orthanc_id: str | None) -> Entry:
        """Adopt a verified, fsynced temp file as the entry for its SOPInstanceUID."""
        rel, meta = self._place(temp, summary, md5, orthanc_id)
        full = self.directory / rel
        try:
            # The rename must be durable before the index row that points at it.
            _fsync_dir(full.parent)
        except OSError as exc:
            full.unlink(missing_ok=True)
            _raise_if_full(exc)
            raise
        [entry] = self._index_rows([_Placed(0, rel, meta)])
        if isinstance(entry, StoreFull):
            raise entry
        return entry

    def commit_group(self, bodies: Sequence[Verified]) -> list[Committed]:
        """Write and commit several verified bodies as one group; one result per body.

        The same guarantees as :meth:`write_temp` then :meth:`commit` for each
        body, with fewer syncs: every file is written and fsynced in ``tmp/``
        and renamed into ``objects/``; then each directory touched is fsynced
        once; only then are the index rows inserted (and the aliases learnt).  A
        crash at any point leaves complete entries or leftovers the sweep
        removes.  A result is the :class:`Entry`, ``None`` (evicted at once:
        bigger than the whole cache), or the ``OSError`` (:class:`StoreFull`,
        :class:`StoreClosed`) that kept that body out.
        """
        results: list[Committed] = [None] * len(bodies)
        with self._group_lock:
            if self._closed:
                return [StoreClosed("store closed: commit abandoned")] * len(bodies)
            placed: list[_Placed] = []
            for i, body in enumerate(bodies):
                try:
                    temp = self.write_temp(body.data)
                    rel, meta = self._place(temp, body.summary, body.md5, body.orthanc_id)
                except OSError as exc:
                    results[i] = exc
                    continue
                placed.append(_Placed(i, rel, meta))
            try:
                # Renames durable before any index row points at them; one fsync per
                # directory (a group spreads over a few of the 256 object directories).
                for parent in sorted({(self.directory / p.rel).parent for p in placed}):
                    _fsync_dir(parent)
            except OSError as exc:
                for p in placed:
                    (self.directory / p.rel).unlink(missing_ok=True)
                    results[p.index] = _full_or(exc)
                return results
            for p, entry in zip(placed, self._index_rows(placed), strict=True):
                # An entry evicted at once (bigger than the whole cache) is no entry.
                results[p.index] = entry if isinstance(entry, StoreFull) or entry.path.exists() \
                    else None
        return results

    def _place(self, temp: Path, summary: DicomSummary, md5: str,
               orthanc_id: str | None) -> tuple[str, dict[str, Any]]:
        """Rename a fsynced temp file into ``objects/`` (its directory not yet synced)."""
        meta = {
            "sop_uid": summary.sop_instance_uid,
            "size": summary.size,
            "md5": md5,
            "transfer_syntax": summary.transfer_syntax_uid,
            "study_uid": summary.study_instance_uid,
            "series_uid": summary.series_instance_uid,
            "orthanc_id": orthanc_id,
            "stored_at": time.time(),
        }
        # A random suffix: a re-commit of the same key must not reuse the old
        # name, which diskcache deletes after replacing the row.
        rel = os.path.join("objects", secrets.token_hex(1),
                           f"{summary.sop_instance_uid}.{secrets.token_hex(4)}.dcm")
        full = self.directory / rel
        try:
            _rename_into(temp, full)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            _raise_if_full(exc)
            raise
        return rel, meta

    def _index_rows(self, placed: Sequence[_Placed]) -> list[Entry | StoreFull]:
        """Index durable files in ``objects/``, learn their aliases; a result per file.

        A row the index cannot take (its disk full) is a :class:`StoreFull`,
        and its file and those after it are removed.
        """
        results: list[Entry | StoreFull] = []
        # Only the index update and eviction are serialised; writes, renames and
        # fsyncs of other commits run in parallel in other worker threads.
        # One transaction per row, not per group: diskcache unlinks the file of a
        # replaced row when the set's own transaction ends, which must be after
        # its COMMIT (in WAL mode without fsync, a commit is cheap).
        with self._commit_lock:
            for n, p in enumerate(placed):
                try:
                    self._index.set(p.meta["sop_uid"], _Pending(p.rel, p.meta), retry=True)
                except sqlite3.OperationalError as exc:  # "database or disk is full"
                    full = StoreFull(errno.ENOSPC, f"cache index cannot grow: {exc}")
                    for left in placed[n:]:
                        (self.directory / left.rel).unlink(missing_ok=True)
                        results.append(full)
                    break
                results.append(self._entry(dict(p.meta, file=p.rel)))
            self.evictions += self._evict_to_bound()
        self._learn_all([(p.meta["orthanc_id"], p.meta["sop_uid"])
                         for p, r in zip(placed, results, strict=True)
                         if isinstance(r, Entry) and p.meta["orthanc_id"]])
        for p, r in zip(placed, results, strict=True):
            if isinstance(r, Entry):
                self._remember(r, p.rel)
        return results

    def _evict_to_bound(self) -> int:
        """Evict least-recently-used entries, one at a time, until under ``max_size``.

        Entries of pinned studies are skipped; if only they are left, the store
        stays over the bound (and says so in the log, at most every 5 minutes).
        """
        index = self._index
        evicted = 0
        while index.volume() > self.max_size and len(index) > 1:
            # diskcache's LRU order (access_time) and its file cleanup, one row at a
            # time, with pinned studies left out of the choice.
            with index._transact(retry=True) as (sql, cleanup):
                row = sql(_SELECT_EVICTABLE).fetchone()
                if row is not None:
                    sql("DELETE FROM Cache WHERE rowid = ?", (row[0],))
                    cleanup(row[1])
            if row is None:
                if time.monotonic() - self._pinned_warned > 300:
                    self._pinned_warned = time.monotonic()
                    log.warning("cache is over max_size but every remaining entry belongs "
                                "to a pinned study; unpin some (dicomcache unpin) or raise "
                                "cache.max_size")
                break
            evicted += 1
        return evicted

    def get(self, sop_uid: str) -> Entry | None:
        """The entry for ``sop_uid`` (marking it recently used), or ``None``.

        An index row whose file has vanished (deleted by hand, disk trouble) is
        dropped and reported as a miss, so it is fetched again.
        """
        raw = self._index.get(sop_uid, retry=True)
        if raw is None:
            return None
        meta = json.loads(raw)
        entry = self._entry(meta)
        if not entry.path.exists():
            self.forget(sop_uid)
            return None
        self._remember(entry, meta["file"])
        return entry

    # --- the hot map -----------------------------------------------------------------
    _HOT_LIMIT = 200_000

    def _remember(self, entry: Entry, rel: str | None) -> None:
        if len(self._hot) >= self._HOT_LIMIT:  # bound memory; misses refill it
            self._hot.clear()
            self._file_to_sop.clear()
        self._hot[entry.sop_uid] = entry
        if rel:
            self._file_to_sop[rel] = entry.sop_uid
        if entry.orthanc_id:
            self._hot_oid[entry.orthanc_id] = entry.sop_uid

    def peek(self, sop_uid: str) -> Entry | None:
        """A known entry without I/O (safe on the event loop), marking it used."""
        entry = self._hot.get(sop_uid)
        if entry is not None:
            self._touched[sop_uid] = None
        return entry

    def peek_orthanc_id(self, orthanc_id: str) -> Entry | None:
        sop_uid = self._hot_oid.get(orthanc_id)
        return self.peek(sop_uid) if sop_uid else None

    def flush_touches(self) -> int:
        """Write the recency of entries served from memory back to the index."""
        touched = list(self._touched)
        for key in touched:
            self._touched.pop(key, None)
            self._index.get(key, retry=True)  # LRU policy: a get updates access_time
        return len(touched)

    def _forget_file(self, rel: str) -> None:
        sop_uid = self._file_to_sop.pop(rel, None)
        if sop_uid is not None:
            self._hot.pop(sop_uid, None)

    def forget(self, sop_uid: str) -> None:
        """Drop an entry whose file vanished (deleted by hand, disk trouble)."""
        log.warning("store: file of %s vanished; dropping its entry", sop_uid)
        self._hot.pop(sop_uid, None)
        self._index.delete(sop_uid, retry=True)

    def _entry(self, meta: dict[str, Any]) -> Entry:
        return Entry(
            sop_uid=meta["sop_uid"], path=self.directory / meta["file"], size=meta["size"],
            md5=meta["md5"], transfer_syntax=meta["transfer_syntax"],
            study_uid=meta.get("study_uid"), series_uid=meta.get("series_uid"),
            orthanc_id=meta.get("orthanc_id"), stored_at=meta["stored_at"])

    def delete(self, sop_uid: str) -> bool:
        self._hot.pop(sop_uid, None)
        return bool(self._index.delete(sop_uid, retry=True))

    def get_by_orthanc_id(self, orthanc_id: str) -> Entry | None:
        """The entry of an Orthanc instance ID, if its SOPInstanceUID is known and stored."""
        sop_uid = self.resolve(orthanc_id)
        return self.get(sop_uid) if sop_uid else None

    def resolve(self, orthanc_id: str) -> str | None:
        """SOPInstanceUID of an Orthanc instance ID, if learned."""
        value = self._aliases.get(("oid", orthanc_id))
        return value if isinstance(value, str) else None

    def learn(self, orthanc_id: str, sop_uid: str) -> None:
        """Record that an Orthanc instance ID and a SOPInstanceUID name one instance."""
        self._learn_all([(orthanc_id, sop_uid)])

    def _learn_all(self, pairs: Sequence[tuple[str, str]]) -> None:
        new = [(oid, sop) for oid, sop in pairs if self.resolve(oid) != sop]
        if not new:
            return  # already known: no write transaction
        with self._aliases.transact(retry=True):  # one transaction, both directions
            for orthanc_id, sop_uid in new:
                self._aliases.set(("oid", orthanc_id), sop_uid)
                self._aliases.set(("sop", sop_uid), orthanc_id)

    def orthanc_id_of(self, sop_uid: str) -> str | None:
        value = self._aliases.get(("sop", sop_uid))
        return value if isinstance(value, str) else None

    def stats(self) -> dict[str, int]:
        """Entries, bytes used (index included), bound, evictions since start."""
        return {"entries": len(self._index), "size_bytes": int(self._index.volume()),
                "max_bytes": self.max_size, "evictions": self.evictions}

    def entries(self) -> Iterator[Entry]:
        for raw in self._raw_values():
            yield self._entry(json.loads(raw))

    # --- administration: pins, purge, quarantine (CLI and status page) ---------------
    _pinned_warned = -1e9

    def _init_pins(self) -> None:
        self._index._sql(_CREATE_PINNED)

    def pin(self, study_uid: str) -> bool:
        """Keep a study's entries (present and future) out of eviction; False if already pinned."""
        with self._index._transact(retry=True) as (sql, _cleanup):
            cur = sql("INSERT OR IGNORE INTO Pinned (study_uid, pinned_at) VALUES (?, ?)",
                      (study_uid, time.time()))
            return bool(cur.rowcount)

    def unpin(self, study_uid: str) -> bool:
        """Make a study evictable again; False if it was not pinned."""
        with self._index._transact(retry=True) as (sql, _cleanup):
            return bool(sql("DELETE FROM Pinned WHERE study_uid = ?", (study_uid,)).rowcount)

    def pinned(self) -> dict[str, float]:
        """Pinned StudyInstanceUIDs and when each was pinned."""
        rows = self._index._sql("SELECT study_uid, pinned_at FROM Pinned ORDER BY pinned_at")
        return {str(uid): float(at) for uid, at in rows.fetchall()}

    def listing(self) -> Iterator[tuple[Entry, float]]:
        """Every entry with its last use (Unix time; what LRU eviction orders by)."""
        rows = self._index._sql(
            "SELECT value, access_time FROM Cache WHERE mode = ?", (_MODE_RAW,)).fetchall()
        for value, access_time in rows:
            if isinstance(value, str):
                yield self._entry(json.loads(value)), float(access_time)

    def remove_entries(self, entries: list[Entry]) -> tuple[int, int]:
        """Delete these entries and their files; returns (entries, bytes) removed.

        Only the row still pointing at the same file is deleted, so an entry
        re-committed meanwhile (by a running daemon) is left alone.
        """
        removed = nbytes = 0
        for start in range(0, len(entries), 256):  # bounded transactions
            with self._index._transact(retry=True) as (sql, cleanup):
                for entry in entries[start:start + 256]:
                    rel = self._rel(entry)
                    if sql("DELETE FROM Cache WHERE filename = ?", (rel,)).rowcount:
                        cleanup(rel)
                        removed += 1
                        nbytes += entry.size
                    self._drop_hot(entry, rel)
        return removed, nbytes

    @property
    def quarantine_dir(self) -> Path:
        return self.directory / "quarantine"

    def quarantine(self, entry: Entry, cause: str, reason: str) -> Path | None:
        """Move a bad entry's file to ``quarantine/`` with a JSON note, and drop its row.

        Returns the quarantined file, or ``None`` if the file was already gone.
        """
        rel = self._rel(entry)
        self.quarantine_dir.mkdir(exist_ok=True)
        dest = self.quarantine_dir / entry.path.name
        try:
            os.rename(entry.path, dest)  # same file system: atomic, no copy
        except FileNotFoundError:
            moved = None
        else:
            moved = dest
            note = dict(entry_as_dict(entry), path=str(dest), cause=cause, reason=reason,
                        quarantined_at=time.time())
            dest.with_suffix(".json").write_text(json.dumps(note, indent=1) + "\n")
        with self._index._transact(retry=True) as (sql, _cleanup):
            sql("DELETE FROM Cache WHERE filename = ?", (rel,))
        self._drop_hot(entry, rel)
        return moved

    def check(self) -> dict[str, int]:
        """Prove the store usable: the index answers and ``tmp/`` takes a synced write.

        Raises ``OSError`` or ``sqlite3.Error`` when it is not.  Returns the
        stats plus the free bytes of the cache's file system.
        """
        stats = self.stats()
        probe = self.write_temp(b"ready")
        probe.unlink()
        fs = os.statvfs(self.directory)
        return dict(stats, free_bytes=fs.f_bavail * fs.f_frsize)

    def _rel(self, entry: Entry) -> str:
        return str(entry.path.relative_to(self.directory))

    def _drop_hot(self, entry: Entry, rel: str) -> None:
        self._hot.pop(entry.sop_uid, None)
        self._file_to_sop.pop(rel, None)
        self._touched.pop(entry.sop_uid, None)
        if entry.orthanc_id:
            self._hot_oid.pop(entry.orthanc_id, None)


#: A group of commits closes at this many bytes or bodies (its waiters settle together).
GROUP_BYTES = 32 << 20
GROUP_BODIES = 64
#: Queued bytes from which group commits start even while they are deferred
#: (:meth:`AsyncStore.deferring_commits`): the memory held undurable for speed.
DEFER_LIMIT = 96 << 20


class AsyncStore:
    """The event-loop face of :class:`Store`: every call runs in a worker thread.

    Commits are grouped (see the module docstring): one committer task writes
    what is queued, a group at a time, in a worker thread.

    While a transfer asks for it (:meth:`deferring_commits`), group commits
    wait: on a small machine, writing a series to disk while it is being sent
    takes the CPU the transfer needs (a cold 200-instance retrieve: about
    0.1 CPU-second of file writes).  They start anyway as soon as anyone waits
    for one of them (a lookup of a queued instance, :meth:`drain`), or :data:`DEFER_LIMIT` bytes are queued, or the last
    transfer deferring them ends.  Only the cache's durability waits: a crash
    meanwhile costs downloading those instances again, never a wrong entry.
    """

    def __init__(self, store: Store) -> None:
        self.sync = store
        self._queue: collections.deque[tuple[Verified, asyncio.Future[Entry | None]]] = \
            collections.deque()
        self._queued_bytes = 0
        self._committer: asyncio.Task[None] | None = None
        #: Commits queued or being written, by SOPInstanceUID and by Orthanc ID.
        self._pending: dict[str, asyncio.Future[Entry | None]] = {}
        self._pending_oid: dict[str, asyncio.Future[Entry | None]] = {}
        #: Their verified bodies, by Orthanc ID (still in memory until durable).
        self._pending_body: dict[str, Verified] = {}
        #: Transfers deferring group commits, and the signal that they are due anyway.
        self._deferrals = 0
        self._due = asyncio.Event()

    async def get(self, sop_uid: str) -> Entry | None:
        """The entry, waiting for its commit if it is queued or being written."""
        return (self.sync.peek(sop_uid) or await self._committed(self._pending.get(sop_uid))
                or await asyncio.to_thread(self.sync.get, sop_uid))

    async def get_by_orthanc_id(self, orthanc_id: str) -> Entry | None:
        return (self.sync.peek_orthanc_id(orthanc_id)
                or await self._committed(self._pending_oid.get(orthanc_id))
                or await asyncio.to_thread(self.sync.get_by_orthanc_id, orthanc_id))

    @contextlib.contextmanager
    def deferring_commits(self) -> Iterator[None]:
        """Group commits wait while this is held (see the class docstring)."""
        self._deferrals += 1
        try:
            yield
        finally:
            self._deferrals -= 1
            if not self._deferrals:
                self._due.set()

    async def _committed(self, fut: asyncio.Future[Entry | None] | None) -> Entry | None:
        if fut is not None and not fut.done():
            self._due.set()  # somebody waits for it: no more deferring
        return await _committed(fut)

    async def flush_touches(self) -> int:
        return await asyncio.to_thread(self.sync.flush_touches)

    async def resolve(self, orthanc_id: str) -> str | None:
        return await asyncio.to_thread(self.sync.resolve, orthanc_id)

    async def orthanc_id_of(self, sop_uid: str) -> str | None:
        return await asyncio.to_thread(self.sync.orthanc_id_of, sop_uid)

    async def learn(self, orthanc_id: str, sop_uid: str) -> None:
        await asyncio.to_thread(self.sync.learn, orthanc_id, sop_uid)

    async def commit_bytes(self, data: bytes, summary: DicomSummary, md5: str,
                           orthanc_id: str | None) -> Entry | None:
        """Write, fsync, rename and index a verified body now, in one thread hop.

        For a viewer's own download: it does not queue behind a series stream's
        group commits (:meth:`queue_commit`), whose backlog can be many megabytes.
        ``None`` when the entry was evicted at once (bigger than the whole cache);
        :class:`StoreFull` (an ``OSError``) when the disk is full.
        """
        def work() -> Entry | None:
            temp = self.sync.write_temp(data)
            entry = self.sync.commit(temp, summary, md5, orthanc_id)
            return entry if entry.path.exists() else None
        return await asyncio.to_thread(work)

    def queue_commit(self, body: Verified) -> asyncio.Future[Entry | None]:
        """Queue a verified body for the next group; the future settles when it is durable.

        From now until then :meth:`get` and :meth:`get_by_orthanc_id` of the
        instance wait for it (a lookup never misses an instance being committed).
        """
        fut: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        sop, oid = body.summary.sop_instance_uid, body.orthanc_id
        self._pending[sop] = fut
        if oid:
            self._pending_oid[oid] = fut
            self._pending_body[oid] = body

        def settled(f: asyncio.Future[Entry | None]) -> None:
            if self._pending.get(sop) is f:
                del self._pending[sop]
            if oid and self._pending_oid.get(oid) is f:
                del self._pending_oid[oid]
                del self._pending_body[oid]
            if not f.cancelled():
                f.exception()  # retrieved: the waiter may have gone
        fut.add_done_callback(settled)
        self._queue.append((body, fut))
        self._queued_bytes += len(body.data)
        if self._queued_bytes >= DEFER_LIMIT:
            self._due.set()
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_queued(), name="store commits")
        return fut

    def pending_body(self, orthanc_id: str) -> Verified | None:
        """The verified body of an instance queued or being committed (not durable yet).

        A whole-series retrieve right after a cold one sends these from memory
        instead of waiting for a backlog of commits (a lookup of one instance
        waits for its commit instead: :meth:`get_by_orthanc_id`).
        """
        return self._pending_body.get(orthanc_id)

    async def drain(self) -> None:
        """Wait until every commit queued so far is durable (or failed)."""
        while self._committer is not None and not self._committer.done():
            self._due.set()
            await asyncio.wait([self._committer])

    def _take_group(self) -> list[tuple[Verified, asyncio.Future[Entry | None]]]:
        group = [self._queue.popleft()]
        size = len(group[0][0].data)
        while self._queue and len(group) < GROUP_BODIES \
                and size + len(self._queue[0][0].data) <= GROUP_BYTES:
            body = self._queue.popleft()
            group.append(body)
            size += len(body[0].data)
        self._queued_bytes -= size
        return group

    async def _until_due(self) -> None:
        """Wait while commits are deferred and nothing makes them due."""
        while self._deferrals and not self._due.is_set():
            await self._due.wait()

    async def _commit_queued(self) -> None:
        """Commit what is queued, one group per thread hop, until nothing is left.

        Bodies queued while a group is written form the next one: the busier
        the store, the bigger the groups and the fewer syncs per instance.
        """
        group: list[tuple[Verified, asyncio.Future[Entry | None]]] = []
        try:
            while self._queue:
                await self._until_due()
                group = self._take_group()
                try:
                    results: list[Committed | Exception] = list(await asyncio.to_thread(
                        self.sync.commit_group, [body for body, _ in group]))
                except Exception as exc:  # a bug or sqlite trouble: only this group fails
                    log.exception("store: a group of %d commits failed", len(group))
                    results = [exc] * len(group)
                for (_, fut), result in zip(group, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
                group = []
        except asyncio.CancelledError:  # shutting down: nothing more is started
            # The group in its thread still completes (close() waits for it); what is
            # queued is abandoned, and its waiters serve their verified bytes uncached.
            for _, fut in (*group, *self._queue):
                if not fut.done():
                    fut.set_exception(StoreClosed("shutting down: commit abandoned"))
            self._queue.clear()
            self._queued_bytes = 0
            raise
        finally:
            if not self._queue:  # what comes next is deferred again
                self._due.clear()

    async def stats(self) -> dict[str, int]:
        return await asyncio.to_thread(self.sync.stats)

    async def check(self) -> dict[str, int]:
        return await asyncio.to_thread(self.sync.check)

    async def pinned(self) -> dict[str, float]:
        return await asyncio.to_thread(self.sync.pinned)


async def _committed(fut: asyncio.Future[Entry | None] | None) -> Entry | None:
    """The entry a pending commit gave, ``None`` if none or it failed (never cancels it)."""
    if fut is None:
        return None
    await asyncio.wait([fut])
    if fut.cancelled() or fut.exception() is not None:
        return None
    return fut.result()


def _raise_if_full(exc: OSError) -> None:
    """Raise a :class:`StoreFull` from ``exc`` when it says the disk (or quota) is full."""
    full = _full_or(exc)
    if full is not exc:
        raise full from exc


def _full_or(exc: OSError) -> OSError:
    """``exc``, or a :class:`StoreFull` when it says the disk (or quota) is full."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, StoreFull):
        return StoreFull(exc.errno, f"cache disk full: {exc.strerror}")
    return exc


def entry_as_dict(entry: Entry) -> dict[str, Any]:
    d = asdict(entry)
    d["path"] = str(entry.path)
    return d
