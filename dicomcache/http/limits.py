"""Per-client fairness on the viewer port: one client cannot take the clinic's share.

Two request limits, per client (its address, or the address a trusted proxy names in
``X-Forwarded-For``; an IPv6 client counts as its /64):

* **Requests in progress** (``server.max_requests_per_client``): more wait their
  turn, in order (a browser's burst of frame requests is slowed, not refused); when
  :data:`QUEUE_FACTOR` times that many already wait, the next is answered ``429``.
  One client's hundreds of cold misses then hold a bounded part of the upstream
  connections and of the worker threads, and other viewers' requests go ahead.
* **Request rate** (``server.client_rate`` per second, bursts up to
  ``server.client_burst``): a token bucket (:func:`take`); beyond it ``429`` with
  ``Retry-After``.  OHIF opening a 1,000-slice series sends about 1,000 requests
  within a second or two, well inside the default burst.

A third limit holds per connection, not per request: **open connections**
(``server.max_connections_per_client``, the TCP peer at accept(); see
:class:`ConnectionGate` and ``http/listeners.py``).

A refusal costs no upstream request, is counted in
``dicomcache_client_limited_total{limit}`` and logged at most once a minute per
client.  At most :data:`CAPACITY` clients are remembered (the least recently seen
idle ones are forgotten first), so many addresses bound the memory, not the table.
CORS preflights are answered before these limits (they cost nothing upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import cast

from aiohttp import hdrs, web

from dicomcache.config import Settings
from dicomcache.http.audit import TRUSTED_PROXIES, TrustedProxies, client_address
from dicomcache.http.auth import client_key
from dicomcache.http.keys import METRICS
from dicomcache.http.respond import json_error
from dicomcache.metrics import Metrics

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Requests of one client that may wait for a turn, per request it may have in progress.
QUEUE_FACTOR = 8
#: Clients remembered at most.
CAPACITY = 10000
#: Seconds between two log lines about one client's refusals.
LOG_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket's state: ``tokens`` left at time ``at``."""

    tokens: float
    at: float


def take(bucket: Bucket | None, now: float, rate: float, burst: float) -> tuple[Bucket, float]:
    """One request against a token bucket refilled at ``rate`` per second up to ``burst``
    (a new client starts full): the bucket after it, and the seconds to wait before
    retrying (0: admitted, one token taken; a refused request takes none)."""
    tokens = burst if bucket is None else min(burst, bucket.tokens
                                              + max(0.0, now - bucket.at) * rate)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), 0.0
    return Bucket(tokens, now), (1.0 - tokens) / rate


@dataclass(slots=True)
class _Client:
    bucket: Bucket | None = None
    running: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    logged: float = -math.inf

    @property
    def idle(self) -> bool:
        return self.running == 0 and not self.waiters


class ClientLimits:
    """The per-client table (event loop only)."""

    def __init__(self, in_flight: int, rate: float, burst: int, *,
                 capacity: int = CAPACITY) -> None:
        self.in_flight = in_flight
        self.rate = rate
        self.burst = float(burst)
        self.capacity = capacity
        self._table: OrderedDict[str, _Client] = OrderedDict()

    def client(self, key: str) -> _Client:
        entry = self._table.get(key)
        if entry is None:
            entry = self._table[key] = _Client()
            self._forget_idle()
        else:
            self._table.move_to_end(key)
        return entry

    def _forget_idle(self) -> None:
        if len(self._table) <= self.capacity:
            return
        for key in [k for k, c in self._table.items() if c.idle][: len(self._table)
                                                                   - self.capacity]:
            del self._table[key]

    def rate_wait(self, entry: _Client, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        entry.bucket, wait = take(entry.bucket, now, self.rate, self.burst)
        return wait

    async def turn(self, entry: _Client) -> bool:
        """Wait for a turn to run (``False``: too many wait already, refuse)."""
        if self.in_flight <= 0 or (entry.running < self.in_flight and not entry.waiters):
            entry.running += 1
            return True
        if len(entry.waiters) >= self.in_flight * QUEUE_FACTOR:
            return False
        waiter = asyncio.get_running_loop().create_future()
        entry.waiters.append(waiter)
        try:
            await waiter  # done() hands its turn over: `running` already counts this one
        except BaseException:
            if waiter in entry.waiters:
                entry.waiters.remove(waiter)
            elif not waiter.cancelled():
                self.done(entry)  # the turn was handed over as the wait was cancelled
            raise
        return True

    def done(self, entry: _Client) -> None:
        """A request finished: hand its turn to the oldest waiter, if any."""
        while entry.waiters:
            waiter = entry.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return
        entry.running -= 1

    def __len__(self) -> int:
        return len(self._table)


CLIENT_LIMITS = web.AppKey("client_limits", ClientLimits)


def setup(app: web.Application, settings: Settings) -> None:
    server = settings.server
    app[CLIENT_LIMITS] = ClientLimits(server.max_requests_per_client, server.client_rate,
                                      server.client_burst)
    app[CONNECTION_GATE] = ConnectionGate(server.max_connections_per_client,
                                          app[TRUSTED_PROXIES], app[METRICS])


def _refused(request: web.Request, entry: _Client, key: str, limit: str, wait: float,
             reason: str) -> web.Response:
    request.app[METRICS].client_limited.labels(limit).inc()
    now = time.monotonic()
    if now - entry.logged >= LOG_EVERY:
        entry.logged = now
        log.warning("client %s: %s (answered 429; counted in "
                    "dicomcache_client_limited_total, logged once a minute)", key, reason)
    seconds = max(1, math.ceil(wait))
    response = json_error(429, "too many requests", f"{reason}; retry in {seconds} s",
                          retry_after=seconds)
    response.headers[hdrs.RETRY_AFTER] = str(seconds)
    return response


@web.middleware
async def client_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
    limits = request.app.get(CLIENT_LIMITS)
    if limits is None:
        return await handler(request)
    client, _ = client_address(request)
    key = client_key(client)
    entry = limits.client(key)
    wait = limits.rate_wait(entry, time.monotonic())
    if wait > 0:
        return _refused(request, entry, key, "rate", wait,
                        f"more than {limits.rate:g} requests per second (server.client_rate)")
    if not await limits.turn(entry):
        return _refused(request, entry, key, "in_flight", 1.0,
                        f"{limits.in_flight} requests in progress and "
                        f"{limits.in_flight * QUEUE_FACTOR} waiting "
                        "(server.max_requests_per_client)")
    try:
        return await handler(request)
    finally:
        limits.done(entry)


# --- connections ------------------------------------------------------------------------
# Idle keep-alive connections cost a descriptor each and nothing else, so one host could
# hold thousands of them.  ``server.max_connections_per_client`` bounds them per client
# (the TCP peer: no request has been read yet, so no X-Forwarded-For); the listener
# (http/listeners.py) asks the gate at accept().  Beyond the bound the client's longest
# idle connection is closed (browsers open a new one, and retry a request that raced the
# close, as they do at any keep-alive timeout); when none is idle the new one is refused.


class Admission(Enum):
    """What is done with a client's new connection."""

    ADMIT = "admit"
    CLOSE_IDLE = "close_idle"  # admitted, its longest idle connection closed
    REFUSE = "refuse"  # closed at once: every connection it has is answering a request


def longest_idle(idle_since: Sequence[float | None]) -> int | None:
    """The index of the connection idle the longest (``None``: in use), or None."""
    found: int | None = None
    for i, since in enumerate(idle_since):
        if since is not None and (found is None or since < cast(float, idle_since[found])):
            found = i
    return found


def admission(idle_since: Sequence[float | None], limit: int) -> tuple[Admission, int | None]:
    """A new connection of a client whose open ones became idle at ``idle_since`` (``None``:
    in use), under ``limit`` (0: none): the decision, and which one to close."""
    if limit <= 0 or len(idle_since) < limit:
        return Admission.ADMIT, None
    victim = longest_idle(idle_since)
    return (Admission.REFUSE, None) if victim is None else (Admission.CLOSE_IDLE, victim)


def _nothing() -> None:
    pass


@dataclass(eq=False, slots=True)
class Connection:
    """One accepted connection on a gated listener."""

    client: str
    last_used: float
    transport: asyncio.Transport | None = None  # None while being set up (TLS handshake)
    busy: int = 0  # requests of it being answered
    #: Closes it now: the listener's (cancel its set-up), then ``transport.abort``.
    closer: Callable[[], None] = _nothing

    def idle_since(self) -> float | None:
        """When it became idle (no request read yet counts as idle since accepted), or
        None while it answers a request or still sends an answer."""
        if self.busy or (self.transport is not None
                         and self.transport.get_write_buffer_size()):
            return None
        return self.last_used


@dataclass(slots=True)
class _Peer:
    connections: list[Connection] = field(default_factory=list)
    logged: float = -math.inf


class ConnectionGate:
    """The open connections of the viewer listeners, per client (event loop only).  A
    client is remembered only while it has connections open: the table is bounded by
    the process's descriptors."""

    def __init__(self, limit: int, trusted: TrustedProxies, metrics: Metrics) -> None:
        self.limit = limit
        self.trusted = trusted
        self.metrics = metrics
        self._peers: dict[str, _Peer] = {}
        self._by_transport: dict[asyncio.BaseTransport, Connection] = {}
        self._descriptors_logged = -math.inf

    def accept(self, address: str) -> Connection | None:
        """A connection accepted from ``address``: its record, or None when it is to be
        closed at once (the client's bound reached, none of its connections idle)."""
        now = time.monotonic()
        key = client_key(address)
        peer = self._peers.setdefault(key, _Peer())
        if not self.trusted.trusts(address):
            verdict, victim = admission([c.idle_since() for c in peer.connections],
                                        self.limit)
            if verdict is not Admission.ADMIT:
                self._limited(peer, key, now, verdict)
            if verdict is Admission.REFUSE:
                if not peer.connections:
                    del self._peers[key]
                return None
            if victim is not None:
                self.close(peer.connections[victim])
        conn = Connection(key, now)
        peer.connections.append(conn)
        return conn

    def _limited(self, peer: _Peer, key: str, now: float, verdict: Admission) -> None:
        self.metrics.client_limited.labels("connections").inc()
        if now - peer.logged < LOG_EVERY:
            return
        peer.logged = now
        done = ("closed its longest idle one" if verdict is Admission.CLOSE_IDLE
                else "refused the new one (none idle)")
        log.warning("client %s: more than %d connections open "
                    "(server.max_connections_per_client): %s; counted in "
                    "dicomcache_client_limited_total{limit=\"connections\"}, logged once "
                    "a minute", key, self.limit, done)

    def made(self, conn: Connection, transport: asyncio.Transport) -> None:
        """The connection is set up (after the TLS handshake): it serves requests now."""
        conn.transport = transport
        conn.closer = transport.abort
        conn.last_used = time.monotonic()
        self._by_transport[transport] = conn

    def lost(self, conn: Connection) -> None:
        """The connection closed (or never got set up); calling it twice is harmless."""
        if conn.transport is not None:
            self._by_transport.pop(conn.transport, None)
        peer = self._peers.get(conn.client)
        if peer is not None and conn in peer.connections:
            peer.connections.remove(conn)
            if not peer.connections:
                del self._peers[conn.client]

    def of(self, transport: asyncio.BaseTransport | None) -> Connection | None:
        return None if transport is None else self._by_transport.get(transport)

    def close(self, conn: Connection) -> None:
        """Close an idle connection now and stop counting it.  Aborted: nothing is in
        flight on it, its descriptor is freed at once (with TLS, a close_notify the
        client may never answer would hold it for the shutdown timeout)."""
        self.lost(conn)
        conn.closer()

    def make_room(self) -> bool:
        """accept() found no descriptor left: close the connection idle the longest, of
        any client (as nginx reuses its idle keep-alive connections); False if none is."""
        every = [c for p in self._peers.values() for c in p.connections]
        victim = longest_idle([c.idle_since() for c in every])
        if victim is None:
            return False
        self.close(every[victim])
        return True

    def out_of_descriptors(self, exc: OSError, freed: bool) -> None:
        """Say so, once a minute (never a traceback per accept attempt)."""
        now = time.monotonic()
        if now - self._descriptors_logged < LOG_EVERY:
            return
        self._descriptors_logged = now
        log.error("viewer port: out of descriptors (%s; %d connections open): %s; raise "
                  "LimitNOFILE or lower server.max_connections_per_client (logged once a "
                  "minute)", exc.strerror or exc,
                  sum(len(p.connections) for p in self._peers.values()),
                  "closing the longest idle connections to accept new ones" if freed
                  else "no connection is idle, new ones wait in the listen queue")

    def __len__(self) -> int:
        return len(self._peers)


CONNECTION_GATE = web.AppKey("connection_gate", ConnectionGate)


@web.middleware
async def connection_in_use(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: a gated connection counts as in use (never closed as idle) from the
    start of a request until its answer is sent — sent here, so it is."""
    gate = request.app.get(CONNECTION_GATE)
    conn = gate.of(request.transport) if gate is not None else None
    if conn is None:
        return await handler(request)
    conn.busy += 1
    try:
        response = await handler(request)
        if not response.prepared:
            with contextlib.suppress(ConnectionError):  # the client left: aiohttp is quiet too
                await response.prepare(request)
                await response.write_eof()
        return response
    finally:
        conn.busy -= 1
        conn.last_used = time.monotonic()
