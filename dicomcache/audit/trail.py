"""The audit file, and :class:`AuditLog`: the one writer a process has.

**The file** (:class:`AuditFile`) is JSON lines (:func:`~.record.encode`),
shared by every dicomcache process of the host (``serve``, ``relay run``
and its forwarder process, the CLI).  Each append takes an exclusive
``flock`` on ``FILE.lock``, checks that ``FILE`` is still the file it has
open (another process may have rotated it: then it opens the new one),
rotates it itself when the batch would take it past ``max_file_size``,
writes the batch and fsyncs it, and only then lets go.  So:

* no record is lost or written twice by a rotation: nobody writes while the
  file is renamed, and nobody writes into a file after it was rotated;
* a write that fails (disk full, I/O error) is cut back (``ftruncate``) to
  where it started, so a retry never duplicates and no partial line stays;
  a line cut by a crash before its fsync is never merged with the next one
  (a newline is put first);
* rotated files are ``FILE.YYYYMMDDTHHMMSS.ffffffZ`` (names from the clock,
  never from data), ``keep`` of them kept (0: all); an operator may gzip
  them (``.gz``), the query reads those too;
* files and the lock are created ``0600`` in a ``0700`` directory, never
  through a symlink; created by root (the CLI run by root) they are handed
  to the directory's owner, so the service can still write them.

**The writer** (:class:`AuditLog`): :meth:`~AuditLog.submit` encodes a
record and appends it to an in-memory queue (no lock, no I/O: safe on the
event loop and from pynetdicom's threads); one thread writes what is queued
every :data:`TICK` seconds in one batch (a record is durable within about a
quarter of a second plus the fsync).  The queue is bounded
(``max_queue``): past it records are dropped, counted and logged.  A batch
that cannot be written is kept and tried again each tick; meanwhile
:meth:`~AuditLog.accepting` is False, which is what ``[audit] required``
acts on (refuse patient data rather than serve it unaudited), and the
failure is logged (at most once a minute), counted, and shown on the status
page.  Records are kept in memory until written: a crash loses at most
what was queued (a quarter of a second's worth when the disk is healthy).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomcache.audit.record import Record, encode
from dicomcache.audit.syslog import SyslogSender
from dicomcache.config import AuditSettings
from dicomcache.durable import fsync_dir, is_disk_full
from dicomcache.metrics import Metrics

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
#: The writer looks at its queue this often (seconds).
TICK = 0.25
#: Records waiting this long without the writer getting through: the file counts as failing
#: (a disk that hangs rather than errs).
STALL = 5.0
#: Most bytes one append writes (more waits for the next round, a moment later).
MAX_BATCH_BYTES = 4 << 20
#: At most one log line per this many seconds about the same failure.
LOG_EVERY = 60.0
_ROTATED = r"\.\d{8}T\d{6}\.\d{6}Z(?:-\d+)?(?:\.gz)?"


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of ``path``, oldest first (their names sort by time)."""
    pattern = re.compile(re.escape(path.name) + _ROTATED)
    try:
        names = sorted(e.name for e in os.scandir(path.parent)
                       if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return []
    return [path.with_name(n) for n in names]


def audit_files(path: Path) -> list[Path]:
    """Every file of the trail, oldest first: the rotated ones, then the current one."""
    return rotated_files(path) + ([path] if path.is_file() else [])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class AuditFile:
    """The trail on disk (see the module docstring).  Blocking: call from a thread."""

    def __init__(self, path: Path, max_size: int, keep: int = 0) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.max_size = max_size
        self.keep = keep
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._lock_fd: int | None = None
        self.rotations = 0

    def open(self) -> None:
        """Create the directory, the lock and the file if need be; ``OSError`` if it cannot."""
        if self._lock_fd is None:
            self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            self._lock_fd = self._open_private(self.lock_path, os.O_RDWR)
        with self._locked():
            self._current()

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = self._ident = None

    def append(self, lines: Sequence[bytes]) -> None:
        """Write ``lines`` durably (fsync), or raise ``OSError`` having written none."""
        if self._lock_fd is None:
            self.open()
        data = b"".join(lines)
        if not data:
            return
        with self._locked():
            fd = self._current()
            size = os.fstat(fd).st_size
            if size and size + len(data) > self.max_size:
                self._rotate()
                fd, size = self._current(), 0
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a line a crash cut short stays on its own
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # nothing half-written stays, nothing is doubled
                raise

    # --- under the lock ------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        assert self._lock_fd is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _current(self) -> int:
        """The descriptor of the file now at ``path`` (reopened after someone rotated it)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
            if self._fd is not None and (st.st_dev, st.st_ino) == self._ident:
                return self._fd
        except FileNotFoundError:
            pass
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = self._ident = None
        fd = self._open_private(self.path, os.O_RDWR | os.O_APPEND)
        st = os.fstat(fd)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        return fd

    def _open_private(self, path: Path, flags: int) -> int:
        """Open (creating it ``0600``) a regular file of ours; never through a symlink."""
        base = flags | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, base | os.O_CREAT | os.O_EXCL, FILE_MODE)
            created = True
        except FileExistsError:
            fd = os.open(path, base)
            created = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{path} is not a regular file")
            if st.st_mode & 0o077:
                os.fchmod(fd, FILE_MODE)  # audit records are patient data: owner only
            if created:
                self._give_to_directory_owner(fd)
                fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _give_to_directory_owner(self, fd: int) -> None:
        """Root (``sudo dicomcache purge``) creating a file in the service's directory hands
        it to the directory's owner, so the service can still append to it."""
        if os.geteuid() != 0:
            return
        st = os.stat(self.path.parent)
        if st.st_uid != 0:
            os.fchown(fd, st.st_uid, st.st_gid)

    def _rotate(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 0
        while target.exists() or target.with_name(target.name + ".gz").exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.{stamp}-{n}")
        os.rename(self.path, target)
        fsync_dir(self.path.parent)
        self.rotations += 1
        log.info("audit: %s rotated to %s", self.path, target.name)
        if self.keep:
            for old in rotated_files(self.path)[:-self.keep]:
                old.unlink(missing_ok=True)
                log.info("audit: deleted %s ([audit] keep = %d)", old.name, self.keep)
            fsync_dir(self.path.parent)


class _Flushed(threading.Event):
    """A marker in the queue: set once everything queued before it is durable."""

    ok = False


class AuditLog:
    """One process's audit trail: queue from any thread, one writer thread (module docstring).

    Lifecycle: :meth:`open` (optional: fails early, blocking), :meth:`start`,
    then :meth:`close` (blocking: writes what is queued, stops the threads).
    """

    def __init__(self, settings: AuditSettings, metrics: Metrics | None = None, *,
                 source: str, file: AuditFile | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        #: Which process wrote a record: ``serve``, ``relay``, ``relay-forwarder``, ``cli``.
        self.source = source
        self.file = file if file is not None else AuditFile(
            settings.file, settings.max_file_size, settings.keep)
        self.syslog = SyslogSender(
            settings.syslog, source_id=f"dicomcache-{source}", max_queue=settings.max_queue,
            metrics=metrics, ca_file=settings.syslog_ca_file,
            cert_file=settings.syslog_cert_file, key_file=settings.syslog_key_file,
        ) if settings.syslog else None
        # Records are encoded by the writer thread, not by the event loop that made them.
        self._queue: collections.deque[Record | bytes | _Flushed] = collections.deque()
        self._batch: list[bytes] = []
        self._markers: list[_Flushed] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress = time.monotonic()
        #: Whether the file takes records (False until opened, and while writes fail).
        self.healthy = False
        self.error: str | None = None
        self.failing_since: float | None = None
        self.written = 0
        self.dropped = 0
        self.refused = 0
        self._failure_logged = float("-inf")
        self._drop_logged = float("-inf")
        self._unlogged_drops = 0

    @property
    def required(self) -> bool:
        return self.settings.required

    # --- lifecycle (blocking) ------------------------------------------------------------
    def open(self) -> None:
        """Create or open the file now; ``OSError`` (also recorded as the failure) if not."""
        try:
            self.file.open()
        except OSError as exc:
            self._failed(exc)
            raise
        self._ok()

    def start(self) -> None:
        """Start the writer (and syslog) threads."""
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        if self.syslog is not None:
            self.syslog.start()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (within ``timeout``), then stop; what is left is counted lost."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("audit: the writer did not finish within %.0f s (a hung disk?); "
                          "%d record(s) may be lost", timeout, self.depth)
        else:
            self._work()
            self._lose_rest()
        if self.syslog is not None:
            self.syslog.close()
        self.file.close()

    # --- any thread (never blocks) -----------------------------------------------------
    @property
    def depth(self) -> int:
        """Records waiting to be written."""
        return len(self._queue) + len(self._batch)

    def accepting(self) -> bool:
        """Whether a record made now will be written: the file takes writes, the queue has
        room and the writer keeps up (see :data:`STALL`)."""
        if not self.healthy:
            return False
        depth = self.depth
        if depth >= self.settings.max_queue:
            return False
        return not (depth and time.monotonic() - self._progress > STALL)

    def submit(self, rec: Record) -> bool:
        """Queue ``rec`` for the file (and syslog); False, counted and logged, when the queue
        is full."""
        if self.syslog is not None:
            self.syslog.offer(rec)
        if self.depth >= self.settings.max_queue:
            self._drop("queue_full")
            return False
        self._queue.append(rec)  # encoded in the writer thread (_take)
        return True

    def refuse(self, rec: Record, side: str) -> None:
        """An access refused because records cannot be written: counted, and its record
        queued too (written once the file takes writes again, if the queue has room)."""
        self.refused += 1
        if self.metrics is not None:
            self.metrics.audit_refused.labels(side).inc()
        self.submit(rec)

    def flush(self, timeout: float = 10.0) -> bool:
        """Blocking (never on the event loop): True once everything submitted before the
        call is durable; False after ``timeout`` (the file failing, or not started)."""
        marker = _Flushed()
        self._queue.append(marker)
        return marker.wait(timeout) and marker.ok

    def record_now(self, rec: Record) -> None:
        """Write ``rec`` durably before returning (blocking: the CLI); ``OSError`` if not."""
        line = encode(rec, source=self.source)
        if self.syslog is not None:
            self.syslog.offer(rec)
        try:
            self.file.append([line])
        except OSError as exc:
            self._failed(exc)
            raise
        self._wrote(1)
        self._ok()

    def status(self) -> dict[str, Any]:
        """What the status page shows."""
        return {"file": str(self.settings.file), "required": self.required,
                "state": "ok" if self.healthy else "failing", "error": self.error,
                "failing_since": self.failing_since, "written": self.written,
                "dropped": self.dropped, "refused": self.refused, "queued": self.depth,
                "syslog": None if self.syslog is None else self.syslog.status()}

    # --- the writer thread ---------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(TICK):
            self._work()
        self._work()  # what came in before the stop
        self._lose_rest()

    def _work(self) -> None:
        for _ in range(64):  # bounded: a huge backlog is written over a few ticks
            if not self._batch and not self._markers:
                self._take()
            if not self._batch and not self._markers:
                self._progress = time.monotonic()
                break
            if self._batch:
                try:
                    self.file.append(self._batch)
                except OSError as exc:
                    self._failed(exc)
                    break
                self._wrote(len(self._batch))
                self._batch = []
            for marker in self._markers:
                marker.ok = True
                marker.set()
            self._markers = []
            self._ok()
        if self.metrics is not None:
            self.metrics.audit_queue.labels("file").set(self.depth)

    def _take(self) -> None:
        """The next batch: lines up to :data:`MAX_BATCH_BYTES`, or up to a flush marker."""
        size = 0
        batch: list[bytes] = []
        while self._queue and size < MAX_BATCH_BYTES:
            item = self._queue.popleft()
            if isinstance(item, _Flushed):
                self._markers.append(item)
                break
            line = item if isinstance(item, bytes) else encode(item, source=self.source)
            batch.append(line)
            size += len(line)
        self._batch = batch

    def _lose_rest(self) -> None:
        left = len(self._batch) + sum(1 for i in self._queue if not isinstance(i, _Flushed))
        for item in [*self._markers, *self._queue]:
            if isinstance(item, _Flushed):
                item.set()  # ok stays False: the caller learns it was not written
        self._batch, self._markers = [], []
        self._queue.clear()
        if left:
            self.dropped += left
            if self.metrics is not None:
                self.metrics.audit_dropped.labels("file", "shutdown").inc(left)
            log.error("AUDIT RECORDS LOST: %d record(s) could not be written to %s before "
                      "the stop: %s", left, self.settings.file, self.error)

    # --- state ---------------------------------------------------------------------------
    def _wrote(self, n: int) -> None:
        self.written += n
        if self.metrics is not None:
            self.metrics.audit_records.labels("file").inc(n)

    def _ok(self) -> None:
        self._progress = time.monotonic()
        if self.healthy:
            return
        if self.failing_since is not None:
            log.warning("audit: %s is written again (it failed for %.0f s); the records "
                        "kept meanwhile are written", self.settings.file,
                        time.time() - self.failing_since)
        self.healthy, self.error, self.failing_since = True, None, None
        if self.metrics is not None:
            self.metrics.audit_up.set(1)

    def _failed(self, exc: OSError) -> None:
        cause = "disk_full" if is_disk_full(exc) else "io_error"
        if self.metrics is not None:
            self.metrics.audit_write_errors.labels(cause).inc()
            self.metrics.audit_up.set(0)
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = time.time()
            self._failure_logged = float("-inf")
        self.healthy = False
        self.error = f"{cause}: {exc.strerror or exc}"
        if now - self._failure_logged >= LOG_EVERY:
            self._failure_logged = now
            then = ("patient data is refused until it can be written ([audit] required = "
                    "true)" if self.required else "patient data is still served WITHOUT its "
                    "audit records being kept ([audit] required = false)")
            log.error("AUDIT TRAIL CANNOT BE WRITTEN to %s (%s); %s; %d record(s) wait in "
                      "memory", self.settings.file, self.error, then, self.depth)

    def _drop(self, cause: str) -> None:
        self.dropped += 1
        if self.metrics is not None:
            self.metrics.audit_dropped.labels("file", cause).inc()
        now = time.monotonic()
        if now - self._drop_logged < LOG_EVERY:
            self._unlogged_drops += 1
            return
        more = f" ({self._unlogged_drops} more since the last message)" \
            if self._unlogged_drops else ""
        self._drop_logged, self._unlogged_drops = now, 0
        log.error("AUDIT RECORD DROPPED: %d record(s) already wait to be written to %s "
                  "([audit] max_queue)%s; %s", self.depth, self.settings.file, more,
                  self.error or "the disk does not keep up")
