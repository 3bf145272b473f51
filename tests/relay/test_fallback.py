"""Table tests of the fallback walk's decisions (relay/fallback.py): no sockets.

Each case names where its expectation comes from:

* SEED: ``/work/shared/seeds/003_*.txt``, the relay's design seed ("Progressive
  Fallback … If one strategy fails, automatically tries the next more
  compatible one", "Automatic Fallback Sequence", "Error Resolution"), as
  docs/relay.md's "Fallback" and "Failures" paragraphs restate it;
* PS3.8 §7.1.1.9-10 (Table 9-21): A-ASSOCIATE-RJ result (1 permanent,
  2 transient), source (1 service user, 2 service provider ACSE, 3 service
  provider presentation) and diagnostic;
* PS3.8 §9.3.3.2: presentation context results (0 acceptance, 1 user
  rejection, 2 no reason, 3 abstract syntax not supported, 4 transfer
  syntaxes not supported): only contexts with result 0 reach ``accepted``;
* PS3.4 B.2.3 (and PS3.7 C): C-STORE response statuses.
"""

from __future__ import annotations

import pytest

from dicomcache.dicom import syntaxes as ts
from dicomcache.relay import fallback as fb
from dicomcache.relay.negotiation import Accepted, Choice, ContextResult, Proposal, Source
from dicomcache.relay.outcome import DELIVERED, QUARANTINED, RETRY, classify

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
PEER = "PACS (PACS_SCP@192.168.1.100:11112)"
SEQ = ("standard", "conservative", "universal")  # SEED: "standard", 3 associations

TOP, MIDDLE, LAST = fb.Walk(SEQ, 0), fb.Walk(SEQ, 1), fb.Walk(SEQ, 2)


def _rejected(kind: str, reason: str, strategy: str = "standard") -> str:
    return (f"Association rejected by {PEER} ({kind}: {reason}) for '{strategy}' strategy "
            f"with 6 presentation contexts")


@pytest.mark.parametrize("walk, outcome, expected", [
    pytest.param(TOP, fb.Established(), fb.UseAssociation(), id="established: send on it"),
    # SEED "If one strategy fails, automatically tries the next more compatible one": a
    # permanent rejection may be about what we proposed (PS3.8 Table 9-21: result 1,
    # source 1, diagnostic 1 "no reason given"): fall back, logging why.
    pytest.param(TOP, fb.Rejected(1, 1, 1),
                 fb.FallBack(MIDDLE, _rejected("permanent", "no reason given")),
                 id="rejected permanent, no reason: fall back"),
    pytest.param(TOP, fb.Rejected(1, 1, 2),
                 fb.FallBack(MIDDLE, _rejected("permanent",
                                               "application context name not supported")),
                 id="rejected permanent, application context: fall back"),
    pytest.param(TOP, fb.Rejected(1, 2, 2),
                 fb.FallBack(MIDDLE, _rejected("permanent", "protocol version not supported")),
                 id="rejected permanent by the ACSE provider: fall back"),
    pytest.param(TOP, fb.Rejected(1, 1, 5),
                 fb.FallBack(MIDDLE, _rejected("permanent", "diagnostic 5")),
                 id="rejected permanent, reserved diagnostic: fall back"),
    # PS3.8 Table 9-21: diagnostics 3 and 7 of source 1 are about AE titles: no other
    # strategy cures a configuration problem, the destination backs off.
    pytest.param(TOP, fb.Rejected(1, 1, 3),
                 fb.DestinationError(_rejected("permanent", "calling AE title not recognised")),
                 id="calling AE title not recognised: destination error"),
    pytest.param(TOP, fb.Rejected(1, 1, 7),
                 fb.DestinationError(_rejected("permanent", "called AE title not recognised")),
                 id="called AE title not recognised: destination error"),
    # PS3.8 Table 9-21: result 2 (transient), e.g. source 3 "temporary congestion",
    # "local limit exceeded": try later, not with fewer syntaxes.
    pytest.param(TOP, fb.Rejected(2, 3, 1),
                 fb.DestinationError(_rejected("transient", "temporary congestion")),
                 id="rejected transient, congestion: destination error"),
    pytest.param(TOP, fb.Rejected(2, 3, 2),
                 fb.DestinationError(_rejected("transient", "local limit exceeded")),
                 id="rejected transient, local limit: destination error"),
    pytest.param(LAST, fb.Rejected(1, 1, 1),
                 fb.DestinationError(_rejected("permanent", "no reason given", "universal")),
                 id="rejected permanent after the last strategy: destination error"),
    pytest.param(TOP, fb.Rejected(None, None, None),
                 fb.DestinationError(_rejected("transient", "diagnostic None")),
                 id="rejection without its fields: destination error"),
    # PS3.8 §9.3.3.2: every context answered 1-4; SEED "No presentation context
    # accepted" is what the fallback sequence is for.
    pytest.param(TOP, fb.NoContextAccepted(), fb.FallBack(MIDDLE),
                 id="no context accepted: fall back"),
    pytest.param(MIDDLE, fb.NoContextAccepted(), fb.FallBack(LAST),
                 id="no context accepted at conservative: universal"),
    pytest.param(LAST, fb.NoContextAccepted(), fb.QuarantineRest(),
                 id="no context accepted by any strategy: quarantine the rest"),
    # docs/relay.md Failures: "peer down, association rejected or aborted → the
    # destination backs off".
    pytest.param(TOP, fb.Failed(),
                 fb.DestinationError(f"Cannot associate with {PEER}: connection failed or "
                                     f"aborted (peer down or unreachable)"),
                 id="peer down: destination error"),
])
def test_after_association(walk: fb.Walk, outcome: fb.AssociationOutcome,
                           expected: object) -> None:
    assert fb.after_association(walk, outcome, peer=PEER, n_contexts=6) == expected


def _acc(*pairs: tuple[str, str]) -> list[Accepted]:
    return [Accepted(2 * i + 1, a, t) for i, (a, t) in enumerate(pairs)]


SEED_MESSAGE = ("No compatible presentation context for '1.2.840.10008.5.1.4.1.1.2'. "
                "Peer accepted transfer syntaxes: ['1.2.840.10008.1.2']\n"
                "Recommendation: Use 'universal' strategy for this peer")


@pytest.mark.parametrize("walk, source, accepted, seen, expected", [
    pytest.param(TOP, Source(CT, ts.EXPLICIT_LE), _acc((CT, ts.EXPLICIT_LE)), {},
                 fb.Send(Choice(1, ts.EXPLICIT_LE, False, False)),
                 id="own syntax accepted: send as is"),
    # PS3.8 §9.3.3.2: the JPEG context came back 4 (transfer syntaxes not supported),
    # Implicit VR LE was accepted: decompress (docs/relay.md Transcoding).
    pytest.param(TOP, Source(CT, ts.JPEG_BASELINE), _acc((CT, ts.IMPLICIT_LE)), {},
                 fb.Send(Choice(1, ts.IMPLICIT_LE, True, False)),
                 id="only another syntax accepted: transcode"),
    # PS3.8 §9.3.3.2: the CT contexts came back 3 (abstract syntax not supported), the MR
    # ones 0; SEED: the next more compatible strategy is tried for this instance.
    pytest.param(TOP, Source(CT, ts.EXPLICIT_LE), _acc((MR, ts.EXPLICIT_LE)), {},
                 fb.FallBack(MIDDLE), id="nothing usable for its class: fall back"),
    pytest.param(MIDDLE, Source(CT, ts.EXPLICIT_LE), [], {}, fb.FallBack(LAST),
                 id="nothing usable at conservative: universal"),
    # SEED "Error Resolution": the two-line message, with what the peer accepted for the
    # class in this batch's associations.
    pytest.param(LAST, Source(CT, ts.EXPLICIT_LE), _acc((MR, ts.IMPLICIT_LE)),
                 {CT: {ts.IMPLICIT_LE}}, fb.Quarantine(SEED_MESSAGE),
                 id="nothing usable after the last strategy: the seed's message"),
    pytest.param(LAST, Source(CT, ts.EXPLICIT_LE), _acc((CT, ts.JPEG_BASELINE)),
                 {CT: {ts.JPEG_BASELINE}},
                 fb.Quarantine("No compatible presentation context for "
                               "'1.2.840.10008.5.1.4.1.1.2'. Peer accepted transfer syntaxes: "
                               "['1.2.840.10008.1.2.4.50']\n"
                               "Recommendation: the peer takes SOP class "
                               "'1.2.840.10008.5.1.4.1.1.2' (CT Image Storage) only in lossy "
                               "syntaxes the relay cannot produce: let it accept a lossless "
                               "or uncompressed syntax"),
                 id="only a lossy syntax accepted, lossy not allowed: quarantined"),
    pytest.param(LAST, Source(CT, ts.EXPLICIT_LE), [], {},
                 fb.Quarantine("No compatible presentation context for "
                               "'1.2.840.10008.5.1.4.1.1.2'. Peer accepted transfer syntaxes: "
                               "[]\nRecommendation: check that the peer supports SOP class "
                               "'1.2.840.10008.5.1.4.1.1.2' (CT Image Storage); it accepted "
                               "none of the proposed contexts"),
                 id="nothing accepted for its class at all: check the SOP class"),
])
def test_for_instance(walk: fb.Walk, source: Source, accepted: list[Accepted],
                      seen: dict[str, set[str]], expected: object) -> None:
    assert fb.for_instance(walk, source, accepted, seen) == expected


@pytest.mark.parametrize("status, alive, expected", [
    pytest.param(0x0000, True, fb.Next(), id="0x0000 success (PS3.4 B.2.3): next"),
    pytest.param(0xB000, True, fb.Next(), id="0xB000 coercion warning (PS3.4 B.2.3): next"),
    pytest.param(0xA700, True, fb.EndBatch(),
                 id="0xA700 out of resources (PS3.4 B.2.3): the study waits"),
    pytest.param(0xC000, True, fb.Next(),
                 id="0xC000 cannot understand (PS3.4 B.2.3): quarantined, next"),
    pytest.param(None, False, fb.EndBatch(
        f"Association with {PEER} aborted during C-STORE: no response"),
        id="no response on a dead association: destination error"),
    pytest.param(None, True, fb.EndBatch(), id="no response (timeout): the study waits"),
])
def test_after_result(status: int | None, alive: bool, expected: object) -> None:
    assert fb.after_result(classify(status), alive, "no response", peer=PEER) == expected


def test_a_retry_turned_quarantined_by_the_retry_limit_goes_on() -> None:
    # docs/relay.md Failures: after max_instance_retries refusals the instance is
    # quarantined, and it does not hold the study back.
    assert fb.after_result(QUARANTINED, True, "refused", peer=PEER) == fb.Next()


@pytest.mark.parametrize("status, expected", [
    # PS3.4 B.2.3: success, and the warnings (coercion, elements discarded, data set
    # does not match the SOP class): stored.
    (0x0000, DELIVERED), (0xB000, DELIVERED), (0xB006, DELIVERED), (0xB007, DELIVERED),
    # PS3.4 B.2.3 0xA7xx out of resources; PS3.7 C: 0x0210 duplicate invocation,
    # 0x0213 resource limitation, 0xFE00 cancel; no status at all: outcome unknown.
    (None, RETRY), (0xA700, RETRY), (0xA7FF, RETRY), (0x0210, RETRY), (0x0213, RETRY),
    (0xFE00, RETRY),
    # PS3.4 B.2.3 0xA9xx data set does not match SOP class, 0xCxxx cannot understand;
    # PS3.7 C: 0x0122 SOP class not supported, 0x0117 invalid instance, 0x0124 not
    # authorised; 0xC211 a peer's unhandled exception (pynetdicom).
    (0xA900, QUARANTINED), (0xA9FF, QUARANTINED), (0xC000, QUARANTINED),
    (0xCFFF, QUARANTINED), (0x0122, QUARANTINED), (0x0117, QUARANTINED),
    (0x0124, QUARANTINED), (0xC211, QUARANTINED),
])
def test_classify(status: int | None, expected: str) -> None:
    assert classify(status) == expected


@pytest.mark.parametrize("configured, learned, retries, expected", [
    ("standard", None, 3, SEQ),                                # SEED's example
    ("standard", "universal", 3, ("universal",)),              # learned: start there
    # Learned by widening (the peer refused every syntax of the configured strategy,
    # result 4): start there (issue 17: "the sequence must be able to widen").
    ("standard", "extended", 3, ("extended", "compression", "standard")),
    ("extended", None, 2, ("extended", "compression")),
])
def test_walk_start(configured: str, learned: str | None, retries: int,
                    expected: tuple[str, ...]) -> None:
    assert fb.Walk.start(configured, learned, retries).sequence == expected


def test_walk_steps() -> None:
    assert (TOP.strategy, TOP.attempts, TOP.tried, TOP.last) == ("standard", 1, ("standard",),
                                                                 False)
    assert (LAST.strategy, LAST.attempts, LAST.tried, LAST.last) == ("universal", 3, SEQ, True)
    assert TOP.next() == MIDDLE
    with pytest.raises(ValueError):
        LAST.next()
    # docs/relay.md: "When a fallback worked, the destination learns it".
    assert TOP.learned() is None
    assert MIDDLE.learned() == "conservative"


def test_the_seeds_automatic_fallback_sequence() -> None:
    """SEED "Automatic Fallback Sequence", walked through the decisions: standard is
    rejected, conservative accepts no context, universal works."""
    walk = fb.Walk.start("standard", None, 3)
    log = []
    for outcome in (fb.Rejected(1, 1, 1), fb.NoContextAccepted(), fb.Established()):
        step = fb.after_association(walk, outcome, peer=PEER, n_contexts=2)
        log.append((walk.strategy, type(step).__name__))
        if isinstance(step, fb.FallBack):
            walk = step.walk
    assert log == [("standard", "FallBack"), ("conservative", "FallBack"),
                   ("universal", "UseAssociation")]
    assert walk.attempts == 3 and walk.learned() == "universal"
    assert fb.fallback_message(walk, PEER, 2, CT) == (
        f"Using universal fallback for {PEER}: 2 instance(s) of study left to send "
        f"(previous strategy 'conservative' gave no usable presentation context for '{CT}')")


# --- widening and the peer's result codes (issue 17) ---------------------------------------
def _results(*triples: tuple[str, str, int]) -> tuple[ContextResult, ...]:
    return tuple(ContextResult(*t) for t in triples)


CONS = fb.Walk(("conservative", "universal"), limit=3)
CONS_WIDE = fb.Walk(("conservative", "universal"), 0, "compression", 3)
CT_ELE = Source(CT, ts.EXPLICIT_LE)


@pytest.mark.parametrize("walk, outcome, sources, expected", [
    # PS3.8 §9.3.3.2 result 4 for every CT context: the peer stores CT, not in these
    # syntaxes. A narrower strategy offers a subset of them: widen instead.
    pytest.param(CONS, fb.NoContextAccepted(_results((CT, ts.IMPLICIT_LE, 4),
                                                      (CT, ts.EXPLICIT_LE, 4))),
                 [CT_ELE], fb.FallBack(CONS_WIDE), id="result 4: widen to compression"),
    pytest.param(CONS, fb.NoContextAccepted(_results((CT, ts.EXPLICIT_LE, 4))),
                 [Source(CT, ts.JPEG_BASELINE)],
                 fb.FallBack(fb.Walk(("conservative", "universal"), 0, "extended", 3)),
                 id="result 4, own syntax lossy: widen to extended (sent as received)"),
    pytest.param(CONS_WIDE, fb.NoContextAccepted(_results((CT, ts.EXPLICIT_LE, 4))),
                 [CT_ELE], fb.QuarantineRest(), id="result 4 after widening: quarantine"),
    pytest.param(fb.Walk(("conservative", "universal"), limit=1),
                 fb.NoContextAccepted(_results((CT, ts.EXPLICIT_LE, 4))), [CT_ELE],
                 fb.QuarantineRest(), id="result 4, no association left: quarantine"),
    pytest.param(fb.Walk(("extended", "compression"), limit=3),
                 fb.NoContextAccepted(_results((CT, ts.EXPLICIT_LE, 4))), [CT_ELE],
                 fb.QuarantineRest(), id="result 4 at extended: nothing wider, quarantine"),
    # Result 3 everywhere: the peer does not store the class; no strategy helps.
    pytest.param(CONS, fb.NoContextAccepted(_results((CT, ts.IMPLICIT_LE, 3),
                                                      (CT, ts.EXPLICIT_LE, 3))),
                 [CT_ELE], fb.QuarantineRest(), id="result 3: quarantine at once"),
    # Results 1/2 (no reason): the seed's narrower fallback, as before.
    pytest.param(CONS, fb.NoContextAccepted(_results((CT, ts.EXPLICIT_LE, 2))), [CT_ELE],
                 fb.FallBack(fb.Walk(("conservative", "universal"), 1, None, 3)),
                 id="result 2: fall back"),
    # One class unsupported (3), another refused in its syntaxes (4): widen for the latter.
    pytest.param(CONS, fb.NoContextAccepted(_results((CT, ts.EXPLICIT_LE, 4),
                                                      (MR, ts.EXPLICIT_LE, 3))),
                 [CT_ELE, Source(MR, ts.EXPLICIT_LE)], fb.FallBack(CONS_WIDE),
                 id="results 3 and 4: widen"),
])
def test_after_association_reads_the_peers_results(walk: fb.Walk, outcome: object,
                                                   sources: list[Source],
                                                   expected: object) -> None:
    assert fb.after_association(walk, outcome, peer=PEER, n_contexts=2,  # type: ignore[arg-type]
                                sources=sources) == expected


@pytest.mark.parametrize("walk, accepted, refused, expected", [
    pytest.param(CONS, _acc((MR, ts.EXPLICIT_LE)), {CT: {4}}, fb.FallBack(CONS_WIDE),
                 id="its class refused with 4 on an established association: widen"),
    pytest.param(CONS, _acc((MR, ts.EXPLICIT_LE)), {CT: {3}},
                 fb.Quarantine(
                     "No compatible presentation context for '1.2.840.10008.5.1.4.1.1.2'. "
                     "Peer accepted transfer syntaxes: []\n"
                     "Peer answered: abstract syntax (SOP class) not supported (result 3)\n"
                     "Recommendation: the peer does not store SOP class "
                     "'1.2.840.10008.5.1.4.1.1.2' (CT Image Storage): add it to the peer's "
                     "accepted SOP classes, or do not send it there"),
                 id="its class refused with 3: quarantined, the class named"),
    pytest.param(CONS_WIDE, _acc((MR, ts.EXPLICIT_LE)), {CT: {4}},
                 fb.Quarantine(
                     "No compatible presentation context for '1.2.840.10008.5.1.4.1.1.2'. "
                     "Peer accepted transfer syntaxes: []\n"
                     "Peer answered: transfer syntaxes not supported (result 4)\n"
                     "Recommendation: the peer takes SOP class '1.2.840.10008.5.1.4.1.1.2' "
                     "(CT Image Storage) but none of the transfer syntaxes the relay can "
                     "produce: check which ones it accepts"),
                 id="refused with 4 after widening: quarantined, syntaxes named"),
    pytest.param(CONS, _acc((MR, ts.EXPLICIT_LE)), {}, fb.FallBack(
        fb.Walk(("conservative", "universal"), 1, None, 3)), id="no results known: fall back"),
])
def test_for_instance_reads_the_peers_results(walk: fb.Walk, accepted: list[Accepted],
                                              refused: dict[str, set[int]],
                                              expected: object) -> None:
    assert fb.for_instance(walk, CT_ELE, accepted, {}, refused=refused,
                           pending=[CT_ELE]) == expected


def test_widened_walk() -> None:
    assert (CONS_WIDE.strategy, CONS_WIDE.attempts, CONS_WIDE.tried, CONS_WIDE.last,
            CONS_WIDE.probe) == ("compression", 2, ("conservative", "compression"), True, True)
    assert CONS_WIDE.learned() == "compression"
    assert CONS_WIDE.widen([CT_ELE]) is None  # once per batch


# --- learned per key, re-probed (issue 17) ----------------------------------------------------
NOW = 1_000_000.0
K_CT, K_LS = (CT, ts.EXPLICIT_LE), (MR, ts.JPEG_LS_LOSSLESS)
FRESH = fb.Learned("conservative", NOW - 60, 3)


@pytest.mark.parametrize("learned, expected", [
    pytest.param(None, "compression", id="nothing learned: configured"),
    pytest.param(FRESH, "conservative", id="fresh: learned"),
    pytest.param(fb.Learned("extended", NOW - 60), "extended", id="widened: learned"),
    pytest.param(fb.Learned("conservative", NOW - fb.REPROBE_AFTER_SECONDS), "compression",
                 id="interval passed: re-probe"),
    pytest.param(fb.Learned("conservative", NOW - 60, fb.REPROBE_AFTER_BATCHES),
                 "compression", id="batches used up: re-probe"),
    pytest.param(fb.Learned("conservative", NOW + 3600), "compression",
                 id="clock went back: re-probe"),
    pytest.param(fb.Learned("bogus", NOW - 60), "compression", id="unknown strategy"),
])
def test_key_start(learned: fb.Learned | None, expected: str) -> None:
    assert fb.key_start("compression", learned, NOW) == expected


def test_batch_start_is_the_widest_key_start() -> None:
    table = {K_CT: FRESH}
    assert fb.batch_start("compression", [K_CT], table, NOW) == "conservative"
    # A key with nothing learned gets the configured strategy: not one global downgrade.
    assert fb.batch_start("compression", [K_LS], table, NOW) == "compression"
    assert fb.batch_start("compression", [K_CT, K_LS], table, NOW) == "compression"
    assert fb.batch_start("compression", [], table, NOW) == "compression"


@pytest.mark.parametrize("table, delivered, refused, expected", [
    pytest.param({}, [(K_CT, "conservative")], [K_CT],
                 {K_CT: fb.Learned("conservative", NOW, 0)}, id="refused, then delivered: learn"),
    pytest.param({K_CT: FRESH}, [(K_CT, "compression")], [],
                 {K_CT: None}, id="configured works again (re-probe): forget"),
    pytest.param({}, [(K_CT, "compression")], [], {}, id="configured, nothing learned"),
    pytest.param({K_CT: FRESH}, [(K_CT, "conservative")], [],
                 {K_CT: fb.Learned("conservative", FRESH.since, 4)},
                 id="started from it: one more batch"),
    pytest.param({K_CT: FRESH}, [(K_CT, "conservative")], [K_CT],
                 {K_CT: fb.Learned("conservative", NOW, 0)},
                 id="re-probe refused again: learned afresh"),
    pytest.param({}, [(K_CT, "conservative"), (K_LS, "conservative")], [K_CT],
                 {K_CT: fb.Learned("conservative", NOW, 0)},
                 id="carried along by another key's fallback: not learned"),
    pytest.param({}, [(K_CT, "compression")], [K_CT], {},
                 id="refused but delivered with the configured one: nothing to learn"),
])
def test_learn(table: dict[fb.Key, fb.Learned], delivered: list[tuple[fb.Key, str]],
               refused: list[fb.Key], expected: dict[fb.Key, fb.Learned | None]) -> None:
    assert fb.learn("compression", table, delivered, refused, NOW) == expected


# --- the association kept open from the last batch (fb.reuse) -------------------------------
def _p(sop_class: str, syntax: str) -> Proposal:
    return Proposal(sop_class, syntax)


_KEPT = (_p(CT, ts.EXPLICIT_LE), _p(CT, ts.IMPLICIT_LE), _p(CT, ts.JPEG_LS_LOSSLESS))
_KEPT_OK = (Accepted(1, CT, ts.EXPLICIT_LE), Accepted(3, CT, ts.IMPLICIT_LE),
            Accepted(5, CT, ts.JPEG_LS_LOSSLESS))
_CT_ILE = Source(CT, ts.IMPLICIT_LE)
_CT_JLS = Source(CT, ts.JPEG_LS_LOSSLESS)


@pytest.mark.parametrize("proposed, accepted, wanted, sources, expected", [
    # the same needs: used, with the contexts the new association would have had
    (_KEPT[:2], _KEPT_OK[:2], _KEPT[:2], [Source(CT, ts.EXPLICIT_LE)], _KEPT_OK[:2]),
    # proposed more (a wider strategy): only what this batch would propose is used, so
    # a narrower start never sends in a syntax it would not have proposed
    (_KEPT, _KEPT_OK, _KEPT[:2], [_CT_JLS], _KEPT_OK[:2]),
    # a context this batch would propose was never proposed (another SOP class): new one
    (_KEPT, _KEPT_OK, (*_KEPT[:2], _p(MR, ts.EXPLICIT_LE)),
     [Source(MR, ts.EXPLICIT_LE)], None),
    # ... or another syntax of the same class
    (_KEPT[:2], _KEPT_OK[:2], _KEPT, [_CT_JLS], None),
    # proposed, but refused by the peer, for an instance that needs it: a new association
    # walks the fallback as it would have (nothing is decided on the kept one)
    (_KEPT[:2], _KEPT_OK[:1], _KEPT[1:2], [_CT_ILE], None),
    # one usable context per instance is enough (what a new association would choose)
    (_KEPT[:2], _KEPT_OK[1:2], _KEPT[:2], [Source(CT, ts.EXPLICIT_LE), _CT_ILE],
     _KEPT_OK[1:2]),
    # nothing to propose: no reuse
    (_KEPT, _KEPT_OK, (), [], None),
])
def test_reuse_of_the_kept_association(proposed: tuple[Proposal, ...],
                                       accepted: tuple[Accepted, ...],
                                       wanted: tuple[Proposal, ...], sources: list[Source],
                                       expected: tuple[Accepted, ...] | None) -> None:
    assert fb.reuse(proposed, accepted, wanted, sources) == expected
