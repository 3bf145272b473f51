"""The forward queue's workers: one per destination.

Each worker loops: take the next due batch (the oldest pending study that is
not backing off, in arrival order, at most ``batch_size`` instances and 128
presentation contexts), send it with :class:`~.scu.StoreSCU` in a thread,
record every outcome in the spool as it comes, then back off:

* the **destination** (exponential, ``retry_backoff_base`` doubling up to
  ``retry_backoff_max``, with jitter: :mod:`.backoff`) when it is down,
  rejects the association or aborts;
* the **study**, the same way, when the peer answered a transient failure
  status for one of its instances: later instances of that study wait, other
  studies go on; an instance refused ``max_instance_retries`` times is
  quarantined.

Permanent failures are quarantined and do not hold the study back.

The association a batch ended on stays open for the next batch while it
serves it (:class:`~.scu.StoreSCU` ``keep_open``), and is released once it has
waited ``forward_idle_release`` seconds (at most half the ``timeout``, after
which pynetdicom would abort it as idle), when the forwarder stops (shutdown,
the end of a drain) and after a failure of the loop itself.

What a crash (``kill -9``, power cut of the process) can make the peer store
twice is bounded: an outcome is written to the spool by a recording thread
while the next instance is sent, and the one after waits until it is
written.  At any moment at most two instances the peer may have stored are
not yet recorded as delivered: the one being sent and the one being recorded.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from dicomcache.audit.record import FAILED, RELAY_FORWARD, SUCCESS, Actor, Record, Subject
from dicomcache.audit.trail import AuditLog
from dicomcache.config import DestinationSettings, RelaySettings
from dicomcache.metrics import Metrics
from dicomcache.relay import fallback as fb
from dicomcache.relay import negotiation as neg
from dicomcache.relay.backoff import refused_too_often, retry_delay
from dicomcache.relay.outcome import DELIVERED, QUARANTINED, RETRY, Outcome
from dicomcache.relay.scu import BatchReport, SendItem, StoreSCU
from dicomcache.relay.spool import QueueItem, Spool
from dicomcache.relay.transcode import encodable_syntaxes

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Instances a crash can make a destination store twice (see the module docstring).
DUPLICATES_AFTER_CRASH = 2
#: Longest idle sleep: new arrivals wake the worker earlier.
_IDLE = 5.0
#: While a modality is sending, a batch smaller than this waits for more (see
#: :func:`gather_delay`): each batch costs an association (its negotiation with
#: the PACS), and a forwarder that keeps pace with the SCP would otherwise send
#: two or three instances per association (measured: 73 associations for 200).
GATHER_TARGET = 32
#: ... until no instance arrived for this long (the modality paused or finished) ...
GATHER_QUIET = 0.05
#: ... or it waited this long for the batch.
GATHER_MAX = 0.25


def gather_delay(batch: int, batch_size: int, since_arrival: float, waited: float) -> float:
    """How much longer to wait before sending a batch of ``batch`` instances (0: send
    now), ``since_arrival`` seconds after the last instance was received and ``waited``
    seconds after the batch was first found (pure).

    A batch waits only while instances keep arriving (a pause of ``GATHER_QUIET``
    ends it), only while it is smaller than ``GATHER_TARGET`` and ``batch_size``, and
    ``GATHER_MAX`` at most: a study sent instance by instance goes out in batches of
    a few dozen, and the last instances of a study leave ``GATHER_QUIET`` after they
    arrived.
    """
    if batch >= min(GATHER_TARGET, batch_size) or since_arrival >= GATHER_QUIET:
        return 0.0
    return max(0.0, min(GATHER_QUIET - since_arrival, GATHER_MAX - waited))


class SpoolWriteError(OSError):
    """What a peer answered could not be recorded in the spool."""


class Forwarder:
    """Delivers the spool's queue for one destination."""

    def __init__(
        self,
        settings: RelaySettings,
        destination: DestinationSettings,
        spool: Spool,
        metrics: Metrics,
        executor: Executor,
        *,
        rng: random.Random | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.settings = settings
        self.dest = destination
        #: Every instance sent (or refused) is recorded: where it went, and the outcome.
        self.audit = audit
        d = destination
        self._where = f"{d.name} {d.remote_ae_title}@{d.remote_host}:{d.remote_port}"
        self._us = Actor(settings.ae_title, "relay", "dimse")
        self.spool = spool
        self.metrics = metrics
        self.executor = executor
        self.rng = rng or random.Random()
        self.scu = StoreSCU(settings.ae_title, destination, timeout=settings.timeout,
                            max_pdu=settings.max_pdu, metrics=metrics,
                            keep_open=settings.forward_idle_release > 0)
        #: An idle association is released after this long (pynetdicom aborts one idle for
        #: its network timeout: released well before).
        self.idle_release = min(settings.forward_idle_release, settings.timeout / 2)
        self._stopping = threading.Event()
        self._recorder = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix=f"record-{destination.name}")
        self._wakeup: asyncio.Event | None = None
        self.busy = False
        self.last_report: dict[str, Any] | None = None
        #: Outcomes the peer gave that the spool could not record (its disk full, an I/O
        #: error): nothing is sent until they are, or the same instances would be again.
        self._unrecorded: list[Outcome] = []
        #: Consecutive failures of the loop itself (the spool), for its back-off.
        self._failures = 0
        #: When (monotonic) :meth:`wake` was last called: an instance arrived.
        self._last_arrival = -float("inf")

    # --- control ---------------------------------------------------------------------
    def wake(self) -> None:
        """Something new may be due (call from the event loop)."""
        self._last_arrival = time.monotonic()
        if self._wakeup is not None:
            self._wakeup.set()

    def request_stop(self) -> None:
        """Finish the instance in flight, then release and stop."""
        self._stopping.set()
        self.wake()

    def abort(self) -> None:
        """Abort the association in progress (shutdown deadline passed)."""
        self.scu.abort()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args))

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` or until :meth:`wake`; no longer than until the open
        association is due for release (the loop then releases it)."""
        assert self._wakeup is not None
        self._wakeup.clear()
        idle = self.scu.idle_seconds()
        if idle is not None:
            seconds = min(seconds, self.idle_release - idle)
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=max(seconds, 0.0))
        except TimeoutError:
            pass

    async def _release_idle(self, *, now: bool = False) -> None:
        """Release the association kept open when it has waited ``idle_release`` for a
        batch (``now``: whatever its wait)."""
        idle = self.scu.idle_seconds()
        if idle is not None and (now or idle >= self.idle_release):
            await self._call(self.scu.close)

    async def run(self) -> None:
        """The worker loop; returns after :meth:`request_stop`."""
        self._wakeup = asyncio.Event()
        name = self.dest.name
        log.info("Forwarder for %s started", self.scu.peer)
        while not self._stopping.is_set():
            try:
                await self._release_idle()
                if not self.spool.is_open:  # a full disk at start-up: retried with back-off
                    await self._call(self.spool.ensure_open)
                if self._unrecorded:  # what the peer has must be written down first
                    await self._call(self._record_unrecorded)
                # Older copies a newer one replaced leave the spool (none is in flight here).
                await self._call(self.spool.finish_superseded, name)
                state = await self._call(self.spool.destination_state, name)
                wait = float(state["next_attempt"]) - time.time()
                if wait > 0:
                    await self._sleep(min(wait, _IDLE))
                    continue
                batch = await self._gathered(name)
                if not batch:
                    due = await self._call(self.spool.next_due, name)
                    idle = _IDLE if due is None else min(_IDLE, due - time.time())
                    await self._sleep(max(idle, 0.05))
                    continue
                self.busy = True
                try:
                    await self._call(self.deliver, batch)
                finally:
                    self.busy = False
                    await self._call(self.spool.release, name)
                self._failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Paused with a growing delay: a spool that cannot be written (full disk)
                # must never turn into the same batch sent again and again.
                self._failures += 1
                delay = retry_delay(self._failures, self.settings.retry_backoff_base,
                                    self.settings.retry_backoff_max, self.rng.random())
                if self._failures == 1:
                    log.exception("Forwarder for %s paused (%s); retrying in %.1f s", name,
                                  exc, delay)
                else:
                    log.error("Forwarder for %s still paused (%s, %d times); retrying in "
                              "%.1f s", name, exc, self._failures, delay)
                self.metrics.relay_forwarder_failures.labels(name).inc()
                await self._release_idle(now=True)  # the next batch negotiates afresh
                await self._sleep(delay)
        await self._release_idle(now=True)
        log.info("Forwarder for %s stopped", self.scu.peer)

    async def _gathered(self, name: str) -> list[QueueItem]:
        """The next batch, once :func:`gather_delay` says it has waited enough."""
        found = time.monotonic()
        while True:
            batch = await self._call(self.spool.next_batch, name, self.settings.batch_size)
            now = time.monotonic()
            delay = gather_delay(len(batch), self.settings.batch_size,
                                 now - self._last_arrival, now - found)
            if not batch or delay <= 0 or self._stopping.is_set():
                return batch
            await self._call(self.spool.release, name)
            # (not _sleep: every arrival would wake it to count the batch again)
            await asyncio.sleep(delay)

    def _record_unrecorded(self) -> None:
        """Write down what the peer answered before the spool failed (blocking); raises
        while it still cannot, and nothing is sent meanwhile."""
        self.spool.record(self.dest.name, list(self._unrecorded))
        log.warning("Forwarder for %s: %d outcome(s) recorded now that the spool takes "
                    "writes again", self.scu.peer, len(self._unrecorded))
        self._unrecorded = []

    # --- one batch (blocking, in a thread) ---------------------------------------------------
    def deliver(self, batch: list[QueueItem]) -> BatchReport:
        """Send one batch and record everything about it in the spool."""
        name = self.dest.name
        state = self.spool.destination_state(name)
        configured = self.dest.transfer_syntax_strategy
        if state["configured_strategy"] != configured:
            # A changed configuration starts afresh: what was learned was for the old one.
            self.spool.forget_learned(name)
            self.spool.update_destination(name, configured_strategy=configured,
                                          learned_strategy=None)
        table = {k: fb.Learned(*v) for k, v in self.spool.learned(name).items()}
        start = fb.batch_start(configured, [(q.sop_class, q.transfer_syntax) for q in batch],
                               table, time.time())
        sources = [neg.Source(q.sop_class, q.transfer_syntax, q.has_pixels) for q in batch]
        n = neg.fit_batch(start, sources, encodable=encodable_syntaxes(),
                          allow_lossy=self.dest.allow_lossy_recompression)
        batch = batch[:n]
        by_key = {q.instance_id: q for q in batch}
        items = [SendItem(q.instance_id, q.path, q.sop_class, q.sop_instance, q.transfer_syntax,
                          q.has_pixels) for q in batch]
        pending: list[tuple[Future[None], list[Outcome]]] = []
        unrecordable = threading.Event()

        def on_result(res: Outcome) -> None:
            attempts = by_key[res.key].attempts
            if res.outcome == RETRY and refused_too_often(
                    res.status, attempts, self.settings.max_instance_retries):
                res.outcome = QUARANTINED
                res.reason += f" (refused {attempts + 1} times: given up, max_instance_retries)"
            self._observe(res, by_key[res.key])
            # The previous outcome must be in the spool before the next instance goes
            # out: what a crash sends again is bounded (DUPLICATES_AFTER_CRASH).  It was
            # recorded by another thread while this one was sent (SQLite, unlinking
            # delivered files: off the send loop), so this seldom waits.
            for fut, _ in pending[-1:]:
                try:
                    fut.result()
                except Exception:  # the spool cannot be written: stop sending (below)
                    unrecordable.set()
            pending.append((self._recorder.submit(self.spool.record, name, [res]), [res]))

        def should_stop() -> bool:
            return self._stopping.is_set() or unrecordable.is_set()

        try:
            report = self.scu.send(items, start, should_stop=should_stop,
                                   on_result=on_result)
        finally:
            failed: list[Outcome] = []
            error: BaseException | None = None
            for fut, outcomes in pending:  # all recorded before the next batch is chosen
                try:
                    fut.result()
                except Exception as exc:  # the spool's disk or database: kept in memory
                    failed.extend(outcomes)
                    error = error or exc
            if failed:
                self._unrecorded.extend(failed)
                raise SpoolWriteError(f"{len(failed)} outcome(s) from {self.scu.peer} could "
                                      f"not be recorded in the spool: {error}") from error
        self.metrics.relay_attempts.labels(name).inc(report.associations)
        now = time.time()
        study = batch[0].study_uid
        retried = [r for r in report.results if r.outcome == RETRY]
        delivered = [r for r in report.results if r.outcome == DELIVERED]
        if report.destination_error:
            failures = int(state["failures"]) + 1
            delay = retry_delay(failures, self.settings.retry_backoff_base,
                                self.settings.retry_backoff_max, self.rng.random())
            self.spool.update_destination(name, failures=failures, next_attempt=now + delay,
                                          last_error=report.destination_error,
                                          last_error_time=now)
            log.warning("%s: %d instance(s) wait in the spool; next attempt in %.1f s",
                        report.destination_error, len(batch) - len(delivered), delay)
        elif retried:
            if delivered:  # progress: the study's back-off starts again from its base
                self.spool.clear_study_backoff(name, study)
            delay = self.spool.back_off_study(name, study, lambda failures: retry_delay(
                failures, self.settings.retry_backoff_base, self.settings.retry_backoff_max,
                self.rng.random()))
            log.warning("Study %s to %s postponed %.1f s: %s", study, self.scu.peer, delay,
                        retried[0].reason)
        elif delivered:
            self.spool.clear_study_backoff(name, study)
        if delivered and not report.destination_error:
            values: dict[str, Any] = {"failures": 0, "next_attempt": 0.0, "last_success": now}
            values["learned_strategy"] = self._learn(configured, table, batch, report, now)
            if report.accepted_syntaxes:
                values["learned_syntaxes"] = report.accepted_syntaxes
            self.spool.update_destination(name, **values)
        self.last_report = {
            "time": now, "study_uid": study, "instances": len(batch),
            "delivered": len(delivered), "retry": len(retried),
            "quarantined": sum(r.outcome == QUARANTINED for r in report.results),
            "not_attempted": len(report.not_attempted), "associations": report.associations,
            "destination_error": report.destination_error,
        }
        return report

    def _learn(self, configured: str, table: dict[fb.Key, fb.Learned],
               batch: list[QueueItem], report: BatchReport, now: float) -> str | None:
        """Record what this batch taught, per (SOP class, source syntax); returns the
        most recently learned strategy still held (``relay status``'s summary)."""
        by_key = {q.instance_id: (q.sop_class, q.transfer_syntax) for q in batch}
        delivered = [(by_key[r.key], r.strategy_used or configured)
                     for r in report.results if r.outcome == DELIVERED]
        changes = fb.learn(configured, table, delivered, report.refused_keys, now)
        self.spool.update_learned(self.dest.name, {
            k: None if v is None else (v.strategy, v.since, v.batches)
            for k, v in changes.items()})
        for (sop_class, syntax), value in changes.items():
            if value is not None and value.since == now:
                log.warning("Learned strategy for %s: '%s' for %s in %s (next batches of "
                            "these start there; the configured '%s' is tried again after "
                            "%d s or %d batches)", self.scu.peer, value.strategy,
                            neg.sop_class_name(sop_class), syntax, configured,
                            fb.REPROBE_AFTER_SECONDS, fb.REPROBE_AFTER_BATCHES)
            elif value is None:
                log.info("Configured strategy '%s' works again for %s: %s in %s",
                         configured, self.scu.peer, neg.sop_class_name(sop_class), syntax)
        table = {**table, **{k: v for k, v in changes.items() if v is not None}}
        for k in [k for k, v in changes.items() if v is None]:
            table.pop(k, None)
        return max(table.values(), key=lambda v: v.since).strategy if table else None

    def _observe(self, res: Outcome, item: QueueItem) -> None:
        name = self.dest.name
        m = self.metrics
        if self.audit is not None:
            self.audit.submit(Record(
                RELAY_FORWARD, self._us,
                Subject(study_uid=item.study_uid or None, sop_uid=item.sop_instance,
                        sop_class=item.sop_class),
                SUCCESS if res.outcome == DELIVERED else FAILED, status=res.status,
                dimse=True, bytes=item.size if res.outcome == DELIVERED else 0,
                seconds=res.seconds, time=time.time() - res.seconds,
                destination=self._where,
                detail=None if res.outcome == DELIVERED else f"{res.outcome}: {res.reason}"))
        m.relay_forwarded.labels(name, res.outcome).inc()
        m.relay_forward_seconds.labels(name).observe(res.seconds)
        if res.outcome == DELIVERED:
            m.relay_strategy.labels(name, res.strategy_used or "", res.transfer_syntax or "").inc()
            if res.transcoded:
                m.relay_transcoded.labels(item.transfer_syntax, res.transfer_syntax or "").inc()
            log.debug("C-STORE successful: %s to %s, strategy_used=%s attempts_made=%d "
                      "transfer_syntax=%s status=0x%04X %.1f ms", item.sop_instance,
                      self.scu.peer, res.strategy_used, res.attempts_made, res.transfer_syntax,
                      res.status or 0, res.seconds * 1000)
        elif res.outcome == QUARANTINED:
            log.error("Quarantined %s for %s: %s", item.sop_instance, self.scu.peer, res.reason)
