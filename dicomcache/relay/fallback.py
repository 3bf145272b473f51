"""The fallback walk of one batch, as pure decisions (no sockets).

:meth:`~.scu.StoreSCU.send` does the I/O; what it does next is decided here,
so that every case can be table-tested (``tests/relay/test_fallback.py``):

* after each association attempt, :func:`after_association`: send on it,
  fall back to the next strategy, quarantine what is left, or leave the
  destination for now (it backs off);
* for the next instance on an established association, :func:`for_instance`:
  send it in the best accepted syntax, fall back, or quarantine it;
* after each instance's outcome, :func:`after_result`: go on, or end the batch;
* before a batch, whether the association kept open from the last one serves it
  (:func:`reuse`) or a new one is negotiated.

The walk follows the seed's fallback sequence (``docs/relay.md``): from the
configured strategy, or the one learned to work, towards ``universal``
(``extended → compression → standard → conservative → universal``), one
association per strategy, at most ``max_association_retries`` of them.

A narrower strategy proposes a subset of what was refused, so it only helps
when the peer rejected the association itself (A-ASSOCIATE-RJ: a legacy PACS
choking on a syntax it was offered) or gave no reason.  When the peer says
what it refused (PS3.8 §9.3.3.2), the walk follows that instead:

* result 4, *transfer syntaxes not supported* (it stores the class, not in
  those syntaxes): **widen**, once, to :func:`~.negotiation.widen_target`
  (``compression``: what the relay can produce losslessly; ``extended``),
  probing every syntax so that the peer's answer lists what it accepts;
* result 3, *abstract syntax not supported* (it does not store the class): no
  strategy helps; the instances of that class are quarantined at once.

What a destination learns is kept per (SOP class, source transfer syntax) and
re-probed (:func:`key_start`, :func:`learn`), never one global downgrade.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dicomcache.config import STRATEGIES
from dicomcache.relay import negotiation as neg
from dicomcache.relay.outcome import RETRY


@dataclass(frozen=True, slots=True)
class Walk:
    """Where a batch is on its fallback sequence."""

    sequence: tuple[str, ...]
    level: int = 0
    #: The strategy widened to (after the peer refused every syntax offered), if any.
    widened: str | None = None
    #: Associations allowed (``max_association_retries``); 0: ``len(sequence)``.
    limit: int = 0

    @classmethod
    def start(cls, configured: str, learned: str | None, max_association_retries: int
              ) -> Walk:
        """The walk from the configured strategy, or from the learned one."""
        strategy = neg.start_strategy(configured, learned)
        return cls(neg.fallback_sequence(strategy, max_association_retries),
                   limit=max_association_retries)

    @property
    def strategy(self) -> str:
        """The strategy of the association made at this level."""
        return self.widened or self.sequence[self.level]

    @property
    def attempts(self) -> int:
        """Associations made so far, this one included (an instance's ``attempts_made``)."""
        return self.level + 1 + (self.widened is not None)

    @property
    def tried(self) -> tuple[str, ...]:
        """The strategies tried so far, this one included."""
        return self.sequence[: self.level + 1] + ((self.widened,) if self.widened else ())

    @property
    def last(self) -> bool:
        """No strategy is left to fall back to (after a widening, narrower ones propose
        only what the peer refused)."""
        return self.widened is not None or self.level + 1 >= len(self.sequence)

    def next(self) -> Walk:
        """The next, more compatible, strategy (only when not :attr:`last`)."""
        if self.last:
            raise ValueError(f"no strategy after {self.strategy!r} in {self.sequence}")
        return Walk(self.sequence, self.level + 1, None, self.limit)

    def widen(self, sources: Iterable[neg.Source]) -> Walk | None:
        """The walk widened for ``sources`` (once, within the association limit), or None."""
        if self.widened is not None or self.attempts >= (self.limit or len(self.sequence)):
            return None
        target = neg.widen_target(self.strategy, sources)
        return None if target is None else Walk(self.sequence, self.level, target, self.limit)

    @property
    def probe(self) -> bool:
        """Propose every syntax (a widened association: the answer says what the peer takes)."""
        return self.widened is not None

    def learned(self) -> str | None:
        """What an association that delivered something teaches: its strategy, when it was
        a fallback or a widening (the destination's next batches start there)."""
        return self.strategy if self.attempts > 1 else None


# --- how an association attempt ended ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Established:
    """A-ASSOCIATE-AC with at least one accepted presentation context."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A-ASSOCIATE-RJ (PS3.8 §7.1.1.9-10): result 1 permanent, 2 transient; source 1
    service user, 2 service provider (ACSE), 3 service provider (presentation)."""

    result: int | None
    source: int | None
    diagnostic: int | None


@dataclass(frozen=True, slots=True)
class NoContextAccepted:
    """A-ASSOCIATE-AC in which every presentation context was rejected (PS3.8 §9.3.3.2:
    results 1-4); pynetdicom then aborts the association."""

    #: How the peer answered each proposed context (empty: not known).
    results: tuple[neg.ContextResult, ...] = ()


@dataclass(frozen=True, slots=True)
class Failed:
    """No association: connection refused, timed out or aborted (peer down)."""


AssociationOutcome = Established | Rejected | NoContextAccepted | Failed


# --- what to do next ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UseAssociation:
    """Send the pending instances on the association just established."""


@dataclass(frozen=True, slots=True)
class FallBack:
    """Release (if established) and associate again at ``walk``'s strategy (narrower
    after a fallback, wider when ``walk.widened`` is set)."""

    walk: Walk
    #: Logged first (a rejection the next strategy may cure).
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class QuarantineRest:
    """Every strategy tried and no context accepted: every pending instance is
    quarantined for this destination, each with :func:`no_context`'s message."""


@dataclass(frozen=True, slots=True)
class DestinationError:
    """The destination is unusable for now: it backs off, the pending instances wait."""

    message: str


@dataclass(frozen=True, slots=True)
class Send:
    """Send the instance on the accepted context of ``choice`` (transcoding if it says so)."""

    choice: neg.Choice


@dataclass(frozen=True, slots=True)
class Quarantine:
    """The instance cannot go to this destination: quarantine it with ``message``."""

    message: str


@dataclass(frozen=True, slots=True)
class Next:
    """Go on with the next instance."""


@dataclass(frozen=True, slots=True)
class EndBatch:
    """Stop here: later instances of the study wait (per-study order) and are resent."""

    #: Set when the association broke: the destination backs off too.
    destination_error: str | None = None


#: A-ASSOCIATE-RJ (source, diagnostic) → reason (PS3.8 §7.1.1.10, Table 9-21).
REJECT_REASONS: Mapping[tuple[int, int], str] = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}
#: Rejections about AE titles: a configuration problem no other strategy cures.
_AE_TITLE_PROBLEMS = frozenset({(1, 3), (1, 7)})


def rejection_message(peer: str, strategy: str, n_contexts: int, rejected: Rejected) -> str:
    """``Association rejected by PEER (permanent: REASON) for 'S' strategy with N
    presentation contexts``."""
    reason = REJECT_REASONS.get((rejected.source or 0, rejected.diagnostic or 0),
                                f"diagnostic {rejected.diagnostic}")
    kind = "permanent" if rejected.result == 1 else "transient"
    return (f"Association rejected by {peer} ({kind}: {reason}) for '{strategy}' strategy "
            f"with {n_contexts} presentation contexts")


def refusals(results: Iterable[neg.ContextResult]) -> dict[str, set[int]]:
    """SOP class → the results (PS3.8 §9.3.3.2) the peer gave its contexts."""
    out: dict[str, set[int]] = {}
    for r in results:
        out.setdefault(r.abstract_syntax, set()).add(r.result)
    return out


def _needs_other_syntaxes(codes: Iterable[int]) -> bool:
    """The peer stores the class but refused the syntaxes offered (result 4, nothing 0)."""
    codes = set(codes)
    return neg.TRANSFER_SYNTAXES_NOT_SUPPORTED in codes and neg.ACCEPTANCE not in codes


def _class_unsupported(codes: Iterable[int]) -> bool:
    """Every context of the class answered 3: no strategy makes the peer store it."""
    codes = set(codes)
    return bool(codes) and codes == {neg.ABSTRACT_SYNTAX_NOT_SUPPORTED}


def after_association(walk: Walk, outcome: AssociationOutcome, *, peer: str, n_contexts: int,
                      sources: Sequence[neg.Source] = ()
                      ) -> UseAssociation | FallBack | QuarantineRest | DestinationError:
    """What follows an association attempt at ``walk``'s strategy.

    * established: use it;
    * rejected permanently for a reason other than an AE title, with a strategy
      left: fall back (fewer syntaxes may be what the peer wants), logging the
      rejection; any other rejection: a destination error;
    * nothing accepted: when the peer answered *transfer syntaxes not supported*
      (result 4) for some class, widen for ``sources`` (the pending instances), or
      quarantine what is left when that is not possible (narrower strategies offer
      only what it refused); when it answered *abstract syntax not supported*
      (result 3) for everything, quarantine; otherwise fall back, or after the
      last strategy quarantine what is left;
    * no association at all: a destination error (peer down or unreachable).
    """
    if isinstance(outcome, Established):
        return UseAssociation()
    if isinstance(outcome, Rejected):
        message = rejection_message(peer, walk.strategy, n_contexts, outcome)
        ae_title = (outcome.source, outcome.diagnostic) in _AE_TITLE_PROBLEMS
        if outcome.result == 1 and not ae_title and not walk.last:
            return FallBack(walk.next(), warning=message)
        return DestinationError(message)
    if isinstance(outcome, NoContextAccepted):
        by_class = refusals(outcome.results)
        if any(_needs_other_syntaxes(codes) for codes in by_class.values()):
            wider = walk.widen(sources)
            return QuarantineRest() if wider is None else FallBack(wider)
        if by_class and all(_class_unsupported(codes) for codes in by_class.values()):
            return QuarantineRest()
        return QuarantineRest() if walk.last else FallBack(walk.next())
    return DestinationError(f"Cannot associate with {peer}: connection failed or aborted "
                            f"(peer down or unreachable)")


def no_context(sop_class: str, seen: Mapping[str, Iterable[str]],
               refused: Mapping[str, Iterable[int]] | None = None,
               encodable: Iterable[str] | None = None) -> str:
    """Why an instance of ``sop_class`` cannot go: the seed's message, naming what the peer
    accepted for that SOP class in any association of the batch (``seen``) and what it
    answered to the contexts it refused (``refused``)."""
    return neg.no_context_message(sop_class, seen.get(sop_class, ()),
                                  (refused or {}).get(sop_class, ()), encodable)


def for_instance(
    walk: Walk,
    source: neg.Source,
    accepted: Iterable[neg.Accepted],
    seen: Mapping[str, Iterable[str]],
    *,
    encodable: Iterable[str] = (),
    allow_lossy: bool = False,
    refused: Mapping[str, Iterable[int]] | None = None,
    pending: Sequence[neg.Source] = (),
) -> Send | FallBack | Quarantine:
    """What to do with the next instance on an association that accepted ``accepted``.

    Send it when a context is usable (:func:`~.negotiation.choose`).  Otherwise, by
    what the peer answered for its class in this batch (``refused``): *abstract
    syntax not supported* everywhere → quarantine it; *transfer syntaxes not
    supported* → widen for ``pending`` (or quarantine when that is not possible);
    else fall back to the next strategy, or after the last one quarantine it (the
    batch goes on with the next instance on the same association).
    """
    choice = neg.choose(source, accepted, encodable=encodable, allow_lossy=allow_lossy)
    if choice is not None:
        return Send(choice)
    codes = set((refused or {}).get(source.sop_class, ()))
    why = Quarantine(no_context(source.sop_class, seen, refused, encodable))
    if _class_unsupported(codes):
        return why
    if _needs_other_syntaxes(codes):
        wider = walk.widen(pending or (source,))
        return why if wider is None else FallBack(wider)
    if not walk.last:
        return FallBack(walk.next())
    return why


def after_result(outcome: str, association_alive: bool, reason: str, *, peer: str
                 ) -> Next | EndBatch:
    """After an instance's outcome: a transient failure ends the batch (nothing of the
    study goes before it is delivered), and a broken association makes it a
    destination error; anything else goes on."""
    if outcome != RETRY:
        return Next()
    if association_alive:
        return EndBatch()
    return EndBatch(f"Association with {peer} aborted during C-STORE: {reason}")


def reuse(proposed: Iterable[neg.Proposal], accepted: Iterable[neg.Accepted],
          wanted: Sequence[neg.Proposal], sources: Sequence[neg.Source], *,
          encodable: Iterable[str] = (), allow_lossy: bool = False
          ) -> tuple[neg.Accepted, ...] | None:
    """Whether an association kept open from an earlier batch serves the next one as a
    new association would; returns the accepted contexts to use, or None (release it,
    negotiate afresh).

    ``wanted``: what a new association would propose for ``sources`` (the batch's
    start strategy).  It serves when it proposed every one of those contexts (so the
    peer has answered each) and each instance of a class in ``wanted`` has a usable
    accepted context among them.  Only those are used: what a new association would
    have accepted, so the choice of syntax, the fallback walk and what is learned stay
    as they would be with a new association (a context kept from a wider strategy is
    never used by a narrower one).
    """
    want = set(wanted)
    if not want or not want <= set(proposed):
        return None
    usable = tuple(a for a in accepted
                   if neg.Proposal(a.abstract_syntax, a.transfer_syntax) in want)
    classes = {p.abstract_syntax for p in want}
    for src in sources:
        if src.sop_class in classes and neg.choose(src, usable, encodable=encodable,
                                                   allow_lossy=allow_lossy) is None:
            return None
    return usable


def fallback_message(walk: Walk, peer: str, left: int, sop_class: str) -> str:
    """The seed's log line when a fallback association is made (``walk.attempts > 1``);
    a widening says so."""
    if walk.widened is not None:
        previous = walk.sequence[walk.level]
        return (f"Using {walk.strategy} widening for {peer}: {left} instance(s) of study left "
                f"to send (the peer answered 'transfer syntaxes not supported' to what "
                f"strategy '{previous}' proposed for '{sop_class}'; proposing every syntax, "
                f"sending only what the destination allows)")
    previous = walk.sequence[walk.level - 1]
    return (f"Using {walk.strategy} fallback for {peer}: {left} instance(s) of study left to "
            f"send (previous strategy '{previous}' gave no usable presentation context for "
            f"'{sop_class}')")


# --- what a destination learns, per (SOP class, source syntax), and when it re-probes ------
#: (SOP class UID, the instance's own transfer syntax UID).
Key = tuple[str, str]

#: A learned strategy is used for at most this long, or this many batches, after which
#: the configured strategy is tried again (the peer may have been fixed or upgraded; a
#: downgrade that stayed for good once cost 7.6x the bytes over the WAN, issue 17).
REPROBE_AFTER_SECONDS = 3600.0
REPROBE_AFTER_BATCHES = 20


@dataclass(frozen=True, slots=True)
class Learned:
    """The strategy a fallback or a widening found for one key of a destination."""

    strategy: str
    #: When it was learned (or confirmed again by a re-probe), epoch seconds.
    since: float
    #: Batches started from it since then.
    batches: int = 0


def key_start(configured: str, learned: Learned | None, now: float) -> str:
    """Where a key starts: its learned strategy while fresh, else the configured one
    (a re-probe once :data:`REPROBE_AFTER_SECONDS` or :data:`REPROBE_AFTER_BATCHES`
    have passed, or when the clock went back)."""
    if learned is None or learned.strategy not in STRATEGIES:
        return configured
    age = now - learned.since
    if not 0 <= age < REPROBE_AFTER_SECONDS or learned.batches >= REPROBE_AFTER_BATCHES:
        return configured
    return learned.strategy


def batch_start(configured: str, keys: Iterable[Key], table: Mapping[Key, Learned],
                now: float) -> str:
    """One association serves the batch: it starts at the widest of its keys' starts, so
    a key with nothing learned (or due for a re-probe) gets the configured strategy and
    a narrower key falls back again on its own refusal."""
    starts = {key_start(configured, table.get(k), now) for k in keys}
    return max(starts, key=STRATEGIES.index) if starts else configured


def learn(configured: str, table: Mapping[Key, Learned],
          delivered: Iterable[tuple[Key, str]], refused: Iterable[Key], now: float
          ) -> dict[Key, Learned | None]:
    """What to change in the destination's learned table after a batch (None: forget).

    For each key delivered (with the strategy of the association that delivered it):

    * with the configured strategy → forget what was learned (a re-probe worked);
    * the key was refused at another strategy in this batch → learn this one, afresh;
    * with the strategy it had learned, without a refusal → one more batch on it;
    * otherwise (carried along by another key's fallback) → unchanged.
    """
    used: dict[Key, str] = {}
    for key, strategy in delivered:
        used[key] = strategy
    refused = set(refused)
    changes: dict[Key, Learned | None] = {}
    for key, strategy in used.items():
        old = table.get(key)
        if strategy == configured:
            if old is not None:
                changes[key] = None
        elif key in refused:
            changes[key] = Learned(strategy, now, 0)
        elif old is not None and old.strategy == strategy:
            changes[key] = Learned(strategy, old.since, old.batches + 1)
    return changes
