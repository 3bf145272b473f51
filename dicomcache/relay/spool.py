"""The durable spool: received instances, their delivery state, quarantine.

Layout of ``spool_directory``::

    incoming/      temp files being written (removed at start-up)
    objects/       one Part-10 file per received instance, as received
    quarantine/    <name>.dcm + <name>.reason.json (bad input, or a destination
                   that refused it for good)
    state.sqlite   queue state (WAL): instances, per-destination deliveries,
                   back-off, learned strategies, recent errors
    reserve        bytes kept aside for the database on a full disk (:mod:`.space`)
    relay.lock     held (flock, shared) by each running relay (:mod:`.drain`)

Guarantees
----------
* :meth:`Spool.put` returns only once the file is written, fsynced, renamed
  into ``objects/`` and the directory fsynced: after that a power cut cannot
  lose it, so the SCP may acknowledge.  C-STOREs spooled at once (several
  associations) share the directory's fsync (:mod:`.groupsync`): each still
  returns only after an fsync that began after its own rename.  The database
  row is written after the file with ``synchronous=NORMAL`` (survives a
  process crash, not necessarily a power cut); :meth:`Spool.open` re-queues
  any file in ``objects/`` that has no row, so the file system is the source
  of truth for "received".
* Queue order is arrival order (the row id); file names start with a
  nanosecond timestamp so re-queued files keep their order too.
* A delivery is marked delivered only after the peer's success status: a
  crash in between sends it again (at-least-once).
* One copy per SOP Instance UID goes to a destination, the newest
  (:mod:`.versions`): queueing a copy supersedes the older ones still waiting
  for the same destination (state ``superseded``: never sent, noted in the
  recent errors, :attr:`Spool.on_superseded` told).  Their files go once no
  forwarder of this process holds them (:meth:`Spool.finish_superseded`).
* Thread-safe: one connection behind a lock; pynetdicom's threads, the
  forwarders' threads and status readers share it.  Process-safe through
  SQLite (WAL, ``BEGIN IMMEDIATE``, busy timeout): the forwarders run in a
  child process with their own :class:`Spool` on the same directory.  Every method blocks:
  call it from a thread, never from the event loop.
* Table ``meta`` also holds control records (keys ``control.*``, JSON): how a
  command asks a running relay something and reads its answer
  (:mod:`.drain`); they are not part of the schema.
* The database records its schema version (table ``meta``, key ``schema``).
  An older layout is migrated when the spool is opened (version 1: the layout
  before versions were recorded); a newer one is refused with
  :class:`SpoolSchemaError` before anything in it is read or changed.
* A full file system never stops the relay from starting: when the database
  cannot be opened or recovered for lack of space, the reserve is released and
  the open tried again; when that fails too, :meth:`Spool.open` raises
  :class:`SpoolUnavailable`, nothing is changed (files without a row stay in
  ``objects/`` and are queued by the next successful open) and the caller runs
  without the spool, retrying :meth:`Spool.ensure_open`.  Recording what a
  peer stored may use the reserve (it frees space); receiving never does.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomcache.dicom.syntaxes import DEFLATED_LE
from dicomcache.dicom.verify import parse_dicom
from dicomcache.durable import fsync_dir, is_disk_full, temp_name, write_durably, write_new
from dicomcache.errors import IntegrityError
from dicomcache.relay import space, versions
from dicomcache.relay.groupsync import GroupSync
from dicomcache.relay.outcome import DELIVERED, Outcome

log = logging.getLogger(__name__)

#: Writes an object file durably (:meth:`Spool.write_object` unless injected: tests
#: make the disk "full" with one).
Writer = Callable[[Path, bytes], None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    received REAL NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    sop_instance TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    has_pixels INTEGER NOT NULL DEFAULT 1,
    size INTEGER NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS deliveries (
    instance_id INTEGER NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT,
    strategy_used TEXT,
    transfer_syntax TEXT,
    updated REAL,
    PRIMARY KEY (instance_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_queue ON deliveries(destination, state, instance_id);
CREATE INDEX IF NOT EXISTS instances_sop ON instances(sop_instance);
CREATE TABLE IF NOT EXISTS study_backoff (
    destination TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    next_attempt REAL NOT NULL,
    failures INTEGER NOT NULL,
    PRIMARY KEY (destination, study_uid)
);
CREATE TABLE IF NOT EXISTS destinations (
    name TEXT PRIMARY KEY,
    configured_strategy TEXT,
    learned_strategy TEXT,
    learned_syntaxes TEXT,
    next_attempt REAL NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    last_success REAL,
    last_error TEXT,
    last_error_time REAL
);
CREATE TABLE IF NOT EXISTS learned (
    destination TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    strategy TEXT NOT NULL,
    since REAL NOT NULL,
    batches INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (destination, sop_class, transfer_syntax)
);
CREATE TABLE IF NOT EXISTS errors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    destination TEXT,
    sop_instance TEXT,
    status INTEGER,
    message TEXT NOT NULL
);
"""

#: The layout this code reads and writes (see :data:`_MIGRATIONS`).
SCHEMA_VERSION = 2
#: SQL taking a spool from version N to N+1 (applied in order, one transaction each).
#: Version 1 is the layout of every spool written before versions were recorded: the
#: same tables, no ``meta``.
_MIGRATIONS: dict[int, str] = {
    1: "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
}
_KEEP_ERRORS = 200
#: The status of the ``errors`` rows that record an instance accepted with problems
#: (what the modality was answered: success).
RECEIVED_WITH_PROBLEMS = 0x0000
ACCEPTED_PREFIX = "accepted as received despite: "
RESERVE_NAME = "reserve"
_counter = itertools.count()
#: The names :meth:`Spool.put` gives files (receive time in ns, pid, a counter).
SPOOL_NAME = re.compile(r"[0-9]{19}-[0-9]+-[0-9]{6}\.dcm")


class SpoolSchemaError(RuntimeError):
    """The spool's database was written by a newer dicomcache (or is not a spool)."""

    def __init__(self, path: Path, found: str) -> None:
        super().__init__(
            f"spool database {path} has schema version {found}; this dicomcache reads "
            f"version {SCHEMA_VERSION} and older. Run the dicomcache that wrote it (drain "
            f"it there first) or restore the spool saved before the upgrade; nothing in it "
            f"was changed")
        self.path = path
        self.found = found


def _schema_version(db: sqlite3.Connection) -> int | None:
    """The version a spool database records (1: tables but no version; None: empty)."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        row = None
    if row is not None:
        return int(row[0]) if str(row[0]).isdigit() else -1
    has_tables = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' "
                            "AND name='instances'").fetchone()
    return 1 if has_tables else None


def schema_problem(directory: Path) -> str | None:
    """Why the spool in ``directory`` cannot be used by this version (read-only check, for
    start-up and ``check-config``), or None (no spool yet, or a version it reads)."""
    path = directory / "state.sqlite"
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            found = _schema_version(db)
        finally:
            db.close()
    except sqlite3.Error:
        return None  # unreadable now (a full disk…): the relay's own start-up says why
    if found is not None and not 1 <= found <= SCHEMA_VERSION:
        return str(SpoolSchemaError(path, str(found) if found > 0 else "unknown"))
    return None


class SpoolUnavailable(OSError):
    """The spool's database cannot be opened or written for lack of space."""


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """What the queue needs to know about a received instance."""

    study_uid: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    has_pixels: bool = True
    #: For the audit record of the receipt (not kept in the spool's database).
    patient_id: str | None = None
    series_uid: str | None = None
    #: What a strict reading objects to (stored all the same: :mod:`.acceptance`).
    problems: tuple[str, ...] = ()
    #: The data set names its SOP Class itself (not only the File Meta).
    sop_class_in_dataset: bool = True


@dataclass(frozen=True, slots=True)
class Superseded:
    """An older copy of a SOP Instance taken out of a destination's queue by a newer one."""

    destination: str
    sop_instance: str
    study_uid: str
    sop_class: str
    #: When the older copy (not sent) and the newer one (sent instead) were received.
    received: float
    newer_received: float
    newer_calling_ae: str


@dataclass(frozen=True, slots=True)
class QueueItem:
    """One pending delivery of one instance to one destination."""

    instance_id: int
    path: Path
    received: float
    study_uid: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    has_pixels: bool
    size: int
    attempts: int


def info_from_bytes(data: bytes) -> InstanceInfo:
    """Parse a Part-10 file leniently (``parse_dicom(lenient=True)``: what a PACS
    stores) and return its queue info, the strict problems included; raises
    IntegrityError when it cannot be read at all."""
    summary = parse_dicom(data, lenient=True)
    # The strict parse does not summarise deflated data sets: assume pixels (the
    # conservative answer: only relabelling of pixel-less data depends on it).
    has_pixels = summary.pixel is not None or summary.transfer_syntax_uid == DEFLATED_LE
    # No Study Instance UID (invalid, but it happens): queued in arrival order with the
    # others that lack one; the PACS decides whether to take it.
    return InstanceInfo(summary.study_instance_uid or "", summary.sop_class_uid,
                        summary.sop_instance_uid, summary.transfer_syntax_uid, has_pixels,
                        patient_id=summary.patient_id,
                        series_uid=summary.series_instance_uid,
                        problems=summary.problems,
                        sop_class_in_dataset=summary.sop_class_in_dataset)


class Spool:
    """See the module docstring."""

    def __init__(
        self,
        directory: Path,
        destinations: Iterable[str] = (),
        *,
        retention: float = 0.0,
        writer: Writer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.incoming = self.directory / "incoming"
        self.objects = self.directory / "objects"
        self.quarantine_dir = self.directory / "quarantine"
        self.destinations = tuple(destinations)
        self.retention = retention
        self.writer: Writer = writer or self.write_object
        self.clock = clock
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._recover_on_open = True
        #: Called (from any thread) after each successful :meth:`put`.
        self.on_put: Callable[[], None] | None = None
        #: Called (from the thread of :meth:`put`) with the copies a put superseded.
        self.on_superseded: Callable[[list[Superseded]], None] | None = None
        #: Instance ids each destination's forwarder (in this process) is sending: from
        #: :meth:`next_batch` until their outcome is recorded or :meth:`release`.  Their
        #: files are not removed meanwhile (a superseded copy may still be in a batch).
        self._held: dict[str, set[int]] = {}
        #: The fsync of ``objects/`` after a rename, shared by the C-STOREs spooled at once.
        self.objects_sync = GroupSync(lambda: fsync_dir(self.objects))

    # --- lifecycle -------------------------------------------------------------------
    def open(self, *, recover: bool = True) -> None:
        """Create the layout, open the database, recover from a crash.

        ``recover=False`` (the forwarder process, sharing the spool with the
        receiving one): no clean-up of ``incoming/``, no re-queueing.  Raises
        :class:`SpoolUnavailable` on a file system too full to open it (see the
        module docstring); the spool then stays closed and unchanged.
        """
        self._recover_on_open = recover
        for d in (self.directory, self.incoming, self.objects, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        if recover:
            for leftover in self.incoming.iterdir():  # writes cut short: never acknowledged
                leftover.unlink(missing_ok=True)
        with self._lock:
            self._with_room(lambda: self._connect(recover), "open")
        if recover:
            self.make_reserve()

    def ensure_open(self) -> bool:
        """Open the spool if it is not (after :class:`SpoolUnavailable`); True when this
        call opened it.  Raises :class:`SpoolUnavailable` while it still cannot."""
        if self._db is not None:
            return False
        with self._lock:
            if self._db is not None:
                return False
            self.open(recover=self._recover_on_open)
        return True

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def _connect(self, recover: bool) -> None:
        db = sqlite3.connect(self.directory / "state.sqlite", check_same_thread=False,
                             isolation_level=None, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA secure_delete=ON")  # purged rows hold patient data
            self._migrate(db)  # before the schema: never alter another version's tables
            db.executescript(_SCHEMA)
            self._db = db
            if recover:
                self._recover()
        except BaseException:
            self._db = None
            db.close()
            raise

    def _migrate(self, db: sqlite3.Connection) -> None:
        path = self.directory / "state.sqlite"
        db.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it
        try:
            found = _schema_version(db)
            if found is not None and not 1 <= found <= SCHEMA_VERSION:
                raise SpoolSchemaError(path, str(found) if found > 0 else "unknown")
            for version in range(found or SCHEMA_VERSION, SCHEMA_VERSION):
                db.execute(_MIGRATIONS[version])
                log.warning("Spool %s: schema migrated from version %d to %d", path, version,
                            version + 1)
            if found != SCHEMA_VERSION:
                db.execute("CREATE TABLE IF NOT EXISTS meta "
                           "(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)",
                           (str(SCHEMA_VERSION),))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- room on the file system ---------------------------------------------------
    def free_bytes(self) -> int | None:
        """Bytes the service may still write on the spool's file system (None: unknown)."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def room(self) -> space.Room:
        """What :func:`.space.refusal` decides on (a stat and a statvfs: cheap)."""
        return space.Room(spool_open=self._db is not None,
                          reserve_held=(self.directory / RESERVE_NAME).exists(),
                          free=self.free_bytes())

    def out_of_space(self, exc: BaseException) -> bool:
        """Whether ``exc`` (from SQLite or the file system) means the disk is full.
        SQLite says so (SQLITE_FULL) only for its pages: a WAL index it cannot extend is
        an "I/O error", told apart by the free space."""
        if isinstance(exc, SpoolUnavailable):
            return True
        if isinstance(exc, OSError) and is_disk_full(exc):
            return True
        if not isinstance(exc, sqlite3.Error):
            return False
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL":
            return True
        free = self.free_bytes()
        return free is not None and free < space.RESERVE_SIZE

    def release_reserve(self) -> bool:
        """Give the reserve back to the file system; True if there was one."""
        try:
            (self.directory / RESERVE_NAME).unlink()
        except FileNotFoundError:
            return False
        log.error("Spool %s: its file system is full: the reserve (%d KiB) is released so "
                  "that deliveries can still be recorded; new C-STOREs are refused (0xA700) "
                  "until there is room again", self.directory, space.RESERVE_SIZE >> 10)
        return True

    def make_reserve(self) -> bool:
        """Create the reserve when it is missing and there is room to spare (see
        :func:`.space.reserve_due`); True if this call created it.  Never raises."""
        path = self.directory / RESERVE_NAME
        if path.exists() or not space.reserve_due(self.free_bytes()):
            return False
        tmp = self.incoming / RESERVE_NAME
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.posix_fallocate(fd, 0, space.RESERVE_SIZE)  # allocated, not sparse
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("Spool %s: cannot set its reserve aside: %s", self.directory, exc)
            return False
        return True

    def _with_room(self, fn: Callable[[], None], what: str) -> None:
        """Run ``fn`` (an open, or a write that frees space); on a full disk, release the
        reserve and run it once more.  Raises :class:`SpoolUnavailable` when it still
        cannot."""
        try:
            fn()
            return
        except (sqlite3.Error, OSError) as exc:
            if not self.out_of_space(exc):
                raise
            if not self.release_reserve():
                raise SpoolUnavailable(errno.ENOSPC, f"spool {what}: {exc}") from exc
        try:
            fn()
        except (sqlite3.Error, OSError) as exc:
            if not self.out_of_space(exc):
                raise
            raise SpoolUnavailable(errno.ENOSPC, f"spool {what}: {exc}") from exc

    def open_readonly(self) -> None:
        """Open the state database read-only (``relay status`` while the daemon runs)."""
        path = self.directory / "state.sqlite"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                             isolation_level=None, timeout=30)
        found = _schema_version(db)
        if found is not None and not 1 <= found <= SCHEMA_VERSION:
            db.close()
            raise SpoolSchemaError(path, str(found) if found > 0 else "unknown")
        self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("spool is not open")
        return self._db

    def _recover(self) -> None:
        db = self.db
        known = {row[0] for row in db.execute("SELECT name FROM instances")}
        orphans = sorted(p for p in self.objects.iterdir() if p.name not in known)
        for path in orphans:  # spooled and fsynced, but the row was lost in a crash
            if not SPOOL_NAME.fullmatch(path.name) or not path.is_file() or path.is_symlink():
                # Never a file of ours: something else wrote it (or a crafted name).  It
                # is never forwarded to a PACS; an operator decides (quarantine/).
                log.error("Spool: %s is not a file the relay wrote: quarantined, not forwarded",
                          path.name)
                self._move_to_quarantine(path, "not written by the relay", None, None)
                continue
            try:
                data = path.read_bytes()
                info = info_from_bytes(data)
            except (OSError, IntegrityError) as exc:
                log.error("Spooled file %s is unreadable (%s): quarantined", path.name, exc)
                self._move_to_quarantine(path, f"unreadable after restart: {exc}", None, None)
                continue
            received = int(path.name.split("-", 1)[0]) / 1e9
            self._insert(path.name, received, "", info, len(data))
            log.info("Re-queued %s found in the spool without a queue entry", path.name)
        # Destinations added since get what is still waiting.  Deliveries to a destination
        # no longer configured stay pending: acknowledged data is never dropped by a
        # configuration edit (it waits for the destination to return, or for
        # `dicomcache relay reroute`).
        pending = [row[0] for row in db.execute("SELECT id FROM instances WHERE finished IS NULL")]
        with self._tx():
            for dest in self.destinations:
                db.executemany(
                    "INSERT OR IGNORE INTO deliveries(instance_id, destination) VALUES (?, ?)",
                    [(i, dest) for i in pending])
                # (a destination added since, or files re-queued above, may have queued
                # two copies of one instance)
                self._supersede_all(dest)
        for dest, count in self.unconfigured().items():
            log.error("Spool: %d instance(s) wait for destination %r, which is no longer "
                      "configured: they are kept; add it back, or move them with "
                      "`dicomcache relay reroute --from %s --to NAME`", count, dest, dest)
        missing = [(i, n) for i, n in db.execute(
            "SELECT id, name FROM instances WHERE finished IS NULL")
            if not (self.objects / n).exists()]
        for instance_id, name in missing:
            log.error("Spooled file %s is missing: its deliveries are dropped", name)
            with self._tx():
                db.execute("UPDATE deliveries SET state='dropped', last_error='file missing' "
                           "WHERE instance_id=? AND state='pending'", (instance_id,))
        self._finish_done()

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: object, *rest: object) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> Spool._Tx:
        return Spool._Tx(self.db)

    # --- receiving -------------------------------------------------------------------
    def write_object(self, final: Path, data: bytes) -> None:
        """Write an object file so that it survives a crash or a power cut (temp file in
        ``incoming/``, fsync, rename, directory fsync; mode ``FILE_MODE``): what
        :func:`dicomcache.durable.write_durably` does, with the directory's fsync shared
        by the C-STOREs renamed at once (:attr:`objects_sync`).  On an error nothing
        is left in ``objects/``."""
        tmp = self.incoming / temp_name(final)
        write_new(tmp, data)
        try:
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            self.objects_sync.sync()
        except BaseException:
            final.unlink(missing_ok=True)  # never acknowledged: not queued at the next start
            raise

    def put(self, data: bytes, info: InstanceInfo, calling_ae: str = "") -> int:
        """Spool ``data`` durably and queue it for every destination; returns its id.

        Raises ``OSError`` (``ENOSPC`` on a full disk) if it could not be made
        durable; then nothing was queued.
        """
        received = self.clock()
        name = f"{time.time_ns():019d}-{os.getpid()}-{next(_counter):06d}.dcm"
        self.writer(self.objects / name, data)
        replaced: list[Superseded] = []
        try:
            with self._lock:
                instance_id = self._insert(name, received, calling_ae, info, len(data),
                                           replaced)
        except (sqlite3.Error, RuntimeError) as exc:
            # Not acknowledged: the file must not be queued by the next start either.
            (self.objects / name).unlink(missing_ok=True)
            code = errno.ENOSPC if self.out_of_space(exc) else errno.EIO
            raise OSError(code, f"spool database: {exc}") from exc
        if replaced and self.on_superseded is not None:
            self.on_superseded(replaced)
        if self.on_put is not None:
            self.on_put()
        return instance_id

    def _insert(self, name: str, received: float, calling_ae: str, info: InstanceInfo,
                size: int, replaced: list[Superseded] | None = None) -> int:
        db = self.db
        found: list[Superseded] = []
        with self._tx():
            cur = db.execute(
                "INSERT INTO instances(name, received, calling_ae, study_uid, sop_class, "
                "sop_instance, transfer_syntax, has_pixels, size) VALUES (?,?,?,?,?,?,?,?,?)",
                (name, received, calling_ae, info.study_uid, info.sop_class, info.sop_instance,
                 info.transfer_syntax, int(info.has_pixels), size))
            instance_id = int(cur.lastrowid or 0)
            db.executemany("INSERT INTO deliveries(instance_id, destination) VALUES (?, ?)",
                           [(instance_id, d) for d in self.destinations])
            if not self.destinations:
                db.execute("UPDATE instances SET finished=? WHERE id=?", (received, instance_id))
            if info.problems:  # with the row: the record of what was accepted as it is
                self._error(None, info.sop_instance, RECEIVED_WITH_PROBLEMS,
                            f"{ACCEPTED_PREFIX}{'; '.join(info.problems)}")
            for dest in self.destinations:
                found += self._supersede(dest, info.sop_instance)
        for s in found:
            log.info("Spool: an older copy of %s (received %s) will not be sent to %s: a "
                     "newer copy (received %s from %r) replaces it", s.sop_instance,
                     utc_text(s.received), s.destination, utc_text(s.newer_received),
                     s.newer_calling_ae)
        if replaced is not None:
            replaced.extend(found)
        return instance_id

    def _supersede_all(self, destination: str) -> list[Superseded]:
        """:meth:`_supersede` for every instance with a copy waiting for ``destination``
        and another one queued for it (start-up, reroute); in the caller's transaction."""
        sops = [r[0] for r in self.db.execute(
            "SELECT i.sop_instance FROM deliveries d JOIN instances i ON i.id=d.instance_id "
            "WHERE d.destination=? GROUP BY i.sop_instance "
            "HAVING COUNT(*) > 1 AND SUM(d.state='pending') > 0", (destination,))]
        return [s for sop in sops for s in self._supersede(destination, sop)]

    def _supersede(self, destination: str, sop_instance: str) -> list[Superseded]:
        """Mark the copies of ``sop_instance`` waiting for ``destination`` that a newer
        copy replaces (:func:`.versions.superseded`); in the caller's transaction."""
        db = self.db
        rows = db.execute(
            "SELECT i.id, i.received, d.state, i.study_uid, i.sop_class, i.calling_ae "
            "FROM instances i JOIN deliveries d ON d.instance_id=i.id AND d.destination=? "
            "WHERE i.sop_instance=?", (destination, sop_instance)).fetchall()
        if len(rows) < 2:
            return []
        keys = versions.superseded(versions.Copy(r[0], r[1], r[2]) for r in rows)
        if not keys:
            return []
        newest = max(rows, key=lambda r: (r[1], r[0]))
        by_key = {r[0]: r for r in rows}
        out: list[Superseded] = []
        for key in keys:
            r = by_key[key]
            why = (f"superseded: a newer copy of {sop_instance} (received "
                   f"{utc_text(newest[1])} from {newest[5] or 'unknown AE'!r}) replaces this one "
                   f"(received {utc_text(r[1])}), which is not sent")
            db.execute("UPDATE deliveries SET state=?, last_error=?, updated=? "
                       "WHERE instance_id=? AND destination=? AND state='pending'",
                       (versions.SUPERSEDED, why, self.clock(), key, destination))
            self._error(destination, sop_instance, None, why)
            out.append(Superseded(destination, sop_instance, r[3], r[4], r[1], newest[1],
                                  newest[5]))
        return out

    def quarantine_received(self, data: bytes, reason: str, status: int, calling_ae: str,
                            sop_instance: str | None = None) -> Path | None:
        """Keep a rejected input with its reason (best effort: never raises)."""
        name = f"{time.time_ns():019d}-{os.getpid()}-{next(_counter):06d}"
        path = self.quarantine_dir / f"{name}.dcm"
        try:
            write_new(path, data, sync=False)
            self._write_reason(path, {
                "reason": reason, "status": f"0x{status:04X}", "calling_ae": calling_ae,
                "sop_instance_uid": sop_instance, "destination": None, "time": self.clock()})
        except OSError as exc:
            log.error("Could not quarantine a rejected instance (%s): %s", reason, exc)
            return None
        try:
            with self._lock:
                self._error(None, sop_instance, status, f"received and quarantined: {reason}")
        except (sqlite3.Error, RuntimeError) as exc:  # closed, or its disk full: logged only
            log.error("Could not note a rejected instance in the spool (%s): %s", reason, exc)
        return path

    # --- forwarding ------------------------------------------------------------------
    def next_batch(self, destination: str, limit: int, max_bytes: int = 256 << 20
                   ) -> list[QueueItem]:
        """The oldest pending instances of one study for ``destination``, in arrival order.

        The study is the one holding the oldest pending instance whose study
        is not backing off.  Returns ``[]`` when nothing is due.
        """
        now = self.clock()
        with self._lock:
            row = self.db.execute(
                "SELECT i.study_uid FROM deliveries d JOIN instances i ON i.id=d.instance_id "
                "LEFT JOIN study_backoff b ON b.destination=d.destination "
                "  AND b.study_uid=i.study_uid "
                "WHERE d.destination=? AND d.state='pending' "
                "  AND (b.next_attempt IS NULL OR b.next_attempt<=?) "
                "ORDER BY d.instance_id LIMIT 1", (destination, now)).fetchone()
            if row is None:
                return []
            rows = self.db.execute(
                "SELECT i.id, i.name, i.received, i.study_uid, i.sop_class, i.sop_instance, "
                "i.transfer_syntax, i.has_pixels, i.size, d.attempts "
                "FROM deliveries d JOIN instances i ON i.id=d.instance_id "
                "WHERE d.destination=? AND d.state='pending' AND i.study_uid=? "
                "ORDER BY d.instance_id LIMIT ?", (destination, row[0], limit)).fetchall()
            items: list[QueueItem] = []
            total = 0
            for r in rows:
                if items and total + r[8] > max_bytes:
                    break
                total += r[8]
                items.append(QueueItem(r[0], self.objects / r[1], r[2], r[3], r[4], r[5],
                                       r[6], bool(r[7]), r[8], r[9]))
            self._held.setdefault(destination, set()).update(q.instance_id for q in items)
        return items

    def release(self, destination: str, ids: Iterable[int] | None = None) -> None:
        """``destination``'s forwarder no longer holds these instances (None: any)."""
        with self._lock:
            held = self._held.get(destination)
            if held is not None:
                if ids is None:
                    held.clear()
                else:
                    held.difference_update(ids)

    def _unheld(self, ids: Iterable[int]) -> list[int]:
        with self._lock:
            held = set().union(*self._held.values()) if self._held else set()
        return [i for i in ids if i not in held]

    def finish_superseded(self, destination: str) -> int:
        """Finish the instances superseded for ``destination`` that nothing else waits
        for and no forwarder here holds (their files go, or after ``retention``).
        Returns how many were looked at.  The forwarders call it between batches."""
        with self._lock:
            ids = [r[0] for r in self.db.execute(
                "SELECT d.instance_id FROM deliveries d JOIN instances i "
                "ON i.id=d.instance_id WHERE d.destination=? AND d.state=? "
                "AND i.finished IS NULL", (destination, versions.SUPERSEDED))]
            ids = self._unheld(ids)
            if ids:
                self._with_room(lambda: self._finish_done(ids), "record")
        return len(ids)

    def next_due(self, destination: str) -> float | None:
        """When something is next due for ``destination`` (None: queue empty)."""
        with self._lock:
            row = self.db.execute(
                "SELECT MIN(COALESCE(b.next_attempt, 0)) FROM deliveries d "
                "JOIN instances i ON i.id=d.instance_id "
                "LEFT JOIN study_backoff b ON b.destination=d.destination "
                "  AND b.study_uid=i.study_uid "
                "WHERE d.destination=? AND d.state='pending'", (destination,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def record(self, destination: str, outcomes: Sequence[Outcome]) -> None:
        """Store delivery outcomes (``key``: the instance id); delivered and quarantined
        instances leave the queue.  On a full disk the reserve is used (recording frees
        space); :class:`SpoolUnavailable` when even that is not enough."""
        if not outcomes:
            return
        now = self.clock()
        with self._lock:
            states: dict[int, str] = {}
            self._with_room(lambda: self._record_tx(destination, outcomes, now, states),
                            "record")
            self.release(destination, (o.key for o in outcomes))
            for o in outcomes:
                if states.get(o.key) == versions.QUARANTINED_STATE:
                    self._quarantine_delivery(destination, o)
            done = self._unheld(o.key for o in outcomes
                                if states.get(o.key) != versions.PENDING)
            self._with_room(lambda: self._finish_done(done), "record")

    def _record_tx(self, destination: str, outcomes: Sequence[Outcome], now: float,
                   states: dict[int, str]) -> None:
        """Write the outcomes; ``states`` gets each delivery's new state."""
        db = self.db
        with self._tx():
            states.clear()  # (run again after a full disk)
            for o in outcomes:
                row = db.execute("SELECT state FROM deliveries WHERE instance_id=? "
                                 "AND destination=?", (o.key, destination)).fetchone()
                state = versions.recorded_state(row[0] if row else versions.PENDING,
                                                o.outcome)
                states[o.key] = state
                db.execute(
                    "UPDATE deliveries SET state=?, attempts=attempts+1, last_status=?, "
                    "last_error=?, strategy_used=COALESCE(?, strategy_used), "
                    "transfer_syntax=COALESCE(?, transfer_syntax), updated=? "
                    "WHERE instance_id=? AND destination=?",
                    (state, o.status, o.reason or None, o.strategy_used, o.transfer_syntax,
                     now, o.key, destination))
                if o.outcome != DELIVERED:
                    sop = db.execute("SELECT sop_instance FROM instances WHERE id=?",
                                     (o.key,)).fetchone()
                    self._error(destination, sop[0] if sop else None, o.status, o.reason)

    def _quarantine_delivery(self, destination: str, o: Outcome) -> None:
        row = self.db.execute("SELECT name, sop_instance, calling_ae FROM instances WHERE id=?",
                              (o.key,)).fetchone()
        if row is None:
            return
        src = self.objects / row[0]
        dst = self.quarantine_dir / f"{Path(row[0]).stem}.{_safe(destination)}.dcm"
        try:
            try:
                os.link(src, dst)
            except FileExistsError:
                pass
            except OSError:
                write_durably(dst, src.read_bytes(), sync=False)
            self._write_reason(dst, {
                "reason": o.reason, "status": None if o.status is None else f"0x{o.status:04X}",
                "destination": destination, "sop_instance_uid": row[1],
                "calling_ae": row[2], "strategy_used": o.strategy_used,
                "attempts_made": o.attempts_made, "time": self.clock()})
        except OSError as exc:
            log.error("Could not copy %s to quarantine: %s", row[0], exc)

    def _finish_done(self, ids: Sequence[int] | None = None) -> None:
        """Mark instances with no pending delivery finished; delete their files (or keep them
        for ``retention`` seconds).  ``ids`` limits the check (None: every instance)."""
        db = self.db
        now = self.clock()
        sql = ("UPDATE instances SET finished=? WHERE finished IS NULL AND NOT EXISTS "
               "(SELECT 1 FROM deliveries d WHERE d.instance_id=instances.id "
               " AND d.state='pending')")
        with self._tx():
            if ids is None:
                db.execute(sql, (now,))
            else:
                db.executemany(sql + " AND id=?", [(now, i) for i in ids])
        self.purge(now)

    def purge(self, now: float | None = None) -> int:
        """Delete finished instances older than the retention; returns how many."""
        now = self.clock() if now is None else now
        with self._lock:
            rows = self.db.execute("SELECT id, name FROM instances WHERE finished IS NOT NULL "
                                   "AND finished<=?", (now - self.retention,)).fetchall()
            for _, name in rows:
                try:
                    (self.objects / name).unlink()
                except FileNotFoundError:
                    pass
            if rows:
                with self._tx():
                    self.db.executemany("DELETE FROM instances WHERE id=?",
                                        [(r[0],) for r in rows])
        return len(rows)

    def purge_delivered(self, study_uids: Iterable[str] | None) -> int:
        """Delete delivered instances kept for ``retention`` (of these studies; ``None``:
        all), with their files: what an operator purges leaves no copy here.  Instances
        still waiting for a destination are never touched.  Returns how many."""
        with self._lock:
            if study_uids is None:
                rows = self.db.execute("SELECT id, name FROM instances "
                                       "WHERE finished IS NOT NULL").fetchall()
            else:
                rows = [r for uid in set(study_uids) for r in self.db.execute(
                    "SELECT id, name FROM instances WHERE finished IS NOT NULL "
                    "AND study_uid=?", (uid,))]
            for _, name in rows:
                (self.objects / name).unlink(missing_ok=True)
            if rows:
                with self._tx():
                    self.db.executemany("DELETE FROM instances WHERE id=?",
                                        [(r[0],) for r in rows])
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return len(rows)

    def back_off_study(self, destination: str, study_uid: str,
                       delay_for: Callable[[int], float]) -> float:
        """Postpone a study for ``destination`` by ``delay_for(failures)`` (its consecutive
        failures, this one included); returns that delay."""
        with self._lock, self._tx():
            row = self.db.execute("SELECT failures FROM study_backoff WHERE destination=? "
                                  "AND study_uid=?", (destination, study_uid)).fetchone()
            failures = (row[0] if row else 0) + 1
            delay = delay_for(failures)
            self.db.execute("INSERT OR REPLACE INTO study_backoff VALUES (?,?,?,?)",
                            (destination, study_uid, self.clock() + delay, failures))
        return delay

    def clear_study_backoff(self, destination: str, study_uid: str) -> None:
        with self._lock, self._tx():
            self.db.execute("DELETE FROM study_backoff WHERE destination=? AND study_uid=?",
                            (destination, study_uid))

    def destination_state(self, name: str) -> dict[str, Any]:
        with self._lock:
            row = self.db.execute(
                "SELECT configured_strategy, learned_strategy, learned_syntaxes, next_attempt, "
                "failures, last_success, last_error, last_error_time FROM destinations "
                "WHERE name=?", (name,)).fetchone()
        if row is None:
            return {"configured_strategy": None, "learned_strategy": None,
                    "learned_syntaxes": {}, "next_attempt": 0.0, "failures": 0,
                    "last_success": None, "last_error": None, "last_error_time": None}
        return {"configured_strategy": row[0], "learned_strategy": row[1],
                "learned_syntaxes": json.loads(row[2]) if row[2] else {},
                "next_attempt": row[3], "failures": row[4], "last_success": row[5],
                "last_error": row[6], "last_error_time": row[7]}

    def update_destination(self, name: str, **values: Any) -> None:
        """Set columns of the destination's row (created on first use)."""
        allowed = {"configured_strategy", "learned_strategy", "learned_syntaxes", "next_attempt",
                   "failures", "last_success", "last_error", "last_error_time"}
        bad = set(values) - allowed
        if bad:
            raise ValueError(f"unknown destination fields {sorted(bad)}")
        if "learned_syntaxes" in values and not isinstance(values["learned_syntaxes"], str):
            values["learned_syntaxes"] = json.dumps(values["learned_syntaxes"], sort_keys=True)
        with self._lock, self._tx():
            self.db.execute("INSERT OR IGNORE INTO destinations(name) VALUES (?)", (name,))
            if values:
                cols = ", ".join(f"{k}=?" for k in values)
                self.db.execute(f"UPDATE destinations SET {cols} WHERE name=?",
                                (*values.values(), name))
            if values.get("last_error"):
                self._error(name, None, None, str(values["last_error"]))

    def learned(self, destination: str) -> dict[tuple[str, str], tuple[str, float, int]]:
        """(SOP class, source syntax) → (strategy, since, batches) learned for
        ``destination`` (the decisions are :mod:`.fallback`'s)."""
        with self._lock:
            # A spool last written by an older dicomcache, opened read-only (`relay
            # status` beside it), has no such table yet: nothing learned.
            if self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' "
                               "AND name='learned'").fetchone() is None:
                return {}
            rows = self.db.execute("SELECT sop_class, transfer_syntax, strategy, since, batches "
                                   "FROM learned WHERE destination=?", (destination,))
            return {(r[0], r[1]): (r[2], float(r[3]), int(r[4])) for r in rows}

    def update_learned(self, destination: str,
                       changes: dict[tuple[str, str], tuple[str, float, int] | None]) -> None:
        """Set (or, for None, forget) learned strategies of ``destination``."""
        with self._lock, self._tx():
            for (sop_class, syntax), value in changes.items():
                if value is None:
                    self.db.execute("DELETE FROM learned WHERE destination=? AND sop_class=? "
                                    "AND transfer_syntax=?", (destination, sop_class, syntax))
                else:
                    self.db.execute("INSERT OR REPLACE INTO learned VALUES (?,?,?,?,?,?)",
                                    (destination, sop_class, syntax, *value))

    def forget_learned(self, destination: str) -> None:
        with self._lock, self._tx():
            self.db.execute("DELETE FROM learned WHERE destination=?", (destination,))

    # --- diagnostics -----------------------------------------------------------------
    def _error(self, destination: str | None, sop_instance: str | None, status: int | None,
               message: str) -> None:
        db = self.db
        db.execute("INSERT INTO errors(time, destination, sop_instance, status, message) "
                   "VALUES (?,?,?,?,?)", (self.clock(), destination, sop_instance, status,
                                          message))
        db.execute("DELETE FROM errors WHERE id <= (SELECT MAX(id) FROM errors) - ?",
                   (_KEEP_ERRORS,))

    def unconfigured(self) -> dict[str, int]:
        """Instances waiting for a destination that is not configured, by destination."""
        with self._lock:
            rows = self.db.execute(
                "SELECT destination, COUNT(*) FROM deliveries WHERE state='pending' "
                "GROUP BY destination").fetchall()
        return {name: n for name, n in rows if name not in self.destinations}

    def reroute(self, source: str, target: str) -> tuple[int, int]:
        """Move what waits for ``source`` to ``target``: ``(now_waiting, already_sent)``.
        An instance ``target`` already waits for or was given is never queued twice."""
        db = self.db
        with self._lock, self._tx():
            already = {row[0]: row[1] for row in db.execute(
                "SELECT d.instance_id, t.state FROM deliveries d JOIN deliveries t "
                "ON t.instance_id=d.instance_id AND t.destination=? "
                "WHERE d.destination=? AND d.state='pending'", (target, source))}
            moved = db.execute(
                "UPDATE deliveries SET destination=?, attempts=0, last_error=NULL "
                "WHERE destination=? AND state='pending' AND instance_id NOT IN "
                "(SELECT instance_id FROM deliveries WHERE destination=?)",
                (target, source, target)).rowcount
            db.execute("UPDATE deliveries SET state='dropped', last_error=? "
                       "WHERE destination=? AND state='pending'",
                       (f"rerouted to {target}", source))
            self._supersede_all(target)
        self._finish_done()
        waiting = sum(1 for state in already.values() if state == "pending")
        return moved + waiting, len(already) - waiting

    def retry(self, destinations: Iterable[str]) -> dict[str, int]:
        """Forget the back-off of ``destinations`` (theirs and their studies') and the
        refusals counted towards ``max_instance_retries``: the next attempt is now, for a
        running relay too (its forwarders read this state before every batch).  Returns
        how many instances wait for each."""
        names = list(dict.fromkeys(destinations))
        db = self.db
        with self._lock, self._tx():
            for name in names:
                db.execute("UPDATE destinations SET next_attempt=0, failures=0 WHERE name=?",
                           (name,))
                db.execute("DELETE FROM study_backoff WHERE destination=?", (name,))
                db.execute("UPDATE deliveries SET attempts=0 WHERE destination=? "
                           "AND state='pending'", (name,))
            return {name: int(db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE destination=? AND state='pending'",
                (name,)).fetchone()[0]) for name in names}

    # --- control records (``meta``): how commands talk to a running relay -------------
    def control(self, key: str) -> dict[str, Any] | None:
        """The control record ``key`` (JSON in ``meta``), or None."""
        _control_key(key)
        with self._lock:
            try:
                row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            except sqlite3.OperationalError:  # read-only, version 1 (no ``meta`` yet)
                if self.db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
                    raise
                row = None
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def set_control(self, key: str, value: dict[str, Any] | None) -> None:
        """Write (or, with None, delete) the control record ``key``."""
        _control_key(key)
        with self._lock, self._tx():
            if value is None:
                self.db.execute("DELETE FROM meta WHERE key=?", (key,))
            else:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                (key, json.dumps(value, sort_keys=True)))

    def last_instance_id(self) -> int:
        """The highest instance id ever given (ids are never reused, even once purged):
        how many instances arrived between two calls is the difference."""
        with self._lock:
            row = self.db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name='instances'").fetchone()
        return int(row[0]) if row else 0

    def known_destinations(self) -> list[str]:
        """Every destination the spool has state or waiting instances for."""
        with self._lock:
            rows = self.db.execute("SELECT name FROM destinations UNION "
                                   "SELECT DISTINCT destination FROM deliveries "
                                   "WHERE state='pending'").fetchall()
        return sorted(r[0] for r in rows)

    def snapshot(self, destinations: Iterable[str] = (), errors: int = 10) -> dict[str, Any]:
        """Queue state, JSON-able: what ``relay status`` and the status page show."""
        now = self.clock()
        names = list(dict.fromkeys([*destinations, *self.destinations]))
        configured = set(names)
        with self._lock:
            db = self.db
            for (n,) in db.execute("SELECT DISTINCT destination FROM deliveries "
                                   "WHERE state='pending'"):
                if n not in names:
                    names.append(n)
            out_dests: dict[str, Any] = {}
            for name in names:
                depth, oldest, nbytes = db.execute(
                    "SELECT COUNT(*), MIN(i.received), COALESCE(SUM(i.size), 0) "
                    "FROM deliveries d JOIN instances i ON i.id=d.instance_id "
                    "WHERE d.destination=? AND d.state='pending'", (name,)).fetchone()
                # Counted from the quarantine folder: delivery rows go with their instance.
                quarantined = sum(1 for _ in self.quarantine_dir.glob(
                    f"*.{_safe(name)}.reason.json"))
                state = self.destination_state(name)
                recent = [
                    {"time": t, "sop_instance_uid": s, "status": None if st is None
                     else f"0x{st:04X}", "message": m}
                    for t, s, st, m in db.execute(
                        "SELECT time, sop_instance, status, message FROM errors "
                        "WHERE destination=? ORDER BY id DESC LIMIT ?", (name, errors))]
                out_dests[name] = {
                    "configured": name in configured,
                    "queue_depth": depth,
                    "queue_bytes": nbytes,
                    "oldest_received": oldest,
                    "oldest_age_seconds": None if oldest is None else max(0.0, now - oldest),
                    "quarantined": quarantined,
                    "configured_strategy": state["configured_strategy"],
                    "learned_strategy": state["learned_strategy"],
                    "learned_syntaxes": state["learned_syntaxes"],
                    "learned_by_class": [
                        {"sop_class": sop, "transfer_syntax": ts, "strategy": strategy,
                         "since": since, "batches": batches}
                        for (sop, ts), (strategy, since, batches)
                        in sorted(self.learned(name).items())],
                    "backing_off_until": state["next_attempt"] if state["next_attempt"] > now
                    else None,
                    "consecutive_failures": state["failures"],
                    "last_success": state["last_success"],
                    "last_error": state["last_error"],
                    "last_error_time": state["last_error_time"],
                    "recent_errors": recent,
                }
            spooled, spooled_bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances "
                "WHERE finished IS NULL").fetchone()
            received_errors, received_warnings = (
                [{"time": t, "sop_instance_uid": s, "status": None if st is None
                  else f"0x{st:04X}", "message": m}
                 for t, s, st, m in db.execute(
                     "SELECT time, sop_instance, status, message FROM errors "
                     f"WHERE destination IS NULL AND {where} ORDER BY id DESC LIMIT ?",
                     (RECEIVED_WITH_PROBLEMS, errors))]
                for where in ("(status IS NULL OR status != ?)", "status = ?"))
        quarantine_files = sum(1 for p in self.quarantine_dir.glob("*.dcm"))
        return {
            "spool_directory": str(self.directory),
            "spooled_instances": spooled,
            "spooled_bytes": spooled_bytes,
            "quarantine_files": quarantine_files,
            "destinations": out_dests,
            "recent_receive_errors": received_errors,
            # Instances stored although a strict reading objects (:mod:`.acceptance`).
            "recent_receive_warnings": received_warnings,
            "time": now,
        }

    # --- helpers ---------------------------------------------------------------------
    def _move_to_quarantine(self, path: Path, reason: str, status: int | None,
                            destination: str | None) -> None:
        dst = self.quarantine_dir / path.name
        try:
            os.replace(path, dst)
            self._write_reason(dst, {"reason": reason, "status": status,
                                     "destination": destination, "time": self.clock()})
        except OSError as exc:
            log.error("Could not quarantine %s: %s", path, exc)

    @staticmethod
    def _write_reason(path: Path, info: dict[str, Any]) -> None:
        reason = path.with_name(path.stem + ".reason.json")
        text = json.dumps(info, indent=2, sort_keys=True) + "\n"
        write_durably(reason, text.encode(), sync=False)


def utc_text(ts: float) -> str:
    """A time for people (logs, messages): ISO 8601, UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _control_key(key: str) -> None:
    if not key.startswith("control."):  # never the schema version, or another's record
        raise ValueError(f"not a control record: {key!r}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)

