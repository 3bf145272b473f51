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

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The schema this code reads and writes.  An index of another version is refused
#: (see :class:`SchemaMismatch`), never silently read.
SCHEMA_VERSION = 1
INDEX_FILE = "index.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    sop_uid TEXT NOT NULL UNIQUE,
    orthanc_id TEXT,
    study_uid TEXT,
    series_uid TEXT,
    transfer_syntax TEXT NOT NULL,
    md5 TEXT NOT NULL,
    size INTEGER NOT NULL,
    file TEXT NOT NULL UNIQUE,
    stored_at REAL NOT NULL,
    used_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_used ON instances(used_at);
CREATE INDEX IF NOT EXISTS instances_orthanc_id ON instances(orthanc_id);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
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
CREATE TABLE IF NOT EXISTS aliases (
    orthanc_id TEXT PRIMARY KEY,
    sop_uid TEXT NOT NULL,
    learned_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS aliases_sop ON aliases(sop_uid);
CREATE INDEX IF NOT EXISTS aliases_learned ON aliases(learned_at);
CREATE TABLE IF NOT EXISTS pinned (study_uid TEXT PRIMARY KEY, pinned_at REAL NOT NULL);
"""

_COLUMNS = ("sop_uid, orthanc_id, study_uid, series_uid, transfer_syntax, md5, size, file, "
            "stored_at")
#: Aliases kept at most (Orthanc ID ↔ SOP Instance UID learned from lookups); the
#: oldest learnt go first.  A row is ~150 bytes.
MAX_ALIASES = 1_000_000


class SchemaMismatch(RuntimeError):
    """The index was written by another version of dicomcache."""


@dataclass(frozen=True, slots=True)
class Row:
    """One indexed instance (``file`` is relative to the store's directory)."""

    sop_uid: str
    orthanc_id: str | None
    study_uid: str | None
    series_uid: str | None
    transfer_syntax: str
    md5: str
    size: int
    file: str
    stored_at: float


class Index:
    """The SQLite index of one store directory (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / INDEX_FILE
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
            self._check_version()

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
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

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    # --- instances ---------------------------------------------------------------------
    def put(self, rows: Sequence[Row], now: float) -> list[str | None]:
        """Index each row (replacing the entry of the same SOP Instance UID), one
        transaction each; returns the file each replaced (to unlink), or ``None``.

        ``sqlite3.OperationalError`` (a full disk) propagates after the rows before it.
        """
        replaced: list[str | None] = []
        for row in rows:
            with self._tx() as db:
                old = db.execute("SELECT file FROM instances WHERE sop_uid = ?",
                                 (row.sop_uid,)).fetchone()
                if old is not None:
                    db.execute("DELETE FROM instances WHERE sop_uid = ?", (row.sop_uid,))
                db.execute(f"INSERT INTO instances ({_COLUMNS}, used_at) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (row.sop_uid, row.orthanc_id, row.study_uid, row.series_uid,
                            row.transfer_syntax, row.md5, row.size, row.file, row.stored_at,
                            now))
            replaced.append(old[0] if old is not None else None)
        return replaced

    def get(self, sop_uid: str) -> Row | None:
        with self._lock:
            found = self._db.execute(f"SELECT {_COLUMNS} FROM instances WHERE sop_uid = ?",
                                     (sop_uid,)).fetchone()
        return Row(*found) if found is not None else None

    def touch(self, sop_uids: Iterable[str], now: float) -> None:
        """Mark entries used now (what least-recently-used eviction orders by)."""
        with self._tx() as db:
            db.executemany("UPDATE instances SET used_at = ? WHERE sop_uid = ?",
                           ((now, s) for s in sop_uids))

    def delete(self, sop_uid: str, file: str | None = None) -> bool:
        """Drop an entry; with ``file``, only while it still points at that file."""
        with self._tx() as db:
            if file is None:
                cur = db.execute("DELETE FROM instances WHERE sop_uid = ?", (sop_uid,))
            else:
                cur = db.execute("DELETE FROM instances WHERE sop_uid = ? AND file = ?",
                                 (sop_uid, file))
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

    # --- aliases -----------------------------------------------------------------------
    def learn(self, pairs: Sequence[tuple[str, str]], now: float) -> None:
        """Record Orthanc instance ID ↔ SOP Instance UID pairs (one transaction)."""
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)",
                           ((oid, sop, now) for oid, sop in pairs))
            (count,) = db.execute("SELECT count(*) FROM aliases").fetchone()
            if count > MAX_ALIASES:
                db.execute("DELETE FROM aliases WHERE orthanc_id IN (SELECT orthanc_id FROM "
                           "aliases ORDER BY learned_at LIMIT ?)", (count - MAX_ALIASES,))

    def sop_of(self, orthanc_id: str) -> str | None:
        with self._lock:
            found = self._db.execute("SELECT sop_uid FROM aliases WHERE orthanc_id = ?",
                                     (orthanc_id,)).fetchone()
        return str(found[0]) if found is not None else None

    def orthanc_id_of(self, sop_uid: str) -> str | None:
        with self._lock:
            found = self._db.execute(
                "SELECT orthanc_id FROM aliases WHERE sop_uid = ? ORDER BY learned_at DESC",
                (sop_uid,)).fetchone()
        return str(found[0]) if found is not None else None

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
                    self.db.execute("ROLLBACK")
                    raise
            else:
                self.db.execute("ROLLBACK")
        finally:
            self.lock.release()

