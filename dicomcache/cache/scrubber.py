"""Background scrubbing: every stored file re-verified at a bounded rate.

:meth:`Store.open_checked` catches a file that rotted before this process first
served it; the scrubber catches one that rots later.  It walks every entry,
oldest check first, re-verifying length, MD5 and the full parse
(:func:`~dicomcache.cache.admin.check_entry`, in a worker thread), paced so a
full pass takes ``cache.scrub_period`` seconds (default a day) and never reads
faster than :data:`MAX_RATE`.  A file that fails is quarantined (the running
daemon stops serving it at once) and its instance fetched again in the
background, at prefetch priority.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from dicomcache.cache.admin import check_entry
from dicomcache.cache.instance import Instance
from dicomcache.cache.store import AsyncStore
from dicomcache.metrics import Metrics

log = logging.getLogger(__name__)

#: Bytes per second the scrubber reads at most, however short the period.
MAX_RATE = 64 << 20
#: Pause between passes when the store is empty or a pass finished early.
IDLE = 60.0


class Scrubber:
    """Re-verifies the store in the background (see the module docstring)."""

    def __init__(self, store: AsyncStore, metrics: Metrics, period: float,
                 refetch: Callable[[str], Awaitable[object]]) -> None:
        self.store = store
        self.metrics = metrics
        self.period = period
        self.refetch = refetch
        self.passes = 0
        #: Entries checked since start, and those that failed.
        self.checked = 0
        self.bad = 0

    async def run(self) -> None:
        """Pass after pass until cancelled."""
        while True:
            started = time.monotonic()
            await self.one_pass()
            self.passes += 1
            await asyncio.sleep(max(IDLE, self.period - (time.monotonic() - started)))

    async def one_pass(self) -> None:
        entries = await asyncio.to_thread(lambda: list(self.store.sync.entries()))
        total = sum(e.size for e in entries) or 1
        rate = min(MAX_RATE, max(total / self.period, 1.0))
        for entry in entries:
            started = time.monotonic()
            await self.check(entry)
            await asyncio.sleep(max(0.0, entry.size / rate - (time.monotonic() - started)))

    async def check(self, entry: Instance) -> bool:
        """Verify one entry; quarantine and fetch again if it fails.  True when intact."""
        try:
            error = await asyncio.to_thread(check_entry, entry)
        except FileNotFoundError:
            return True  # evicted or purged meanwhile: nothing to check
        self.checked += 1
        self.metrics.scrubbed_bytes.inc(entry.size)
        if error is None:
            return True
        self.bad += 1
        self.metrics.bad_files.labels("scrub").inc()
        log.error("scrub: stored file of instance %s is bad (%s): quarantined, fetching it "
                  "again", entry.orthanc_id, error.reason)
        await asyncio.to_thread(self.store.sync.quarantine, entry, error.cause, error.reason)
        task = asyncio.ensure_future(self.refetch(entry.orthanc_id))
        task.add_done_callback(_log_refetch)
        return False


def _log_refetch(task: asyncio.Future[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("scrub: fetching a quarantined instance again failed: %s", task.exception())
