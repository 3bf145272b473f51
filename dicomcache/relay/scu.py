"""Sending a batch of instances to one destination (blocking; run it in a thread).

One call of :meth:`StoreSCU.send` is one batch (normally: the pending
instances of one study): one association per strategy tried, instances sent
in order, the fallback sequence walked when an association yields no usable
context for the next instance (the decisions are :mod:`.fallback`'s).  Nothing
here touches the spool: the result (:class:`BatchReport`) says what happened
to each instance, and the caller records it.  ``dicomcache relay send`` uses
the same class.

With ``keep_open`` (the forwarder, ``[relay] forward_idle_release`` > 0) the
association a batch ended on stays open for the next batch, which uses it
when it serves that batch as a new association would (:func:`.fallback.reuse`);
otherwise it is released and a new one negotiated.  Negotiating took ~40 % of
the forwarder's CPU when each batch had its own association (bench/README.md).
It is released, never kept, after a batch that ended on an error or a transient
refusal, or with a stop asked for; the caller releases it when it has been idle
long enough, and on shutdown (:meth:`StoreSCU.close`).  One the peer released,
aborted or closed while idle is dropped before use; if the peer closed it just
as the next batch began, that batch's first C-STORE gets no answer: it is sent
again on a new association at once, not counted as a failure of the peer
(the peer may then store that one instance twice, if it stored it and closed
without answering; a duplicate SOP Instance is an overwrite to a PACS).
At most one association per destination is open at a time, kept or not.

Each instance's :class:`~.outcome.Outcome` follows the peer's status
(:func:`~.outcome.classify`, PS3.4 B.2.3): a warning is stored, so delivered
(logged; resending would store it again).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomcache import tls
from dicomcache.config import DestinationSettings
from dicomcache.metrics import Metrics
from dicomcache.relay import fallback as fb
from dicomcache.relay import negotiation as neg
from dicomcache.relay.outcome import DELIVERED, QUARANTINED, RETRY, Outcome, classify
from dicomcache.relay.transcode import TranscodeError, encodable_syntaxes, transcode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SendItem:
    """One instance to send: a Part-10 file and what negotiation needs."""

    key: int
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    has_pixels: bool = True

    @property
    def source(self) -> neg.Source:
        return neg.Source(self.sop_class, self.transfer_syntax, self.has_pixels)


@dataclass(slots=True)
class BatchReport:
    """The outcome of one :meth:`StoreSCU.send` call."""

    results: list[Outcome] = field(default_factory=list)
    #: Association-level failure (peer down, rejected, aborted): back off the destination.
    destination_error: str | None = None
    #: Set when a fallback strategy was needed and worked: start there next time.
    learned_strategy: str | None = None
    #: SOP class → transfer syntaxes the peer accepted (last association that sent something).
    accepted_syntaxes: dict[str, list[str]] = field(default_factory=dict)
    associations: int = 0
    #: Keys not attempted (stop requested or the association failed before them).
    not_attempted: list[int] = field(default_factory=list)
    #: (SOP class, source transfer syntax) of the instances the peer refused at some
    #: strategy of this batch (they needed a fallback or a widening): what they were
    #: then delivered with is worth learning (:func:`.fallback.learn`).
    refused_keys: set[tuple[str, str]] = field(default_factory=set)


def _tune_socket(assoc: Association, timeout: float) -> None:
    """TCP_NODELAY and a send timeout on an established association's socket.

    pynetdicom sets neither on a requestor's socket: without TCP_NODELAY each
    message waits for Nagle's algorithm (~40 ms); without a timeout a PACS that
    stops reading holds the sending thread for ever.
    """
    try:
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if sock.gettimeout() is None:
                sock.settimeout(timeout)
    except OSError:  # the connection may already be gone; sending will say so
        pass


def _context_results(assoc: Association) -> tuple[neg.ContextResult, ...]:
    """How the peer answered each context we proposed (PS3.8 §9.3.3.2), from the
    A-ASSOCIATE-AC: accepted ones 0, the others their result (1-4)."""
    proposed = {cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.requestor.requested_contexts if cx.transfer_syntax}
    out = [neg.ContextResult(*proposed[cx.context_id], neg.ACCEPTANCE)
           for cx in assoc.accepted_contexts if cx.context_id in proposed]
    out += [neg.ContextResult(*proposed[cx.context_id], int(cx.result))
            for cx in assoc.rejected_contexts
            if cx.context_id in proposed and cx.result is not None]
    return tuple(out)


def _association_outcome(assoc: Association) -> fb.AssociationOutcome:
    """How pynetdicom's association attempt ended, as :mod:`.fallback` knows it."""
    if assoc.is_established:
        return fb.Established()
    rsp = assoc.acceptor.primitive
    if assoc.is_rejected:
        return fb.Rejected(getattr(rsp, "result", None), getattr(rsp, "result_source", None),
                           getattr(rsp, "diagnostic", None))
    if rsp is not None and getattr(rsp, "result", None) == 0 and not assoc.accepted_contexts:
        # The peer answered A-ASSOCIATE-AC but accepted no context (pynetdicom then
        # aborts): that is "no usable context", not "peer down".
        return fb.NoContextAccepted(_context_results(assoc))
    return fb.Failed()


@dataclass(slots=True)
class _Kept:
    """The association kept open after a batch, with what it was negotiated for."""

    assoc: Association
    proposed: frozenset[neg.Proposal]
    accepted: tuple[neg.Accepted, ...]
    #: When its last batch ended (monotonic).
    since: float


def _accepted(assoc: Association) -> tuple[neg.Accepted, ...]:
    return tuple(neg.Accepted(int(cx.context_id or 0), str(cx.abstract_syntax),
                              str(cx.transfer_syntax[0]))
                 for cx in assoc.accepted_contexts)


def _key(item: SendItem) -> tuple[str, str]:
    """What a destination learns a strategy for: (SOP class, source transfer syntax)."""
    return (item.sop_class, item.transfer_syntax)


@dataclass(slots=True)
class _Batch:
    """One :meth:`StoreSCU.send` call's state, shared by every association it uses."""

    pending: deque[SendItem]
    report: BatchReport
    #: Each outcome as it comes (records it; the caller may turn a retry into quarantined).
    done: Callable[[Outcome], None]
    should_stop: Callable[[], bool]
    #: SOP class → syntaxes the peer accepted in any association of this batch.
    seen: dict[str, set[str]] = field(default_factory=dict)
    #: SOP class → the results the peer gave its contexts in this batch (PS3.8 §9.3.3.2).
    refused: dict[str, set[int]] = field(default_factory=dict)

    def give_up_rest(self) -> None:
        """The rest is not attempted in this batch (it stays pending in the spool)."""
        self.report.not_attempted.extend(i.key for i in self.pending)
        self.pending.clear()


class StoreSCU:
    """C-STORE SCU for one destination with strategy fallback and transcoding."""

    def __init__(
        self,
        calling_ae: str,
        destination: DestinationSettings,
        *,
        timeout: float = 30.0,
        max_pdu: int = 131072,
        metrics: Metrics | None = None,
        encodable: frozenset[str] | None = None,
        keep_open: bool = False,
    ) -> None:
        self.calling_ae = calling_ae
        self.dest = destination
        self.timeout = timeout
        self.max_pdu = max_pdu
        self.metrics = metrics
        self.encodable = encodable_syntaxes() if encodable is None else encodable
        #: Keep the association a batch ended on for the next one (see the module docstring).
        self.keep_open = keep_open
        #: The association in use or kept open (for :meth:`abort`).
        self._assoc: Association | None = None
        self._kept: _Kept | None = None
        self._lock = threading.Lock()
        #: Each association's own socket, from EVT_CONN_OPEN, so it is closed for sure.
        self._sockets: dict[int, socket.socket] = {}

    @property
    def peer(self) -> str:
        d = self.dest
        return f"{d.name} ({d.remote_ae_title}@{d.remote_host}:{d.remote_port})"

    def abort(self) -> None:
        """Abort the association in progress or kept open (from another thread: shutdown
        deadline); the next batch negotiates afresh."""
        with self._lock:
            assoc = self._assoc
        if assoc is not None and assoc.is_established:
            assoc.abort()

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.relay_associations.labels("outbound", outcome).inc()

    def _proposals(self, walk: fb.Walk, items: Sequence[SendItem]) -> list[neg.Proposal]:
        """What an association at ``walk``'s strategy proposes for ``items``."""
        return neg.propose(walk.strategy, [i.source for i in items], encodable=self.encodable,
                           allow_lossy=self.dest.allow_lossy_recompression,
                           probe=walk.probe)[: neg.MAX_CONTEXTS]

    def _associate(self, walk: fb.Walk, proposals: Sequence[neg.Proposal]) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10.0)
        contexts = [build_context(p.abstract_syntax, [p.transfer_syntax]) for p in proposals]
        assoc = ae.associate(self.dest.remote_host, self.dest.remote_port, contexts=contexts,
                             ae_title=self.dest.remote_ae_title, max_pdu=self.max_pdu,
                             tls_args=self._tls_args(),
                             evt_handlers=self._socket_handlers())
        with self._lock:
            self._assoc = assoc
        if not assoc.is_established:
            self._close_socket(assoc)
        return assoc

    def _socket_handlers(self) -> list[EventHandlerType]:
        return [(evt.EVT_CONN_OPEN, self._conn_open),
                (evt.EVT_CONN_CLOSE, lambda event: self._close_socket(event.assoc))]

    def _conn_open(self, event: Any) -> None:
        """From the first byte: pynetdicom reads a PDU's rest with a blocking ``recv``
        and leaves a requestor's socket without a timeout, so a PACS that sends part of
        its A-ASSOCIATE-AC and stalls held the forwarder for ever (and pynetdicom's
        abort after the ACSE timeout then spun on it).  The socket is kept for
        :meth:`_close_socket`."""
        try:
            raw = event.assoc.dul.socket.socket
        except AttributeError:
            return
        if raw is None:
            return
        with self._lock:
            self._sockets[id(event.assoc)] = raw
        try:
            if raw.gettimeout() is None:
                raw.settimeout(self.timeout)
        except OSError:
            pass

    def _close_socket(self, assoc: Association) -> None:
        """Close an ended association's socket.  pynetdicom closes it only when
        ``shutdown()`` succeeds; after a reset by the peer that raises ENOTCONN and the
        descriptor stayed open until garbage collection (one per reset, under a
        PACS that resets every attempt).  Idempotent."""
        with self._lock:
            raw = self._sockets.pop(id(assoc), None)
        if raw is not None:
            raw.close()

    def _tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        """DICOM TLS towards this peer, or None.  The context is built for each
        association (milliseconds, once per batch), so renewed files are picked up
        without a restart; a file that no longer loads fails this association like
        an unreachable peer (:class:`~dicomcache.tls.TLSFileError`; the batch is retried
        with back-off, nothing is lost)."""
        d = self.dest
        if not d.tls:
            return None
        ctx = tls.client_context(d.tls_ca_file, d.tls_certificate, d.tls_key)
        return ctx, d.tls_server_name or d.remote_host

    def echo(self) -> str | None:
        """One C-ECHO over a Verification association, as the forwarder would open it
        (our AE title, TLS, timeouts): ``None`` when the peer answered success, else
        why not, for people (``check-config --online``)."""
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10.0)
        ae.add_requested_context(Verification)
        try:
            assoc = ae.associate(self.dest.remote_host, self.dest.remote_port,
                                 ae_title=self.dest.remote_ae_title, max_pdu=self.max_pdu,
                                 tls_args=self._tls_args(),
                                 evt_handlers=self._socket_handlers())
        except tls.TLSFileError as exc:
            return f"DICOM TLS cannot start: {exc}"
        if not assoc.is_established:
            self._close_socket(assoc)
            outcome = _association_outcome(assoc)
            if isinstance(outcome, fb.Rejected):
                return (f"association rejected (result {outcome.result}, source "
                        f"{outcome.source}, reason {outcome.diagnostic}): is our AE title "
                        f"{self.calling_ae!r} known to the peer as a sender?")
            if isinstance(outcome, fb.NoContextAccepted):
                return "the peer accepts no Verification (C-ECHO) context"
            return "no association (peer down, wrong host/port, or a TLS mismatch)"
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
            self._close_socket(assoc)
        code = getattr(status, "Status", None)
        if code == 0x0000:
            return None
        return "no C-ECHO answer" if code is None else f"C-ECHO answered 0x{code:04X}"

    def _release(self, assoc: Association) -> None:
        with self._lock:
            self._assoc = None
        if assoc.is_established:
            assoc.release()
        self._close_socket(assoc)

    def _drop(self, assoc: Association) -> None:
        """End an association that cannot be trusted any more (the peer closed it, or
        sent something unasked while it was idle): A-ABORT if still up."""
        with self._lock:
            self._assoc = None
        if assoc.is_established:
            assoc.abort()
        self._close_socket(assoc)

    def idle_seconds(self) -> float | None:
        """How long the association kept open has waited for a batch (None: none is)."""
        with self._lock:
            kept = self._kept
        return None if kept is None else time.monotonic() - kept.since

    def close(self) -> None:
        """Release the association kept open, if any (idle for long enough, shutdown,
        drain, an error of the caller's).  Blocking; never raises."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is None:
            return
        try:
            if self._alive(kept.assoc):
                log.debug("Releasing the idle association with %s", self.peer)
                self._release(kept.assoc)
            else:
                self._drop(kept.assoc)
        except Exception:  # pynetdicom on a broken socket: gone either way
            log.exception("Releasing the association with %s failed", self.peer)
            self._close_socket(kept.assoc)

    def _alive(self, assoc: Association) -> bool:
        """Whether an idle association can carry the next batch: established, its DUL
        running, and nothing waiting on its socket (a peer says nothing unasked
        between batches: readable means its A-RELEASE-RQ, A-ABORT or a closed
        connection that pynetdicom has not handled yet)."""
        if not assoc.is_established or not assoc.dul.is_alive():
            return False
        with self._lock:
            raw = self._sockets.get(id(assoc))
        if raw is None:
            return False
        try:
            readable, _, _ = select.select([raw], [], [], 0)
        except (OSError, ValueError):  # closed meanwhile
            return False
        return not readable

    def _take_kept(self, items: Sequence[SendItem], wanted: Sequence[neg.Proposal]
                   ) -> tuple[_Kept, tuple[neg.Accepted, ...]] | None:
        """The association kept from the last batch with the contexts to use for this
        one (:func:`.fallback.reuse`), or None after releasing (or dropping) it."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is None:
            return None
        if not self._alive(kept.assoc):
            log.info("The idle association with %s was ended by the peer: negotiating a "
                     "new one", self.peer)
            self._drop(kept.assoc)
            return None
        usable = fb.reuse(kept.proposed, kept.accepted, wanted, [i.source for i in items],
                          encodable=self.encodable,
                          allow_lossy=self.dest.allow_lossy_recompression)
        if usable is None:
            log.debug("The open association with %s does not serve the next batch: "
                      "releasing it, negotiating a new one", self.peer)
            self._release(kept.assoc)
            return None
        return kept, usable

    def send(
        self,
        items: Sequence[SendItem],
        start_strategy: str | None = None,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_result: Callable[[Outcome], None] | None = None,
    ) -> BatchReport:
        """Send ``items`` in order; never raises for network or data problems.

        ``start_strategy``: where to start (the forwarder's
        :func:`~.fallback.batch_start`: what was learned for these instances, or the
        configured strategy; None: the configured one).  ``on_result`` sees each
        outcome as it comes and may turn a ``retry`` into ``quarantined`` (the
        forwarder's retry limit): the batch then goes on.  What to do next is
        :mod:`.fallback`'s decision; this method only performs it.
        """
        # Spooled files go out as they are (no decode/re-encode) when the peer accepted
        # their own syntax.  A process-wide pynetdicom switch; it only affects
        # send_c_store called with a *path*, which only this class does.
        _config.STORE_SEND_CHUNKED_DATASET = True
        report = BatchReport()
        walk = fb.Walk.start(self.dest.transfer_syntax_strategy, start_strategy,
                             self.dest.max_association_retries)
        def done(res: Outcome) -> None:
            report.results.append(res)
            if on_result is not None:
                on_result(res)

        batch = _Batch(deque(items), report, done, should_stop)
        try:
            self._walk(walk, batch)
        except BaseException:
            # (on_result raised: the spool, the caller's): nothing is left open behind it.
            with self._lock:
                assoc, self._kept = self._assoc, None
            if assoc is not None:
                self._drop(assoc)
            raise
        delivered = [r for r in report.results if r.outcome == DELIVERED]
        if delivered:
            strategies = sorted({r.strategy_used or "" for r in delivered})
            syntaxes = sorted({r.transfer_syntax or "" for r in delivered})
            log.info("C-STORE successful: %d instance(s) to %s using %s strategy "
                     "(attempts made: %d, transfer syntaxes: %s, transcoded: %d)",
                     len(delivered), self.peer, "/".join(repr(s) for s in strategies),
                     max(r.attempts_made for r in delivered), syntaxes,
                     sum(r.transcoded for r in delivered))
        return report

    def _walk(self, walk: fb.Walk, batch: _Batch) -> None:
        """:meth:`send`'s loop: one association per strategy tried (the first may be the
        one kept open from the last batch)."""
        pending, report = batch.pending, batch.report
        reusable = True
        while pending:
            if batch.should_stop():
                batch.give_up_rest()
                break
            if walk.attempts > 1:
                log.warning("%s", fb.fallback_message(walk, self.peer, len(pending),
                                                      pending[0].sop_class))
            proposals = self._proposals(walk, pending)
            kept = self._take_kept(pending, proposals) if reusable else None
            reusable = False  # only at the batch's start: its walk is where a new one starts
            if kept is not None:
                old, usable = kept
                walk, stale = self._send_on(old.assoc, proposals, usable, walk, batch, reused=old)
                if stale:
                    log.info("The association kept open with %s was closed by the peer as "
                             "the batch began: sending again on a new one", self.peer)
                continue
            report.associations += 1
            try:
                assoc = self._associate(walk, proposals)
            except tls.TLSFileError as exc:
                report.destination_error = f"DICOM TLS towards {self.peer} cannot start: {exc}"
                log.error("%s", report.destination_error)
                batch.give_up_rest()
                break
            n_contexts = len(proposals)
            outcome = _association_outcome(assoc)
            for sop_class, codes in fb.refusals(_context_results(assoc)).items():
                batch.refused.setdefault(sop_class, set()).update(codes - {neg.ACCEPTANCE})
            step = fb.after_association(walk, outcome, peer=self.peer, n_contexts=n_contexts,
                                        sources=[i.source for i in pending])
            if not isinstance(step, fb.UseAssociation):
                self._count("rejected" if isinstance(outcome, fb.Rejected) else "failed")
                with self._lock:
                    self._assoc = None
            if isinstance(step, fb.FallBack):
                if step.warning:
                    log.warning("%s", step.warning)
                report.refused_keys.update(_key(i) for i in pending)
                walk = step.walk
            elif isinstance(step, fb.QuarantineRest):
                while pending:
                    item = pending.popleft()
                    self._quarantine(item, walk, fb.no_context(item.sop_class, batch.seen,
                                                               batch.refused, self.encodable),
                                     batch.done)
                break
            elif isinstance(step, fb.DestinationError):
                log.warning("%s", step.message)
                report.destination_error = step.message
                batch.give_up_rest()
                break
            else:
                self._count("established")
                _tune_socket(assoc, self.timeout)
                walk, _ = self._send_on(assoc, proposals, _accepted(assoc), walk, batch)

    def _send_on(
        self,
        assoc: Association,
        proposals: Sequence[neg.Proposal],
        accepted: Sequence[neg.Accepted],
        walk: fb.Walk,
        batch: _Batch,
        *,
        reused: _Kept | None = None,
    ) -> tuple[fb.Walk, bool]:
        """Send the batch's pending instances in order on an established association
        (negotiated for ``proposals``; ``accepted``: its contexts to use), until none is
        left, a stop is asked for, the batch ends, or the next instance needs a fallback;
        then keep it open for the next batch or release it (:meth:`_finish`).

        ``reused``: it was kept open from an earlier batch (kept again as negotiated
        then).  Returns the walk to go on with, and whether such an association was
        found closed by the peer at its first C-STORE: that instance is back at the
        head of the pending ones, nothing recorded for it (no answer came: it is sent
        again on a new association)."""
        pending, report = batch.pending, batch.report
        negotiated = (reused.proposed, reused.accepted) if reused else (proposals, accepted)
        first_on_kept = reused is not None
        by_class: dict[str, set[str]] = {}
        for acc in accepted:
            by_class.setdefault(acc.abstract_syntax, set()).add(acc.transfer_syntax)
        for sop_class, syntaxes in by_class.items():
            batch.seen.setdefault(sop_class, set()).update(syntaxes)
        proposed = {p.abstract_syntax for p in proposals}
        sent = 0
        clean = True  # no transient refusal, no broken association: worth keeping
        after = walk
        while pending and not batch.should_stop():
            item = pending[0]
            if item.sop_class not in proposed:
                # Cut off by the context limit (a widened association proposes more per
                # class): it goes in the next batch, not judged on contexts never offered.
                batch.give_up_rest()
                break
            step = fb.for_instance(walk, item.source, accepted, batch.seen,
                                   encodable=self.encodable,
                                   allow_lossy=self.dest.allow_lossy_recompression,
                                   refused=batch.refused, pending=[i.source for i in pending])
            if isinstance(step, fb.FallBack):
                report.refused_keys.add(_key(item))
                after = step.walk
                break
            pending.popleft()
            if isinstance(step, fb.Quarantine):
                self._quarantine(item, walk, step.message, batch.done)
                continue
            res, unanswered = self._send_one(assoc, item, step.choice, walk.strategy,
                                             walk.attempts)
            alive = assoc.is_established
            if first_on_kept and unanswered:
                pending.appendleft(item)
                self._drop(assoc)
                return walk, True
            first_on_kept = False  # the peer answered on it: a failure from here is its own
            batch.done(res)  # (may turn a retry into quarantined)
            if res.outcome == DELIVERED:
                sent += 1
            elif res.outcome == RETRY:
                clean = False
            end = fb.after_result(res.outcome, alive, res.reason, peer=self.peer)
            if isinstance(end, fb.EndBatch):
                batch.give_up_rest()
                if end.destination_error:
                    report.destination_error = end.destination_error
        keep = clean and after is walk and not pending and not batch.should_stop()
        self._finish(assoc, *negotiated, keep=keep)
        if sent:
            report.accepted_syntaxes = {k: sorted(v) for k, v in by_class.items()}
            learned = walk.learned()
            if learned is not None:
                report.learned_strategy = learned
        return after, False

    def _finish(self, assoc: Association, proposals: Iterable[neg.Proposal],
                accepted: Iterable[neg.Accepted], *, keep: bool) -> None:
        """After a batch's last instance on ``assoc``: keep it open for the next batch
        (``keep_open``, ``keep``: the batch ended cleanly, and it is still up), else
        release it."""
        if self.keep_open and keep and assoc.is_established:
            with self._lock:
                self._kept = _Kept(assoc, frozenset(proposals), tuple(accepted),
                                   time.monotonic())
            return
        self._release(assoc)

    def _quarantine(self, item: SendItem, walk: fb.Walk, message: str,
                    done: Callable[[Outcome], None]) -> None:
        """No compatible context after every strategy: this instance cannot go to this peer."""
        log.error("All C-STORE strategies failed for %s to %s (tried %s): %s",
                  item.sop_instance, self.peer, ", ".join(walk.tried), message)
        done(Outcome(item.key, QUARANTINED, None, message, walk.strategy, walk.attempts, None))

    def _send_one(self, assoc: Association, item: SendItem, choice: neg.Choice, strategy: str,
                  attempts: int) -> tuple[Outcome, bool]:
        """The instance's outcome, and whether the association gave no answer to it (it
        was gone, or went while the peer was asked)."""
        started = time.perf_counter()
        base = Outcome(item.key, RETRY, None, "", strategy, attempts, choice.transfer_syntax,
                          transcoded=choice.transcode)
        payload: Path | Dataset
        try:
            if choice.transcode:
                payload = transcode(item.path.read_bytes(), choice.transfer_syntax,
                                    allow_lossy=choice.lossy_recompression)
            else:
                payload = item.path
        except TranscodeError as exc:
            base.outcome, base.reason = QUARANTINED, str(exc)
            log.error("Cannot transcode %s for %s: %s", item.sop_instance, self.peer, exc)
            base.seconds = time.perf_counter() - started
            return base, False
        except OSError as exc:
            base.outcome, base.reason = RETRY, f"cannot read the spooled file: {exc}"
            base.seconds = time.perf_counter() - started
            return base, False
        try:
            rsp = assoc.send_c_store(payload)
        except RuntimeError as exc:  # association gone
            base.reason = f"association lost: {exc}"
            base.seconds = time.perf_counter() - started
            return base, True
        except (ValueError, AttributeError) as exc:  # cannot encode / no context / no UIDs
            base.outcome, base.reason = QUARANTINED, f"cannot send: {exc}"
            base.seconds = time.perf_counter() - started
            return base, False
        base.seconds = time.perf_counter() - started
        status = rsp.get("Status") if rsp is not None else None
        if status is None:
            base.reason = ("no C-STORE response (aborted or timed out): outcome unknown, "
                           "will resend")
            return base, True
        status = int(status)
        base.status = status
        base.outcome = classify(status)
        if base.outcome == DELIVERED:
            if status != 0:
                log.warning("%s stored %s with warning status 0x%04X", self.peer,
                            item.sop_instance, status)
            return base, False
        comment = rsp.get("ErrorComment", "")
        base.reason = (f"C-STORE of {item.sop_instance} refused by {self.peer} with status "
                       f"0x{status:04X}{': ' + str(comment) if comment else ''}")
        return base, False
