"""The verified on-disk store of DICOM instances.

Guarantees:

* **Only verified bytes.** The store is only ever handed :class:`Instance`
  bodies that passed :mod:`dicomcache.dicom.verify`; nothing else is written
  under ``objects/``.
* **Crash-safe.** A body is written to ``tmp/``, fsynced, renamed into
  ``objects/`` (and the directory fsynced) *before* the index row that points
  to it is inserted.  A ``kill -9`` at any moment leaves either no entry or a
  complete one; leftovers (temp files, renamed files the index never learned)
  are swept at start-up.
* **File names never come from data**: ``objects/<2 hex>/<32 random hex>.dcm``.
  A re-commit of an instance gets a new name, so a file once served never
  changes under a reader.
* **Size-bounded, least recently used first.** After each commit, entries are
  evicted one at a time, least recently used first and skipping pinned
  studies, until the files and the index fit ``max_size``
  (:mod:`dicomcache.cache.index` keeps the totals and the order).
* **Group commit** for series streams: :meth:`AsyncStore.queue_commit` queues a
  verified body (its future settles once it is durable); bodies queued while a
  group is being written go into the next group (:meth:`Store.commit_group`),
  written in one thread hop: each file is still fsynced and renamed, but each
  directory touched is fsynced once per group.  While queued or being
  written, an instance is found by :meth:`AsyncStore.get` (which waits for its
  commit), so a retrieve answered before its parts were durable is followed by
  lookups that see them.  A viewer's own download is committed at once by
  :meth:`AsyncStore.commit_now`, never behind a group.
* **Keyed by the full identity.** An entry is one Orthanc instance: its
  ``orthanc_id`` is the hash of Patient ID, Study, Series and SOP Instance UIDs,
  so the same SOP Instance UID re-imported under another patient is another
  entry, never the same one.  Requests by UIDs (WADO-URI, DICOMweb) are
  *resolved* to Orthanc instances the way Orthanc resolves them
  (:meth:`Store.resolution`: exactly one, else Orthanc's 404), and the three API
  families of one instance share one file.

All methods touching the index or the disk are synchronous and meant to run in
a worker thread; :class:`AsyncStore` wraps them with :func:`asyncio.to_thread`
so lookups never block the event loop.  Hits are answered from an in-memory map
of entries already looked up (:meth:`Store.peek`): no thread hop and no index
write per hit.  Their recency is written back to the index in batches
(:meth:`Store.flush_touches`, every second), which is what eviction reads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from dicomcache import durable
from dicomcache.cache.health import StoreHealth
from dicomcache.cache.index import (
    EVERY_STUDY,
    INDEX_FILE,
    Index,
    Row,
    SchemaMismatch,
    schema_of,
)
from dicomcache.cache.instance import Instance
from dicomcache.cache.space import Degrade, Evict, Write, plan_space, trouble_of
from dicomcache.dicom.verify import verify_file
from dicomcache.errors import (
    BadStoredFile,
    Cause,
    StoreFull,
    StoreTrouble,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

#: Object files are spread over this many directories (two hex digits).
FAN_OUT = 256
#: The index file of development builds before 0.1.0 (diskcache), adopted once
#: (:meth:`Store._migrate_legacy`).
LEGACY_INDEX = "cache.db"
#: An index of an earlier schema, moved aside to be adopted (:meth:`Store._migrate_old`).
OLD_INDEX = "index-old.sqlite"
#: The earlier schemas it can be: 1 keyed entries by SOP Instance UID alone, 2 had no
#: series/study IDs or confirmation times.
OLD_SCHEMAS = ("1", "2")

#: Seconds between re-checks of the store by the daemon (:meth:`Store.recheck`): how soon
#: caching resumes after the disk recovers, and min_free is kept without traffic.
RECHECK_EVERY = 5.0
#: A re-check the disk does not answer within this many seconds degrades the store.
RECHECK_TIMEOUT = 30.0
#: Room the min_free guard keeps for the index's growth with each body: its row, and the
#: deletions of the entries evicted for it, in the write-ahead log.
INDEX_ALLOWANCE = 128 << 10
#: What opening a store's directory and index can raise when they cannot be used.
ATTACH_ERRORS = (OSError, sqlite3.Error, SchemaMismatch)

#: What :meth:`Store.commit_group` gives for each body: the stored instance, ``None``
#: (evicted at once: bigger than the whole cache), or the error that kept it out.
Committed = Instance | None | OSError


class StoreClosed(OSError):
    """The store was closed (shutting down): the commit was abandoned, nothing written."""


@dataclass(frozen=True, slots=True)
class _Placed:
    """A body renamed into ``objects/``, not yet indexed."""

    index: int
    row: Row


def _rename_into(temp: Path, full: Path) -> None:
    """Rename ``temp`` to ``full``, making its directory if it is missing."""
    for attempt in range(3):
        try:
            os.rename(temp, full)
            return
        except FileNotFoundError:
            if attempt == 2 or not temp.exists():
                raise
            full.parent.mkdir(parents=True, exist_ok=True)


class Store:
    """Synchronous store API (call from worker threads); see the module docstring."""

    def __init__(self, directory: Path, max_size: int, min_free: int = 0) -> None:
        """The store of ``directory``; ``OSError``, ``sqlite3.Error`` or
        :class:`SchemaMismatch` when it cannot be used (see :meth:`for_serving`)."""
        self._prepare(directory, max_size, min_free)
        self._attach()

    @classmethod
    def for_serving(cls, directory: Path, max_size: int, min_free: int) -> Store:
        """The daemon's store: degraded, never an error, when ``directory`` cannot be used.

        A directory that is full, read-only, missing and impossible to create, or
        holds an unusable index gives a store that indexes nothing (an empty index in
        memory), writes nothing, and says why in :attr:`health`; :meth:`recheck`
        attaches it to the directory once it is usable.
        """
        store = cls.__new__(cls)
        store._prepare(directory, max_size, min_free)
        try:
            store._attach()
        except ATTACH_ERRORS as exc:
            store._note(exc)
            store._attach_read_only()
        return store

    def _prepare(self, directory: Path, max_size: int, min_free: int) -> None:
        """What lives in memory only (no I/O); an empty index in memory until attached."""
        self.directory = Path(directory)
        self.max_size = max_size
        #: Bytes to keep free on the file system (``[cache] min_free``; 0: no guard).
        self.min_free = min_free
        self.tmp_dir = self.directory / "tmp"
        self.health = StoreHealth()
        self.index = Index(None)
        #: True once the directory and its index are in use (see :meth:`for_serving`).
        self.attached = False
        #: Attached to a directory that can be read, not written (:meth:`_attach_read_only`).
        self.read_only = False
        #: While read-only: entries that are no longer to be served (purged, quarantined,
        #: vanished) but whose rows cannot be deleted.
        self._withdrawn: set[str] = set()
        self._read_only_failure = ""
        #: The file system's free and total bytes when last looked at (None: not yet).
        self.free_bytes: int | None = None
        self.disk_bytes: int | None = None
        #: Called (from worker threads) with each stored file deleted (evicted, replaced,
        #: purged).
        self.removal_listeners: list[Callable[[Path], object]] = []
        self._commit_lock = threading.Lock()
        #: Held while a group is written; close() takes it, so it never cuts a group.
        self._group_lock = threading.Lock()
        #: Held while deciding whether a body fits (min_free); ``_reserved``: bytes being
        #: written by bodies admitted (not yet seen in the file system's free space).
        self._space_lock = threading.Lock()
        self._reserved = 0
        self._closed = False
        self.evictions = 0
        #: Entries evicted to keep ``min_free`` (``evictions``: to stay under ``max_size``).
        self.space_evictions = 0
        self._pinned_warned = -1e9
        # The hot map: plain dicts, read on the event loop, written by worker
        # threads (single dict operations are atomic under the GIL).
        self._hot: dict[str, Instance] = {}
        self._hot_sop: dict[str, set[str]] = {}
        self._resolved: dict[str, list[str]] = {}
        self._touched: dict[str, None] = {}
        #: Stored files this process checked against their MD5, with their signature then
        #: (see open_checked): a file written to since is checked again.
        self._confirmed: dict[Path, FileSignature] = {}
        #: Stored files found bad when first opened (a metric follows it).
        self.bad_found = 0
        self.generation = 0

    def _attach(self) -> None:
        """Use the directory: make it, open (or adopt) its index, make the object
        directories.  On an error the store stays as it was (unattached)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        if schema_of(self.directory / INDEX_FILE) in OLD_SCHEMAS:
            self._move_old_aside()
        previous, self.index = self.index, Index(self.directory)
        try:
            self._make_object_dirs()
            if (self.directory / LEGACY_INDEX).exists():
                self._migrate_legacy()
            if (self.directory / OLD_INDEX).exists():
                self._migrate_old()
        except BaseException:
            failed, self.index = self.index, previous
            failed.close()
            raise
        # The index in memory is left to the garbage collector, not closed: a lookup in
        # another thread may still be reading it (it indexes nothing).
        self._hot.clear()
        self._hot_sop.clear()
        self.generation = self.index.generation()
        self.attached = True
        self.read_only = False
        self._withdrawn.clear()

    def _attach_read_only(self) -> None:
        """Serve what a directory that cannot be written holds (its file system remounted
        read-only after an I/O error, say): its index opened read-only, every entry still
        checked against its MD5 when first opened; nothing written (no new entries, no
        recency, no eviction, no quarantine) until :meth:`recheck` attaches it for writing.
        Only while the store is degraded for being read-only; else it stays unattached."""
        state = self.health.degraded
        if state is None or state.trouble is not StoreTrouble.READ_ONLY:
            return
        try:
            index = Index(self.directory, read_only=True)
            try:
                generation = index.generation()
                entries, _ = index.usage()
            except BaseException:
                index.close()
                raise
        except ATTACH_ERRORS as exc:
            failure = _describe(exc)
            if failure != self._read_only_failure:  # once, not at every re-check
                self._read_only_failure = failure
                log.warning("store: the read-only cache index cannot be read either (%s): "
                            "nothing is served from %s", failure, self.directory)
            return
        self.index = index  # the one in memory is left to the garbage collector (above)
        self.attached = self.read_only = True
        self._hot.clear()
        self._hot_sop.clear()
        self.generation = generation
        log.warning("store: cache directory %s cannot be written: the %d instance(s) it "
                    "holds are served (verified), nothing new is cached", self.directory,
                    entries)

    def _detach(self) -> None:
        """The directory vanished under the store: index nothing (in memory) until
        :meth:`recheck` can attach it again (a new directory, a new index)."""
        self.index = Index(None)  # the old one is left to the garbage collector (above)
        self.attached = False
        self.read_only = False
        self._hot.clear()
        self._hot_sop.clear()

    # --- lifecycle -------------------------------------------------------------------
    def _make_object_dirs(self) -> None:
        """Make the object directories now, not one by one during a cold retrieve."""
        objects = self.directory / "objects"
        dirs = [objects / f"{i:02x}" for i in range(FAN_OUT)]
        if not all(d.is_dir() for d in dirs):
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
            durable.fsync_dir(objects)

    def _move_old_aside(self) -> None:
        """Rename an index of an earlier schema (with its WAL) to :data:`OLD_INDEX`."""
        for suffix in ("-wal", "-shm", ""):  # the main file last: it marks the move done
            source = self.directory / f"{INDEX_FILE}{suffix}"
            if source.exists():
                os.rename(source, self.directory / f"{OLD_INDEX}{suffix}")
        durable.fsync_dir(self.directory)

    def _migrate_legacy(self) -> None:
        """Adopt the entries of a store written by a development build before 0.1.0 (a
        diskcache index).

        That version keyed entries by SOP Instance UID alone (see :meth:`_adopt`).
        """
        db = sqlite3.connect(self.directory / LEGACY_INDEX)
        try:
            rows = [dict(json.loads(value), used_at=used) for value, used in
                    db.execute("SELECT value, access_time FROM Cache WHERE mode = 1")]
            try:
                pins = db.execute("SELECT study_uid, pinned_at FROM Pinned").fetchall()
            except sqlite3.OperationalError:  # no pins were ever made
                pins = []
        finally:
            db.close()
        self._adopt(rows, pins, LEGACY_INDEX)

    def _migrate_old(self) -> None:
        """Adopt the entries of an index of an earlier schema (moved aside first; see
        :meth:`_adopt`)."""
        db = sqlite3.connect(self.directory / OLD_INDEX)
        try:
            rows = [dict(zip(("file", "md5", "size", "orthanc_id", "stored_at", "used_at"), r,
                             strict=True))
                    for r in db.execute("SELECT file, md5, size, orthanc_id, stored_at, used_at "
                                        "FROM instances")]
            pins = db.execute("SELECT study_uid, pinned_at FROM pinned").fetchall()
        finally:
            db.close()
        self._adopt(rows, pins, OLD_INDEX)

    def _adopt(self, rows: list[dict[str, Any]], pins: list[tuple[Any, Any]],
               old_index: str) -> None:
        """Index the files of a previous version's entries, then remove its index.

        Those versions keyed entries by SOP Instance UID alone (one UID under two
        patients was one entry).  Each entry whose file is a regular file inside
        ``objects/`` and still matches its size and MD5 is parsed again for its
        full identity (Patient ID and the three UIDs), renamed to a name of this
        version (never one taken from data) and indexed with its last use.  An
        entry whose identity is not the Orthanc instance it was fetched as, or
        whose file is bad, is dropped (the file is swept as a leftover).  Pins
        are kept.  The old index is removed last, so a crash midway repeats the
        migration for what is left.
        """
        objects = (self.directory / "objects").resolve()
        adopted = 0
        for meta in rows:
            try:
                old = (self.directory / str(meta["file"])).resolve()
                if old.parent.parent != objects or old.is_symlink() or not old.is_file():
                    continue
                summary = verify_file(old, expected_length=int(meta["size"]),
                                      expected_md5=str(meta["md5"]))
                if meta.get("orthanc_id") not in (None, summary.orthanc_id):
                    log.warning("store: dropping a cache entry of the previous version whose "
                                "identity is not the instance it was fetched as (%s)",
                                meta.get("orthanc_id"))
                    continue
                instance = replace(Instance.verified(summary, str(meta["md5"]), b""),
                                   size=summary.size, data=None)
                row = self._place(old, instance)
                self.index.put([replace(row, stored_at=float(meta.get("stored_at") or 0))],
                               float(meta.get("used_at") or 0))
                adopted += 1
            except (ValueError, KeyError, TypeError, OSError) as exc:
                log.warning("store: cannot adopt a cache entry of the previous version: %s", exc)
        for study_uid, pinned_at in pins:
            self.index.pin(str(study_uid), float(pinned_at))
        durable.fsync_dir(self.directory / "objects")
        for name in (old_index, f"{old_index}-wal", f"{old_index}-shm"):
            (self.directory / name).unlink(missing_ok=True)
        shutil.rmtree(self.directory / "aliases", ignore_errors=True)
        log.warning("store: adopted %d of %d entries of the previous version's index",
                    adopted, len(rows))

    def close(self) -> None:
        """Close the index; waits for a group being written, refuses later ones."""
        with self._group_lock:
            if not self._closed:
                self._closed = True
                self.index.close()

    def sweep(self, min_age: float = 60.0) -> int:
        """Remove leftovers of interrupted writes: temp files and unindexed objects.

        Returns the number of files removed.  Safe to run while serving: files
        younger than ``min_age`` seconds are left alone (they may be mid-commit).
        """
        removed = 0
        if not self.attached or self.read_only:
            return 0
        cutoff = time.time() - min_age
        for tmp in self.tmp_dir.iterdir():
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink(missing_ok=True)
                removed += 1
        known = self.index.files()
        objects = self.directory / "objects"
        for path in objects.rglob("*.dcm"):
            if str(path.relative_to(self.directory)) not in known \
                    and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("store sweep removed %d leftover file(s) of interrupted writes", removed)
        return removed

    # --- health: degraded, not dead ---------------------------------------------------
    def _note(self, exc: BaseException, *, look: bool = True) -> None:
        """A disk or index operation failed: the store is degraded (see :attr:`health`).

        ``look``: ask the file system whether it is read-only (blocking: not on the
        event loop)."""
        if isinstance(exc, StoreClosed | StoreUnavailable):
            return
        trouble = trouble_of(exc.__cause__ if isinstance(exc.__cause__, sqlite3.Error)
                             else exc)
        if not self.attached and not self.directory.exists():
            trouble = StoreTrouble.MISSING  # whatever mkdir said (EROFS, EACCES)
        elif look and trouble is not StoreTrouble.READ_ONLY and self._on_read_only_fs():
            trouble = StoreTrouble.READ_ONLY  # whatever failed (EIO, SQLITE_CANTOPEN…)
        current = self.health.degraded
        if trouble is StoreTrouble.IO_ERROR and current is not None \
                and current.trouble is StoreTrouble.READ_ONLY:
            # ext4 made read-only after an error (still "rw" to statvfs): new files fail
            # with EROFS, the index's writes with EIO.  One cause, not two in turn.
            trouble = StoreTrouble.READ_ONLY
        detail = _describe(exc)
        if isinstance(exc, sqlite3.Error):
            detail = f"{self.directory / INDEX_FILE}: {detail}"
        self.health.degrade(trouble, detail)

    def _on_read_only_fs(self) -> bool:
        """The directory's file system is mounted read-only (by hand, or by the kernel
        after an I/O error: ext4 ``errors=remount-ro``)."""
        try:
            return bool(os.statvfs(self.directory).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    def _best_effort(self, write: Callable[[], object]) -> None:
        """An index write that only saves work later (recency, resolutions,
        confirmations): on a full or failing disk it is skipped (kept in memory where
        it is), and the store degraded, rather than failing the request behind it;
        never tried while the store is read-only."""
        state = self.health.degraded
        if self.read_only or (state is not None and state.trouble is StoreTrouble.READ_ONLY):
            return
        try:
            write()
        except sqlite3.Error as exc:
            self._note(exc)

    def recheck(self) -> None:
        """The periodic re-check (blocking; every few seconds while serving).

        Attaches a store that could not use its directory; keeps ``min_free``
        (evicting least-recently-used entries when that restores it); proves the
        directory and the index take a synced write.  Then the store caches (again),
        or stays degraded with the cause found.
        """
        state = self.health.degraded
        if not self.attached or self.read_only or (
                state is not None and state.trouble is StoreTrouble.READ_ONLY):
            # Read-only: a new index, as the directory may be another file system now (the
            # old one unmounted, checked and mounted again); the old connection may fail
            # for good (ext4 after errors=remount-ro).
            withdrawn = set(self._withdrawn)
            if self.read_only:
                try:
                    self._probe_tmp()  # writable again? (else keep serving what it holds)
                except OSError as exc:
                    self._note(exc)
                    return
                reader = self.index
                self._detach()
                reader.release()
            try:
                self._attach()
            except ATTACH_ERRORS as exc:
                self._note(exc)
                if not self.attached:
                    self._attach_read_only()
                return
            log.info("store: cache directory %s is usable again", self.directory)
            self._sweep_quietly()
            self._drop_withdrawn(withdrawn)
        state = self.health.degraded
        # Caching resumes with a tenth of min_free to spare, not at the first byte over
        # it: else a disk hovering at min_free flips between the two every re-check.
        margin = self.min_free // 10 if state and state.trouble is StoreTrouble.MIN_FREE else 0
        try:
            with self._space_lock:
                self._make_room(margin)
            self._probe()
        except StoreUnavailable:
            return  # below min_free: degraded by _make_room
        except ATTACH_ERRORS as exc:
            self._note(exc)
            if not self.directory.is_dir():
                self._detach()  # removed under us: a new one is made at the next re-check
            return
        self.health.recover()

    def _probe_tmp(self) -> None:
        """A synced write in ``tmp/`` (made again if it was removed), or the error."""
        if not self.tmp_dir.exists():
            self.tmp_dir.mkdir()
        probe = self.write_temp(b"ready")
        probe.unlink()

    def _drop_withdrawn(self, orthanc_ids: set[str]) -> None:
        """Delete the entries withdrawn while the index was read-only (purged, found bad,
        vanished), now that it takes writes."""
        if not orthanc_ids:
            return
        try:
            with self._commit_lock:
                for oid in orthanc_ids:
                    row = self.index.get(oid)
                    if row is not None and self.index.delete(oid, row.file):
                        self._remove(row.file)
            self._log_removal({EVERY_STUDY: len(orthanc_ids)})
        except ATTACH_ERRORS as exc:
            self._note(exc)

    def _probe(self) -> None:
        """A synced write in ``tmp/`` (made again if it was removed), and while degraded a
        write to the index too (not every few seconds while all is well: it would queue
        behind an admin command's transaction), or the error."""
        self._probe_tmp()
        if self.health.degraded is not None:
            self.index.probe(time.time())

    def _admit(self, nbytes: int) -> None:
        """Admit ``nbytes`` about to be written (bodies and :data:`INDEX_ALLOWANCE` for
        each): :class:`StoreUnavailable` while the store is degraded or when ``min_free``
        cannot be kept (evicting first when that helps).  Reserved until
        :meth:`_release` (the file system does not show them yet)."""
        state = self.health.degraded
        if state is not None:
            raise StoreUnavailable(state.trouble, state.detail)
        if self.read_only:
            raise StoreUnavailable(StoreTrouble.READ_ONLY, f"{self.directory} is read-only")
        if not self.attached:
            raise StoreUnavailable(StoreTrouble.MISSING, f"{self.directory} is not in use")
        with self._space_lock:
            self._make_room(nbytes)
            self._reserved += nbytes

    def _release(self, nbytes: int) -> None:
        with self._space_lock:
            self._reserved -= nbytes

    @contextlib.contextmanager
    def _room(self, nbytes: int) -> Iterator[None]:
        """:meth:`_admit` ``nbytes`` for the time of a write."""
        self._admit(nbytes)
        try:
            yield
        finally:
            self._release(nbytes)

    def _make_room(self, incoming: int) -> None:
        """Look at the file system's free space; keep ``min_free`` after ``incoming``
        more bytes (:func:`~dicomcache.cache.space.plan_space`).  Holds ``_space_lock``."""
        fs = os.statvfs(self.directory)
        self.free_bytes = fs.f_bavail * fs.f_frsize
        self.disk_bytes = fs.f_blocks * fs.f_frsize
        free = self.free_bytes - self._reserved

        def plan(evictable: int) -> Write | Evict | Degrade:
            return plan_space(free=free, min_free=self.min_free, incoming=incoming,
                              evictable=evictable, block=fs.f_frsize)
        decided = plan(0)
        if isinstance(decided, Write):
            return
        decided = plan(self.index.evictable_bytes())
        if isinstance(decided, Evict):
            with self._commit_lock:
                self.space_evictions += self._evict_bytes(decided.nbytes, fs.f_frsize)
            return
        assert isinstance(decided, Degrade)
        detail = (f"{_size(free)} free, min_free {_size(self.min_free)}: "
                  f"{_size(decided.short)} more needed than evicting every unpinned entry "
                  "would give")
        self.health.degrade(StoreTrouble.MIN_FREE, detail)
        raise StoreUnavailable(StoreTrouble.MIN_FREE, detail)

    def _evict_bytes(self, nbytes: int, block: int) -> int:
        """Evict least-recently-used entries (not pinned) until their files held at
        least ``nbytes``; how many went.  Holds ``_commit_lock``."""
        evicted = freed = 0
        while freed < nbytes:
            row = self.index.least_recently_used()
            if row is None:
                break
            if self.index.delete(row.orthanc_id, row.file):
                self._remove(row.file)
                self._drop_hot(row.orthanc_id)
                evicted += 1
                freed += -(-row.size // block) * block
        return evicted

    def _remove(self, rel: str) -> None:
        """Delete a stored file whose entry is gone, and tell :attr:`removal_listeners`
        (a descriptor kept open elsewhere would hold its space on the disk)."""
        path = self.directory / rel
        path.unlink(missing_ok=True)
        for listener in self.removal_listeners:
            listener(path)

    def _sweep_quietly(self) -> None:
        try:
            self.sweep()
        except OSError as exc:
            log.warning("store: cannot sweep leftovers of interrupted writes: %s", exc)

    def status(self) -> dict[str, Any]:
        """What ``/readyz`` and the status page say of the store (blocking: the stats and
        the file system's free space)."""
        with contextlib.suppress(OSError):  # no directory: the health says so
            fs = os.statvfs(self.directory)
            self.free_bytes = fs.f_bavail * fs.f_frsize
            self.disk_bytes = fs.f_blocks * fs.f_frsize
        state = self.health.degraded
        return {**self.stats(),
                "ok": state is None,
                "degraded": None if state is None else str(state.trouble),
                "status": "caching" if state is None else state.status,
                "detail": None if state is None else state.detail,
                "degraded_since": None if state is None else state.since,
                # What it holds is served (from a read-only index too), or nothing is.
                "serving_cached": self.attached, "read_only": self.read_only,
                "free_bytes": self.free_bytes, "disk_bytes": self.disk_bytes,
                "min_free": self.min_free}

    # --- temp files ----------------------------------------------------------------------
    def temp_path(self) -> Path:
        """A fresh path in ``tmp/`` (same file system as ``objects/``, so rename is atomic)."""
        return self.tmp_dir / f"{secrets.token_hex(8)}.part"

    def write_temp(self, data: bytes | memoryview) -> Path:
        """Write ``data`` to a new temp file and fsync it; :class:`StoreFull` on ENOSPC."""
        path = self.temp_path()
        try:
            durable.write_new(path, data)
        except OSError as exc:
            _reraise(exc)
        return path

    # --- entries -------------------------------------------------------------------------
    def commit(self, temp: Path, instance: Instance) -> Instance | None:
        """Adopt a verified, fsynced temp file as the entry of its SOP Instance UID
        (``None``: evicted at once, bigger than the whole cache)."""
        row = self._place(temp, instance)
        full = self.directory / row.file
        try:
            # The rename must be durable before the index row that points at it.
            durable.fsync_dir(full.parent)
        except OSError as exc:
            full.unlink(missing_ok=True)
            _reraise(exc)
        [stored] = self._index_rows([_Placed(0, row)])
        if isinstance(stored, OSError):
            raise stored
        return stored

    @property
    def caching(self) -> bool:
        """The store takes new bodies (not degraded, its directory in use)."""
        return self.attached and self.health.degraded is None

    def commit_received(self, temp: Path, instance: Instance) -> Instance | None:
        """:meth:`commit` for a verified temp file already written to ``tmp/`` (a large
        body streamed in, :mod:`~dicomcache.cache.receive`): ``min_free`` is kept (its
        bytes are on the disk already, only the index's growth is admitted), and a
        failure degrades the store like :meth:`commit_body`'s."""
        try:
            with self._room(INDEX_ALLOWANCE):
                return self.commit(temp, instance)
        except OSError as exc:
            self._note(exc)
            raise

    def note_failure(self, exc: OSError) -> None:
        """A write into the store's directory failed outside the store (a large body
        streamed to ``tmp/``): the store is degraded, as after a failure of its own
        (called on the event loop: the next re-check tells a read-only file system)."""
        self._note(exc, look=False)

    def commit_body(self, body: Instance) -> Instance | None:
        """Write, fsync, rename and index a verified body in memory (see :meth:`commit`).

        :class:`StoreUnavailable` (nothing tried) while the store is degraded or when
        ``min_free`` cannot be kept; any other ``OSError`` (:class:`StoreFull`…)
        degrades it.
        """
        assert body.data is not None, "only bodies in memory are committed"
        try:
            with self._room(body.size + INDEX_ALLOWANCE):
                temp = self.write_temp(body.data)
            return self.commit(temp, body)
        except OSError as exc:
            self._note(exc)
            raise

    def commit_group(self, bodies: Sequence[Instance]) -> list[Committed]:
        """Write and commit several verified bodies (in memory) as one group.

        The same guarantees as :meth:`write_temp` then :meth:`commit` for each
        body, with fewer syncs: every file is written and fsynced in ``tmp/``
        and renamed into ``objects/``; then each directory touched is fsynced
        once; only then are the index rows inserted (and the aliases learnt).
        One result per body (see :data:`Committed`).
        """
        results = self._commit_group(bodies)
        for result in results:
            if isinstance(result, OSError):
                self._note(result)
                break
        return results

    def _commit_group(self, bodies: Sequence[Instance]) -> list[Committed]:
        results: list[Committed] = [None] * len(bodies)
        with self._group_lock:
            if self._closed:
                return [StoreClosed("store closed: commit abandoned")] * len(bodies)
            total = sum(body.size + INDEX_ALLOWANCE for body in bodies)
            try:
                self._admit(total)
            except OSError as exc:  # degraded, or no room: nothing written
                return [exc] * len(bodies)
            placed: list[_Placed] = []
            try:
                for i, body in enumerate(bodies):
                    try:
                        assert body.data is not None, "only bodies in memory are committed"
                        placed.append(_Placed(i, self._place(self.write_temp(body.data), body)))
                    except OSError as exc:
                        results[i] = exc
            finally:
                self._release(total)
            try:
                # Renames durable before any index row points at them; one fsync per
                # directory (a group spreads over a few of the object directories).
                for parent in sorted({(self.directory / p.row.file).parent for p in placed}):
                    durable.fsync_dir(parent)
            except OSError as exc:
                for p in placed:
                    (self.directory / p.row.file).unlink(missing_ok=True)
                    results[p.index] = _full_or(exc)
                return results
            for p, stored in zip(placed, self._index_rows(placed), strict=True):
                results[p.index] = stored
        return results

    def _place(self, temp: Path, instance: Instance) -> Row:
        """Rename a fsynced temp file into ``objects/`` (its directory not yet synced)."""
        rel = os.path.join("objects", secrets.token_hex(1), f"{secrets.token_hex(16)}.dcm")
        try:
            _rename_into(temp, self.directory / rel)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            _reraise(exc)
        now = time.time()
        return Row(instance.orthanc_id, instance.patient_id, instance.study_uid,
                   instance.series_uid, instance.sop_uid, instance.transfer_syntax,
                   instance.md5, instance.size, rel, now, now)

    def _index_rows(self, placed: Sequence[_Placed]) -> list[Instance | OSError | None]:
        """Index durable files in ``objects/``; a result per file.

        A row the index cannot take is an ``OSError`` (:class:`StoreFull` when its
        disk is full; the SQLite error as its ``__cause__``), and its file and those
        after it are removed; an entry evicted at once (bigger than the whole cache)
        is ``None``.
        """
        results: list[Instance | OSError | None] = []
        rows = [p.row for p in placed]
        # Only the index update and eviction are serialised; writes, renames and
        # fsyncs of other commits run in parallel in other worker threads.
        with self._commit_lock:
            try:
                replaced = self.index.put(rows, time.time())
            except sqlite3.Error as exc:  # "database or disk is full", read-only, …
                failed = _index_failure(exc)
                for row in rows:
                    (self.directory / row.file).unlink(missing_ok=True)
                return [failed] * len(rows)
            for old in replaced:
                if old is not None:
                    self._remove(old)
            self.evictions += self._evict_to_bound()
        for row in rows:
            instance = self._instance(row)
            if (self.directory / row.file).exists():
                self._remember(instance)
                results.append(instance)
            else:
                results.append(None)
        return results

    def _evict_to_bound(self) -> int:
        """Evict least-recently-used entries, one at a time, until under ``max_size``.

        Entries of pinned studies are skipped; if only they are left, the store
        stays over the bound (and says so in the log, at most every 5 minutes).
        """
        evicted = 0
        while self.volume() > self.max_size:
            row = self.index.least_recently_used()
            if row is None:
                if time.monotonic() - self._pinned_warned > 300:
                    self._pinned_warned = time.monotonic()
                    log.warning("cache is over max_size but every remaining entry belongs "
                                "to a pinned study; unpin some (dicomcache unpin) or raise "
                                "cache.max_size")
                break
            if self.index.delete(row.orthanc_id, row.file):
                self._remove(row.file)
                self._drop_hot(row.orthanc_id)
                evicted += 1
        return evicted

    # --- reading stored files ----------------------------------------------------------
    def open_checked(self, instance: Instance) -> tuple[int, os.stat_result]:
        """An open descriptor of a stored file and its stat.

        The first time this process opens a file, and whenever the file was written
        to since (its :func:`signature` changed: a hand edit, a restore), its size
        and MD5 are checked against the index, so a changed file is never served: a
        file that fails is quarantined and :class:`BadStoredFile` raised (the caller
        fetches the instance again, as for a file that vanished).  Bit rot that
        changes no metadata is caught by the background scrubber
        (:mod:`dicomcache.cache.scrubber`) and by ``dicomcache verify``.
        """
        assert instance.path is not None
        fd = os.open(instance.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if self._confirmed.get(instance.path) != signature(st):
                problem = _file_problem(fd, st.st_size, instance)
                if problem is not None:
                    self.bad_found += 1
                    self.quarantine(instance, Cause.MD5_MISMATCH, problem)
                    log.warning("store: stored file of instance %s: %s; quarantined, "
                                "it is fetched again", instance.orthanc_id, problem)
                    raise BadStoredFile(f"stored file of instance {instance.orthanc_id}: "
                                        f"{problem}; quarantined")
                if len(self._confirmed) >= self._HOT_LIMIT:
                    self._confirmed.clear()
                self._confirmed[instance.path] = signature(st)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def refresh(self) -> dict[str, int] | None:
        """Forget what is held in memory when another process (``dicomcache purge``,
        ``verify``, ``revalidate``) removed entries since the last call.

        Returns ``None`` when nothing was removed; else the StudyInstanceUIDs whose
        content was purged, with how many instances (:data:`EVERY_STUDY` among them
        when it cannot tell), for what derives from them to be dropped — empty when
        only bad files were quarantined.
        """
        generation = self.index.generation()
        if generation == self.generation:
            return None
        purged = self.index.purged_since(self.generation)
        self.generation = generation
        self._hot.clear()
        self._hot_sop.clear()
        self._resolved.clear()
        return purged

    def _log_removal(self, study_uids: Mapping[str, int]) -> None:
        """Note a removal in the index (:meth:`refresh` of other processes sees it); the
        store's own removals are not news to itself."""
        generation = self.index.log_purge(study_uids)
        if generation == self.generation + 1:
            self.generation = generation

    def volume(self) -> int:
        """Bytes the store takes: its files and its index."""
        return self.index.usage()[1] + self.index.file_bytes()

    def get(self, orthanc_id: str) -> Instance | None:
        """The entry of an Orthanc instance (marking it recently used), or ``None``.

        An index row whose file has vanished (deleted by hand, disk trouble) is
        dropped and reported as a miss, so it is fetched again.
        """
        row = self.index.get(orthanc_id)
        return self._found(row) if row is not None else None

    def _served(self, row: Row) -> bool:
        return not self._withdrawn or row.orthanc_id not in self._withdrawn

    def by_uids(self, sop_uid: str, study_uid: str | None = None,
                series_uid: str | None = None) -> list[Instance]:
        """Every stored entry with these UIDs (several: the same UIDs under several
        patients; see :meth:`resolution` for which one a request may be given)."""
        found = [self._found(row) for row in self.index.by_uids(sop_uid, study_uid, series_uid)]
        return [i for i in found if i is not None]

    def _found(self, row: Row) -> Instance | None:
        if not self._served(row):
            return None
        instance = self._instance(row)
        assert instance.path is not None
        if not instance.path.exists():
            self.forget(instance.orthanc_id)
            return None
        self._remember(instance)
        self._best_effort(lambda: self.index.touch([instance.orthanc_id], time.time()))
        return instance

    # --- resolutions: which Orthanc instances a set of UIDs names --------------------
    @staticmethod
    def uids_key(sop_uid: str, study_uid: str | None, series_uid: str | None) -> str:
        return f"{sop_uid}|{study_uid or ''}|{series_uid or ''}"

    def resolution(self, sop_uid: str, study_uid: str | None = None,
                   series_uid: str | None = None) -> list[str] | None:
        """The Orthanc instances these UIDs named when last asked (``None``: never asked).

        More than one is an ambiguity a request is never answered through (Orthanc
        answers 404, and so does dicomcache).
        """
        key = self.uids_key(sop_uid, study_uid, series_uid)
        known = self._resolved.get(key)
        if known is None:
            known = self.index.resolution(key)
            if known is not None:
                self._resolved[key] = known
        return known

    def peek_resolution(self, sop_uid: str, study_uid: str | None = None,
                        series_uid: str | None = None) -> list[str] | None:
        """:meth:`resolution` from memory only (safe on the event loop)."""
        return self._resolved.get(self.uids_key(sop_uid, study_uid, series_uid))

    def resolve_as(self, sop_uid: str, study_uid: str | None, series_uid: str | None,
                   orthanc_ids: Sequence[str]) -> None:
        """Record which Orthanc instances these UIDs name (Orthanc's own answer)."""
        self.resolve_many([(sop_uid, study_uid, series_uid, orthanc_ids)])

    def resolve_many(self, found: Sequence[tuple[str, str | None, str | None, Sequence[str]]]
                     ) -> None:
        """:meth:`resolve_as` for many UIDs at once (one transaction): what a listing of
        a study or series that Orthanc resolved uniquely says of each of its instances."""
        if len(self._resolved) + len(found) >= self._HOT_LIMIT:
            self._resolved.clear()
        keyed = [(self.uids_key(sop, st, se), list(oids)) for sop, st, se, oids in found]
        self._resolved.update(keyed)
        self._best_effort(lambda: self.index.resolve_as(keyed, time.time()))

    def forget_resolutions(self, sop_uid: str) -> None:
        """Orthanc changed what this SOP Instance UID names: ask it again next time."""
        for key in [k for k in self._resolved if k.startswith(f"{sop_uid}|")]:
            self._resolved.pop(key, None)
        self._best_effort(lambda: self.index.forget_resolutions(sop_uid))

    # --- the hot map -----------------------------------------------------------------
    _HOT_LIMIT = 200_000

    def _remember(self, instance: Instance) -> None:
        if len(self._hot) >= self._HOT_LIMIT:  # bound memory; misses refill it
            self._hot.clear()
            self._hot_sop.clear()
        self._hot[instance.orthanc_id] = instance
        self._hot_sop.setdefault(instance.sop_uid, set()).add(instance.orthanc_id)

    def peek(self, orthanc_id: str) -> Instance | None:
        """A known entry without I/O (safe on the event loop), marking it used."""
        instance = self._hot.get(orthanc_id)
        if instance is not None:
            self._touched[orthanc_id] = None
        return instance

    def peek_uids(self, sop_uid: str, study_uid: str | None = None,
                  series_uid: str | None = None) -> list[Instance]:
        """Known entries with these UIDs, without I/O."""
        found = (self._hot.get(oid) for oid in self._hot_sop.get(sop_uid, ()))
        return [i for i in found if i is not None
                and (study_uid is None or i.study_uid == study_uid)
                and (series_uid is None or i.series_uid == series_uid)]

    def flush_touches(self) -> int:
        """Write the recency of entries served from memory back to the index."""
        touched = list(self._touched)
        for key in touched:
            self._touched.pop(key, None)
        if touched:
            self._best_effort(lambda: self.index.touch(touched, time.time()))
        return len(touched)

    def _drop_hot(self, orthanc_id: str) -> None:
        dropped = self._hot.pop(orthanc_id, None)
        self._touched.pop(orthanc_id, None)
        if dropped is not None:
            others = self._hot_sop.get(dropped.sop_uid)
            if others is not None:
                others.discard(orthanc_id)
                if not others:
                    del self._hot_sop[dropped.sop_uid]

    def forget(self, orthanc_id: str) -> None:
        """Drop an entry whose file vanished (deleted by hand, disk trouble)."""
        log.warning("store: file of instance %s vanished; dropping its entry", orthanc_id)
        self._drop_hot(orthanc_id)
        if self.read_only:
            self._withdraw([orthanc_id])
            return
        self.index.delete(orthanc_id)

    def _withdraw(self, orthanc_ids: Sequence[str]) -> None:
        """Never serve these entries of a read-only index again (their rows cannot go);
        past :attr:`_HOT_LIMIT` of them, serve nothing from it (memory stays bounded)."""
        for oid in orthanc_ids:
            self._drop_hot(oid)
        self._withdrawn.update(orthanc_ids)
        if len(self._withdrawn) > self._HOT_LIMIT:
            log.warning("store: too many entries of the read-only cache were withdrawn: "
                        "nothing more is served from it")
            self._detach()

    def _instance(self, row: Row) -> Instance:
        return Instance(row.orthanc_id, row.patient_id, row.study_uid, row.series_uid,
                        row.sop_uid, row.transfer_syntax, row.md5, row.size,
                        path=self.directory / row.file, stored_at=row.stored_at,
                        confirmed_at=row.confirmed_at)

    def stats(self) -> dict[str, int]:
        """Entries, bytes used (index included), bound, evictions since start (to stay
        under ``max_size``, and to keep ``min_free``)."""
        entries, _ = self.index.usage()
        return {"entries": entries, "size_bytes": self.volume(), "max_bytes": self.max_size,
                "evictions": self.evictions, "min_free_evictions": self.space_evictions}

    def entries(self) -> Iterator[Instance]:
        for row, _used in self.index.rows():
            yield self._instance(row)

    # --- administration: pins, purge, quarantine (CLI and status page) ---------------
    def pin(self, study_uid: str) -> bool:
        """Keep a study's entries (present and future) out of eviction; False if already pinned."""
        return self.index.pin(study_uid, time.time())

    def unpin(self, study_uid: str) -> bool:
        """Make a study evictable again; False if it was not pinned."""
        return self.index.unpin(study_uid)

    def pinned(self) -> dict[str, float]:
        """Pinned StudyInstanceUIDs and when each was pinned."""
        return self.index.pinned()

    def listing(self) -> Iterator[tuple[Instance, float]]:
        """Every entry with its last use (Unix time; what eviction orders by)."""
        for row, used in self.index.rows():
            yield self._instance(row), used

    def purge(self, entries: Sequence[Instance], *, every_study: bool = False
              ) -> tuple[int, int]:
        """Delete these entries, their files and how their UIDs were resolved; returns
        (entries, bytes) removed.

        Only the row still pointing at the same file is deleted, so an entry
        re-committed meanwhile (by a running daemon) is left alone.  The purge is
        logged with the studies it touched (``every_study``: note it as touching
        every study), so a running daemon drops what it derived from them.
        """
        removed = nbytes = 0
        if self.read_only:  # the rows cannot be deleted: the entries are never served again
            self._withdraw([e.orthanc_id for e in entries])
            return len(entries), sum(e.size for e in entries)
        studies: collections.Counter[str] = collections.Counter()
        for start in range(0, len(entries), 256):  # bounded transactions
            batch = entries[start:start + 256]
            by_file = {self._rel(e): e for e in batch}
            for rel in self.index.delete_files(list(by_file)):
                gone = by_file[rel]
                self._remove(rel)
                removed += 1
                nbytes += gone.size
                studies[EVERY_STUDY if every_study else gone.study_uid or EVERY_STUDY] += 1
            for e in batch:
                self._drop_hot(e.orthanc_id)
                self.forget_resolutions(e.sop_uid)
        if removed:
            self._log_removal(studies)
        return removed, nbytes

    def confirm(self, entries: Sequence[Instance], now: float) -> None:
        """Orthanc confirmed these entries' MD5 at ``now`` (hot copies updated too)."""
        self._best_effort(lambda: self.index.confirm([e.orthanc_id for e in entries], now))
        for e in entries:
            if e.orthanc_id in self._hot:
                self._hot[e.orthanc_id] = replace(e, confirmed_at=now, data=None)

    def series_updated(self, series_oid: str) -> str | None:
        """Orthanc's ``LastUpdate`` of a series when its entries were last confirmed."""
        return self.index.series_updated(series_oid)

    def set_series_updated(self, series_oid: str, last_update: str | None) -> None:
        self._best_effort(lambda: self.index.set_series_updated(series_oid, last_update))

    def in_series(self, series_oid: str) -> list[Instance]:
        """The entries of an Orthanc series."""
        return [self._instance(r) for r in self.index.in_series(series_oid) if self._served(r)]

    def in_study(self, study_oid: str) -> list[Instance]:
        """The entries of an Orthanc study."""
        return [self._instance(r) for r in self.index.in_study(study_oid) if self._served(r)]

    def patients_of(self, column: str, value: str) -> list[str]:
        """The Patient IDs (two at most) cached for a study or series (blocking)."""
        return self.index.patients_of(column, value)

    def of_patient(self, patient_id: str) -> list[Instance]:
        """The entries of a Patient ID."""
        return [self._instance(r) for r in self.index.of_patient(patient_id) if self._served(r)]

    @property
    def quarantine_dir(self) -> Path:
        return self.directory / "quarantine"

    def quarantine(self, entry: Instance, cause: str, reason: str) -> Path | None:
        """Move a bad entry's file to ``quarantine/`` with a JSON note, and drop its row.

        Returns the quarantined file, or ``None`` if the file was already gone.
        """
        assert entry.path is not None
        if self.read_only:  # nothing can be moved: it is only never served again
            self._withdraw([entry.orthanc_id])
            return None
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
        self.index.delete(entry.orthanc_id, rel)
        self._drop_hot(entry.orthanc_id)
        self._log_removal({})
        return moved

    def drop_quarantined(self, studies: set[str] | None, patient: str | None = None,
                         instance: str | None = None) -> int:
        """Delete quarantined files (and notes) of these studies, this patient or this
        instance (``studies=None`` and no other: all of them): a purge leaves no copy
        behind.  Returns how many files went."""
        dropped = 0
        if not self.quarantine_dir.is_dir():
            return 0
        for note_path in self.quarantine_dir.glob("*.json"):
            try:
                note = json.loads(note_path.read_text())
            except (OSError, ValueError):
                continue
            everything = studies is None and patient is None and instance is None
            if everything or (studies is not None and note.get("study_uid") in studies) \
                    or (patient is not None and note.get("patient_id") == patient) \
                    or (instance is not None
                        and instance in (note.get("orthanc_id"), note.get("sop_uid"))):
                note_path.with_suffix(".dcm").unlink(missing_ok=True)
                note_path.unlink(missing_ok=True)
                dropped += 1
        return dropped

    def _rel(self, entry: Instance) -> str:
        assert entry.path is not None
        return str(entry.path.relative_to(self.directory))


#: A group of commits closes at this many bytes or bodies (its waiters settle together).
GROUP_BYTES = 32 << 20
GROUP_BODIES = 64


class AsyncStore:
    """The event-loop face of :class:`Store`: every call runs in a worker thread.

    Commits are grouped (see the module docstring): one committer task writes
    what is queued, a group at a time, in a worker thread.
    """

    def __init__(self, store: Store) -> None:
        self.sync = store
        self._queue: collections.deque[tuple[Instance, asyncio.Future[Instance | None]]] = \
            collections.deque()
        self._committer: asyncio.Task[None] | None = None
        #: Commits queued or being written, by Orthanc ID, and their verified bodies
        #: (in memory until durable).
        self._pending: dict[str, asyncio.Future[Instance | None]] = {}
        self._pending_body: dict[str, Instance] = {}
        #: Commits of bodies already served (:meth:`commit_soon`).
        self._soon: set[asyncio.Task[Instance | None]] = set()

    @property
    def committer(self) -> asyncio.Task[None] | None:
        """The task writing queued commits, while there are any."""
        return self._committer

    async def get(self, orthanc_id: str) -> Instance | None:
        """The entry, waiting for its commit if it is queued or being written."""
        return (self.sync.peek(orthanc_id) or await _committed(self._pending.get(orthanc_id))
                or await asyncio.to_thread(self.sync.get, orthanc_id))

    async def by_uids(self, sop_uid: str, study_uid: str | None = None,
                      series_uid: str | None = None) -> list[Instance]:
        """Every stored entry with these UIDs (see :meth:`Store.by_uids`)."""
        pending = [b for b in self._pending_body.values() if b.sop_uid == sop_uid
                   and study_uid in (None, b.study_uid) and series_uid in (None, b.series_uid)]
        for body in pending:  # being committed: wait, then it is found below
            await _committed(self._pending.get(body.orthanc_id))
        return await asyncio.to_thread(self.sync.by_uids, sop_uid, study_uid, series_uid)

    async def resolution(self, sop_uid: str, study_uid: str | None = None,
                         series_uid: str | None = None) -> list[str] | None:
        known = self.sync.peek_resolution(sop_uid, study_uid, series_uid)
        if known is not None:
            return known
        return await asyncio.to_thread(self.sync.resolution, sop_uid, study_uid, series_uid)

    async def resolve_as(self, sop_uid: str, study_uid: str | None, series_uid: str | None,
                         orthanc_ids: list[str]) -> None:
        await asyncio.to_thread(self.sync.resolve_as, sop_uid, study_uid, series_uid,
                                orthanc_ids)

    async def resolve_many(self, found: Sequence[tuple[str, str | None, str | None,
                                                       Sequence[str]]]) -> None:
        if found:
            await asyncio.to_thread(self.sync.resolve_many, found)

    async def flush_touches(self) -> int:
        return await asyncio.to_thread(self.sync.flush_touches)

    async def commit_now(self, body: Instance) -> Instance | None:
        """Write, fsync, rename and index a verified body now, in one thread hop.

        For a viewer's own download: it does not queue behind a series stream's
        group commits (:meth:`queue_commit`), whose backlog can be many megabytes.
        ``None`` when the entry was evicted at once (bigger than the whole cache);
        an ``OSError`` when it was not cached (:meth:`Store.commit_body`).
        """
        return await asyncio.to_thread(self.sync.commit_body, body)

    async def commit_file(self, temp: Path, instance: Instance) -> Instance | None:
        """Adopt a verified, fsynced temp file of ``tmp/`` (a large body received by
        :mod:`~dicomcache.cache.receive`) as the entry; see :meth:`commit_now`."""
        return await asyncio.to_thread(self.sync.commit_received, temp, instance)

    def queue_commit(self, body: Instance) -> asyncio.Future[Instance | None]:
        """Queue a verified body for the next group; the future settles when it is durable.

        From now until then :meth:`get` of the instance waits for it (a lookup never
        misses an instance being committed).
        """
        fut: asyncio.Future[Instance | None] = asyncio.get_running_loop().create_future()
        self._track(body, fut)
        self._queue.append((body, fut))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_queued(), name="store commits")
        return fut

    def commit_soon(self, body: Instance) -> asyncio.Future[Instance | None]:
        """:meth:`commit_now` in a task of its own, for a body its viewer is served from
        memory meanwhile (a cold frame answered once verified, not once durable).  Until
        it settles, :meth:`get` of the instance waits for it, as for :meth:`queue_commit`;
        :meth:`drain` waits for it too."""
        task = asyncio.get_running_loop().create_task(self.commit_now(body),
                                                      name=f"store commit {body.orthanc_id}")
        self._track(body, task)
        self._soon.add(task)
        task.add_done_callback(self._soon.discard)
        return task

    def _track(self, body: Instance, fut: asyncio.Future[Instance | None]) -> None:
        """``body`` is being committed by ``fut``: lookups wait for it until it settles."""
        oid = body.orthanc_id
        self._pending[oid] = fut
        self._pending_body[oid] = body

        def settled(f: asyncio.Future[Instance | None]) -> None:
            if self._pending.get(oid) is f:
                del self._pending[oid]
                del self._pending_body[oid]
            if not f.cancelled():
                f.exception()  # retrieved: the waiter may have gone
        fut.add_done_callback(settled)

    def peek(self, orthanc_id: str) -> Instance | None:
        """A known entry, or a verified body being committed, without I/O."""
        return self.sync.peek(orthanc_id) or self._pending_body.get(orthanc_id)

    def peek_uids(self, sop_uid: str) -> list[Instance]:
        """Known entries, and verified bodies being committed, with this SOP Instance
        UID, without I/O."""
        known = self.sync.peek_uids(sop_uid)
        ids = {i.orthanc_id for i in known}
        return known + [b for b in self._pending_body.values()
                        if b.sop_uid == sop_uid and b.orthanc_id not in ids]

    def pending_body(self, orthanc_id: str) -> Instance | None:
        """The verified body of an instance queued or being committed (not durable yet).

        A whole-series retrieve right after a cold one sends these from memory
        instead of waiting for a backlog of commits (a lookup of one instance
        waits for its commit instead: :meth:`get_by_orthanc_id`).
        """
        return self._pending_body.get(orthanc_id)

    async def drain(self) -> None:
        """Wait until every commit queued so far is durable (or failed)."""
        while self._committer is not None and not self._committer.done():
            await asyncio.wait([self._committer])
        if self._soon:
            await asyncio.wait(list(self._soon))

    def _take_group(self) -> list[tuple[Instance, asyncio.Future[Instance | None]]]:
        group = [self._queue.popleft()]
        size = group[0][0].size
        while self._queue and len(group) < GROUP_BODIES \
                and size + self._queue[0][0].size <= GROUP_BYTES:
            body = self._queue.popleft()
            group.append(body)
            size += body[0].size
        return group

    async def _commit_queued(self) -> None:
        """Commit what is queued, one group per thread hop, until nothing is left.

        Bodies queued while a group is written form the next one: the busier
        the store, the bigger the groups and the fewer syncs per instance.
        """
        group: list[tuple[Instance, asyncio.Future[Instance | None]]] = []
        try:
            while self._queue:
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
            raise

    async def stats(self) -> dict[str, int]:
        return await asyncio.to_thread(self.sync.stats)

    async def status(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.sync.status)

    async def pinned(self) -> dict[str, float]:
        return await asyncio.to_thread(self.sync.pinned)


async def _committed(fut: asyncio.Future[Instance | None] | None) -> Instance | None:
    """The entry a pending commit gave, ``None`` if none or it failed (never cancels it)."""
    if fut is None:
        return None
    await asyncio.wait([fut])
    if fut.cancelled() or fut.exception() is not None:
        return None
    return fut.result()


#: What changes when a file is written to: inode, size, modification and change times.
FileSignature = tuple[int, int, int, int]


def signature(st: os.stat_result) -> FileSignature:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _file_problem(fd: int, size: int, instance: Instance) -> str | None:
    """Why the open file is not the instance's recorded bytes, or ``None``."""
    if size != instance.size:
        return f"{size} bytes where {instance.size} were stored"
    digest = hashlib.md5(usedforsecurity=False)
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            return f"cut at {offset} of {size} bytes"
        digest.update(chunk)
        offset += len(chunk)
    actual = digest.hexdigest()
    return None if actual == instance.md5 else f"MD5 {actual}, stored as {instance.md5}"


def _reraise(exc: OSError) -> NoReturn:
    """Raise ``exc``, as a :class:`StoreFull` when it says the disk is full."""
    full = _full_or(exc)
    if full is exc:
        raise exc
    raise full from exc


def _full_or(exc: OSError) -> OSError:
    """``exc``, or a :class:`StoreFull` when it says the disk (or quota) is full."""
    if durable.is_disk_full(exc) and not isinstance(exc, StoreFull):
        return StoreFull(exc.errno, f"cache disk full: {exc.strerror}")
    return exc


def entry_as_dict(entry: Instance) -> dict[str, Any]:
    d = asdict(replace(entry, data=None))
    d.pop("data", None)
    d["path"] = str(entry.path)
    return d


def _index_failure(exc: sqlite3.Error) -> OSError:
    """An index write that failed, as the ``OSError`` a commit gives (its cause kept)."""
    failed = (StoreFull(errno.ENOSPC, f"cache index cannot grow: {exc}")
              if trouble_of(exc) is StoreTrouble.DISK_FULL
              else OSError(errno.EIO, f"cache index cannot be written: {exc}"))
    failed.__cause__ = exc
    return failed


def _describe(exc: BaseException) -> str:
    """An error for people: what failed, on which file."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else str(exc)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
