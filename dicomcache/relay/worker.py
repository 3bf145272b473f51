"""The forwarders in a child process, so that sending never competes with receiving.

Why a process: pynetdicom's transport is pure Python.  With the forwarders in
the receiving process, every PDU they encode and every 1 ms poll of their DUL
threads takes the GIL from the SCP's threads, and the modality's
acknowledgements slow down (measured in ``docs/relay.md``).  The spool
(files + the SQLite WAL database) already is the interface between receiving
and forwarding, so the child opens the same spool (without crash recovery,
which the parent did) and runs one :class:`~.forward.Forwarder` per
destination, exactly as they ran in-process.

The pipe protocol (private to this module; both ends are ours):

* parent → child, on the child's stdin: first one frame (4-byte big-endian
  length + pickle) with the settings and log levels, then single bytes:
  ``w`` something was spooled (wake the forwarders), ``s`` stop after the
  instance in flight, ``a`` abort the associations in progress.  EOF (the
  parent died) means ``s`` + ``a``; the child also asks the kernel to kill it
  when its parent dies (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the
  daemon never leaves a forwarder running beside the next one.  The child
  ignores SIGINT and SIGTERM (a Ctrl-C or a SIGTERM to the whole process
  group): its life is the parent's to end, in order, after the SCP.
* child → parent, on the child's stdout (fd 1 of the child is re-pointed to
  stderr so a stray ``print`` cannot corrupt it): frames ``("ready",)``,
  ``("log", record_dict)`` (re-emitted by the parent's ``logging``, so log
  files, ``caplog`` and the log level work as before), ``("metrics", [...])``
  (``(attribute, labels, method, value)`` applied to the parent's
  :class:`~dicomcache.metrics.Metrics`) and ``("status", {...})`` (each
  forwarder's ``busy`` and ``last_batch`` for :meth:`Relay.status`).

Nothing durable crosses the pipe: a lost message costs a log line or a
metric increment, never an instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, cast

from dicomcache.config import AuditSettings, RelaySettings
from dicomcache.metrics import Metrics

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_METHODS = frozenset({"inc", "observe", "set"})
#: How often the child sends batched metrics and changed statuses.
_REPORT_EVERY = 0.2
_WAKE, _STOP, _ABORT = b"w", b"s", b"a"
#: The audit counters the child adds to the parent's (its gauges, ``audit_up`` and the
#: queue depth, are the parent's own writer's: two processes would overwrite each other).
_AUDIT_COUNTERS = frozenset({"audit_records", "audit_dropped", "audit_write_errors",
                             "audit_refused", "audit_syslog_failures"})


def _forwarded(attr: str, method: str) -> bool:
    """Whether the parent applies a metric update the child sent."""
    return method in _METHODS and (attr.startswith("relay_") or (
        attr in _AUDIT_COUNTERS and method == "inc"))


def _write_frame(out: IO[bytes], obj: object) -> None:
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(blob)) + blob)
    out.flush()


def _read_exact(inp: IO[bytes], n: int) -> bytes | None:
    chunks: list[bytes] = []
    while n > 0:
        chunk = inp.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_frame(inp: IO[bytes]) -> Any:
    """The next frame, or ``None`` at EOF."""
    head = _read_exact(inp, _HEADER.size)
    if head is None:
        return None
    blob = _read_exact(inp, _HEADER.unpack(head)[0])
    return None if blob is None else pickle.loads(blob)


# --- parent side -------------------------------------------------------------------------


class ForwarderProcess:
    """Starts, feeds and stops the forwarders' child process (parent side).

    A supervisor thread spawns the child and reads its messages; if the child
    dies while the relay runs, it is started again (1 s, doubling to 30 s).
    All methods are thread-safe; :meth:`start` and :meth:`wait` block.
    """

    def __init__(self, settings: RelaySettings, metrics: Metrics,
                 audit: AuditSettings | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        #: The child records its forwards itself, in the same file (``flock``).
        self.audit = audit
        self.status: dict[str, dict[str, Any]] = {
            d.name: {"busy": False, "last_batch": None} for d in settings.destinations}
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: str | None = None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    def start(self, timeout: float = 60.0) -> None:
        """Spawn the child; returns once its forwarders run (or raises ``RuntimeError``)."""
        self._thread = threading.Thread(target=self._supervise, name="relay-forwarders",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._failed:
            self.request_stop()
            self.kill()
            raise RuntimeError(f"the relay's forwarder process did not start: "
                               f"{self._failed or 'timed out'}")

    def _send(self, byte: bytes) -> None:
        # Non-blocking (the fd is): the SCP calls wake() before acknowledging, and a
        # stuck child must not stall it.  A full pipe already holds a wake-up.
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None:
                return
            try:
                os.write(proc.stdin.fileno(), byte)
            except (OSError, ValueError):  # full, or the child is gone (restarted)
                pass

    def wake(self) -> None:
        """Something was spooled (from any thread)."""
        self._send(_WAKE)

    def request_stop(self) -> None:
        """Finish the instance in flight, then stop (no restart after this)."""
        self._stopping.set()
        self._send(_STOP)

    def abort(self) -> None:
        """Abort the associations in progress (shutdown deadline passed)."""
        self._send(_ABORT)

    def wait(self, timeout: float) -> bool:
        """Wait for the supervisor (and so the child) to end; True if it did."""
        if self._thread is None:
            return True
        self._thread.join(max(timeout, 0.0))
        return not self._thread.is_alive()

    def kill(self) -> None:
        """SIGKILL our child (by its PID, through its Popen), last resort."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            log.warning("Killing the relay's forwarder process %d", proc.pid)
            proc.kill()

    def _spawn(self) -> subprocess.Popen[bytes]:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen([sys.executable, "-m", "dicomcache.relay.worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                close_fds=True)
        assert proc.stdin is not None
        levels = {name: logging.getLogger(name).getEffectiveLevel()
                  for name in ("", "dicomcache", "dicomcache.relay", "pynetdicom")}
        try:
            _write_frame(proc.stdin, {"settings": self.settings, "levels": levels,
                                      "parent": os.getpid(), "audit": self.audit})
        except OSError:
            pass  # it died at once: the reader sees EOF
        os.set_blocking(proc.stdin.fileno(), False)
        return proc

    def _supervise(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                with self._lock:
                    proc = self._proc = self._spawn()
            except OSError as exc:
                log.error("Cannot start the relay's forwarder process: %s", exc)
                if not self._ready.is_set():
                    self._failed = str(exc)
                    break
                if self._stopping.wait(delay):
                    break
                delay = min(delay * 2, 30.0)
                continue
            log.info("Relay forwarder process %d started", proc.pid)
            self._read(proc)
            code = proc.wait()
            with self._lock:
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None:
                        with contextlib.suppress(OSError):
                            pipe.close()
                self._proc = None
            if not self._ready.is_set():  # died before it ever ran: do not loop
                self._failed = f"exit status {code} before it was ready (see the log)"
                break
            for st in self.status.values():
                st["busy"] = False
            if self._stopping.is_set():
                log.info("Relay forwarder process %d stopped (exit status %s)", proc.pid, code)
                break
            if time.monotonic() - started > 60:
                delay = 1.0
            log.error("Relay forwarder process %d exited unexpectedly (exit status %s); "
                      "restarting in %.0f s (the spool keeps everything)", proc.pid, code, delay)
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, 30.0)
        self._ready.set()  # never leave start() waiting

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        while True:
            try:
                msg = _read_frame(proc.stdout)
            except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
                log.error("Bad message from the relay's forwarder process: %s", exc)
                msg = None
            if msg is None:
                return
            try:
                self._dispatch(msg)
            except Exception:
                log.exception("Could not handle a message from the forwarder process")

    def _dispatch(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "log":
            record = logging.makeLogRecord(msg[1])
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        elif kind == "metrics":
            for attr, labels, method, value in msg[1]:
                if not _forwarded(str(attr), str(method)):
                    continue
                metric = getattr(self.metrics, attr)
                if labels:
                    metric = metric.labels(*labels)
                getattr(metric, method)(value)
        elif kind == "status":
            for name, st in msg[1].items():
                self.status[name] = st
        elif kind == "ready":
            self._ready.set()


# --- child side --------------------------------------------------------------------------


class _Outbox:
    """Thread-safe writer of frames to the parent; metrics are batched."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self._lock = threading.Lock()
        self._metrics: list[tuple[str, tuple[str, ...], str, float]] = []
        self.broken = False

    def send(self, obj: object) -> None:
        with self._lock:
            if self.broken:
                return
            try:
                _write_frame(self.out, obj)
            except (OSError, ValueError):
                self.broken = True  # the parent is gone

    def metric(self, attr: str, labels: tuple[str, ...], method: str, value: float) -> None:
        with self._lock:
            self._metrics.append((attr, labels, method, value))

    def flush_metrics(self) -> None:
        with self._lock:
            batch, self._metrics = self._metrics, []
        if batch:
            self.send(("metrics", batch))


class _MetricProxy:
    def __init__(self, outbox: _Outbox, attr: str, labels: tuple[str, ...] = ()) -> None:
        self._outbox, self._attr, self._labels = outbox, attr, labels

    def labels(self, *labels: str) -> _MetricProxy:
        return _MetricProxy(self._outbox, self._attr, tuple(str(v) for v in labels))

    def inc(self, value: float = 1.0) -> None:
        self._outbox.metric(self._attr, self._labels, "inc", value)

    def observe(self, value: float) -> None:
        self._outbox.metric(self._attr, self._labels, "observe", value)

    def set(self, value: float) -> None:
        self._outbox.metric(self._attr, self._labels, "set", value)


class _MetricsProxy:
    """Stands in for :class:`Metrics` in the child: every update goes to the parent."""

    def __init__(self, outbox: _Outbox) -> None:
        self._outbox = outbox

    def __getattr__(self, attr: str) -> _MetricProxy | _Ignored:
        if attr in ("audit_up", "audit_queue"):
            return _Ignored()
        if not (attr.startswith("relay_") or attr in _AUDIT_COUNTERS):
            raise AttributeError(attr)
        return _MetricProxy(self._outbox, attr)


class _Ignored:
    """A gauge of the parent's that the child does not set."""

    def labels(self, *_labels: str) -> _Ignored:
        return self

    def set(self, _value: float) -> None:
        pass


class _PipeLogHandler(logging.Handler):
    def __init__(self, outbox: _Outbox) -> None:
        super().__init__()
        self.outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc_text = record.exc_text
            if record.exc_info and not exc_text:
                exc_text = logging.Formatter().formatException(record.exc_info)
            self.outbox.send(("log", {
                "name": record.name, "levelno": record.levelno,
                "levelname": record.levelname, "msg": record.getMessage(), "args": None,
                "created": record.created, "msecs": record.msecs,
                "relativeCreated": record.relativeCreated, "pathname": record.pathname,
                "filename": record.filename, "module": record.module,
                "lineno": record.lineno, "funcName": record.funcName,
                "threadName": f"forwarders/{record.threadName}",
                "process": record.process, "processName": "relay-forwarders",
                "exc_text": exc_text, "stack_info": record.stack_info}))
        except Exception:
            self.handleError(record)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL us when the parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)


async def _child_main(settings: RelaySettings, outbox: _Outbox, inp: IO[bytes],
                      audit_settings: AuditSettings | None = None) -> None:
    from dicomcache.audit.trail import AuditLog
    from dicomcache.relay import transcode
    from dicomcache.relay.forward import Forwarder
    from dicomcache.relay.spool import Spool, SpoolUnavailable

    loop = asyncio.get_running_loop()
    spool = Spool(settings.spool_directory, [d.name for d in settings.destinations],
                  retention=settings.retention)
    executor = ThreadPoolExecutor(max_workers=2 * len(settings.destinations) + 2,
                                  thread_name_prefix="forward")
    try:
        await loop.run_in_executor(executor, lambda: spool.open(recover=False))
    except SpoolUnavailable as exc:  # a full disk: the forwarders open it when they can
        log.error("The forwarders cannot open the spool yet: %s", exc)
    metrics = cast(Metrics, _MetricsProxy(outbox))
    audit = None
    if audit_settings is not None:
        audit = AuditLog(audit_settings, metrics, source="relay-forwarder")
        try:
            await loop.run_in_executor(executor, audit.open)
        except OSError as exc:  # kept in memory, written once it can be (logged by the trail)
            log.error("audit trail %s cannot be opened: %s", audit_settings.file, exc)
        audit.start()
    forwarders = [Forwarder(settings, d, spool, metrics, executor, audit=audit)
                  for d in settings.destinations]
    tasks = [asyncio.create_task(fw.run(), name=f"relay-{fw.dest.name}") for fw in forwarders]
    done = asyncio.Event()

    def wake_all() -> None:
        for fw in forwarders:
            fw.wake()

    def stop_all() -> None:
        for fw in forwarders:
            fw.request_stop()

    def abort_all() -> None:
        for fw in forwarders:
            fw.abort()

    def on_command(cmd: bytes) -> None:
        if _STOP in cmd or not cmd:
            stop_all()
        if _ABORT in cmd or not cmd:
            # Blocking (pynetdicom abort): off the loop.
            loop.run_in_executor(executor, abort_all)
        if _WAKE in cmd:
            wake_all()

    def read_commands() -> None:
        fd = inp.fileno()
        while True:
            try:
                cmd = os.read(fd, 4096)
            except OSError:
                cmd = b""
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(on_command, cmd)
            if not cmd:  # EOF: the parent is gone or closed the pipe
                return

    threading.Thread(target=read_commands, name="commands", daemon=True).start()

    async def report() -> None:
        last: dict[str, Any] = {}
        while not done.is_set():
            status = {fw.dest.name: {"busy": fw.busy, "last_batch": fw.last_report}
                      for fw in forwarders}
            if status != last:
                outbox.send(("status", status))
                last = status
            outbox.flush_metrics()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), _REPORT_EVERY)

    reporter = asyncio.create_task(report(), name="report")
    outbox.send(("ready",))
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        done.set()
        await reporter
        if audit is not None:
            await loop.run_in_executor(executor, audit.close)
        outbox.flush_metrics()
        await loop.run_in_executor(executor, spool.close)
        executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(transcode.shutdown_pool)


def child() -> int:
    """Entry point of the child (``python -m dicomcache.relay.worker``, started by the parent)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, not into the frames
    # Ctrl-C, or a SIGTERM to the whole process group / cgroup (systemd), is the
    # parent's to handle: it stops us in order (after its SCP), or we die with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inp = os.fdopen(0, "rb", buffering=0)  # unbuffered: commands are read from the fd too
    init = _read_frame(inp)
    if init is None:
        return 1
    _die_with_parent(int(init["parent"]))
    outbox = _Outbox(out)
    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(outbox)]
    for name, level in init["levels"].items():
        logging.getLogger(name).setLevel(level)
    settings: RelaySettings = init["settings"]
    if settings.accelerate:
        from dicomcache.relay import accel

        accel.install(settings.max_pdu)
    asyncio.run(_child_main(settings, outbox, inp, init.get("audit")))
    return 0

if __name__ == "__main__":
    sys.exit(child())
