"""Which encoding to ask Orthanc for instance bodies: ``upstream.compression = "auto"``.

Orthanc gzips a DICOM body when asked: about 2x fewer bytes on the link for about
45 ms of its CPU per 512 KiB slice (``/work/shared/FACTS.md``).  Across a slow WAN
that wins (at 10 Mbit/s a slice crosses in 0.42 s instead of 0.18 s); on a LAN or
loopback it loses (the slice would have crossed in a few milliseconds).  Nobody
knows the link in advance, so it is measured from dicomcache's own downloads, and
no probe ever costs a viewer anything:

* :class:`LinkMeter` keeps the last ``window`` instance bodies (and only those of
  the last ``max_age`` seconds): per body its encoding, bytes on the wire and
  decoded, its time to first byte (request sent to headers in: Orthanc gzips a
  slice before its headers, which carry a ``Content-Length``; a large file it
  gzips while sending, chunked, and such a body's times are left out of the rate
  and the cost, as Orthanc's rather than the link's), and its share of
  the link's busy time (the body's transfer time divided among the bodies
  crossing at once, so six parallel downloads do not read as a six times slower
  link).
* :func:`figures` turns those samples into :class:`LinkFigures`: the link's
  throughput (median of the bodies' rates, so one stalled body does not decide),
  gzip's ratio (decoded / wire bytes of gzipped bodies) and gzip's cost (median
  time to first byte of gzipped bodies less that of identity ones, per decoded
  byte).  What was not measured in the window is ``None``.
* :func:`choose`, a pure function, compares them: gzip saves
  ``size × (1 − 1/ratio) / rate`` seconds of link and costs ``size × cost``
  seconds of Orthanc, so it wins below the break-even rate
  ``(1 − 1/ratio) / cost`` whatever the body's size.  A band around it keeps
  the choice from flapping.  An unmeasured ratio or cost falls back to the
  measured facts above; an unmeasured link (start, or idle for ``max_age``)
  asks for gzip: what a browser gets straight from Orthanc, so never slower than
  going direct, where guessing identity on a slow WAN would double the first
  image's time.
* To keep gzip's cost measured while identity is chosen (and identity's time to
  first byte while gzip is), one body in ``explore_every`` that no viewer is
  waiting for (prefetch) is asked the other way, as long as the window holds
  fewer than ``MIN_SAMPLES`` of that kind and the rate is within 2x of the
  break-even (:func:`uncertain`; farther, the cost cannot change the choice).
  A viewer's body is never an experiment.

What Orthanc sends is decoded before it is verified and stored
(:mod:`dicomcache.cache.receive`): the encoding changes bytes on the link, never
the bytes kept.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

Encoding = Literal["gzip", "identity"]
ENCODINGS: tuple[Encoding, ...] = ("gzip", "identity")

#: Bodies kept: enough for a median that one odd body does not move, few enough that
#: half a window (eight slices of one series) follows a link that changed.
WINDOW = 16
#: Seconds after which a body no longer counts: an idle link is measured again.
MAX_AGE = 120.0
#: Bodies of one kind needed before a figure built on that kind is trusted.
MIN_SAMPLES = 3
#: One background body in this many is asked the other way while that kind is short.
EXPLORE_EVERY = 8
#: gzip's ratio and cost when unmeasured (FACTS.md: 2.35x for a CT phantom, real CT and
#: MR are nearer 2; ≈ 45 ms of Orthanc CPU per 512 KiB).
PRIOR_RATIO = 2.0
PRIOR_COST = 0.045 / (512 << 10)
#: The choice changes only once the rate is this fraction beyond the break-even rate.
BAND = 0.2


@dataclass(frozen=True, slots=True)
class LinkFigures:
    """What the window says; ``None``: not measured in it."""

    #: Bytes per second one body gets from the link (its share while others cross).
    rate: float | None = None
    #: Decoded bytes per wire byte of gzipped bodies.
    ratio: float | None = None
    #: Seconds of Orthanc's gzip per decoded byte (its extra time to first byte).
    cost: float | None = None


def break_even(f: LinkFigures) -> float:
    """The rate (bytes/s) below which gzip wins (0: it never does; pure)."""
    ratio = PRIOR_RATIO if f.ratio is None else f.ratio
    cost = PRIOR_COST if f.cost is None else f.cost
    if ratio <= 1.0:
        return 0.0  # nothing saved
    # A measured cost of zero or less (noise on a quiet Orthanc): gzip costs at least
    # a tenth of what it usually does, so the rate still decides.
    return (1.0 - 1.0 / ratio) / max(cost, PRIOR_COST / 10)


def choose(f: LinkFigures, current: Encoding) -> Encoding:
    """gzip or identity for the next instance body, given ``f`` and the current choice
    (pure).  Unmeasured link: gzip (see the module's docstring)."""
    if f.rate is None:
        return "gzip"
    limit = break_even(f)
    if current == "gzip":
        return "gzip" if f.rate < limit * (1 + BAND) else "identity"
    return "gzip" if f.rate < limit * (1 - BAND) else "identity"


def uncertain(f: LinkFigures) -> bool:
    """Whether the measured rate is near enough the break-even (within 2x) for gzip's
    measured cost to matter (pure): far from it, exploring only wastes the link."""
    limit = break_even(f)
    return f.rate is not None and limit / 2 <= f.rate <= limit * 2


@dataclass(frozen=True, slots=True)
class Sample:
    """One instance body as it crossed the link."""

    at: float  # when it ended (the meter's clock)
    encoding: Encoding
    wire: int  # bytes on the link
    size: int  # bytes decoded
    ttfb: float  # seconds from the request to its headers
    share: float  # seconds of the link's busy time that were this body's
    #: Sent as Orthanc made it (no Content-Length: a large file, chunked).  A gzipped
    #: one is compressed while it crosses, so its times are Orthanc's, not the link's.
    streamed: bool = False


def figures(samples: list[Sample]) -> LinkFigures:
    """:class:`LinkFigures` from the samples of the window (pure)."""
    timed = [s for s in samples if not (s.streamed and s.encoding == "gzip")]
    rates = [s.wire / s.share for s in timed if s.share > 0 and s.wire > 0]
    rate = statistics.median(rates) if len(rates) >= MIN_SAMPLES else None
    every_gz = [s for s in samples if s.encoding == "gzip" and s.wire > 0]
    ratio = sum(s.size for s in every_gz) / sum(s.wire for s in every_gz) if every_gz else None
    gz = [s for s in timed if s.encoding == "gzip" and s.wire > 0]
    plain = [s for s in timed if s.encoding == "identity"]
    cost = None
    if len(gz) >= MIN_SAMPLES and len(plain) >= MIN_SAMPLES:
        extra = (statistics.median(s.ttfb for s in gz)
                 - statistics.median(s.ttfb for s in plain))
        size = statistics.median(s.size for s in gz)
        cost = max(extra, 0.0) / size if size > 0 else None
    return LinkFigures(rate, ratio, cost)


class Body:
    """One body crossing the link (:meth:`LinkMeter.body`); ``done`` records it."""

    def __init__(self, meter: LinkMeter, ttfb: float, started: float) -> None:
        self._meter = meter
        self._ttfb = ttfb
        self._started = started

    def done(self, encoding: str, wire: int, size: int, *, streamed: bool = False) -> None:
        """The body arrived whole: ``wire`` bytes on the link, ``size`` decoded
        (``streamed``: it came without a Content-Length)."""
        kind: Encoding = "gzip" if encoding in ("gzip", "deflate") else "identity"
        self._meter.record(kind, wire, size, self._ttfb, self._started, streamed)


class LinkMeter:
    """The recent instance bodies of one link, and the encoding they suggest."""

    def __init__(self, *, window: int = WINDOW, max_age: float = MAX_AGE,
                 explore_every: int = EXPLORE_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.max_age = max_age
        self.explore_every = explore_every
        self._samples: deque[Sample] = deque(maxlen=window)
        self._choice: Encoding = "gzip"
        self._since_explore = 0
        # Busy-time accounting: ``_virtual`` grows by dt / n while n bodies cross.
        self._active = 0
        self._virtual = 0.0
        self._last = clock()

    def samples(self) -> list[Sample]:
        """The bodies of the window still young enough to count."""
        now = self.clock()
        return [s for s in tuple(self._samples) if now - s.at <= self.max_age]

    def figures(self) -> LinkFigures:
        return figures(self.samples())

    def choice(self) -> Encoding:
        """What the next viewer's body is asked as (also read by the metrics)."""
        self._choice = choose(self.figures(), self._choice)
        return self._choice

    def encoding_for(self, *, background: bool) -> Encoding:
        """The encoding to ask for one body (``background``: no viewer waits for it)."""
        chosen = self.choice()
        if not background or not uncertain(self.figures()):
            return chosen
        other: Encoding = "identity" if chosen == "gzip" else "gzip"
        self._since_explore += 1
        short = sum(1 for s in self.samples() if s.encoding == other) < MIN_SAMPLES
        if short and self._since_explore >= self.explore_every:
            self._since_explore = 0
            return other
        return chosen

    @contextmanager
    def body(self, ttfb: float) -> Iterator[Body]:
        """While a body crosses (from its headers to its end); a body that fails is
        not recorded, but its time is still taken from the others' shares."""
        started = self._advance()
        self._active += 1
        try:
            yield Body(self, ttfb, started)
        finally:
            self._advance()
            self._active -= 1

    def _advance(self) -> float:
        now = self.clock()
        if self._active > 0:
            self._virtual += (now - self._last) / self._active
        self._last = now
        return self._virtual

    def record(self, encoding: Encoding, wire: int, size: int, ttfb: float,
               started: float, streamed: bool = False) -> None:
        """One body ended; ``started``: the busy-time clock when it began."""
        share = self._advance() - started
        self._samples.append(Sample(self.clock(), encoding, wire, size, ttfb, share,
                                    streamed))
