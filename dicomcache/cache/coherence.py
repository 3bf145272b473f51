"""Coherence: what Orthanc deleted, replaced or corrected is not served from the store.

Orthanc deletes instances, series and studies, re-creates them under the same
identifiers, and overwrites instances in place (``OverwriteInstances``: a
corrected Patient Name, same UIDs, same Orthanc ID).  A stored copy stays
Orthanc's only while someone checks.  The rules:

* **Series confirmation.**  A stored entry is served only while Orthanc's list of
  the instances of its series (``GET /series/{id}``, one small request for the
  whole series) was read within twice ``cache.confirm_interval``.  Entries missing
  from the list are purged (deleted upstream); when the series' ``LastUpdate``
  moved since its entries were last confirmed, each one's MD5 is compared with
  Orthanc's and the changed ones are purged (replaced).  The first request for a
  series not confirmed lately waits for that one request; series in use are
  confirmed again in the background every ``confirm_interval``, so their requests
  never wait.
* **MD5 age.**  An entry whose MD5 Orthanc has not confirmed for
  ``cache.revalidate_after`` seconds is compared again before it is served.
* **The change feed** (:mod:`dicomcache.upstream.changes`) says at once when a
  stored instance got new content (``NewInstance``, ``UpdatedAttachment``): its MD5
  is compared at once.  Orthanc 1.10 writes no ``Deleted`` change (the changes of
  a deleted resource leave its history), so deletions are found by confirmation; a
  gap in the feed makes every series unconfirmed.
* **Offline**, entries are served unconfirmed (stale-if-error) and counted
  (``dicomcache_cache_unconfirmed_served_total``).

Every purge tells the study hooks (``removed=True``), so metadata, listings and
rendered answers derived from the study are dropped too.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Iterable, Sequence

from dicomcache.cache.instance import Instance
from dicomcache.cache.store import AsyncStore
from dicomcache.config import CacheSettings
from dicomcache.errors import NotFoundUpstream, UpstreamError
from dicomcache.metrics import Metrics
from dicomcache.singleflight import SingleFlight
from dicomcache.upstream.changes import StudyEvent, StudyHook, notify
from dicomcache.upstream.client import OrthancClient

log = logging.getLogger(__name__)

#: A series used within this many seconds is confirmed again in the background.
ACTIVE_SECONDS = 120.0
#: MD5 comparisons asked of Orthanc at once.
MD5_CONCURRENCY = 8
#: Change types that mean "this instance may have new content".
CONTENT_CHANGES = frozenset({"NewInstance", "UpdatedAttachment", "ModifiedInstance"})


def needs_series_check(confirmed_at: float | None, now: float, interval: float) -> bool:
    """Whether a series must be confirmed before its entries are served (pure).

    ``interval`` 0 turns confirmation off.  Twice the interval, so a series in use
    (confirmed in the background every interval) never makes a request wait.
    """
    if interval <= 0:
        return False
    return confirmed_at is None or now - confirmed_at > 2 * interval


def recently_confirmed(entry_confirmed_at: float, wall_now: float, interval: float) -> bool:
    """Whether an entry itself came from Orthanc (downloaded, or its MD5 compared) so
    recently that its series need not be confirmed for it (pure)."""
    return wall_now - entry_confirmed_at <= 2 * interval


def needs_md5_check(entry_confirmed_at: float, wall_now: float, revalidate_after: float) -> bool:
    """Whether an entry's MD5 must be compared with Orthanc's before it is served (pure)."""
    return revalidate_after > 0 and wall_now - entry_confirmed_at > revalidate_after


class Coherence:
    """Confirms stored entries against Orthanc; see the module docstring."""

    def __init__(self, settings: CacheSettings, client: OrthancClient, store: AsyncStore,
                 metrics: Metrics, hooks: list[StudyHook]) -> None:
        self.interval = settings.confirm_interval
        self.revalidate_after = settings.revalidate_after
        self.client = client
        self.store = store
        self.metrics = metrics
        self.hooks = hooks
        #: Series (Orthanc ID) → ``time.monotonic()`` of its last confirmation.
        self._confirmed: dict[str, float] = {}
        #: Series → its instances as Orthanc listed them then (``None``: it had none).
        self._listed: dict[str, frozenset[str]] = {}
        #: Series → ``time.monotonic()`` of the last request for one of its entries.
        self._active: dict[str, float] = {}
        self._flights: SingleFlight[None] = SingleFlight()
        self._task: asyncio.Task[None] | None = None
        #: Instances purged by this process, by cause (for summaries).
        self.purges: collections.Counter[str] = collections.Counter()
        #: For the status page: entries served unconfirmed, and why, last.
        self.unconfirmed_since: float | None = None
        self.unconfirmed_reason = ""

    # --- serving ------------------------------------------------------------------------
    async def check(self, entry: Instance) -> Instance | None:
        """``entry`` if it may be served, or ``None`` when it was purged meanwhile
        (Orthanc deleted it, or holds other content under its identity)."""
        return (await self.check_many([entry]))[0]

    async def check_many(self, entries: Sequence[Instance | None]) -> list[Instance | None]:
        """:meth:`check` for many entries (one confirmation per series)."""
        now, wall = time.monotonic(), time.time()
        series: set[str] = set()
        stale: set[str] = set()
        for e in entries:
            if e is None or not e.stored:
                continue
            series.add(e.series_oid)
            if needs_series_check(self._confirmed.get(e.series_oid), now, self.interval) \
                    and not recently_confirmed(e.confirmed_at, wall, self.interval):
                stale.add(e.series_oid)
        for oid in series:
            self._active[oid] = now
        old = [e for e in entries if e is not None and e.stored
               and needs_md5_check(e.confirmed_at, wall, self.revalidate_after)]
        if not stale and not old:
            return list(entries)
        try:
            await asyncio.gather(*(self.confirm_series(oid) for oid in stale))
            if old:
                await self.confirm_md5(old)
        except UpstreamError as exc:  # Orthanc unreachable: serve what is stored
            self._served_unconfirmed(len(entries), str(exc))
            return list(entries)
        still = await asyncio.to_thread(
            lambda: [self.store.sync.get(e.orthanc_id) if e is not None and e.stored else e
                     for e in entries])
        return still

    def listed_since(self, series_oid: str, since: float) -> frozenset[str] | None:
        """The series' instances as Orthanc listed them after ``since`` (monotonic), if
        a confirmation read them since then: fresher than a listing made at ``since``."""
        at = self._confirmed.get(series_oid)
        return self._listed.get(series_oid) if at is not None and at > since else None

    def _served_unconfirmed(self, count: int, reason: str) -> None:
        self.metrics.unconfirmed.inc(count)
        self.metrics.revalidations.labels("unreachable").inc()
        if self.unconfirmed_since is None:
            self.unconfirmed_since = time.time()
            log.warning("coherence: Orthanc cannot confirm stored instances (%s); serving "
                        "them unconfirmed until it can", reason)
        self.unconfirmed_reason = reason

    # --- confirmation -------------------------------------------------------------------
    async def confirm_series(self, series_oid: str) -> None:
        """Read Orthanc's list of the series' instances and purge what it no longer has
        (see the module docstring); one flight per series however many ask."""
        await self._flights.run(series_oid, lambda: self._confirm_series(series_oid))

    async def _confirm_series(self, series_oid: str) -> None:
        asked_at = time.time()
        try:
            info = await self.client.get_json(f"/series/{series_oid}", kind="confirm",
                                              retry=False, expect=dict)
        except NotFoundUpstream:
            info = None
        stored = await asyncio.to_thread(self.store.sync.in_series, series_oid)
        listed = set(info.get("Instances") or ()) if isinstance(info, dict) else set()
        # An entry stored after Orthanc answered may be newer than the list: never purged here.
        gone = [e for e in stored if e.orthanc_id not in listed and e.stored_at < asked_at]
        present = [e for e in stored if e.orthanc_id in listed]
        if gone:
            await self.purge(gone, "deleted_upstream")
        last_update = str(info.get("LastUpdate", "")) if isinstance(info, dict) else None
        before = await asyncio.to_thread(self.store.sync.series_updated, series_oid)
        if present and before is not None and before != last_update:
            await self.confirm_md5(present)  # added to, or overwritten in place
        if last_update != before:
            await asyncio.to_thread(self.store.sync.set_series_updated, series_oid,
                                    last_update)
        if len(stored) == len(gone):  # nothing of it stored any more: nothing to confirm
            self._active.pop(series_oid, None)
        self._confirmed[series_oid] = time.monotonic()
        if len(self._listed) > 10_000:
            self._listed.clear()
        self._listed[series_oid] = frozenset(listed)
        self.unconfirmed_since = None
        self.metrics.revalidations.labels("changed" if gone else "confirmed").inc()

    async def confirm_md5(self, entries: Sequence[Instance]) -> None:
        """Compare each entry's MD5 with Orthanc's; purge the changed ones (replaced) and
        the ones Orthanc no longer has (deleted), record the others as confirmed.

        An instance Orthanc keeps no MD5 for (``StoreMD5ForAttachments`` off) cannot
        be compared without downloading it: it counts as confirmed.
        """
        limit = asyncio.Semaphore(MD5_CONCURRENCY)

        async def one(entry: Instance) -> tuple[Instance, str | None]:
            async with limit:
                return entry, await self._md5_or_gone(entry.orthanc_id)
        results = await asyncio.gather(*(one(e) for e in entries))
        gone = [e for e, md5 in results if md5 == _GONE]
        changed = [e for e, md5 in results if md5 not in (None, _GONE, e.md5)]
        same = [e for e, md5 in results if md5 is None or md5 == e.md5]
        if gone:
            await self.purge(gone, "deleted_upstream")
        if changed:
            await self.purge(changed, "replaced")
        if same:
            await asyncio.to_thread(self.store.sync.confirm, same, time.time())
        self.metrics.revalidations.labels("changed" if gone or changed else "confirmed").inc()

    async def _md5_or_gone(self, orthanc_id: str) -> str | None:
        md5 = await self.client.instance_md5(orthanc_id)
        if md5 is not None:
            return md5
        try:  # no MD5 attachment, or no instance at all?
            await self.client.get_json(f"/instances/{orthanc_id}", kind="confirm",
                                       retry=False)
        except NotFoundUpstream:
            return _GONE
        return None

    async def purge(self, entries: Sequence[Instance], cause: str) -> int:
        """Remove entries Orthanc no longer holds as they are, and tell the study hooks."""
        removed, _ = await asyncio.to_thread(self.store.sync.purge, list(entries))
        if removed:
            self.purges[cause] += removed
            self.metrics.purged.labels(cause).inc(removed)
            log.info("coherence: %d stored instance(s) %s in Orthanc purged (%s)", removed,
                     "deleted" if cause == "deleted_upstream" else "changed",
                     ", ".join(e.orthanc_id for e in entries[:3])
                     + (", …" if len(entries) > 3 else ""))
        for study in sorted({e.study_uid for e in entries if e.study_uid}):
            await notify(self.hooks, StudyEvent(study, removed=True))
        return removed

    # --- what the change feed says ------------------------------------------------------
    async def changed(self, kind: str, level: str, resource: str) -> None:
        """One change from Orthanc's feed (:class:`~dicomcache.upstream.changes.ChangeWatcher`)."""
        if level == "Instance":
            entry = await self.store.get(resource)
            if entry is None:
                return
            self._confirmed.pop(entry.series_oid, None)
            if kind == "Deleted":
                await self.purge([entry], "deleted_upstream")
            elif kind in CONTENT_CHANGES:
                await self.confirm_md5([entry])
        elif level == "Series":
            self._confirmed.pop(resource, None)
            if kind == "Deleted":
                await self.store.drain()  # bodies being written are in the store first
                await self.purge(await asyncio.to_thread(self.store.sync.in_series, resource),
                                 "deleted_upstream")
        elif level == "Study":
            if kind == "Deleted":
                await self.store.drain()  # (as for a series)
            entries = await asyncio.to_thread(self.store.sync.in_study, resource)
            for oid in {e.series_oid for e in entries}:
                self._confirmed.pop(oid, None)
            if kind == "Deleted":
                await self.purge(entries, "deleted_upstream")
        elif kind == "Deleted":  # a patient: which of ours, only confirmation can say
            self.unconfirm_all()

    async def gap(self, why: str) -> None:
        """Changes may have been missed: every series is confirmed again before use."""
        self.metrics.feed_gaps.inc()
        log.warning("coherence: %s; every stored series is confirmed again before it is "
                    "served", why)
        self.unconfirm_all()

    def unconfirm_all(self) -> None:
        self._confirmed.clear()

    # --- the background loop ------------------------------------------------------------
    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="coherence")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.confirm_active()
            except asyncio.CancelledError:
                raise
            except UpstreamError as exc:
                log.debug("coherence: background confirmation failed: %s", exc)
            except Exception:
                log.exception("coherence: background confirmation failed")

    async def confirm_active(self) -> None:
        """Confirm again the series used lately whose confirmation is an interval old."""
        now = time.monotonic()
        for oid, used in list(self._active.items()):
            if now - used > ACTIVE_SECONDS:
                del self._active[oid]
        due = [oid for oid in self._active
               if now - self._confirmed.get(oid, -math.inf) >= self.interval]
        for batch in _chunks(due, 4):
            await asyncio.gather(*(self.confirm_series(oid) for oid in batch))

    def status(self) -> dict[str, object]:
        """For the status page."""
        return {"confirm_interval": self.interval, "revalidate_after": self.revalidate_after,
                "active_series": len(self._active), "confirmed_series": len(self._confirmed),
                "unconfirmed_since": self.unconfirmed_since,
                "unconfirmed_reason": self.unconfirmed_reason}


#: :meth:`Coherence._md5_or_gone`'s answer for an instance Orthanc does not have.
_GONE = "\0gone"


def _chunks(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]
