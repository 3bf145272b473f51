"""Table tests for the pure negotiation functions (no sockets), as pynetdicom's
test_presentation.

Where the expectations come from: the relay's design seed
(``/work/shared/seeds/003_*.txt``: the strategy lists, "Automatic Fallback
Sequence", "Error Resolution"), docs/relay.md ("Strategies": the instance's own
syntax first, then what we can produce; lossy only for ``extended`` with
``allow_lossy_recompression``), PS3.8 §9.3.2.2 (one transfer syntax per
proposed context lets the acceptor's answer say exactly what it takes; at most
128 contexts) and PS3.5 §8.2 (which syntaxes are lossy, from
dicomcache.dicom.syntaxes).  The walk along the sequence: test_fallback.py.
"""

from __future__ import annotations

import pytest

from dicomcache.dicom import syntaxes as ts
from dicomcache.relay import negotiation as neg
from dicomcache.relay.negotiation import Accepted, Choice, Source

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.11"
ILE, ELE, EBE, DFL = ts.IMPLICIT_LE, ts.EXPLICIT_LE, ts.EXPLICIT_BE, ts.DEFLATED_LE
RLE, JLL, JLS, J2KLL, J2K = (ts.RLE_LOSSLESS, ts.JPEG_LOSSLESS_SV1, ts.JPEG_LS_LOSSLESS,
                             ts.JPEG_2000_LOSSLESS, ts.JPEG_2000)
JPEG = ts.JPEG_BASELINE
ALL_ENCODERS = frozenset({RLE, JLL, JLS, J2KLL, J2K, ts.JPEG_LS_NEAR_LOSSLESS})


@pytest.mark.parametrize("strategy, retries, expected", [
    ("standard", 3, ("standard", "conservative", "universal")),   # the seed's example
    ("standard", 1, ("standard",)),
    ("standard", 10, ("standard", "conservative", "universal")),
    ("conservative", 3, ("conservative", "universal")),
    ("universal", 3, ("universal",)),
    ("extended", 3, ("extended", "compression", "standard")),
    ("extended", 5, ("extended", "compression", "standard", "conservative", "universal")),
])
def test_fallback_sequence(strategy: str, retries: int, expected: tuple[str, ...]) -> None:
    assert neg.fallback_sequence(strategy, retries) == expected


@pytest.mark.parametrize("bad", [("nope", 3), ("standard", 0)])
def test_fallback_sequence_rejects(bad: tuple[str, int]) -> None:
    with pytest.raises(ValueError):
        neg.fallback_sequence(*bad)


@pytest.mark.parametrize("configured, learned, expected", [
    ("standard", None, "standard"),
    ("standard", "universal", "universal"),
    ("standard", "extended", "extended"),     # learned by widening: above it
    ("conservative", "bogus", "conservative"),
])
def test_start_strategy(configured: str, learned: str | None, expected: str) -> None:
    assert neg.start_strategy(configured, learned) == expected


@pytest.mark.parametrize("strategy, syntaxes", [  # the seed's three strategy lists
    ("universal", {ILE}),
    ("conservative", {ILE, ELE}),
    ("standard", {ILE, ELE, EBE}),
])
def test_strategy_syntaxes_from_the_seed(strategy: str, syntaxes: set[str]) -> None:
    assert set(neg.STRATEGY_SYNTAXES[strategy]) == syntaxes


def test_every_syntax_comes_from_the_table() -> None:
    # The SCP accepts every transfer syntax dicomcache knows; strategies use only those.
    assert set(neg.ACCEPTED_FROM_MODALITIES) == set(ts.SYNTAXES)
    assert set(neg.STRATEGY_SYNTAXES["extended"]) == set(ts.SYNTAXES)
    assert set(neg.STRATEGIES) == set(neg.STRATEGY_SYNTAXES)


def test_compression_and_extended_contents() -> None:
    comp = set(neg.STRATEGY_SYNTAXES["compression"])
    assert {ILE, ELE, EBE, RLE, J2KLL, JLL, JLS} <= comp
    assert not comp & set(ts.LOSSY)
    assert set(ts.LOSSY) <= set(neg.STRATEGY_SYNTAXES["extended"])


@pytest.mark.parametrize("strategy, sources, encodable, lossy, expected", [
    # own syntax first, then what we could transcode to
    ("conservative", [Source(CT, ELE)], (), False, [(CT, ELE), (CT, ILE)]),
    ("conservative", [Source(CT, ILE)], (), False, [(CT, ILE), (CT, ELE)]),
    ("universal", [Source(CT, ELE)], (), False, [(CT, ILE)]),
    # a compressed source outside the strategy: not proposed (it will be decompressed)
    ("conservative", [Source(CT, JPEG)], ALL_ENCODERS, False, [(CT, ELE), (CT, ILE)]),
    ("standard", [Source(MR, EBE)], (), False, [(MR, EBE), (MR, ELE), (MR, ILE)]),
    # compression: own compressed syntax first, lossless targets only if encodable
    ("compression", [Source(CT, JLS)], {RLE}, False,
     [(CT, JLS), (CT, ELE), (CT, ILE), (CT, EBE), (CT, RLE)]),
    # lossy targets only for extended + allowed
    ("extended", [Source(CT, ELE)], {J2K}, False, [(CT, ELE), (CT, ILE), (CT, EBE)]),
    ("extended", [Source(CT, ELE)], {J2K}, True, [(CT, ELE), (CT, ILE), (CT, EBE), (CT, J2K)]),
    # two SOP classes, two own syntaxes of one class, no duplicates
    ("conservative", [Source(CT, ELE), Source(MR, ILE), Source(CT, ILE)], (), False,
     [(CT, ELE), (CT, ILE), (MR, ILE), (MR, ELE)]),
])
def test_propose(strategy: str, sources: list[Source], encodable: set[str], lossy: bool,
                 expected: list[tuple[str, str]]) -> None:
    got = neg.propose(strategy, sources, encodable=encodable, allow_lossy=lossy)
    assert [(p.abstract_syntax, p.transfer_syntax) for p in got] == expected


def test_fit_batch_respects_the_context_limit() -> None:
    # 100 SOP classes x 2 contexts (conservative) = 200 > 128: a prefix of 64 fits.
    sources = [Source(f"1.2.3.{i}", ELE) for i in range(100)]
    n = neg.fit_batch("conservative", sources)
    assert n == 64
    assert len(neg.propose("conservative", sources[:n])) <= neg.MAX_CONTEXTS
    assert len(neg.propose("conservative", sources[:n + 1])) > neg.MAX_CONTEXTS
    # one class: everything fits
    assert neg.fit_batch("extended", [Source(CT, ELE)] * 500, encodable=ALL_ENCODERS) == 500
    assert neg.fit_batch("conservative", []) == 0


@pytest.mark.parametrize("strategy", neg.STRATEGIES)
def test_fit_batch_agrees_with_propose(strategy: str) -> None:
    mix = [Source(f"1.2.3.{i % 40}", ts) for i, ts in
           enumerate([ELE, ILE, JPEG, JLS, RLE, EBE, DFL, J2K] * 20)]
    n = neg.fit_batch(strategy, mix, encodable=ALL_ENCODERS, allow_lossy=True)
    assert len(neg.propose(strategy, mix[:n], encodable=ALL_ENCODERS, allow_lossy=True)) <= 128
    if n < len(mix):
        assert len(neg.propose(strategy, mix[:n + 1], encodable=ALL_ENCODERS,
                               allow_lossy=True)) > 128


def _acc(*pairs: tuple[str, str]) -> list[Accepted]:
    return [Accepted(2 * i + 1, a, t) for i, (a, t) in enumerate(pairs)]


@pytest.mark.parametrize("source, accepted, encodable, lossy, expected", [
    # own syntax accepted: no transcoding, whatever else is there
    (Source(CT, ELE), _acc((CT, ILE), (CT, ELE)), (), False, Choice(3, ELE, False, False)),
    (Source(CT, JPEG), _acc((CT, ILE), (CT, JPEG)), (), False, Choice(3, JPEG, False, False)),
    # only the other uncompressed one: transcode
    (Source(CT, ELE), _acc((CT, ILE)), (), False, Choice(1, ILE, True, False)),
    (Source(CT, ILE), _acc((CT, EBE), (CT, ELE)), (), False, Choice(3, ELE, True, False)),
    # big endian source prefers explicit LE over implicit
    (Source(MR, EBE), _acc((MR, ILE), (MR, ELE)), (), False, Choice(3, ELE, True, False)),
    # deflated → uncompressed
    (Source(CT, DFL), _acc((CT, ILE)), (), False, Choice(1, ILE, True, False)),
    # compressed → uncompressed (decompression), explicit before implicit
    (Source(CT, J2K), _acc((CT, ILE), (CT, ELE)), (), False, Choice(3, ELE, True, False)),
    # only a lossless compression accepted: encode if we can
    (Source(CT, ELE), _acc((CT, JLL)), {JLL}, False, Choice(1, JLL, True, False)),
    (Source(CT, ELE), _acc((CT, JLL)), (), False, None),
    # lossy target only when allowed
    (Source(CT, ELE), _acc((CT, J2K)), {J2K}, False, None),
    (Source(CT, ELE), _acc((CT, J2K)), {J2K}, True, Choice(1, J2K, True, True)),
    # other SOP class accepted only: nothing usable
    (Source(CT, ELE), _acc((MR, ELE)), (), False, None),
    (Source(CT, ELE), [], (), False, None),
    # a data set without pixel data can be relabelled into any syntax
    (Source(SR, ELE, has_pixels=False), _acc((SR, JLL)), (), False, Choice(1, JLL, True, False)),
])
def test_choose(source: Source, accepted: list[Accepted], encodable: set[str], lossy: bool,
                expected: Choice | None) -> None:
    assert neg.choose(source, accepted, encodable=encodable, allow_lossy=lossy) == expected


@pytest.mark.parametrize("accepted, expected", [
    ([ILE], "universal"),
    ([ILE, ELE], "conservative"),
    ([ELE], "conservative"),
    ([EBE], "standard"),
    ([JLL], "compression"),
    ([JPEG, ILE], "extended"),
    ([], None),
])
def test_recommend(accepted: list[str], expected: str | None) -> None:
    assert neg.recommend(accepted) == expected


def test_no_context_message_has_the_seed_shape() -> None:
    msg = neg.no_context_message(CT, [ILE])
    assert msg == ("No compatible presentation context for '1.2.840.10008.5.1.4.1.1.2'. "
                   "Peer accepted transfer syntaxes: ['1.2.840.10008.1.2']\n"
                   "Recommendation: Use 'universal' strategy for this peer")
    none = neg.no_context_message(CT, [])
    assert "Peer accepted transfer syntaxes: []" in none
    assert "Recommendation: check that the peer supports SOP class" in none


# --- the diagnosis from the peer's answers (issue 17; PS3.8 §9.3.3.2) -------------------------
_CT = "1.2.840.10008.5.1.4.1.1.2"
_HEAD = f"No compatible presentation context for '{_CT}'. Peer accepted transfer syntaxes: "


@pytest.mark.parametrize("accepted, results, encodable, expected", [
    pytest.param([ts.IMPLICIT_LE], [], None,
                 _HEAD + "['1.2.840.10008.1.2']\n"
                 "Recommendation: Use 'universal' strategy for this peer",
                 id="the seed's message, unchanged without results"),
    pytest.param([ts.JPEG_2000], [4], {ts.JPEG_2000},
                 _HEAD + "['1.2.840.10008.1.2.4.91']\n"
                 "Peer answered: transfer syntaxes not supported (result 4)\n"
                 "Recommendation: Use 'extended' strategy for this peer with "
                 "allow_lossy_recompression = true (it accepts only lossy syntaxes for this "
                 "class)", id="lossy only, and the relay can produce it"),
    pytest.param([ts.JPEG_BASELINE], [4], {ts.JPEG_2000},
                 _HEAD + "['1.2.840.10008.1.2.4.50']\n"
                 "Peer answered: transfer syntaxes not supported (result 4)\n"
                 "Recommendation: the peer takes SOP class '1.2.840.10008.5.1.4.1.1.2' (CT "
                 "Image Storage) only in lossy syntaxes the relay cannot produce: let it "
                 "accept a lossless or uncompressed syntax", id="lossy only, no encoder"),
    pytest.param([], [3], None,
                 _HEAD + "[]\nPeer answered: abstract syntax (SOP class) not supported "
                 "(result 3)\nRecommendation: the peer does not store SOP class "
                 "'1.2.840.10008.5.1.4.1.1.2' (CT Image Storage): add it to the peer's "
                 "accepted SOP classes, or do not send it there", id="result 3"),
    pytest.param([], [1, 2], None,
                 _HEAD + "[]\nPeer answered: user rejection (result 1), no reason given "
                 "(result 2)\nRecommendation: check that the peer supports SOP class "
                 "'1.2.840.10008.5.1.4.1.1.2' (CT Image Storage); it accepted none of the "
                 "proposed contexts", id="results 1 and 2"),
])
def test_no_context_message(accepted: list[str], results: list[int],
                            encodable: set[str] | None, expected: str) -> None:
    assert neg.no_context_message(_CT, accepted, results, encodable) == expected


@pytest.mark.parametrize("current, own, expected", [
    ("universal", ts.EXPLICIT_LE, "compression"),
    ("conservative", ts.EXPLICIT_LE, "compression"),
    ("standard", ts.JPEG_LS_LOSSLESS, "compression"),
    ("conservative", ts.JPEG_BASELINE, "extended"),  # sent as received: only extended has it
    ("compression", ts.EXPLICIT_LE, "extended"),
    ("extended", ts.EXPLICIT_LE, None),
])
def test_widen_target(current: str, own: str, expected: str | None) -> None:
    assert neg.widen_target(current, [neg.Source(_CT, own)]) == expected


def test_probe_proposes_every_syntax_after_the_strategys() -> None:
    src = [neg.Source(_CT, ts.EXPLICIT_LE)]
    plain = neg.propose("compression", src, encodable={ts.JPEG_LS_LOSSLESS})
    probed = neg.propose("compression", src, encodable={ts.JPEG_LS_LOSSLESS}, probe=True)
    assert probed[: len(plain)] == plain
    assert {p.transfer_syntax for p in probed} == set(neg.STRATEGY_SYNTAXES["extended"])
    assert neg.fit_batch("compression", src * 3, encodable={ts.JPEG_LS_LOSSLESS},
                         probe=True) == 3
