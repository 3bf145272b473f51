"""A circuit breaker for the link to Orthanc: stop waiting on a dead WAN.

Closed (normal): every request goes to Orthanc.  After ``failures``
consecutive requests of dicomcache's own that failed on *every* attempt because
the link failed (timeout, reset, refused connection — see
:func:`dicomcache.upstream.policy.link_down`): an answer, even a 5xx for one
resource, says the link works, refused credentials are not a dead link, and the
read-through (whose paths viewers choose) never counts
the circuit **opens**: requests that need Orthanc fail at once with
:class:`~dicomcache.errors.UpstreamUnavailable` (a ``503`` with
``Retry-After`` and a JSON reason for viewers) instead of each waiting through
its retries, and in-flight retry loops stop at their next attempt.  Cached
instances never need Orthanc and stay available.

While open, one background probe (``GET /system``) runs every
``probe_interval`` seconds; the first success closes the circuit.  Any success
of a real request also resets the failure count.  A 4xx answer counts as
success: Orthanc answered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dicomcache.errors import Cause, UpstreamUnavailable
from dicomcache.metrics import Metrics

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]


class CircuitBreaker:
    """State of the link to one Orthanc; create inside a running loop, ``await close()``."""

    def __init__(self, failures: int, probe_interval: float, probe: Probe, metrics: Metrics,
                 where: str) -> None:
        self.threshold = failures
        self.probe_interval = probe_interval
        self._probe = probe
        self.metrics = metrics
        self.where = where
        self.consecutive = 0
        self.opened_at: float | None = None
        self.reason = ""
        self.next_probe = 0.0
        #: Times the circuit opened, and requests it failed fast (for status pages).
        self.opened_count = 0
        self.rejected_count = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    @property
    def state(self) -> str:
        return "open" if self.is_open else "closed"

    def retry_after(self) -> int:
        """Whole seconds until the next probe could close the circuit (at least 1)."""
        return max(1, math.ceil(self.next_probe - time.monotonic()))

    def check(self, what: str) -> None:
        """Raise :class:`UpstreamUnavailable` when the circuit is open."""
        if self.opened_at is None:
            return
        self.rejected_count += 1
        raise UpstreamUnavailable(
            Cause.CIRCUIT_OPEN,
            f"{what}: Orthanc at {self.where} is unreachable ({self.reason}); dicomcache "
            f"serves what it has cached and retries the link in the background", attempts=0,
            retry_after=self.retry_after())

    def success(self) -> None:
        self.consecutive = 0
        if self.opened_at is not None:
            self._close("a request succeeded")

    def failure(self, reason: str) -> None:
        """One request failed on every attempt for a link-level reason."""
        if not self.enabled:
            return
        self.consecutive += 1
        self.reason = reason
        if self.opened_at is None and self.consecutive >= self.threshold:
            self.opened_at = time.monotonic()
            self.next_probe = self.opened_at + self.probe_interval
            self.opened_count += 1
            self.metrics.note_upstream(False, self.where, f"circuit open: {reason}")
            log.error("circuit to %s OPEN after %d failed requests (%s): misses fail fast "
                      "with 503, probing every %g s", self.where, self.consecutive, reason,
                      self.probe_interval)
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(
                    self._probe_loop(), name="circuit probe")

    def _close(self, why: str) -> None:
        opened, self.opened_at = self.opened_at, None
        self.consecutive = 0
        self.metrics.note_upstream(True, self.where)
        if opened is not None:
            log.warning("circuit to %s CLOSED after %.1f s: %s", self.where,
                        time.monotonic() - opened, why)

    async def _probe_loop(self) -> None:
        while self.opened_at is not None:
            await asyncio.sleep(max(0.0, self.next_probe - time.monotonic()))
            if self.opened_at is None:
                return
            try:
                ok = await self._probe()
            except Exception:
                log.exception("circuit probe failed")
                ok = False
            if ok:
                self._close("probe GET /system answered")
                return
            self.next_probe = time.monotonic() + self.probe_interval

    def status(self) -> dict[str, Any]:
        """For health endpoints and the status page."""
        return {"state": self.state, "consecutive_failures": self.consecutive,
                "threshold": self.threshold, "reason": self.reason if self.is_open else "",
                "retry_after": self.retry_after() if self.is_open else None,
                "opened": self.opened_count, "rejected": self.rejected_count}

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
