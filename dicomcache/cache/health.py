"""Whether the store caches, or is degraded (serving verified bodies without caching).

One :class:`StoreHealth` per store, written by worker threads (a failed write, the
periodic re-check) and read on the event loop (``/readyz``, the status page, the
gauges).  A change is logged once: an error when the cache becomes degraded or its
cause changes, a warning when it caches again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dicomcache.cache.space import MEANING
from dicomcache.errors import StoreTrouble

log = logging.getLogger("dicomcache.cache.store")


@dataclass(frozen=True, slots=True)
class Degraded:
    """Why the cache does not cache now, since when (Unix time)."""

    trouble: StoreTrouble
    detail: str
    since: float

    @property
    def status(self) -> str:
        """``cache degraded: <cause>: <what it means> (<detail>)``: one line for people."""
        return f"cache degraded: {self.trouble}: {MEANING[self.trouble]} ({self.detail})"


class StoreHealth:
    """The store's state: ``degraded`` is ``None`` while it caches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.degraded: Degraded | None = None
        #: Called (from any thread) with the new state after each change.
        self.listeners: list[Callable[[Degraded | None], None]] = []

    def degrade(self, trouble: StoreTrouble, detail: str) -> None:
        """The store cannot cache now; logged when the cause is new."""
        with self._lock:
            current = self.degraded
            if current is not None and current.trouble == trouble:
                self.degraded = Degraded(trouble, detail, current.since)
                return
            self.degraded = state = Degraded(trouble, detail, time.time())
        log.error("%s; instances are served verified from Orthanc without being cached, "
                  "and caching resumes by itself once this is fixed", state.status)
        self._tell(state)

    def recover(self) -> None:
        """The store caches again."""
        with self._lock:
            if self.degraded is None:
                return
            was, self.degraded = self.degraded, None
        log.warning("cache recovered (it was degraded for %.0f s: %s): caching again",
                    time.time() - was.since, was.trouble)
        self._tell(None)

    def _tell(self, state: Degraded | None) -> None:
        for listener in list(self.listeners):
            listener(state)
