"""Per-client fairness on the viewer port: one client cannot take the clinic's share.

Two limits, per client (its address, or the address a trusted proxy names in
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

A refusal costs no upstream request, is counted in
``dicomcache_client_limited_total{limit}`` and logged at most once a minute per
client.  At most :data:`CAPACITY` clients are remembered (the least recently seen
idle ones are forgotten first), so many addresses bound the memory, not the table.
CORS preflights are answered before these limits (they cost nothing upstream).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import hdrs, web

from dicomcache.config import Settings
from dicomcache.http.audit import client_address
from dicomcache.http.auth import client_key
from dicomcache.http.keys import METRICS
from dicomcache.http.respond import json_error

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
