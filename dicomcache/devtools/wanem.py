"""A WAN emulator and fault injector: a loopback HTTP/1.1 proxy in front of Orthanc.

dicomcache lives at the edge, between browser viewers and a remote Orthanc across
a slow, lossy WAN.  :class:`WanEmulator` recreates that WAN on one machine: it
listens on a loopback port, forwards every client connection to one upstream
connection (Orthanc, or any HTTP/1.1 server), and on the way

* delays each direction by ``latency_ms`` (one-way, so a request/response costs
  RTT = 2 x latency, and the first request on a new connection one more RTT for
  the TCP handshake), with optional ``jitter_ms``;
* caps each direction at ``bandwidth_mbit``, one token bucket per direction
  shared by all connections, because a WAN link is shared;
* injects faults into responses with the probabilities of a
  :class:`LinkProfile`: lying truncation (short body *and* a matching
  Content-Length, which makes dicomParser throw "buffer overrun"), honest
  truncation, close before the body, TCP reset, byte corruption, stalls and
  synthetic 503s.

It parses HTTP/1.1 framing (Content-Length, chunked, close-delimited, bodiless
HEAD/1xx/204/304 responses) so that faults hit one response at a time and
keep-alive connections keep working when no fault is injected.  Pipelined
requests are relayed in order.  Protocol upgrades (101), CONNECT and TLS are not
supported.

Use it from async tests::

    async with WanEmulator("127.0.0.1", orthanc_port, LinkProfile(latency_ms=40)) as wan:
        url = f"http://127.0.0.1:{wan.port}/instances/{iid}/file"
        ...
        wan.set_profile(LinkProfile(truncate_lying=1.0, fault_paths=r"^/instances/"))
        assert wan.faults["truncate_lying"] == 1

from synchronous code (benchmarks) with :class:`ThreadedWanEmulator`, or from
the command line::

    python -m dicomcache wan-emulator --upstream 127.0.0.1:8042 \\
        --listen 127.0.0.1:9042 --latency-ms 40 --bandwidth-mbit 50 --truncate-lying 0.05

Faults are drawn from ``random.Random(profile.seed)``: for a given seed and a
given order of requests the sequence of injected faults is the same on every
run (timing, and therefore the order of concurrent requests, is not).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import re
import socket
import struct
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Final, Literal, TypeVar

__all__ = [
    "FAULT_KINDS",
    "Exchange",
    "Framing",
    "Head",
    "HttpProtocolError",
    "LinkProfile",
    "ThreadedWanEmulator",
    "WanEmulator",
    "WanStats",
    "keep_alive",
    "parse_head",
    "request_framing",
    "response_framing",
    "with_content_length",
]

logger = logging.getLogger(__name__)

#: Fault kinds, in the order in which one uniform draw is mapped onto them.
#: Each name is also the :class:`LinkProfile` field holding its rate.
FAULT_KINDS: Final = (
    "status_503",
    "reset",
    "close_early",
    "truncate",
    "truncate_lying",
    "corrupt",
    "stall",
)

_READ_LIMIT: Final = 256 * 1024  # longest head / chunk-size line accepted
_CHUNK: Final = 64 * 1024  # read size for bodies
_LINK_SLICE: Final = 16 * 1024  # serialisation unit on a rate-limited link
_LINK_BACKLOG: Final = 0.01  # seconds of reserved link time a sender may run ahead
# Bytes queued in one direction of one connection's delay line before the
# producer waits: bounds memory, and like a TCP window caps throughput at
# _MAX_IN_FLIGHT / latency (80 MB/s at 50 ms) when bandwidth is unlimited.
_MAX_IN_FLIGHT: Final = 4 * 1024 * 1024
_THREAD_TIMEOUT: Final = 30.0

_T = TypeVar("_T")
#: How a message body is delimited (see :func:`request_framing`, :func:`response_framing`).
Framing = Literal["none", "length", "chunked", "close"]
_Shutdown = Literal["close", "reset"]


class HttpProtocolError(ValueError):
    """A message the emulator cannot frame (malformed head, bad chunk size...)."""


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """How the emulated WAN behaves.  Immutable: change it with ``set_profile``.

    ``latency_ms`` is one-way and added to each direction, so RTT = 2 x latency.
    Each fault rate is the probability (0..1) that a matching response gets that
    fault; at most one fault is injected per response, so the rates must add up
    to at most 1.  Faults apply to requests whose method is in ``fault_methods``
    and whose target (path and query) matches ``fault_paths`` (``re.search``;
    None = every target).  Body faults (truncations, corrupt, stall, close_early)
    are skipped, and not counted, for responses with an empty body.

    Fault kinds:

    * ``truncate_lying``: the body is cut at a random fraction and re-framed so
      it looks complete (Content-Length rewritten to the short length, chunked
      terminated early, close-delimited closed early); the connection stays
      usable.
    * ``truncate``: a random prefix of the body with the original framing, then
      the connection is closed.
    * ``close_early``: the response head, then close.
    * ``reset``: a random prefix of the body, then a TCP RST (SO_LINGER 0);
      bodiless responses are replaced by the RST.
    * ``corrupt``: 1-8 random bytes of the body are changed, length kept.
    * ``stall``: sending stops at a random point of the body for
      ``stall_seconds``, then continues (or closes if ``stall_close``).
    * ``status_503``: answered by the emulator with ``503`` and
      ``Retry-After: 1``; the request never reaches upstream.

    Chunked and close-delimited bodies are buffered whole when a fault hits them
    (the cut point is a fraction of a length not known in advance).
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_mbit: float | None = None
    truncate_lying: float = 0.0
    truncate: float = 0.0
    close_early: float = 0.0
    reset: float = 0.0
    corrupt: float = 0.0
    stall: float = 0.0
    status_503: float = 0.0
    stall_seconds: float = 5.0
    stall_close: bool = False
    fault_paths: str | None = None
    fault_methods: frozenset[str] = frozenset({"GET"})
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "stall_seconds"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):  # also rejects NaN
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        bw = self.bandwidth_mbit
        if bw is not None and not (bw > 0 and math.isfinite(bw)):
            raise ValueError(f"bandwidth_mbit must be > 0 or None, got {bw!r}")
        total = 0.0
        for kind in FAULT_KINDS:
            rate = getattr(self, kind)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{kind} must be a probability in [0, 1], got {rate!r}")
            total += rate
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"fault rates add up to {total:g}: at most one fault is injected per "
                "response, so their sum must be <= 1"
            )
        if self.fault_paths is not None:
            try:
                re.compile(self.fault_paths)
            except re.error as exc:
                raise ValueError(f"fault_paths is not a valid regex: {exc}") from None
        # Normalise so that {"get"} works and any iterable is accepted.
        object.__setattr__(
            self, "fault_methods", frozenset(m.upper() for m in self.fault_methods)
        )

    def fault_rates(self) -> dict[str, float]:
        """The non-zero fault rates, by kind."""
        return {k: getattr(self, k) for k in FAULT_KINDS if getattr(self, k) > 0}


@dataclass(frozen=True, slots=True)
class Exchange:
    """One relayed response: what was asked, when, and the bytes that came back.

    ``asked`` is when the request head reached the emulator, ``done`` when the
    response's last byte reaches the client (``loop.time()``: ``time.monotonic()``
    for the default loop).  Lets a benchmark tell whose bytes filled the link when.
    """

    method: str
    target: str
    asked: float
    done: float
    bytes_down: int


@dataclass
class WanStats:
    """Counters kept by a :class:`WanEmulator` (reset with ``reset_stats``).

    ``bytes_up``/``bytes_down`` count what crossed the emulated link (heads
    included): client to upstream and upstream to client.
    """

    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    """Requests by path (query removed)."""
    requests_by_method: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter
    )
    """Requests by (method, path)."""
    targets: list[str] = field(default_factory=list)
    """Every request target (path and query), in arrival order."""
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    """Injected faults by kind (see FAULT_KINDS)."""
    fault_log: list[tuple[str, str]] = field(default_factory=list)
    """(kind, target) of every injected fault, in order."""
    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    """Client connections accepted (while not down)."""
    upstream_connections: int = 0
    exchanges: list[Exchange] = field(default_factory=list)
    """Every response relayed from upstream, in the order they ended."""
    encodings: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter
    )
    """Responses relayed from upstream by (path, Content-Encoding): which answers
    crossed the link gzipped ("identity" when the header is absent)."""

    def copy(self) -> WanStats:
        """A deep copy, safe to keep while the emulator goes on counting."""
        return WanStats(
            requests=collections.Counter(self.requests),
            requests_by_method=collections.Counter(self.requests_by_method),
            targets=list(self.targets),
            faults=collections.Counter(self.faults),
            fault_log=list(self.fault_log),
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            connections=self.connections,
            upstream_connections=self.upstream_connections,
            exchanges=list(self.exchanges),
            encodings=collections.Counter(self.encodings),
        )

    def summary(self) -> str:
        """One line for logs and the CLI."""
        faults = " ".join(f"{k}={v}" for k, v in sorted(self.faults.items())) or "none"
        return (
            f"requests={self.requests.total()} connections={self.connections} "
            f"upstream_connections={self.upstream_connections} "
            f"bytes_up={self.bytes_up} bytes_down={self.bytes_down} faults: {faults}"
        )


# --------------------------------------------------------------------------
# HTTP/1.1 framing: pure functions.


@dataclass(frozen=True, slots=True)
class Head:
    """A parsed request or response head; ``raw`` is forwarded unchanged."""

    raw: bytes
    first: tuple[str, str, str]  # (method, target, version) or (version, status, reason)
    headers: tuple[tuple[str, str], ...]

    def tokens(self, name: str) -> list[str]:
        """Comma-separated, lower-cased values of every ``name`` header."""
        name = name.lower()
        return [
            t.strip().lower()
            for k, v in self.headers
            if k.lower() == name
            for t in v.split(",")
            if t.strip()
        ]


def parse_head(raw: bytes, *, response: bool) -> Head:
    """Parse a head ending in CRLF CRLF; raise HttpProtocolError if malformed."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if response and len(parts) == 2:
        parts.append("")  # the reason phrase may be absent
    if len(parts) != 3 or not all(parts[:2]):
        raise HttpProtocolError(f"bad start line {lines[0]!r}")
    version = parts[0] if response else parts[2]
    if not version.startswith("HTTP/1."):
        raise HttpProtocolError(f"unsupported version in {lines[0]!r}")
    if response and not (len(parts[1]) == 3 and parts[1].isdigit()):
        raise HttpProtocolError(f"bad status in {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpProtocolError(f"bad header line {line!r}")
        headers.append((name, value.strip()))
    return Head(raw, (parts[0], parts[1], parts[2]), tuple(headers))


def _content_length(head: Head) -> int | None:
    values = set(head.tokens("content-length"))
    if not values:
        return None
    if len(values) != 1 or not (v := values.pop()).isdigit():
        raise HttpProtocolError(f"bad Content-Length {sorted(values)!r}")
    return int(v)


def request_framing(head: Head) -> tuple[Framing, int]:
    """How the request body is delimited, and its length if known."""
    te = head.tokens("transfer-encoding")
    if te:
        if te[-1] != "chunked":
            raise HttpProtocolError("request Transfer-Encoding must end in chunked")
        return "chunked", 0
    length = _content_length(head)
    return ("length", length) if length else ("none", 0)


def response_framing(method: str, head: Head) -> tuple[Framing, int]:
    """How a response body is delimited (RFC 9112 section 6.3)."""
    status = int(head.first[1])
    if method == "HEAD" or status < 200 or status in (204, 304):
        return "none", 0
    te = head.tokens("transfer-encoding")
    if te:
        return ("chunked", 0) if te[-1] == "chunked" else ("close", 0)
    length = _content_length(head)
    return ("close", 0) if length is None else ("length", length)


def keep_alive(version: str, head: Head) -> bool:
    """Whether the connection stays open after a message of HTTP ``version`` with this head."""
    connection = head.tokens("connection")
    if version == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


def with_content_length(raw: bytes, length: int) -> bytes:
    """``raw`` head with its Content-Length header(s) replaced by ``length``."""
    lines = raw[:-4].split(b"\r\n")
    out = [lines[0]]
    done = False
    for line in lines[1:]:
        if line.split(b":", 1)[0].strip().lower() == b"content-length":
            if not done:
                out.append(b"Content-Length: %d" % length)
                done = True
        else:
            out.append(line)
    return b"\r\n".join(out) + b"\r\n\r\n"


def _response_503(*, head_only: bool, close: bool) -> bytes:
    body = b"503 Service Unavailable (injected by dicomcache wan-emulator)\n"
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n"
        b"Retry-After: 1\r\n" % len(body)
    )
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + (b"" if head_only else body)


def _chunk(payload: bytes) -> bytes:
    # An empty chunk would be the terminator: emit nothing instead.
    return b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b""


def _flip(payload: bytes, offset: int, flips: dict[int, int]) -> bytes:
    """XOR the bytes of ``payload`` at absolute positions ``flips`` (pos -> mask)."""
    end = offset + len(payload)
    hits = [(pos, mask) for pos, mask in flips.items() if offset <= pos < end]
    if not hits:
        return payload
    buf = bytearray(payload)
    for pos, mask in hits:
        buf[pos - offset] ^= mask
    return bytes(buf)


@dataclass(frozen=True, slots=True)
class _FaultPlan:
    """A fault decided when the request arrives; applied to its response."""

    kind: str
    cut: float  # where in the body (fraction in [0, 1)) truncation/reset/stall happens
    flips: tuple[tuple[float, int], ...] = ()  # corrupt: (fraction, xor mask)


def _plan_fault(
    profile: LinkProfile, rng: random.Random, method: str, target: str
) -> _FaultPlan | None:
    """Decide the fault for one request.

    Every random number is drawn here, in request order, and only for eligible
    requests: that is what makes a seeded run reproducible.
    """
    if method not in profile.fault_methods:
        return None
    if profile.fault_paths is not None and re.search(profile.fault_paths, target) is None:
        return None
    if not profile.fault_rates():
        return None
    x = rng.random()
    acc = 0.0
    for kind in FAULT_KINDS:
        acc += getattr(profile, kind)
        if x < acc:
            cut = rng.random()
            flips: tuple[tuple[float, int], ...] = ()
            if kind == "corrupt":
                count = rng.randint(1, 8)
                flips = tuple((rng.random(), rng.randint(1, 255)) for _ in range(count))
            return _FaultPlan(kind, cut, flips)
    return None


# --------------------------------------------------------------------------
# Stream helpers.


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The next head, or None on a clean EOF before its first byte."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise HttpProtocolError("connection closed inside a message head") from None
    except asyncio.LimitOverrunError:
        raise HttpProtocolError("message head too long") from None


@dataclass(frozen=True, slots=True)
class _Piece:
    wire: bytes  # bytes as framed on the connection
    payload: bytes  # body bytes they carry (empty for chunk-size lines, trailers)


async def _iter_body(
    reader: asyncio.StreamReader, framing: Framing, length: int
) -> AsyncGenerator[_Piece, None]:
    """Read one body with the given framing, in bounded pieces."""
    if framing == "length":
        remaining = length
        while remaining:
            data = await reader.read(min(remaining, _CHUNK))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            yield _Piece(data, data)
    elif framing == "close":
        while data := await reader.read(_CHUNK):
            yield _Piece(data, data)
    elif framing == "chunked":
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                raise HttpProtocolError("chunk-size line too long") from None
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpProtocolError(f"bad chunk size {size_text!r}") from None
            if size == 0:
                wire = line
                while True:  # trailer section, up to an empty line
                    trailer = await reader.readuntil(b"\r\n")
                    wire += trailer
                    if trailer == b"\r\n":
                        break
                yield _Piece(wire, b"")
                return
            yield _Piece(line, b"")
            remaining = size
            while remaining:
                data = await reader.read(min(remaining, _CHUNK))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(data)
                yield _Piece(data, data)
            crlf = await reader.readexactly(2)
            if crlf != b"\r\n":
                raise HttpProtocolError("chunk data not followed by CRLF")
            yield _Piece(crlf, b"")


async def _iter_slices(data: bytes) -> AsyncGenerator[bytes, None]:
    for off in range(0, len(data), _CHUNK):
        yield data[off : off + _CHUNK]


async def _iter_payload(
    body: AsyncGenerator[_Piece, None],
) -> AsyncGenerator[bytes, None]:
    async for piece in body:
        if piece.payload:
            yield piece.payload


# --------------------------------------------------------------------------
# The link: a shared serialiser per direction, and a delay line per connection.


class _Link:
    """One direction of the WAN, shared by every connection: a FIFO serialiser.

    A packet occupies the link for size/bandwidth after the previous one left;
    virtual time makes this exact without a lock or a refill loop.
    """

    def __init__(self) -> None:
        self._next_free = 0.0

    def reserve(self, now: float, nbytes: int, bandwidth_mbit: float | None) -> float:
        """When the last byte of ``nbytes`` offered at ``now`` has left the link."""
        if bandwidth_mbit is None:
            return now
        start = max(now, self._next_free)
        self._next_free = start + nbytes * 8 / (bandwidth_mbit * 1e6)
        return self._next_free


class _DelayLine:
    """One direction of one connection: bytes are stamped with their arrival
    time (serialisation on the shared link + latency + jitter) and a pump
    writes them out at that time, so latency does not limit throughput.
    Close and reset travel through the line too, after the bytes before them.
    """

    def __init__(
        self,
        emu: WanEmulator,
        link: _Link,
        writer: asyncio.StreamWriter,
        count: Callable[[int], None],
        not_before: float,
        on_fail: Callable[[], None],
    ) -> None:
        self._emu = emu
        self._link = link
        self._writer = writer
        self._count = count
        self._on_fail = on_fail
        self._last_at = not_before
        #: Bytes put on the line so far, and when the last of them arrives.
        self.sent = 0
        self._queue: asyncio.Queue[tuple[float, bytes | _Shutdown]] = asyncio.Queue()
        self._queued = 0
        self._space = asyncio.Event()
        self._space.set()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def send(self, data: bytes) -> None:
        """Put ``data`` on the link; waits while the link is busy (bandwidth)
        or too much is in flight, which back-pressures the reader upstream."""
        if not data:
            return
        loop = asyncio.get_running_loop()
        bandwidth = self._emu.profile.bandwidth_mbit
        step = len(data) if bandwidth is None else _LINK_SLICE
        for off in range(0, len(data), step):
            piece = data[off : off + step]
            while self._queued > _MAX_IN_FLIGHT:
                self._space.clear()
                await self._space.wait()
            if self._task.done():
                raise ConnectionResetError("connection closed")
            now = loop.time()
            sent_at = self._link.reserve(now, len(piece), bandwidth)
            # Wait only for what is reserved beyond a short backlog: a sleep wakes
            # late, and waiting for each slice's own time let that lateness idle the
            # link (a single 100 Mbit/s stream got 57 % of it).
            if sent_at - now > _LINK_BACKLOG:
                await asyncio.sleep(sent_at - now - _LINK_BACKLOG)
            self._queued += len(piece)
            self.sent += len(piece)
            self._enqueue(sent_at, piece)

    async def finish(self, how: _Shutdown) -> None:
        """Close (FIN) or reset (RST) once everything sent so far has arrived."""
        if not self._task.done():
            self._enqueue(asyncio.get_running_loop().time(), how)
            await asyncio.wait({self._task})

    @property
    def task(self) -> asyncio.Task[None]:
        """The pump; done once the line is closed, reset or broken."""
        return self._task

    @property
    def last_at(self) -> float:
        """When the last byte put on the line so far arrives (``loop.time()``)."""
        return self._last_at

    def _enqueue(self, sent_at: float, item: bytes | _Shutdown) -> None:
        profile = self._emu.profile
        delay = profile.latency_ms / 1000.0
        if profile.jitter_ms:
            delay += self._emu._jitter_rng.uniform(-profile.jitter_ms, profile.jitter_ms) / 1000.0
        # A TCP stream is never reordered: arrival times only move forward.
        at = max(sent_at + max(delay, 0.0), self._last_at)
        self._last_at = at
        self._queue.put_nowait((at, item))

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        writer = self._writer
        try:
            while True:
                at, item = await self._queue.get()
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if isinstance(item, bytes):
                    writer.write(item)
                    await writer.drain()
                    self._queued -= len(item)
                    self._count(len(item))
                    if self._queued <= _MAX_IN_FLIGHT:
                        self._space.set()
                    continue
                # Flush the transport buffer first: abort() and a closing
                # transport's teardown would otherwise drop what is left.
                writer.transport.set_write_buffer_limits(high=0)
                await writer.drain()
                if item == "reset":
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    writer.transport.abort()
                else:
                    writer.close()
                return
        except (ConnectionError, OSError) as exc:
            logger.debug("wan-emulator: write failed: %r", exc)
            self._space.set()
            self._on_fail()


# --------------------------------------------------------------------------
# One client connection and its upstream connection.


@dataclass(frozen=True, slots=True)
class _Record:
    """What the response side needs to know about one request, in order."""

    method: str
    target: str
    plan: _FaultPlan | None
    close: bool  # the client asked to close after this response
    synthetic: bool = False  # answered by the emulator (503)
    ready_at: float = 0.0  # synthetic: when the request has crossed the link
    asked: float = 0.0  # when its head reached the emulator


class _Connection:
    def __init__(
        self, emu: WanEmulator, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.emu = emu
        self.task = asyncio.current_task()
        self._client_r = reader
        self._client_w = writer
        self._up_r: asyncio.StreamReader | None = None
        self._up_w: asyncio.StreamWriter | None = None
        self._up_line: _DelayLine | None = None
        self._records: asyncio.Queue[_Record | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        latency = emu.profile.latency_ms / 1000.0
        # The TCP handshake costs one RTT before the request can even be sent:
        # the first byte reaches the far end no earlier than 3 one-way delays
        # after the client connected (our accept() completes at once).
        self._up_not_before = loop.time() + 3 * latency
        self._down = _DelayLine(
            emu, emu._down_link, writer, emu._count_down, loop.time(), self.kill
        )

    def kill(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        a = asyncio.create_task(self._client_to_upstream())
        b = asyncio.create_task(self._upstream_to_client())
        try:
            pending: set[asyncio.Task[None]] = {a, b}
            # The response side decides when a connection ends; a failure on
            # the request side (client reset, bad request) ends it at once.
            while b in pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if a in done and not a.cancelled() and a.exception() is not None:
                    logger.debug("wan-emulator: request side: %r", a.exception())
                    break
            if b.done() and not b.cancelled() and b.exception() is not None:
                logger.debug("wan-emulator: response side: %r", b.exception())
        finally:
            # Tear down without awaiting first: stop() or set_down() may
            # cancel us again while we wait for the tasks below.
            tasks = [a, b, self._down.task]
            if self._up_line is not None:
                tasks.append(self._up_line.task)
            for t in tasks:
                t.cancel()
            self._client_w.transport.abort()
            if self._up_w is not None:
                self._up_w.transport.abort()
            cancelled = False
            for _ in range(10):  # bounded: each retry means another cancel()
                try:
                    await asyncio.wait(tasks)
                    break
                except asyncio.CancelledError:
                    cancelled = True
            if cancelled:
                raise asyncio.CancelledError

    async def _ensure_upstream(self) -> _DelayLine:
        if self._up_line is None:
            emu = self.emu
            self._up_r, self._up_w = await asyncio.open_connection(
                emu.upstream_host, emu.upstream_port, limit=_READ_LIMIT
            )
            emu.stats.upstream_connections += 1
            self._up_line = _DelayLine(
                emu, emu._up_link, self._up_w, emu._count_up, self._up_not_before, self.kill
            )
        return self._up_line

    async def _client_to_upstream(self) -> None:
        """Read requests, decide their faults, forward them (or not: 503)."""
        loop = asyncio.get_running_loop()
        emu = self.emu
        while True:
            raw = await _read_head(self._client_r)
            if raw is None:
                break
            asked = loop.time()
            raw = raw.lstrip(b"\r\n")  # empty lines before a request are allowed
            if not raw:
                continue
            head = parse_head(raw, response=False)
            method, target, version = head.first
            framing, length = request_framing(head)
            close = not keep_alive(version, head)
            emu._count_request(method, target)
            plan = _plan_fault(emu.profile, emu._rng, method, target)
            body = _iter_body(self._client_r, framing, length)
            if plan is not None and plan.kind == "status_503":
                now = loop.time()
                nbytes = len(raw)
                if "100-continue" in head.tokens("expect"):
                    close = True  # the body will not come before an answer: skip it
                else:
                    async with contextlib.aclosing(body):
                        async for piece in body:  # read and drop: upstream never sees it
                            nbytes += len(piece.wire)
                emu.stats.bytes_up += nbytes
                ready = max(now + emu.profile.latency_ms / 1000.0, self._up_not_before)
                self._records.put_nowait(
                    _Record(method, target, None, close, True, ready, asked))
            else:
                up = await self._ensure_upstream()
                # Queued before forwarding, so the response side knows the
                # method (HEAD) before any response can come back.
                self._records.put_nowait(_Record(method, target, plan, close, asked=asked))
                await up.send(raw)
                async with contextlib.aclosing(body):
                    async for piece in body:
                        await up.send(piece.wire)
            if close:
                break
        self._records.put_nowait(None)  # no more requests: close after the responses

    async def _upstream_to_client(self) -> None:
        """Relay responses in request order, injecting the planned faults."""
        rec_task: asyncio.Task[_Record | None] | None = None
        head_task: asyncio.Task[bytes | None] | None = None
        try:
            while True:
                if rec_task is None:
                    rec_task = asyncio.create_task(self._records.get())
                if head_task is None and self._up_r is not None:
                    # Read the next head even when idle, to notice upstream's
                    # idle close and pass it on like a TCP-level link would.
                    head_task = asyncio.create_task(_read_head(self._up_r))
                waiting = {rec_task} if head_task is None else {rec_task, head_task}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if not rec_task.done():
                    break  # upstream closed (or spoke unasked) while idle
                rec = rec_task.result()
                rec_task = None
                if rec is None:
                    break
                if rec.synthetic:
                    await self._answer_503(rec)
                    if rec.close:
                        break
                    continue
                if head_task is None:
                    assert self._up_r is not None  # set before the record was queued
                    head_task = asyncio.create_task(_read_head(self._up_r))
                first, head_task = head_task, None
                before = self._down.sent
                try:
                    outcome = await self._relay_response(rec, first)
                except (asyncio.IncompleteReadError, HttpProtocolError, OSError) as exc:
                    # Upstream broke mid-response: the client gets what came
                    # through, then the connection closes, as it would direct.
                    logger.debug("wan-emulator: upstream response: %r", exc)
                    break
                finally:
                    self.emu.stats.exchanges.append(Exchange(
                        rec.method, rec.target, rec.asked, self._down.last_at,
                        self._down.sent - before))
                if outcome == "closed":
                    return
                if outcome == "close":
                    break
            await self._down.finish("close")
        finally:
            for t in (rec_task, head_task):
                if t is None:
                    continue
                if t.done() and not t.cancelled():
                    t.exception()  # seen: an idle upstream reset is no error
                t.cancel()

    async def _answer_503(self, rec: _Record) -> None:
        wait = rec.ready_at - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
        self.emu._count_fault("status_503", rec.target)
        await self._down.send(_response_503(head_only=rec.method == "HEAD", close=rec.close))

    async def _relay_response(
        self, rec: _Record, first: asyncio.Task[bytes | None]
    ) -> Literal["keep", "close", "closed"]:
        """Relay one response; "closed" means a fault already ended the connection."""
        assert self._up_r is not None
        raw = await first
        while True:
            if raw is None:
                return "close"  # upstream closed instead of answering
            head = parse_head(raw, response=True)
            status = int(head.first[1])
            if status >= 200:
                break
            if status == 101:
                raise HttpProtocolError("protocol upgrades are not supported")
            await self._down.send(raw)  # interim 1xx: relay, keep reading
            raw = await _read_head(self._up_r)
        framing, length = response_framing(rec.method, head)
        encoding = ",".join(head.tokens("content-encoding")) or "identity"
        self.emu.stats.encodings[(rec.target.split("?", 1)[0], encoding)] += 1
        keep = framing != "close" and not rec.close and keep_alive(head.first[0], head)
        body = _iter_body(self._up_r, framing, length)
        async with contextlib.aclosing(body):
            if rec.plan is None:
                await self._down.send(raw)
                async for piece in body:
                    await self._down.send(piece.wire)
                return "keep" if keep else "close"
            return await self._inject(rec, rec.plan, raw, framing, length, body, keep)

    async def _inject(
        self,
        rec: _Record,
        plan: _FaultPlan,
        raw: bytes,
        framing: Framing,
        length: int,
        body: AsyncGenerator[_Piece, None],
        keep: bool,
    ) -> Literal["keep", "close", "closed"]:
        down = self._down
        kind = plan.kind
        terminator = b"0\r\n\r\n" if framing == "chunked" else b""
        frame: Callable[[bytes], bytes] = _chunk if framing == "chunked" else bytes
        payloads: AsyncGenerator[bytes, None]
        if framing in ("chunked", "close"):
            # The cut point is a fraction of the body: learn its length first.
            data = b"".join([p async for p in _iter_payload(body)])
            size = len(data)
            payloads = _iter_slices(data)
        else:
            size = length
            payloads = _iter_payload(body)
        async with contextlib.aclosing(payloads):
            if size == 0:
                if kind == "reset":
                    self.emu._count_fault(kind, rec.target)
                    await down.finish("reset")
                    return "closed"
                await down.send(raw + terminator)  # nothing to cut or corrupt
                return "keep" if keep else "close"

            self.emu._count_fault(kind, rec.target)
            cut = min(int(plan.cut * size), size - 1)
            out_head = raw
            if kind == "truncate_lying" and framing == "length":
                out_head = with_content_length(raw, cut)
            await down.send(out_head)
            if kind == "close_early":
                await down.finish("close")
                return "closed"
            flips = {min(int(u * size), size - 1): m for u, m in plan.flips}
            stop_at: int | None = (
                cut if kind in ("truncate_lying", "truncate", "reset", "stall") else None
            )
            sending = True
            offset = 0
            async for payload in payloads:
                end = offset + len(payload)
                if flips:
                    payload = _flip(payload, offset, flips)
                if stop_at is not None and stop_at < end:
                    before, after = payload[: stop_at - offset], payload[stop_at - offset :]
                    stop_at = None
                    await down.send(frame(before))
                    if kind == "truncate":
                        await down.finish("close")
                        return "closed"
                    if kind == "reset":
                        await down.finish("reset")
                        return "closed"
                    if kind == "truncate_lying":
                        sending = False  # drain the rest so keep-alive survives
                    else:  # stall
                        await asyncio.sleep(self.emu.profile.stall_seconds)
                        if self.emu.profile.stall_close:
                            await down.finish("close")
                            return "closed"
                        await down.send(frame(after))
                elif sending:
                    await down.send(frame(payload))
                offset = end
            await down.send(terminator)
            return "keep" if keep else "close"


# --------------------------------------------------------------------------
# Public API.


class WanEmulator:
    """An HTTP/1.1 proxy on ``listen_host:listen_port`` emulating a WAN to
    ``upstream_host:upstream_port``.  Every method runs on the emulator's loop.

    Each client connection gets its own upstream connection, opened on its
    first forwarded request and closed with it (pass-through keep-alive: when
    upstream closes, the client's connection closes too).  Malformed requests
    and unreachable upstreams close the client connection without a response.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        profile: LinkProfile | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.stats = WanStats()
        self._profile = profile if profile is not None else LinkProfile()
        self._rng = random.Random()
        self._jitter_rng = random.Random()
        self._reseed()
        self._down_flag = False
        self._closing = False
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._up_link = _Link()
        self._down_link = _Link()

    # -- controls

    @property
    def profile(self) -> LinkProfile:
        return self._profile

    def set_profile(self, profile: LinkProfile) -> None:
        """Switch to ``profile`` at once, for new and open connections alike.

        Re-seeds the fault generator from ``profile.seed``, so the faults from
        here on depend only on the seed and the order of requests.
        """
        self._profile = profile
        self._reseed()

    @property
    def down(self) -> bool:
        """True while the link is down (see ``set_down``)."""
        return self._down_flag

    @down.setter
    def down(self, value: bool) -> None:
        self.set_down(value)

    def set_down(self, down: bool = True) -> None:
        """Take the link down: new connections are closed as soon as they are
        accepted, open ones are killed (on the next loop iterations).
        ``set_down(False)`` brings it back."""
        self._down_flag = down
        if down:
            for conn in list(self._conns):
                conn.kill()

    def reset_stats(self) -> None:
        """Start counting from zero."""
        self.stats = WanStats()

    # Shortcuts to the counters most tests look at.
    @property
    def requests(self) -> collections.Counter[str]:
        return self.stats.requests

    @property
    def targets(self) -> list[str]:
        return self.stats.targets

    @property
    def faults(self) -> collections.Counter[str]:
        return self.stats.faults

    @property
    def bytes_up(self) -> int:
        return self.stats.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.stats.bytes_down

    # -- lifecycle

    @property
    def port(self) -> int:
        """The bound listening port (useful with ``listen_port=0``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("WanEmulator is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Start listening; returns once the port is bound."""
        if self._server is not None:
            raise RuntimeError("WanEmulator already started")
        self._closing = False
        self._reseed()
        self._server = await asyncio.start_server(
            self._on_client, self.listen_host, self.listen_port, limit=_READ_LIMIT
        )

    async def stop(self) -> None:
        """Stop listening, kill every connection and wait for their tasks."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.kill()
        tasks = [c.task for c in conns if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> WanEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- internals used by _Connection

    def _reseed(self) -> None:
        seed = self._profile.seed
        self._rng = random.Random(seed)
        # Jitter draws depend on timing (chunk boundaries), so they get their
        # own generator and cannot disturb the fault sequence.
        self._jitter_rng = random.Random(None if seed is None else f"{seed}/jitter")

    def _count_request(self, method: str, target: str) -> None:
        path = target.split("?", 1)[0]
        self.stats.requests[path] += 1
        self.stats.requests_by_method[(method, path)] += 1
        self.stats.targets.append(target)

    def _count_fault(self, kind: str, target: str) -> None:
        self.stats.faults[kind] += 1
        self.stats.fault_log.append((kind, target))

    def _count_up(self, n: int) -> None:
        self.stats.bytes_up += n

    def _count_down(self, n: int) -> None:
        self.stats.bytes_down += n

    async def _on_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._down_flag or self._closing:
            writer.transport.abort()
            return
        conn = _Connection(self, reader, writer)
        self._conns.add(conn)
        self.stats.connections += 1
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # killed by set_down()/stop(); run() has cleaned up
        except Exception:  # a bug: log it rather than lose it in a task
            logger.exception("wan-emulator: connection failed")
        finally:
            self._conns.discard(conn)


class ThreadedWanEmulator:
    """A :class:`WanEmulator` on its own event loop in a background thread,
    for synchronous code (benchmarks, sync tests).  A context manager; its
    controls are thread-safe and ``stats()`` returns a snapshot."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        profile: LinkProfile | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self._args = (upstream_host, upstream_port, profile, listen_host, listen_port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._emu: WanEmulator | None = None
        self._port = 0

    def start(self) -> None:
        """Start the thread and the emulator; returns once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("ThreadedWanEmulator already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run_loop, args=(loop,), name="wan-emulator", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            self._emu = self._submit(self._start())
        except BaseException:
            self.stop()
            raise
        self._port = self._emu.port

    def stop(self) -> None:
        """Stop the emulator, the loop and the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if self._emu is not None:
                self._submit(self._emu.stop())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_THREAD_TIMEOUT)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = self._emu = None

    def __enter__(self) -> ThreadedWanEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._emu is None:
            raise RuntimeError("ThreadedWanEmulator is not started")
        return self._port

    @property
    def profile(self) -> LinkProfile:
        return self._call(lambda emu: emu.profile)

    def set_profile(self, profile: LinkProfile) -> None:
        """See :meth:`WanEmulator.set_profile`."""
        self._call(lambda emu: emu.set_profile(profile))

    def set_down(self, down: bool = True) -> None:
        """See :meth:`WanEmulator.set_down`."""
        self._call(lambda emu: emu.set_down(down))

    def stats(self) -> WanStats:
        """A consistent copy of the counters."""
        return self._call(lambda emu: emu.stats.copy())

    def reset_stats(self) -> None:
        self._call(lambda emu: emu.reset_stats())

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())

    async def _start(self) -> WanEmulator:
        emu = WanEmulator(*self._args)
        await emu.start()
        return emu

    def _submit(self, coro: Coroutine[object, object, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("ThreadedWanEmulator is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_THREAD_TIMEOUT)

    def _call(self, fn: Callable[[WanEmulator], _T]) -> _T:
        emu = self._emu
        if emu is None:
            raise RuntimeError("ThreadedWanEmulator is not started")

        async def call() -> _T:  # runs on the emulator's loop: no locking needed
            return fn(emu)

        return self._submit(call())
