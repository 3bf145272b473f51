"""The store's index: a small SQLite schema of its own (``index.sqlite``).

Why not diskcache (named on the design card): the store needs what diskcache's
public API does not offer — delete a row only while it still points at the same
file, evict least-recently-used entries while skipping pinned studies, list
entries with their last use, keep aliases and pins next to the entries in one
transaction — and the earlier index reached for diskcache's private internals
(``_con``, ``_transact``, SQL against its tables) to get them.  Like the relay's
spool, the index now owns a schema of a few tables with a version, read and
written through this module only.

Concurrency: one connection per :class:`Index`, guarded by a lock (the store
calls it from worker threads); WAL journal, so ``dicomcache stats|purge|pin``
in another process read and write the same index while the daemon runs.
Synchronous ``NORMAL``: a power cut may lose the last rows, never corrupt the
index (the files they pointed to are swept as leftovers at the next start).

Every method is blocking: call from a worker thread.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomcache.cache.space import INDEX_HEADROOM, WAL_PAGES
from dicomcache.dicom.uids import orthanc_series_id, orthanc_study_id

#: The schema this code reads and writes.  An index of another version is refused
#: (see :class:`SchemaMismatch`), never silently read.
SCHEMA_VERSION = 3
INDEX_FILE = "index.sqlite"
#: Version 1 keyed entries by SOP Instance UID alone, version 2 had no series/study IDs
#: or confirmation times; the store adopts such an index
#: (:meth:`~dicomcache.cache.store.Store`), re-reading each file's full identity.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    orthanc_id TEXT NOT NULL UNIQUE,
    patient_id TEXT NOT NULL,
    study_uid TEXT,
    series_uid TEXT,
    sop_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    md5 TEXT NOT NULL,
    size INTEGER NOT NULL,
    file TEXT NOT NULL UNIQUE,
    stored_at REAL NOT NULL,
    confirmed_at REAL NOT NULL,
    used_at REAL NOT NULL,
    series_oid TEXT NOT NULL,
    study_oid TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_used ON instances(used_at);
CREATE INDEX IF NOT EXISTS instances_sop ON instances(sop_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE INDEX IF NOT EXISTS instances_patient ON instances(patient_id);
CREATE INDEX IF NOT EXISTS instances_series_oid ON instances(series_oid);
CREATE INDEX IF NOT EXISTS instances_study_oid ON instances(study_oid);
CREATE TABLE IF NOT EXISTS series_state (
    series_oid TEXT PRIMARY KEY,
    last_update TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS purged (
    generation INTEGER NOT NULL,
    study_uid TEXT NOT NULL,
    instances INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS purged_generation ON purged(generation);
CREATE TABLE IF NOT EXISTS usage (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO usage VALUES (1, 0, 0);
CREATE TRIGGER IF NOT EXISTS usage_insert AFTER INSERT ON instances BEGIN
    UPDATE usage SET entries = entries + 1, bytes = bytes + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS usage_delete AFTER DELETE ON instances BEGIN
    UPDATE usage SET entries = entries - 1, bytes = bytes - OLD.size;
END;
CREATE TRIGGER IF NOT EXISTS usage_update AFTER UPDATE OF size ON instances BEGIN
    UPDATE usage SET bytes = bytes - OLD.size + NEW.size;
END;
CREATE TABLE IF NOT EXISTS resolved (
    uids TEXT PRIMARY KEY,
    orthanc_ids TEXT NOT NULL,
    resolved_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS resolved_at ON resolved(resolved_at);
CREATE TABLE IF NOT EXISTS pinned (study_uid TEXT PRIMARY KEY, pinned_at REAL NOT NULL);
"""

_COLUMNS = ("orthanc_id, patient_id, study_uid, series_uid, sop_uid, transfer_syntax, md5, "
            "size, file, stored_at, confirmed_at")
#: Purged studies remembered for the daemon (``purged_since``); older ones: "every study".
MAX_PURGE_LOG = 10_000
#: In the purge log: every study (a purge by patient, age or all).
EVERY_STUDY = "*"
#: Resolutions kept at most (which Orthanc instances a set of UIDs names); the oldest
#: go first.  A row is ~200 bytes.
MAX_RESOLVED = 1_000_000
#: The same for an index in memory (a store that cannot use its directory): memory stays
#: bounded while the cache is degraded.
MAX_RESOLVED_IN_MEMORY = 20_000


class SchemaMismatch(RuntimeError):
    """The index was written by another version of dicomcache."""


def read_only_mode(wal_bytes: int | None, shm: bool) -> str | None:
    """How SQLite can read an index on a file system that cannot be written, from its
    write-ahead log's size (``None``: no log) and whether its ``-shm`` exists: the URI
    parameter, or ``None`` when it cannot be read consistently.

    Measured with SQLite 3.40 on a read-only tmpfs: ``mode=ro`` needs the ``-shm``
    (it cannot create one: ``SQLITE_CANTOPEN`` after a clean close, which removes
    both files), and then sees the rows only the log holds (after a crash or a
    forced remount); ``immutable=1`` opens the file alone and ignores any log.
    """
    if not wal_bytes:
        return "immutable=1"  # no log: the file is the whole index
    if shm:
        return "mode=ro"
    return None  # rows only in a log SQLite cannot index without its -shm


def schema_of(path: Path) -> str | None:
    """The schema version an index file records (``None``: no file, or none recorded)."""
    if not path.exists():
        return None
    db = sqlite3.connect(path)
    try:
        found = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.OperationalError:  # no meta table
        return None
    finally:
        db.close()
    return str(found[0]) if found is not None else None


@dataclass(frozen=True, slots=True)
class Row:
    """One indexed instance (``file`` is relative to the store's directory).

    Keyed by ``orthanc_id``, the hash of the four identifiers that follow: one SOP
    Instance UID under two patients is two rows, never one."""

    orthanc_id: str
    patient_id: str
    study_uid: str | None
    series_uid: str | None
    sop_uid: str
    transfer_syntax: str
    md5: str
    size: int
    file: str
    stored_at: float
    #: When Orthanc last confirmed its MD5 (Unix time; at first, when it was stored).
    confirmed_at: float = 0.0

    @property
    def series_oid(self) -> str:
        return orthanc_series_id(self.patient_id, self.study_uid or "", self.series_uid or "")

    @property
    def study_oid(self) -> str:
        return orthanc_study_id(self.patient_id, self.study_uid or "")


class Index:
    """The SQLite index of one store directory (see the module docstring)."""

    def __init__(self, directory: Path | None, *, read_only: bool = False) -> None:
        """The index of ``directory``; ``None``: an empty one in memory, for a store that
        cannot use its directory (it indexes nothing, and keeps fewer resolutions).

        ``read_only``: the index of a directory that cannot be written (a file system
        remounted read-only), opened as :func:`read_only_mode` says; every write to it
        fails (``SQLITE_READONLY``).  ``OSError`` when it cannot be read consistently.
        """
        self.path = directory / INDEX_FILE if directory is not None else None
        self.max_resolved = MAX_RESOLVED if directory is not None else MAX_RESOLVED_IN_MEMORY
        self.read_only = read_only
        if read_only:
            assert self.path is not None
            self._db = self._open_read_only(self.path)
        else:
            self._db = sqlite3.connect(self.path or ":memory:", timeout=30.0,
                                       isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        if read_only:
            try:
                self._db.execute("PRAGMA query_only = ON")
                self._check_version(create=False)
            except BaseException:
                self._db.close()
                raise
            return
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
                # The WAL is checkpointed at 256 pages and cut back to 1 MiB after: the
                # file it grows into stays within the min_free guard's index headroom
                # (SQLite's default, 1000 pages never cut back, let it grow ~4 MiB).
                self._db.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
                self._db.execute(f"PRAGMA journal_size_limit = {INDEX_HEADROOM}")
                # Deleted rows hold patient data (IDs, UIDs): overwrite them, so a purge
                # leaves none in the file's free pages (see :meth:`checkpoint`).
                self._db.execute("PRAGMA secure_delete = ON")
                self._check_version()  # before the schema: never alter another version's
                self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    @property
    def in_memory(self) -> bool:
        return self.path is None

    @staticmethod
    def _open_read_only(path: Path) -> sqlite3.Connection:
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "no cache index", str(path))
        wal, shm = path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")
        wal_bytes = wal.stat().st_size if wal.exists() else None
        mode = read_only_mode(wal_bytes, shm.exists())
        if mode is None:
            raise OSError(errno.EROFS, f"its write-ahead log ({wal_bytes} bytes) cannot be "
                                       f"read without {shm.name} on a read-only disk", str(path))
        return sqlite3.connect(f"{path.as_uri()}?{mode}", uri=True, timeout=30.0,
                               isolation_level=None, check_same_thread=False)

    def _check_version(self, *, create: bool = True) -> None:
        if create:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None and not create:
            raise SchemaMismatch(f"cache index {self.path} records no schema version")
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif row[0] != str(SCHEMA_VERSION):
            raise SchemaMismatch(
                f"cache index {self.path} has schema version {row[0]}, this dicomcache "
                f"reads version {SCHEMA_VERSION}: purge the cache directory or run the "
                f"matching version")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def release(self) -> None:
        """Close the file, and answer from now on as an empty index in memory: a lookup
        in another thread racing the store's swap to a new index is a miss, not an error.
        SQLite shares one ``-shm`` per file among a process's connections, so while a
        read-only one is open (its ``-shm`` opened read-only), a new connection cannot
        write either: the read-only index is released before the directory is attached
        for writing again."""
        empty = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        empty.executescript(_SCHEMA)
        with self._lock:
            self._db.close()
            self._db = empty
            self.path = None

    def checkpoint(self) -> None:
        """Write the log into the index and empty it: after a purge, no earlier version
        of a deleted row is left in the write-ahead log either."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def generation(self) -> int:
        """Bumped by every removal of entries (purge, quarantine) in any process: a
        running daemon polls it and forgets what it holds in memory when it moves."""
        with self._lock:
            found = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(found[0]) if found is not None else 0

    def bump(self) -> int:
        """A removal that purged no study's content (a bad file quarantined)."""
        return self.log_purge({})

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    # --- instances ---------------------------------------------------------------------
    def put(self, rows: Sequence[Row], now: float) -> list[str | None]:
        """Index each row (replacing the entry of the same Orthanc instance), one
        transaction each; returns the file each replaced (to unlink), or ``None``.

        ``sqlite3.OperationalError`` (a full disk) propagates after the rows before it.
        """
        replaced: list[str | None] = []
        for row in rows:
            with self._tx() as db:
                old = db.execute("SELECT file FROM instances WHERE orthanc_id = ?",
                                 (row.orthanc_id,)).fetchone()
                if old is not None:
                    db.execute("DELETE FROM instances WHERE orthanc_id = ?", (row.orthanc_id,))
                db.execute(f"INSERT INTO instances ({_COLUMNS}, used_at, series_oid, study_oid) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (row.orthanc_id, row.patient_id, row.study_uid, row.series_uid,
                            row.sop_uid, row.transfer_syntax, row.md5, row.size, row.file,
                            row.stored_at, row.confirmed_at or row.stored_at, now,
                            row.series_oid, row.study_oid))
            replaced.append(old[0] if old is not None else None)
        return replaced

    def get(self, orthanc_id: str) -> Row | None:
        with self._lock:
            found = self._db.execute(f"SELECT {_COLUMNS} FROM instances WHERE orthanc_id = ?",
                                     (orthanc_id,)).fetchone()
        return Row(*found) if found is not None else None

    def by_uids(self, sop_uid: str, study_uid: str | None = None,
                series_uid: str | None = None) -> list[Row]:
        """Every entry with this SOP Instance UID (and study/series, when given)."""
        with self._lock:
            found = self._db.execute(
                f"SELECT {_COLUMNS} FROM instances WHERE sop_uid = ? "
                "AND (? IS NULL OR study_uid = ?) AND (? IS NULL OR series_uid = ?)",
                (sop_uid, study_uid, study_uid, series_uid, series_uid)).fetchall()
        return [Row(*values) for values in found]

    def in_series(self, series_oid: str) -> list[Row]:
        """Every entry of an Orthanc series."""
        return self._select("series_oid = ?", series_oid)

    def in_study(self, study_oid: str) -> list[Row]:
        """Every entry of an Orthanc study."""
        return self._select("study_oid = ?", study_oid)

    def of_patient(self, patient_id: str) -> list[Row]:
        """Every entry of a Patient ID."""
        return self._select("patient_id = ?", patient_id)

    def patients_of(self, column: str, value: str) -> list[str]:
        """The Patient IDs (two at most) of the entries whose ``column`` (``study_uid``,
        ``study_oid`` or ``series_oid``, all indexed) is ``value``: who an access is about."""
        assert column in ("study_uid", "study_oid", "series_oid")
        with self._lock:
            found = self._db.execute(f"SELECT DISTINCT patient_id FROM instances "
                                     f"WHERE {column} = ? LIMIT 2", (value,)).fetchall()
        return [str(r[0]) for r in found]

    def _select(self, where: str, *args: object) -> list[Row]:
        with self._lock:
            found = self._db.execute(f"SELECT {_COLUMNS} FROM instances WHERE {where}",
                                     args).fetchall()
        return [Row(*values) for values in found]

    def confirm(self, orthanc_ids: Iterable[str], now: float) -> None:
        """Orthanc confirmed these entries' MD5 ``now``."""
        with self._tx() as db:
            db.executemany("UPDATE instances SET confirmed_at = ? WHERE orthanc_id = ?",
                           ((now, oid) for oid in orthanc_ids))

    def series_updated(self, series_oid: str) -> str | None:
        """Orthanc's ``LastUpdate`` of a series when its entries were last confirmed."""
        with self._lock:
            found = self._db.execute("SELECT last_update FROM series_state WHERE series_oid = ?",
                                     (series_oid,)).fetchone()
        return str(found[0]) if found is not None else None

    def set_series_updated(self, series_oid: str, last_update: str | None) -> None:
        with self._tx() as db:
            if last_update is None:
                db.execute("DELETE FROM series_state WHERE series_oid = ?", (series_oid,))
            else:
                db.execute("INSERT OR REPLACE INTO series_state VALUES (?, ?)",
                           (series_oid, last_update))

    def log_purge(self, studies: Mapping[str, int]) -> int:
        """Bump the generation and note the studies purged with it and how many of their
        instances (``EVERY_STUDY`` when a purge was not by study); returns the new
        generation."""
        with self._tx() as db:
            db.execute("INSERT INTO meta VALUES ('generation', '1') ON CONFLICT(key) "
                       "DO UPDATE SET value = CAST(value AS INTEGER) + 1")
            (generation,) = db.execute(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'generation'").fetchone()
            db.executemany("INSERT INTO purged VALUES (?, ?, ?)",
                           ((generation, uid, n) for uid, n in studies.items()))
            trimmed = db.execute("DELETE FROM purged WHERE rowid IN (SELECT rowid FROM purged "
                                 "ORDER BY generation DESC LIMIT -1 OFFSET ?)",
                                 (MAX_PURGE_LOG,)).rowcount
            if trimmed:  # notes older than the oldest one kept are gone
                db.execute("INSERT OR REPLACE INTO meta SELECT 'purge_log_from', "
                           "CAST(min(generation) AS TEXT) FROM purged")
        return int(generation)

    def purged_since(self, generation: int) -> dict[str, int]:
        """The studies purged after ``generation``, with how many of their instances
        (``EVERY_STUDY`` among them when some purge was not by study, or the log no
        longer reaches that far back)."""
        with self._lock:
            rows = self._db.execute("SELECT study_uid, sum(instances) FROM purged "
                                    "WHERE generation > ? GROUP BY study_uid",
                                    (generation,)).fetchall()
            start = self._db.execute(
                "SELECT value FROM meta WHERE key = 'purge_log_from'").fetchone()
        found = {str(uid): int(n) for uid, n in rows}
        if start is not None and int(start[0]) > generation + 1:
            found.setdefault(EVERY_STUDY, 0)  # the notes of some purges were trimmed
        return found

    def touch(self, orthanc_ids: Iterable[str], now: float) -> None:
        """Mark entries used now (what least-recently-used eviction orders by)."""
        with self._tx() as db:
            db.executemany("UPDATE instances SET used_at = ? WHERE orthanc_id = ?",
                           ((now, oid) for oid in orthanc_ids))

    def delete(self, orthanc_id: str, file: str | None = None) -> bool:
        """Drop an entry; with ``file``, only while it still points at that file."""
        with self._tx() as db:
            if file is None:
                cur = db.execute("DELETE FROM instances WHERE orthanc_id = ?", (orthanc_id,))
            else:
                cur = db.execute("DELETE FROM instances WHERE orthanc_id = ? AND file = ?",
                                 (orthanc_id, file))
            return bool(cur.rowcount)

    def delete_files(self, files: Sequence[str]) -> list[str]:
        """Drop the entries of these files in one transaction; the files whose row went."""
        gone: list[str] = []
        with self._tx() as db:
            for file in files:
                if db.execute("DELETE FROM instances WHERE file = ?", (file,)).rowcount:
                    gone.append(file)
        return gone

    def least_recently_used(self) -> Row | None:
        """The entry eviction takes next: least recently used, not in a pinned study."""
        with self._lock:
            found = self._db.execute(
                f"SELECT {_COLUMNS} FROM instances WHERE study_uid IS NULL OR study_uid NOT IN "
                "(SELECT study_uid FROM pinned) ORDER BY used_at LIMIT 1").fetchone()
        return Row(*found) if found is not None else None

    def evictable_bytes(self) -> int:
        """Bytes of the entries eviction may take (those of no pinned study)."""
        with self._lock:
            (total,) = self._db.execute(
                "SELECT coalesce(sum(size), 0) FROM instances WHERE study_uid IS NULL OR "
                "study_uid NOT IN (SELECT study_uid FROM pinned)").fetchone()
        return int(total)

    def probe(self, now: float) -> None:
        """Write one row (the time of this probe): the index still takes writes."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('probed_at', ?)", (repr(now),))

    def rows(self) -> Iterator[tuple[Row, float]]:
        """Every entry with its last use."""
        with self._lock:
            found = self._db.execute(f"SELECT {_COLUMNS}, used_at FROM instances").fetchall()
        for values in found:
            yield Row(*values[:-1]), float(values[-1])

    def files(self) -> set[str]:
        with self._lock:
            return {f for (f,) in self._db.execute("SELECT file FROM instances")}

    def usage(self) -> tuple[int, int]:
        """(entries, bytes of their files)."""
        with self._lock:
            entries, nbytes = self._db.execute(
                "SELECT entries, bytes FROM usage WHERE one = 1").fetchone()
        return int(entries), int(nbytes)

    def file_bytes(self) -> int:
        """Bytes of the index's own pages (its write-ahead log is checkpointed away)."""
        with self._lock:
            (pages,) = self._db.execute("PRAGMA page_count").fetchone()
            (size,) = self._db.execute("PRAGMA page_size").fetchone()
        return int(pages) * int(size)

    # --- resolutions: which Orthanc instances a set of UIDs names ---------------------
    def resolve_as(self, resolutions: Sequence[tuple[str, Sequence[str]]], now: float) -> None:
        """Record that the UIDs of each ``key`` name exactly these Orthanc instances."""
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO resolved VALUES (?, ?, ?)",
                           ((key, " ".join(oids), now) for key, oids in resolutions))
            (count,) = db.execute("SELECT count(*) FROM resolved").fetchone()
            if count > self.max_resolved:
                db.execute("DELETE FROM resolved WHERE uids IN (SELECT uids FROM resolved "
                           "ORDER BY resolved_at LIMIT ?)", (count - self.max_resolved,))

    def resolution(self, key: str) -> list[str] | None:
        """The Orthanc instances the UIDs ``key`` were last found to name, if known."""
        with self._lock:
            found = self._db.execute("SELECT orthanc_ids FROM resolved WHERE uids = ?",
                                     (key,)).fetchone()
        return found[0].split() if found is not None else None

    def forget_resolutions(self, sop_uid: str) -> int:
        """Drop every resolution of a SOP Instance UID (Orthanc changed what it names)."""
        with self._tx() as db:
            return int(db.execute("DELETE FROM resolved WHERE uids = ? OR uids LIKE ?",
                                  (sop_uid, f"{sop_uid}|%")).rowcount)

    # --- pins --------------------------------------------------------------------------
    def pin(self, study_uid: str, now: float) -> bool:
        with self._tx() as db:
            return bool(db.execute("INSERT OR IGNORE INTO pinned VALUES (?, ?)",
                                   (study_uid, now)).rowcount)

    def unpin(self, study_uid: str) -> bool:
        with self._tx() as db:
            return bool(db.execute("DELETE FROM pinned WHERE study_uid = ?",
                                   (study_uid,)).rowcount)

    def pinned(self) -> dict[str, float]:
        with self._lock:
            return {str(uid): float(at) for uid, at in self._db.execute(
                "SELECT study_uid, pinned_at FROM pinned ORDER BY pinned_at")}


class _Transaction:
    """``with index._tx() as db``: the lock, ``BEGIN IMMEDIATE`` … ``COMMIT`` (or rollback)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self.db = db
        self.lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        try:
            if exc_type is None:
                try:
                    self.db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            else:
                self._rollback()
        finally:
            self.lock.release()

    def _rollback(self) -> None:
        # SQLite rolls back by itself after some errors (a full disk): then there is
        # nothing left to roll back, and trying would hide the error that did it.
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

