"""The relay as one component: SCP + spool + one forwarder per destination.

``Relay(settings.relay, metrics)`` is started and stopped by the application
(``cleanup_ctx``), or alone by ``dicomcache relay run`` (what the kill -9
tests and the benchmark use).  :meth:`Relay.start` installs the speed-ups of
:mod:`.accel` when ``accelerate`` is on.

The SCP runs in this process; the forwarders run in a child process
(:mod:`.worker`) sharing the spool, so that pynetdicom's pure-Python sending
does not take the GIL from the receiving side (``forward_in_process=True``
keeps them here, for debugging).  Their logs and metrics come back to this
process.

Shutdown (:meth:`Relay.stop`): stop accepting associations and let the
in-flight ones finish (an aborted C-STORE was never acknowledged, so the
modality resends it); ask the forwarders to stop after the instance in
flight; abort what is still running at the deadline (and kill the child
process if it still runs).  Nothing acknowledged is lost: it is in the spool
and is forwarded after the next start.

While it runs the relay holds a shared lock on the spool (``relay.lock``) and
reads ``dicomcache relay drain``'s request every 2 s (:mod:`.drain`): then its
SCP rejects new associations (transient) until it restarts.

A full spool disk does not stop the relay from starting (:mod:`.space`): it
runs with C-STOREs refused (0xA700) and opens the spool as soon as it can
(checked every 2 s), then takes C-STOREs again by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dicomcache.audit.record import FAILED, RELAY_FORWARD, Actor, Record, Subject
from dicomcache.audit.trail import AuditLog
from dicomcache.config import RelaySettings
from dicomcache.metrics import Metrics
from dicomcache.relay import accel, drain, space, transcode
from dicomcache.relay.forward import Forwarder
from dicomcache.relay.scp import StoreSCP
from dicomcache.relay.spool import Spool, SpoolUnavailable, Superseded, utc_text
from dicomcache.relay.worker import ForwarderProcess

log = logging.getLogger(__name__)

_STATS_EVERY = 2.0


class Relay:
    """The DIMSE relay (see the module docstring)."""

    def __init__(self, settings: RelaySettings, metrics: Metrics, *,
                 forward_in_process: bool = False, audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        #: This process's audit trail: receipts here; the forwarder process opens its own
        #: writer on the same file (shared by ``flock``).
        self.audit = audit
        self.spool = Spool(settings.spool_directory, [d.name for d in settings.destinations],
                           retention=settings.retention)
        in_process = forward_in_process or not settings.destinations
        self.executor = ThreadPoolExecutor(
            max_workers=(2 * len(settings.destinations) if in_process else 0) + 4,
            thread_name_prefix="relay")
        self.scp = StoreSCP(settings, self.spool, metrics, audit)
        self.forwarders = [Forwarder(settings, d, self.spool, metrics, self.executor,
                                     audit=audit)
                           for d in settings.destinations] if in_process else []
        self.worker = None if in_process else ForwarderProcess(
            settings, metrics, audit=audit.settings if audit is not None else None)
        self._tasks: list[asyncio.Task[None]] = []
        self._stats_task: asyncio.Task[None] | None = None
        self._snapshot: dict[str, Any] = {}
        self._intake: dict[str, Any] = {}
        self._started: float | None = None
        #: The shared lock on the spool that says "a relay runs" (:mod:`.drain`).
        self._lock_fd: int | None = None

    @property
    def port(self) -> int:
        return self.scp.port

    async def start(self) -> None:
        """Install the speed-ups (``accelerate``), open the spool (recovering from a
        crash), start the forwarders and the SCP."""
        loop = asyncio.get_running_loop()
        if self.settings.accelerate:
            accel.install(self.settings.max_pdu)
        self._lock_fd = await loop.run_in_executor(self.executor, drain.lock_running,
                                                   self.settings.spool_directory)
        try:
            await loop.run_in_executor(self.executor, self.spool.open)
            # A drain requested of the relay that ran before is over: this one takes
            # associations (after an upgrade, the new version).
            await loop.run_in_executor(self.executor, drain.clear, self.spool)
        except SpoolUnavailable as exc:
            log.error("Relay spool %s cannot be opened: its file system is full (%s). The "
                      "relay starts without taking C-STOREs (answered 0xA700); nothing "
                      "spooled is lost or changed; it opens the spool and takes C-STOREs "
                      "again by itself once there is room", self.settings.spool_directory,
                      exc)

        def wake_all() -> None:
            for fw in self.forwarders:
                fw.wake()

        def on_put() -> None:  # from pynetdicom's threads
            loop.call_soon_threadsafe(wake_all)

        self.spool.on_superseded = self._audit_superseded
        if self.worker is not None:
            await loop.run_in_executor(self.executor, self.worker.start)
            self.spool.on_put = self.worker.wake
        else:
            self.spool.on_put = on_put
        for fw in self.forwarders:
            self._tasks.append(asyncio.create_task(fw.run(), name=f"relay-{fw.dest.name}"))
        await loop.run_in_executor(self.executor, self.scp.start)
        self._started = time.time()
        await self._refresh()
        self._stats_task = asyncio.create_task(self._stats_loop(), name="relay-stats")

    def _audit_superseded(self, copies: list[Superseded]) -> None:
        """An older copy a newer one replaced is never sent: the audit trail says so, as a
        forward that did not happen (from pynetdicom's threads); counted per destination."""
        for c in copies:
            self.metrics.relay_superseded.labels(c.destination).inc()
        if self.audit is None:
            return
        where = {d.name: f"{d.name} {d.remote_ae_title}@{d.remote_host}:{d.remote_port}"
                 for d in self.settings.destinations}
        us = Actor(self.settings.ae_title, "relay", "dimse")
        for c in copies:
            self.audit.submit(Record(
                RELAY_FORWARD, us, Subject(study_uid=c.study_uid or None,
                                           sop_uid=c.sop_instance, sop_class=c.sop_class),
                FAILED, dimse=True, destination=where.get(c.destination, c.destination),
                detail=f"superseded: a newer copy received {utc_text(c.newer_received)} from "
                       f"{c.newer_calling_ae or 'unknown AE'!r} replaces the copy received "
                       f"{utc_text(c.received)}, which is not sent"))

    async def reload_tls(self) -> None:
        """SIGHUP: the SCP's certificate read again for new associations (destinations'
        files are read at each association anyway)."""
        await asyncio.get_running_loop().run_in_executor(self.executor, self.scp.reload_tls)

    async def stop(self, grace: float) -> None:
        """Graceful stop within ``grace`` seconds (see the module docstring)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(grace, 0.0)
        # 1. No new associations; in-flight ones may finish (half the time at most).
        await loop.run_in_executor(self.executor, self.scp.stop, grace / 2)
        # 2. Forwarders finish the instance in flight and release.
        if self.worker is not None:
            await self._stop_worker(self.worker, deadline)
        for fw in self.forwarders:
            fw.request_stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks,
                                            timeout=max(deadline - loop.time(), 0.1))
            if pending:
                log.warning("Aborting %d forward association(s) at the shutdown deadline",
                            len(pending))
                for fw in self.forwarders:
                    fw.abort()
                _, pending = await asyncio.wait(pending, timeout=5.0)
                for task in pending:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*pending, return_exceptions=True)
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        await loop.run_in_executor(self.executor, self.spool.close)
        drain.unlock(self._lock_fd)
        self._lock_fd = None
        self.executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(transcode.shutdown_pool)
        log.info("Relay stopped")

    async def _stop_worker(self, worker: ForwarderProcess, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        worker.request_stop()
        if await loop.run_in_executor(self.executor, worker.wait,
                                      max(deadline - loop.time(), 0.1)):
            return
        log.warning("Aborting forward association(s) at the shutdown deadline")
        worker.abort()
        if not await loop.run_in_executor(self.executor, worker.wait, 5.0):
            worker.kill()
            await loop.run_in_executor(self.executor, worker.wait, 5.0)

    def _forwarder_status(self) -> dict[str, Any]:
        if self.worker is not None:
            return {name: dict(st) for name, st in self.worker.status.items()}
        return {fw.dest.name: {"busy": fw.busy, "last_batch": fw.last_report}
                for fw in self.forwarders}

    def status(self) -> dict[str, Any]:
        """JSON-able state for the status page (queue figures refresh every 2 s)."""
        return {
            "intake": self._intake,
            "ae_title": self.settings.ae_title,
            "listening": f"{self.settings.host}:{self.port}",
            "started": self._started,
            "active_inbound_associations": self.scp.active(),
            "draining": self.scp.draining,
            "tls": self.scp.tls.status() if self.scp.tls is not None else None,
            "forwarders": self._forwarder_status(),
            **self._snapshot,
        }

    def _check_room(self) -> dict[str, Any]:
        """Open the spool if it could not be (blocking), set the reserve aside again when
        there is room, and say whether C-STOREs are taken."""
        try:
            if self.spool.ensure_open():
                log.warning("Relay spool %s opened: there is room again",
                            self.settings.spool_directory)
                drain.clear(self.spool)
                if self.worker is not None:
                    self.worker.wake()
        except SpoolUnavailable:
            pass
        if self.spool.is_open:
            self.spool.make_reserve()
            drain.answer(self.spool, self.scp.active, self._set_draining)
        return intake(self.spool, self.settings.min_free, self.scp.last_refused_size)

    def _set_draining(self, draining: bool) -> None:
        if draining != self.scp.draining:
            if draining:
                log.warning("Draining (`dicomcache relay drain`): new associations are "
                            "rejected (transient, temporary congestion) until the relay "
                            "restarts or the drain is cancelled; the spool is delivered")
            else:
                log.warning("Drain over: taking associations again")
        self.scp.draining = draining

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        self._intake = await loop.run_in_executor(self.executor, self._check_room)
        if self._intake["free_bytes"] is not None:
            self.metrics.relay_spool_free.set(self._intake["free_bytes"])
        if not self.spool.is_open:
            return
        snap = await loop.run_in_executor(
            self.executor, self.spool.snapshot, [d.name for d in self.settings.destinations])
        self._snapshot = snap
        self.metrics.relay_spooled.set(snap["spooled_instances"])
        for name, d in snap["destinations"].items():
            self.metrics.relay_queue_depth.labels(name).set(d["queue_depth"])
            self.metrics.relay_oldest_age.labels(name).set(d["oldest_age_seconds"] or 0.0)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(_STATS_EVERY)
            try:
                await self._refresh()
                if self.spool.is_open:
                    await asyncio.get_running_loop().run_in_executor(self.executor,
                                                                     self.spool.purge)
            except Exception:
                log.exception("Refreshing relay statistics failed")


def intake(spool: Spool, min_free: int, size: int = 0) -> dict[str, Any]:
    """Whether C-STOREs are taken now, and why not (``relay status``, the status page):
    would one of ``size`` bytes (the last one refused, if any) be taken?"""
    room = spool.room()
    refused = space.refusal(room, size, min_free)
    return {"accepting": refused is None,
            "refusing": None if refused is None else refused.message,
            "free_bytes": room.free, "min_free": min_free,
            "reserve_held": room.reserve_held, "spool_open": room.spool_open}
