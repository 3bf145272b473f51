"""dicomcache.upstream.link: gzip or identity for instance bodies, from measured figures."""

from __future__ import annotations

import pytest

from dicomcache.upstream.link import (
    MIN_SAMPLES,
    PRIOR_COST,
    PRIOR_RATIO,
    LinkFigures,
    LinkMeter,
    Sample,
    break_even,
    choose,
    figures,
    uncertain,
)

MBIT = 1e6 / 8
KIB = 1 << 10
#: Break-even with the priors: (1 - 1/2) / (45 ms / 512 KiB) ≈ 5.8 MB/s ≈ 47 Mbit/s.
PRIOR_EVEN = (1 - 1 / PRIOR_RATIO) / PRIOR_COST


def test_break_even_with_the_priors_is_near_fifty_megabit() -> None:
    assert break_even(LinkFigures()) == pytest.approx(PRIOR_EVEN)
    assert 40 * MBIT < PRIOR_EVEN < 55 * MBIT


@pytest.mark.parametrize("f, current, expected", [
    # Nothing measured (start, or idle): gzip, what a browser gets from Orthanc.
    (LinkFigures(), "identity", "gzip"),
    (LinkFigures(), "gzip", "gzip"),
    (LinkFigures(ratio=3.0, cost=PRIOR_COST), "identity", "gzip"),
    # Slow WAN links: gzip; loopback and LAN: identity (priors for ratio and cost).
    (LinkFigures(rate=10 * MBIT), "identity", "gzip"),
    (LinkFigures(rate=10 * MBIT), "gzip", "gzip"),
    (LinkFigures(rate=1000 * MBIT), "gzip", "identity"),
    (LinkFigures(rate=200 * MBIT), "gzip", "identity"),
    # Around the break-even, the band keeps the current choice.
    (LinkFigures(rate=PRIOR_EVEN * 1.1), "gzip", "gzip"),
    (LinkFigures(rate=PRIOR_EVEN * 1.1), "identity", "identity"),
    (LinkFigures(rate=PRIOR_EVEN * 0.9), "identity", "identity"),
    (LinkFigures(rate=PRIOR_EVEN * 0.9), "gzip", "gzip"),
    (LinkFigures(rate=PRIOR_EVEN * 1.3), "gzip", "identity"),
    (LinkFigures(rate=PRIOR_EVEN * 0.7), "identity", "gzip"),
    # Measured figures move the break-even: a cheap gzip wins on a faster link...
    (LinkFigures(rate=100 * MBIT, ratio=2.0, cost=PRIOR_COST / 4), "identity", "gzip"),
    # ...a dear one loses on a slower link...
    (LinkFigures(rate=20 * MBIT, ratio=2.0, cost=PRIOR_COST * 4), "gzip", "identity"),
    # ...and bodies that do not shrink (already compressed pixels) never pay.
    (LinkFigures(rate=1 * MBIT, ratio=1.0), "gzip", "identity"),
    (LinkFigures(rate=1 * MBIT, ratio=0.99, cost=0.0), "gzip", "identity"),
    # A measured cost of zero (noise) still leaves the rate to decide.
    (LinkFigures(rate=1000 * MBIT, ratio=2.0, cost=0.0), "gzip", "identity"),
    (LinkFigures(rate=100 * MBIT, ratio=2.0, cost=0.0), "identity", "gzip"),
])
def test_choose(f: LinkFigures, current: str, expected: str) -> None:
    assert choose(f, current) == expected  # type: ignore[arg-type]


def body(encoding: str = "identity", *, rate: float = 100 * MBIT, size: int = 512 * KIB,
         ratio: float = 2.0, ttfb: float = 0.01, at: float = 0.0) -> Sample:
    wire = size if encoding == "identity" else int(size / ratio)
    return Sample(at, encoding, wire, size, ttfb, wire / rate)  # type: ignore[arg-type]


@pytest.mark.parametrize("samples, expected", [
    ([], LinkFigures()),
    # Too few bodies for a rate; gzip's ratio from one gzipped body.
    ([body("gzip", ratio=2.5)], LinkFigures(ratio=2.5)),
    ([body(), body()], LinkFigures()),
    # The rate is the median of the bodies' rates: one stalled body does not decide.
    ([body(rate=8 * MBIT), body(rate=10 * MBIT), body(rate=0.1 * MBIT)],
     LinkFigures(rate=8 * MBIT)),
    # gzip's cost: the median extra time to first byte, per decoded byte.
    ([*(body(ttfb=0.01) for _ in range(3)), *(body("gzip", ttfb=0.06) for _ in range(3))],
     LinkFigures(rate=100 * MBIT, ratio=2.0, cost=0.05 / (512 * KIB))),
    # Faster gzipped answers (noise): no negative cost.
    ([*(body(ttfb=0.05) for _ in range(3)), *(body("gzip", ttfb=0.01) for _ in range(3))],
     LinkFigures(rate=100 * MBIT, ratio=2.0, cost=0.0)),
])
def test_figures(samples: list[Sample], expected: LinkFigures) -> None:
    got = figures(samples)
    for name in ("rate", "ratio", "cost"):
        want = getattr(expected, name)
        assert getattr(got, name) == (None if want is None else pytest.approx(want, rel=1e-3))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cross(meter: LinkMeter, clock: Clock, seconds: float, wire: int,
          encoding: str = "identity") -> None:
    """One body alone on the link for ``seconds``."""
    with meter.body(0.01) as b:
        clock.now += seconds
        b.done(encoding, wire, wire)


def test_meter_follows_the_link_and_forgets_it_when_idle() -> None:
    clock = Clock()
    meter = LinkMeter(window=8, max_age=60.0, clock=clock)
    assert meter.choice() == "gzip"  # nothing measured
    for _ in range(MIN_SAMPLES):
        cross(meter, clock, 0.005, 512 * KIB)  # ≈ 840 Mbit/s
    assert meter.choice() == "identity"
    assert meter.figures().rate == pytest.approx(512 * KIB / 0.005)
    for _ in range(5):
        cross(meter, clock, 0.5, 512 * KIB)  # ≈ 8 Mbit/s: the median turns after half
    assert meter.choice() == "gzip"
    clock.now += 61  # idle: every body too old
    assert meter.figures() == LinkFigures()
    assert meter.choice() == "gzip"


def test_parallel_bodies_share_the_link() -> None:
    """Two bodies crossing together each get half the link: its rate is their sum."""
    clock = Clock()
    meter = LinkMeter(clock=clock)
    for _ in range(2):
        with meter.body(0.0) as a, meter.body(0.0) as b:
            clock.now += 1.0
            a.done("identity", 1000, 1000)
            b.done("identity", 1000, 1000)
    cross(meter, clock, 1.0, 2000)
    assert meter.figures().rate == pytest.approx(2000)


def test_a_failed_body_is_not_recorded_but_took_its_share() -> None:
    clock = Clock()
    meter = LinkMeter(clock=clock)
    with pytest.raises(OSError), meter.body(0.0) as failing:  # noqa: PT012
        with meter.body(0.0) as ok:
            clock.now += 1.0
            ok.done("identity", 500, 500)
        raise OSError("cut")
    assert failing is not None
    assert [(s.wire, s.share) for s in meter.samples()] == [(500, pytest.approx(0.5))]


@pytest.mark.parametrize(("f", "expected"), [
    (LinkFigures(), False),  # nothing to compare
    (LinkFigures(rate=PRIOR_EVEN), True),
    (LinkFigures(rate=PRIOR_EVEN * 1.9), True),
    (LinkFigures(rate=PRIOR_EVEN / 1.9), True),
    (LinkFigures(rate=PRIOR_EVEN * 2.1), False),  # a LAN: identity whatever gzip costs
    (LinkFigures(rate=PRIOR_EVEN / 2.1), False),  # a slow WAN: gzip whatever it costs
])
def test_uncertain(f: LinkFigures, expected: bool) -> None:
    assert uncertain(f) is expected


def test_only_background_bodies_explore_and_only_while_the_other_kind_is_short() -> None:
    clock = Clock()
    meter = LinkMeter(explore_every=4, clock=clock)
    for _ in range(MIN_SAMPLES):
        cross(meter, clock, 0.001, 512 * KIB)  # fast: identity
    assert not uncertain(meter.figures())
    assert {meter.encoding_for(background=True) for _ in range(8)} == {"identity"}
    meter = LinkMeter(explore_every=4, clock=clock)
    for _ in range(MIN_SAMPLES):  # near the break-even, on the fast side: identity
        cross(meter, clock, 512 * KIB / (PRIOR_EVEN * 1.5), 512 * KIB)
    assert meter.choice() == "identity"
    viewer = [meter.encoding_for(background=False) for _ in range(20)]
    assert set(viewer) == {"identity"}
    background = [meter.encoding_for(background=True) for _ in range(8)]
    assert background == ["identity"] * 3 + ["gzip"] + ["identity"] * 3 + ["gzip"]
    for _ in range(MIN_SAMPLES):
        cross(meter, clock, 0.001, 256 * KIB, "gzip")
    assert meter.figures().cost is not None
    assert {meter.encoding_for(background=True) for _ in range(8)} == {"identity"}


def test_a_body_gzipped_while_it_crossed_times_orthanc_not_the_link() -> None:
    """A large file Orthanc gzips as it sends (chunked, no Content-Length): its slow
    body is Orthanc compressing, so it counts for the ratio but not the rate."""
    slow = [Sample(0.0, "gzip", 100_000, 250_000, 0.001, 0.05, streamed=True)] * 5
    fast = [body(rate=800 * MBIT) for _ in range(3)]
    got = figures([*slow, *fast])
    assert got.rate == pytest.approx(800 * MBIT)
    assert got.ratio == pytest.approx(2.5)
    assert got.cost is None  # no gzipped body whose time to first byte includes its gzip
