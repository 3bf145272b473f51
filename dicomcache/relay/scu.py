"""Sending a batch of instances to one destination (blocking; run it in a thread).

One call of :meth:`StoreSCU.send` is one batch (normally: the pending
instances of one study): one association per strategy tried, instances sent
in order, the fallback sequence walked when an association yields no usable
context for the next instance.  Nothing here touches the spool: the result
(:class:`BatchReport`) says what happened to each instance, and the caller
records it.  ``dicomcache relay send`` uses the same class.

Each instance's :class:`~.outcome.Outcome` follows the peer's status
(:func:`~.outcome.classify`, PS3.4 B.2.3): a warning is stored, so delivered
(logged; resending would store it again).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association

from dicomcache.config import DestinationSettings
from dicomcache.metrics import Metrics
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


def _none_accepted(assoc: Association) -> bool:
    """The peer answered A-ASSOCIATE-AC but accepted no presentation context."""
    rsp = assoc.acceptor.primitive
    return rsp is not None and getattr(rsp, "result", None) == 0 and not assoc.accepted_contexts


_REJECT_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


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
    ) -> None:
        self.calling_ae = calling_ae
        self.dest = destination
        self.timeout = timeout
        self.max_pdu = max_pdu
        self.metrics = metrics
        self.encodable = encodable_syntaxes() if encodable is None else encodable
        self._assoc: Association | None = None
        self._lock = threading.Lock()

    @property
    def peer(self) -> str:
        d = self.dest
        return f"{d.name} ({d.remote_ae_title}@{d.remote_host}:{d.remote_port})"

    def abort(self) -> None:
        """Abort the association in progress (from another thread: shutdown deadline)."""
        with self._lock:
            assoc = self._assoc
        if assoc is not None and assoc.is_established:
            assoc.abort()

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.relay_associations.labels("outbound", outcome).inc()

    def _associate(self, strategy: str, items: Sequence[SendItem]) -> tuple[Association, int]:
        allow_lossy = self.dest.allow_lossy_recompression
        proposals = neg.propose(strategy, [i.source for i in items], encodable=self.encodable,
                                allow_lossy=allow_lossy)[: neg.MAX_CONTEXTS]
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10.0)
        contexts = [build_context(p.abstract_syntax, [p.transfer_syntax]) for p in proposals]
        assoc = ae.associate(self.dest.remote_host, self.dest.remote_port, contexts=contexts,
                             ae_title=self.dest.remote_ae_title, max_pdu=self.max_pdu)
        with self._lock:
            self._assoc = assoc
        return assoc, len(proposals)

    def _release(self, assoc: Association) -> None:
        with self._lock:
            self._assoc = None
        if assoc.is_established:
            assoc.release()

    def send(
        self,
        items: Sequence[SendItem],
        start_strategy: str | None = None,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_result: Callable[[Outcome], None] | None = None,
    ) -> BatchReport:
        """Send ``items`` in order; never raises for network or data problems."""
        # Spooled files go out as they are (no decode/re-encode) when the peer accepted
        # their own syntax.  A process-wide pynetdicom switch; it only affects
        # send_c_store called with a *path*, which only this class does.
        _config.STORE_SEND_CHUNKED_DATASET = True
        report = BatchReport()
        strategy0 = neg.start_strategy(self.dest.transfer_syntax_strategy, start_strategy)
        sequence = neg.fallback_sequence(strategy0, self.dest.max_association_retries)
        allow_lossy = self.dest.allow_lossy_recompression
        pending = list(items)
        level = 0
        seen_accepted: dict[str, set[str]] = {}

        def done(res: Outcome) -> None:
            report.results.append(res)
            if on_result is not None:
                on_result(res)

        while pending:
            if should_stop():
                report.not_attempted.extend(i.key for i in pending)
                break
            strategy = sequence[level]
            if level > 0:
                log.warning("Using %s fallback for %s: %d instance(s) of study left to send "
                            "(previous strategy '%s' gave no usable presentation context for "
                            "'%s')", strategy, self.peer, len(pending), sequence[level - 1],
                            pending[0].sop_class)
            report.associations += 1
            assoc, n_contexts = self._associate(strategy, pending)
            if not assoc.is_established:
                self._count("rejected" if assoc.is_rejected else "failed")
                with self._lock:
                    self._assoc = None
                if assoc.is_rejected:
                    rsp = assoc.acceptor.primitive
                    result = getattr(rsp, "result", None)
                    source = getattr(rsp, "result_source", None)
                    diag = getattr(rsp, "diagnostic", None)
                    why = _REJECT_REASONS.get((source or 0, diag or 0), f"diagnostic {diag}")
                    kind = "permanent" if result == 1 else "transient"
                    msg = (f"Association rejected by {self.peer} ({kind}: {why}) for "
                           f"'{strategy}' strategy with {n_contexts} presentation contexts")
                    ae_problem = (source, diag) in ((1, 3), (1, 7))
                    if result == 1 and not ae_problem and level + 1 < len(sequence):
                        log.warning("%s", msg)
                        level += 1
                        continue
                elif _none_accepted(assoc):
                    # pynetdicom aborts an association in which the peer accepted no
                    # context: that is "no usable context", not "peer down".
                    for cx in assoc.rejected_contexts:
                        seen_accepted.setdefault(str(cx.abstract_syntax), set())
                    if level + 1 < len(sequence):
                        level += 1
                        continue
                    for item in pending:
                        message = neg.no_context_message(item.sop_class,
                                                         seen_accepted.get(item.sop_class, ()))
                        log.error("All C-STORE strategies failed for %s to %s (tried %s): %s",
                                  item.sop_instance, self.peer, ", ".join(sequence), message)
                        done(Outcome(item.key, QUARANTINED, None, message, strategy,
                                        level + 1, None))
                    pending.clear()
                    break
                else:
                    msg = (f"Cannot associate with {self.peer}: connection failed or aborted "
                           f"(peer down or unreachable)")
                log.warning("%s", msg)
                report.destination_error = msg
                report.not_attempted.extend(i.key for i in pending)
                break
            self._count("established")
            _tune_socket(assoc, self.timeout)
            accepted = [neg.Accepted(int(cx.context_id or 0), str(cx.abstract_syntax),
                                     str(cx.transfer_syntax[0]))
                        for cx in assoc.accepted_contexts]
            by_class: dict[str, set[str]] = {}
            for acc in accepted:
                by_class.setdefault(acc.abstract_syntax, set()).add(acc.transfer_syntax)
            for k, v in by_class.items():
                seen_accepted.setdefault(k, set()).update(v)
            sent_here = 0
            fallback_needed = False
            broken = False
            while pending:
                if should_stop():
                    break
                item = pending[0]
                choice = neg.choose(item.source, accepted, encodable=self.encodable,
                                    allow_lossy=allow_lossy)
                if choice is None:
                    if level + 1 < len(sequence):
                        fallback_needed = True
                        break
                    # Every strategy tried: this instance cannot go to this peer.
                    message = neg.no_context_message(item.sop_class,
                                                     seen_accepted.get(item.sop_class, ()))
                    log.error("All C-STORE strategies failed for %s to %s (tried %s): %s",
                              item.sop_instance, self.peer, ", ".join(sequence[: level + 1]),
                              message)
                    done(Outcome(item.key, QUARANTINED, None, message, strategy,
                                    level + 1, None))
                    pending.pop(0)
                    continue
                res = self._send_one(assoc, item, choice, strategy, level + 1)
                if res.outcome == RETRY and not assoc.is_established:
                    broken = True
                done(res)
                pending.pop(0)
                if res.outcome == DELIVERED:
                    sent_here += 1
                elif res.outcome == RETRY:
                    # Keep per-study order: nothing after it goes before it is delivered.
                    report.not_attempted.extend(i.key for i in pending)
                    pending.clear()
                    if broken:
                        report.destination_error = (f"Association with {self.peer} aborted "
                                                    f"during C-STORE: {res.reason}")
                    break
            self._release(assoc)
            if sent_here:
                report.accepted_syntaxes = {k: sorted(v) for k, v in by_class.items()}
                if level > 0:
                    report.learned_strategy = strategy
            if fallback_needed:
                level += 1
            elif pending and should_stop():
                report.not_attempted.extend(i.key for i in pending)
                break
            else:
                # The head was quarantined for lack of contexts, or all went: restart the
                # sequence for what is left (a new SOP class may work at the top strategy).
                level = 0 if pending else level
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

    def _send_one(self, assoc: Association, item: SendItem, choice: neg.Choice, strategy: str,
                  attempts: int) -> Outcome:
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
            return base
        except OSError as exc:
            base.outcome, base.reason = RETRY, f"cannot read the spooled file: {exc}"
            base.seconds = time.perf_counter() - started
            return base
        try:
            rsp = assoc.send_c_store(payload)
        except RuntimeError as exc:  # association gone
            base.reason = f"association lost: {exc}"
            base.seconds = time.perf_counter() - started
            return base
        except (ValueError, AttributeError) as exc:  # cannot encode / no context / no UIDs
            base.outcome, base.reason = QUARANTINED, f"cannot send: {exc}"
            base.seconds = time.perf_counter() - started
            return base
        base.seconds = time.perf_counter() - started
        status = rsp.get("Status") if rsp is not None else None
        if status is None:
            base.reason = ("no C-STORE response (aborted or timed out): outcome unknown, "
                           "will resend")
            return base
        status = int(status)
        base.status = status
        base.outcome = classify(status)
        if base.outcome == DELIVERED:
            if status != 0:
                log.warning("%s stored %s with warning status 0x%04X", self.peer,
                            item.sop_instance, status)
            return base
        comment = rsp.get("ErrorComment", "")
        base.reason = (f"C-STORE of {item.sop_instance} refused by {self.peer} with status "
                       f"0x{status:04X}{': ' + str(comment) if comment else ''}")
        return base
