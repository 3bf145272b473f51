"""Draining the relay before an upgrade (``dicomcache relay drain``).

**The channel** is the one ``relay retry`` already uses: the spool's state
database, which a running relay reads every 2 seconds.  The command writes a
request (control record :data:`REQUEST` in table ``meta``); the running
relay's SCP then rejects every new association and the relay answers
(:data:`ANSWER`: the request's id, its PID, how many inbound associations are
still open), refreshed every 2 seconds while the request stands.  Its
forwarders go on delivering as always.  A relay clears the request when it
starts, so the new version after an upgrade takes associations again.

**The rejection** is A-ASSOCIATE-RJ *rejected-transient*, source *service
provider (presentation)*, reason *temporary congestion* (``scp.REJECT_DRAINING``):
PS3.8's "try again later".  A modality's send queue retries a transient
rejection as it retries a relay that is down, but its log says what happened
(a refused TCP connection reads like a wrong address or a crashed relay), and
the listener stays bound, so the port is not free for something else during
the upgrade.  Associations open when the drain starts finish normally: their
C-STOREs are spooled and delivered like the rest.

**The request expires.**  After a successful drain the request stands, so that
nothing arrives between the drain and the stop.  An upgrade abandoned there would
leave every modality refused until someone noticed; so the running relay withdraws a
request older than its ``--timeout`` plus :data:`EXPIRY_GRACE` itself, logs it, and
takes associations again (:func:`expired` decides, from the request alone).

**Is a relay running?**  Every relay (``serve`` or ``relay run``) holds a
shared ``flock`` on ``spool_directory/relay.lock`` while it runs; the kernel
lets it go when the process ends, however it ends.  When the command can take
the lock exclusively, no relay runs: it delivers the spool itself, with
forwarders in its own process and no listener at all, holding the lock so
that a relay started meanwhile waits until it is done.

The report (:func:`report`) is a pure function of two spool snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomcache.audit.trail import AuditLog
from dicomcache.config import RelaySettings
from dicomcache.metrics import Metrics
from dicomcache.relay import transcode
from dicomcache.relay.forward import Forwarder
from dicomcache.relay.spool import Spool

log = logging.getLogger(__name__)

#: Control records in the spool's ``meta`` table.
REQUEST = "control.drain"
ANSWER = "control.drain_answer"
#: Held (shared) by every running relay; taken exclusively by a drain with none running.
LOCK_NAME = "relay.lock"
#: How long the command waits for a running relay to answer its request (it reads
#: the request every 2 s).
ANSWER_WITHIN = 30.0
#: How often the command looks at the spool while it waits.
POLL = 0.5
#: How long after its ``--timeout`` a drain request still stands: the time to stop the
#: service after a drain (and back up).  Past it the running relay withdraws the request.
EXPIRY_GRACE = 1800.0
#: The ``--timeout`` of a request that does not say (written by an earlier version).
DEFAULT_TIMEOUT = 600.0


# --- the lock ----------------------------------------------------------------------------
def _lock_file(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    # Read-only and readable by all (it stays empty): a lock file root created must not
    # keep the service's user from taking it.
    fd = os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    if os.geteuid() == 0:
        owner = directory.stat()
        with contextlib.suppress(OSError):
            os.fchown(fd, owner.st_uid, owner.st_gid)
    return fd


def try_lock(directory: Path, *, exclusive: bool) -> int | None:
    """The lock's file descriptor, locked; None when another process holds it in a
    conflicting way.  Blocking (file system): call it from a thread."""
    fd = _lock_file(directory)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def lock_running(directory: Path) -> int:
    """Take the running relay's shared lock, waiting while a drain with the relay
    stopped holds it (bounded by that drain's ``--timeout``).  Blocking."""
    fd = try_lock(directory, exclusive=False)
    if fd is not None:
        return fd
    log.warning("Waiting for `dicomcache relay drain` to finish delivering the spool %s "
                "before the relay starts", directory)
    fd = _lock_file(directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


# --- the running relay's side ----------------------------------------------------------------
def expired(request: dict[str, Any], now: float) -> bool:
    """Whether a drain request has outlived its ``--timeout`` plus :data:`EXPIRY_GRACE`
    at wall-clock time ``now``.  One that cannot be read, or dated further ahead than
    the grace (a clock set back), counts as expired: kept, it would refuse modalities
    for ever."""
    try:
        made = float(request["time"])
        timeout = request.get("timeout")
        timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    except (KeyError, TypeError, ValueError):
        return True
    age = now - made
    # NaN compares false both ways: expired.
    return not -EXPIRY_GRACE <= age <= timeout + EXPIRY_GRACE


def answer(spool: Spool, active_inbound: Callable[[], int], set_draining: Callable[[bool], None]
           ) -> bool:
    """Read the drain request; while there is one, refuse new associations (through
    ``set_draining``) and answer it; withdraw it once :func:`expired` (on the spool's
    clock).  Returns whether the relay drains.  Blocking."""
    request = spool.control(REQUEST)
    if request is not None and expired(request, spool.clock()):
        log.warning("The drain request %s (made %s, --timeout %s s) expired %.0f s after "
                    "its timeout: withdrawn, new associations are taken again",
                    request.get("id"), request.get("time"), request.get("timeout"),
                    EXPIRY_GRACE)
        try:
            spool.set_control(REQUEST, None)
            spool.set_control(ANSWER, None)
        except (sqlite3.Error, OSError) as exc:  # read again in 2 s: tried again then
            log.warning("Cannot withdraw the expired drain request in the spool: %s", exc)
        request = None
    set_draining(request is not None)
    if request is None:
        return False
    # Counted after refusing: nothing can open behind the count.
    try:
        spool.set_control(ANSWER, {"id": request.get("id"), "pid": os.getpid(),
                                   "time": time.time(), "active_inbound": active_inbound()})
    except (sqlite3.Error, OSError) as exc:  # a full disk: the command waits, then says so
        log.warning("Cannot answer the drain request in the spool: %s", exc)
    return True


def clear(spool: Spool) -> None:
    """A relay starting: whatever drain there was is over (blocking)."""
    try:
        spool.set_control(REQUEST, None)
        spool.set_control(ANSWER, None)
    except (sqlite3.Error, OSError) as exc:
        log.error("Cannot clear the last drain request in the spool (%s): new associations "
                  "stay rejected until `dicomcache relay drain --cancel` works", exc)


# --- the report (pure) -------------------------------------------------------------------------
@dataclass(frozen=True)
class DestinationReport:
    """One destination's part of the drain."""

    name: str
    configured: bool
    waiting_before: int
    delivered: int
    quarantined: int
    waiting: int
    why: str | None


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def why_waiting(d: dict[str, Any], now: float) -> str:
    """Why instances still wait for a destination (an entry of ``Spool.snapshot``)."""
    name = d.get("name", "")
    if not d.get("configured", True):
        return (f"not configured: configure it again, or move what waits with `dicomcache "
                f"relay reroute --from {name} --to NAME`")
    error = d.get("last_error")
    recent = error is not None and (d.get("last_success") is None or
                                    (d.get("last_error_time") or 0.0) >= d["last_success"])
    until = d.get("backing_off_until")
    if until is not None and until > now:
        return (f"backing off until {_when(until)}"
                + (f" after: {error}" if recent else ""))
    if recent:
        return f"last attempt failed: {error}"
    return "not sent yet"


def report(before: dict[str, Any], after: dict[str, Any], arrived: int) -> list[DestinationReport]:
    """Per destination, from ``Spool.snapshot`` before and after the drain and the number
    of instances received in between (queued for every configured destination)."""
    now = float(after.get("time", time.time()))
    rows: list[DestinationReport] = []
    names = list(dict.fromkeys([*before["destinations"], *after["destinations"]]))
    for name in names:
        b = before["destinations"].get(name, {})
        a = after["destinations"].get(name, {})
        configured = bool(a.get("configured", b.get("configured", True)))
        waiting_before = int(b.get("queue_depth", 0))
        waiting = int(a.get("queue_depth", 0))
        quarantined = max(0, int(a.get("quarantined", 0)) - int(b.get("quarantined", 0)))
        came = arrived if configured else 0
        delivered = max(0, waiting_before + came - waiting - quarantined)
        if not (waiting_before or waiting or delivered or quarantined or configured):
            continue
        rows.append(DestinationReport(
            name, configured, waiting_before, delivered, quarantined, waiting,
            why_waiting({**a, "name": name, "configured": configured}, now) if waiting
            else None))
    return rows


def exit_status(rows: Iterable[DestinationReport]) -> int:
    """0: nothing waits for any destination; 1: something does."""
    return 1 if any(r.waiting for r in rows) else 0


def format_rows(rows: list[DestinationReport]) -> list[str]:
    """The per-destination lines of the report."""
    width = max((len(r.name) for r in rows), default=0)
    lines = []
    for r in rows:
        line = (f"{r.name:<{width}}  delivered {r.delivered}, quarantined {r.quarantined}, "
                f"still waiting {r.waiting}")
        if r.why:
            line += f": {r.why}"
        lines.append(line)
    return lines


def as_json(rows: list[DestinationReport]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


# --- the command's side ----------------------------------------------------------------------
def configured_waiting(spool: Spool, names: list[str]) -> int:
    """Instances waiting for a configured destination (what a drain can deliver)."""
    snap = spool.snapshot(names, errors=0)
    return sum(int(snap["destinations"][n]["queue_depth"]) for n in names)


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on the relay's address (blocking)."""
    if port == 0:
        return False
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=2.0):
            return True
    except OSError:
        return False


def new_request(timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """A drain request; ``timeout`` (the command's ``--timeout``) dates its expiry."""
    return {"id": uuid.uuid4().hex, "time": time.time(), "pid": os.getpid(),
            "timeout": timeout}


@dataclass
class Waited:
    """How a wait for a running relay ended."""

    answered: bool = False
    relay_stopped: bool = False
    #: Inbound associations the relay last said were open.
    active_inbound: int = 0
    done: bool = False


def wait_running(spool: Spool, request: dict[str, Any], names: list[str], deadline: float,
                 relay_gone: Callable[[], bool], clock: Callable[[], float] = time.monotonic
                 ) -> Waited:
    """Wait (blocking, bounded by ``deadline`` on ``clock``) until the running relay
    answered, its inbound associations closed and nothing waits for a configured
    destination; or the relay stopped (``relay_gone``)."""
    w = Waited()
    asked = clock()
    while True:
        if relay_gone():
            w.relay_stopped = True
            return w
        got = spool.control(ANSWER)
        if got is not None and got.get("id") == request["id"]:
            w.answered = True
            w.active_inbound = int(got.get("active_inbound") or 0)
        if w.answered and w.active_inbound == 0 and configured_waiting(spool, names) == 0:
            w.done = True
            return w
        now = clock()
        if now >= deadline or (not w.answered and now - asked >= ANSWER_WITHIN):
            return w
        time.sleep(min(POLL, max(deadline - now, 0.0)))


async def deliver_stopped(settings: RelaySettings, spool: Spool, deadline: float,
                          audit: AuditLog | None) -> None:
    """With no relay running: the forwarders in this process until nothing waits for a
    configured destination or ``deadline`` (``loop.time()``); then stop them as the
    relay does (the instance in flight finishes, or is aborted 10 s later)."""
    loop = asyncio.get_running_loop()
    names = [d.name for d in settings.destinations]
    executor = ThreadPoolExecutor(max_workers=2 * len(names) + 2, thread_name_prefix="drain")
    metrics = Metrics()  # this process's own: nobody scrapes it
    forwarders = [Forwarder(settings, d, spool, metrics, executor, audit=audit)
                  for d in settings.destinations]
    tasks = [asyncio.create_task(fw.run(), name=f"drain-{fw.dest.name}") for fw in forwarders]
    try:
        while loop.time() < deadline:
            if await loop.run_in_executor(executor, configured_waiting, spool, names) == 0:
                break
            await asyncio.sleep(min(POLL, max(deadline - loop.time(), 0.0)))
    finally:
        for fw in forwarders:
            fw.request_stop()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=10.0)
            if pending:
                for fw in forwarders:
                    await loop.run_in_executor(executor, fw.abort)
                _, pending = await asyncio.wait(pending, timeout=5.0)
                for task in pending:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*pending, return_exceptions=True)
        executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(transcode.shutdown_pool)
