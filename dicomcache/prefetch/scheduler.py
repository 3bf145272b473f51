"""Prefetch: when a viewer first touches a study, fetch the rest ahead of it.

A *touch* is any successful viewer request naming a study: an instance (any
API family), series or study metadata, frames, renderings
(:func:`touch_of` maps a request to ``(study, series, sop)``).  The first
touch of a study queues a job (``prefetch.mode``):

* ``series``: the touched series, from the touched slice outwards (the next,
  the previous, …: where a viewer goes whichever way it scrolls, and the order
  OHIF loads a stack in), in slice order when the touch named no slice;
* ``study``: the same, then every other series of the study.

**The viewer opens first.**  A study opened without an image (OHIF asks for the
series metadata, then for the middle slice) is listed at once, but nothing is
downloaded until the viewer has its first image (a touch that names one) or
:data:`OPEN_HOLD` seconds passed: on a slow link, six prefetch downloads already
under way took most of the link from that first image.

Listing a study costs three requests (``/tools/lookup``, then
``/studies/{id}/series`` and ``/studies/{id}/instances`` in parallel); each
instance is then fetched through :class:`~dicomcache.cache.fetch.Fetcher` — the same
single-flight, verified path as a viewer's miss — by ``prefetch.parallel``
workers.  The fetcher's :class:`~dicomcache.cache.fetch.PriorityLimiter` makes every
viewer download start at once and lets prefetch use only the slots viewers
leave free; a viewer asking for an instance still queued for prefetch joins
(and lifts) that download.  Later touches of the running study move the
queue to where the viewer is.

**The cache bound.**  Studies touched within ``active_seconds`` are "being
viewed".  Prefetch stops (outcome ``budget``) before the bytes of the studies
being viewed would exceed ``max_fraction × cache.max_size``.  Eviction is
least-recently-used, and everything else in the store is older than what is
being viewed, so as long as that working set fits, what prefetch brings in can
only push out entries nobody is looking at.

Jobs run one study at a time, the most recently touched first; at most
``max_queued`` wait (older touches are dropped).  A circuit breaker that opens
(link down) ends the running job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field

from dicomcache.audit.record import FAILED, PREFETCH, SUCCESS, Actor, Record, Subject
from dicomcache.audit.trail import AuditLog
from dicomcache.cache.fetch import Fetcher
from dicomcache.cache.instance import Instance
from dicomcache.cache.store import AsyncStore
from dicomcache.config import PrefetchSettings
from dicomcache.errors import IntegrityError, NotFoundUpstream, UpstreamError, UpstreamUnavailable
from dicomcache.metrics import Metrics
from dicomcache.prefetch.plan import Item, Job, order_items

log = logging.getLogger(__name__)

#: Who downloads nobody's touch caused are audited for (change-feed pre-warming).
SYSTEM = Actor("dicomcache", "system", "change-feed")

#: Seconds a study opened without an image waits for the viewer's first image before
#: its downloads start anyway (a viewer that only reads metadata).
OPEN_HOLD = 10.0

@dataclass(slots=True)
class Tally:
    """Counts of one prefetch run (a job, or a whole CLI run)."""

    total: int = 0
    done: int = 0
    fetched: int = 0
    present: int = 0
    failed: int = 0
    budget: int = 0
    #: Bytes downloaded.
    bytes: int = 0
    #: Bytes of the listed instances, and of those now local (downloaded or already there).
    total_bytes: int = 0
    done_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    errors: list[str] = field(default_factory=list)
    #: Stopped by an open circuit (the link is down): worth trying again later.
    interrupted: bool = False

    @property
    def remaining(self) -> int:
        return self.total - self.done


class Prefetcher:
    """Background prefetch jobs; see the module docstring.  ``start()``/``stop()`` in a loop."""

    def __init__(self, settings: PrefetchSettings, fetcher: Fetcher, store: AsyncStore,
                 metrics: Metrics, max_size: int, audit: AuditLog | None = None) -> None:
        self.settings = settings
        #: Each download is an access to patient data: recorded, for whoever caused it.
        self.audit = audit
        self.fetcher = fetcher
        self.client = fetcher.client
        self.store = store
        self.metrics = metrics
        self.budget = int(settings.max_fraction * max_size)
        fetcher.limiter.capacity = settings.parallel
        #: study → last touch (monotonic): what is "being viewed".
        self.viewing: dict[str, float] = {}
        #: job key (``study`` or ``study/series``) → its bytes (from Orthanc's listing).
        self.study_bytes: dict[str, int] = {}
        #: job key → when its job finished (not queued again while it is being viewed).
        self.done: dict[str, float] = {}
        self.pending: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.current: Job | None = None
        self._wake = asyncio.Event()
        #: Set when a touch names an image (a held job may start).
        self._opened = asyncio.Event()
        self.open_hold = OPEN_HOLD
        self._task: asyncio.Task[None] | None = None
        #: Downloads of a series' first image (:meth:`first_images`).
        self._firsts: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.settings.mode != "off"

    # --- touches -------------------------------------------------------------------
    def touch(self, study_uid: str, series_uid: str | None = None,
              sop_uid: str | None = None, actor: Actor | None = None) -> None:
        """A viewer used this study: queue it if new, or steer its running job.  ``actor``
        (who touched it) is who the job's downloads are audited for: the first to touch."""
        now = time.monotonic()
        self.viewing[study_uid] = now
        if len(self.viewing) > 4096:  # bound memory: forget studies no longer viewed
            horizon = now - self.settings.active_seconds
            for old in [s for s, at in self.viewing.items() if at < horizon]:
                self.viewing.pop(old, None)
            for table in (self.study_bytes, self.done):
                for key in [k for k in table if k.split("/")[0] not in self.viewing]:
                    table.pop(key, None)
        if not self.enabled or (self.settings.mode == "series" and series_uid is None):
            return  # series mode: wait for a touch that names the series
        job = Job(study_uid, series_uid, sop_uid, self.settings.mode, actor=actor,
                  opened=sop_uid is not None)
        if sop_uid is not None:
            self._opened.set()
        current = self.current
        if current is not None and current.key in (job.key, study_uid):
            current.focus(series_uid, sop_uid)
            return
        finished = self.done.get(job.key)
        if finished is not None and now - finished < self.settings.active_seconds:
            return
        queued = self.pending.get(job.key)
        if queued is not None:  # touched again: first in line, from where the viewer is
            self.pending.move_to_end(job.key)
            queued.series_uid = queued.series_uid or series_uid
            queued.sop_uid = sop_uid or queued.sop_uid
            queued.opened |= job.opened
            return
        self.pending[job.key] = job
        while len(self.pending) > self.settings.max_queued:
            dropped, _ = self.pending.popitem(last=False)
            log.info("prefetch queue full: dropped study %s", dropped)
        self._wake.set()

    def warm(self, study_uid: str) -> None:
        """Queue a whole study nobody is viewing yet (change-feed pre-warming), any ``mode``."""
        if study_uid in self.pending or (self.current and self.current.key == study_uid):
            return
        self.pending[study_uid] = Job(study_uid, None, None, "study", opened=True)
        self.pending.move_to_end(study_uid, last=False)  # behind everything a viewer touched
        while len(self.pending) > self.settings.max_queued:
            self.pending.popitem(last=False)
        self._wake.set()

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="prefetch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        tasks = [*self._firsts, *([task] if task is not None else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def first_images(self, oids: tuple[str, ...], actor: Actor | None) -> None:
        """Download ``oids`` now, as a viewer's requests: a series' middle instance,
        named by its metadata as it comes from Orthanc (OHIF opens a series there, as
        its first image or its thumbnail, once it has read the metadata; its request
        then joins this download).  Not held like a study's job: it *is* the first
        image.  Each is audited as a prefetch by ``actor``; none while a required
        audit trail cannot be written.  The caller checked that ``actor`` may prefetch
        this study (authorization, the principal's budget)."""
        if not self.enabled:
            return
        for oid in oids:
            task = asyncio.get_running_loop().create_task(self._first_image(oid, actor))
            self._firsts.add(task)
            task.add_done_callback(self._firsts.discard)

    async def _first_image(self, oid: str, actor: Actor | None) -> None:
        if self.audit is not None and self.audit.required and not self.audit.accepting():
            return
        started, t0 = time.time(), time.monotonic()
        found: Instance | None = None
        failure: str | None = None
        try:
            if await self.store.get(oid) is not None:
                return  # stored: nothing crosses the link, nothing to record
            found = await self.fetcher.by_orthanc_id(oid)
        except (UpstreamError, NotFoundUpstream, IntegrityError, OSError) as exc:
            # The viewer's own request, if it comes, tries again and reports.
            failure = str(exc)
            log.info("instance %s, fetched ahead of its viewer: %s", oid, exc)
        if self.audit is not None:
            subject = Subject(patient_id=found.patient_id, study_uid=found.study_uid,
                              series_uid=found.series_uid, sop_uid=found.sop_uid,
                              orthanc_id=oid, level="instance") if found is not None \
                else Subject(orthanc_id=oid, level="instance")
            self.audit.submit(Record(
                PREFETCH, actor or SYSTEM, subject, SUCCESS if found is not None else FAILED,
                bytes=found.size if found is not None else 0, seconds=time.monotonic() - t0,
                time=started, detail=failure))

    async def idle(self, timeout: float) -> bool:
        """Wait until no job runs or waits (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.current is not None or self.pending:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _run(self) -> None:
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            _, job = self.pending.popitem(last=True)  # the most recently touched first
            try:
                progress = await self.run_job(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("prefetch of study %s failed", job.study_uid)
                progress = Tally()
            if not progress.interrupted:  # else the next touch after the link is back retries
                self.done[job.key] = time.monotonic()

    # --- one study -----------------------------------------------------------------
    async def run_job(self, job: Job, progress: Tally | None = None) -> Tally:
        """List the study (or series) in fetch order and fetch what is missing."""
        progress = progress or Tally()
        self.current = job
        try:
            try:
                job.listed(await self.listing(job))
            except UpstreamUnavailable:
                raise
            except (UpstreamError, NotFoundUpstream) as exc:
                log.warning("prefetch of study %s: cannot list it: %s", job.study_uid, exc)
                progress.errors.append(f"study {job.study_uid}: {exc}")
                progress.failed += 1
                return progress
            await self._until_opened(job)
            return await self.fetch_listed(job, progress)
        except UpstreamUnavailable as exc:
            log.warning("prefetch of study %s stopped: %s", job.study_uid, exc.reason)
            progress.errors.append(f"study {job.study_uid}: {exc.reason}")
            progress.failed += 1
            progress.interrupted = True
            return progress
        finally:
            self.current = None
            self.metrics.prefetch_queue.set(0)

    async def _until_opened(self, job: Job) -> None:
        """Until the viewer has the job's first image, or :attr:`open_hold` seconds."""
        deadline = time.monotonic() + self.open_hold
        while not job.opened and (left := deadline - time.monotonic()) > 0:
            self._opened.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._opened.wait(), left)

    async def fetch_listed(self, job: Job, progress: Tally) -> Tally:
        """Fetch a listed job's ``items`` (counted into ``progress``)."""
        self.current = job
        self.study_bytes[job.key] = sum(it.size for it in job.items)
        progress.total += len(job.items)
        progress.total_bytes += self.study_bytes[job.key]
        try:
            await self._drain(job, progress)
            return progress
        except UpstreamUnavailable as exc:
            log.warning("prefetch of study %s stopped: %s", job.study_uid, exc.reason)
            progress.errors.append(f"study {job.study_uid}: {exc.reason}")
            progress.failed += len(job.items)
            progress.done += len(job.items)
            progress.interrupted = True
            return progress
        finally:
            self.current = None
            self.metrics.prefetch_queue.set(0)

    async def listing(self, job: Job) -> list[Item]:
        """The instances to fetch, in order (three requests for a study or a series, the
        requests of each made together)."""
        if job.mode == "series" and job.series_uid:
            series_id = await self.client.lookup(job.series_uid, "Series")
            series, instances, study = await asyncio.gather(
                self.client.get_json(f"/series/{series_id}", expect=dict),
                self.client.get_json(f"/series/{series_id}/instances", expect=list, of=dict),
                self.client.get_json(f"/series/{series_id}/study", expect=dict))
            items = order_items([series], instances, job.series_uid, job.sop_uid)
            if study.get("MainDicomTags", {}).get("StudyInstanceUID") == job.study_uid:
                await self._remember(job.study_uid, items, whole_study=False)
            return items
        study_id = await self.client.lookup(job.study_uid, "Study")
        series_list, instances = await asyncio.gather(
            self.client.get_json(f"/studies/{study_id}/series", expect=list, of=dict),
            self.client.get_json(f"/studies/{study_id}/instances", expect=list, of=dict))
        first = job.series_uid
        if first is None and series_list:
            first = series_list[0].get("MainDicomTags", {}).get("SeriesInstanceUID")
        items = order_items(series_list, instances, first, job.sop_uid)
        await self._remember(job.study_uid, items, whole_study=True)
        return items

    async def _remember(self, study_uid: str, items: list[Item], *, whole_study: bool) -> None:
        """Keep which instance each listed instance's UIDs name, for the viewer's WADO-URI
        and DICOMweb requests to come (no ``/tools/find`` each).

        The study (or series) UID named one resource in Orthanc (else the lookup was a
        404), so within it the study, series and SOP Instance UIDs name that instance.
        Without the series, a SOP Instance UID found in two series of the study names
        both: that is recorded only from a whole study's listing.
        """
        named: dict[tuple[str, str | None], list[str]] = {}
        for it in items:
            named.setdefault((it.sop_uid, it.series_uid), []).append(it.orthanc_id)
            if whole_study:
                named.setdefault((it.sop_uid, None), []).append(it.orthanc_id)
        await self.store.resolve_many([(sop, study_uid, series, oids)
                                       for (sop, series), oids in named.items()])

    def _others_bytes(self, job: Job) -> int:
        """Bytes of the other jobs' listings whose studies are being viewed."""
        horizon = time.monotonic() - self.settings.active_seconds
        return sum(n for key, n in self.study_bytes.items()
                   if key != job.key and self.viewing.get(key.split("/")[0], -1e18) >= horizon)

    async def _drain(self, job: Job, progress: Tally) -> None:
        used = [self._others_bytes(job)]
        stop = asyncio.Event()

        async def worker() -> None:
            while job.items and not stop.is_set():
                item = job.items.popleft()
                self.metrics.prefetch_queue.set(len(job.items))
                try:
                    await self._one(job, item, used, progress, stop)
                finally:
                    progress.done += 1

        workers = [asyncio.create_task(worker()) for _ in range(self.settings.parallel)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if stop.is_set():
            skipped = len(job.items)
            job.items.clear()
            progress.budget += skipped
            progress.done += skipped
            self.metrics.prefetched.labels("budget").inc(skipped)

    def _audit(self, job: Job, item: Item, found: Instance | None, started: float, t0: float,
               failure: str | None) -> None:
        """The record of one download (a failed one names what was asked)."""
        if self.audit is None:
            return
        if found is not None:
            subject = Subject(patient_id=found.patient_id, study_uid=found.study_uid,
                              series_uid=found.series_uid, sop_uid=found.sop_uid,
                              orthanc_id=found.orthanc_id, level="instance")
        else:
            subject = Subject(study_uid=job.study_uid, series_uid=item.series_uid,
                              sop_uid=item.sop_uid, orthanc_id=item.orthanc_id,
                              level="instance")
        self.audit.submit(Record(
            PREFETCH, job.actor or SYSTEM, subject, SUCCESS if found is not None else FAILED,
            bytes=found.size if found is not None else 0, seconds=time.monotonic() - t0,
            time=started, detail=failure))

    async def _one(self, job: Job, item: Item, used: list[int], progress: Tally,
                   stop: asyncio.Event) -> None:
        if await self.store.get(item.orthanc_id) is not None:
            used[0] += item.size
            progress.done_bytes += item.size
            progress.present += 1
            self.metrics.prefetched.labels("present").inc()
            return
        if used[0] + item.size > self.budget:
            if not stop.is_set():
                log.info("prefetch stops: the studies being viewed would fill more than "
                         "%.0f%% of cache.max_size", 100 * self.settings.max_fraction)
            stop.set()
            progress.budget += 1
            self.metrics.prefetched.labels("budget").inc()
            return
        if self.audit is not None and self.audit.required and not self.audit.accepting():
            if not stop.is_set():
                log.warning("prefetch stops: the audit trail cannot be written ([audit] "
                            "required)")
            stop.set()
            return
        if self.store.sync.health.degraded is not None:
            if not stop.is_set():  # it would download over the WAN what it cannot keep
                log.info("prefetch stops: the cache is degraded (%s)",
                         self.store.sync.health.degraded.trouble)
            stop.set()
            return
        used[0] += item.size  # reserved before the download: parallel workers see it
        started, t0 = time.time(), time.monotonic()
        try:
            found = await self.fetcher.by_orthanc_id(item.orthanc_id, viewer=False)
        except UpstreamUnavailable as exc:
            stop.set()
            self._audit(job, item, None, started, t0, str(exc.reason))
            raise
        except (UpstreamError, NotFoundUpstream) as exc:
            self._audit(job, item, None, started, t0, str(exc))
            used[0] -= item.size
            progress.failed += 1
            progress.errors.append(f"instance {item.orthanc_id} ({item.sop_uid}): {exc}")
            self.metrics.prefetched.labels("failed").inc()
            return
        self._audit(job, item, found, started, t0, None)
        size = found.size
        progress.fetched += 1
        progress.bytes += size
        progress.done_bytes += size
        self.metrics.prefetched.labels("fetched").inc()

