"""Miss handling: coalesce, download, verify, commit.

One download per Orthanc instance at a time, whatever API family asked
(single-flight keyed by the Orthanc instance ID, which every family resolves
to first).  Each attempt downloads the body and Orthanc's stored MD5 in
parallel, verifies length, MD5 and a full DICOM parse in a worker thread, and
only then commits it to the store.  A body that fails is dropped and retried;
after the last retry the caller gets an :class:`UpstreamError`.

Downloads go through a :class:`PriorityLimiter`: a viewer's download starts at
once, a prefetch download only while fewer than ``capacity`` downloads are in
flight, so prefetch fills the link's idle capacity and never makes a viewer
wait.  A viewer asking for an instance whose prefetch is still queued lifts it
to viewer priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from dicomcache.cache.coherence import Coherence
from dicomcache.cache.instance import Instance
from dicomcache.cache.store import AsyncStore
from dicomcache.dicom.verify import DicomSummary, identity_problem, md5_hex, verify_bytes
from dicomcache.errors import Cause, IntegrityError, NotFoundUpstream, UpstreamError
from dicomcache.metrics import Metrics
from dicomcache.singleflight import SingleFlight
from dicomcache.upstream.client import GZIP, OrthancClient

log = logging.getLogger(__name__)


def only_one(found: list[str], sop_uid: str, study_uid: str | None,
             series_uid: str | None) -> str:
    """The one Orthanc instance of ``found``; :class:`NotFoundUpstream` for none or several
    (Orthanc's WADO-URI and DICOMweb answer 404 to UIDs that name several instances)."""
    if len(found) == 1:
        return found[0]
    what = f"SOP Instance UID {sop_uid}" + (f" in study {study_uid}" if study_uid else "") \
        + (f" and series {series_uid}" if series_uid else "")
    if not found:
        raise NotFoundUpstream(404, f"Orthanc has no instance with {what}")
    raise NotFoundUpstream(404, f"{what} names {len(found)} instances in Orthanc (the same "
                           f"UIDs under several patients); Orthanc answers 404 too")


T = TypeVar("T")


class PriorityLimiter:
    """Downloads in flight: urgent (viewer) ones never wait; others wait for a free slot."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.active = 0
        self.waiting = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def slot(self, urgent: Callable[[], bool]) -> AsyncIterator[None]:
        """Hold a slot; ``urgent()`` is re-checked while waiting (priority can be raised)."""
        if not urgent() and self.active >= self.capacity:
            self.waiting += 1
            try:
                async with self._cond:
                    await self._cond.wait_for(lambda: urgent() or self.active < self.capacity)
            finally:
                self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self.wake()

    def wake(self) -> None:
        """Re-evaluate waiters (a slot freed, or a waiter became urgent)."""
        if not self.waiting:
            return

        async def notify() -> None:
            async with self._cond:
                self._cond.notify_all()
        asyncio.get_running_loop().create_task(notify())


class Fetcher:
    """Turns misses into verified, stored instances; see the module docstring."""

    def __init__(self, client: OrthancClient, store: AsyncStore, metrics: Metrics,
                 coherence: Coherence | None = None) -> None:
        self.client = client
        self.store = store
        self.metrics = metrics
        #: Confirms stored entries against Orthanc before they are served (None: trusted).
        self.coherence = coherence
        self._flights: SingleFlight[Any] = SingleFlight()
        #: Single-flight keys some viewer is waiting for (downloaded at viewer priority).
        self._urgent: set[str] = set()
        #: Shared by viewer and prefetch downloads; the prefetcher sets the capacity.
        self.limiter = PriorityLimiter(client.settings.max_connections)

    async def instance(self, orthanc_id: str) -> Instance:
        """The verified instance: from the store, or downloaded (once, however many ask)."""
        entry = await self.stored(orthanc_id)
        if entry is not None:
            return entry
        return await self.by_orthanc_id(orthanc_id)

    async def stored(self, orthanc_id: str) -> Instance | None:
        """The stored entry of an instance, if it may be served: Orthanc still holds it as
        it is (:mod:`~dicomcache.cache.coherence`); ``None`` for a miss."""
        entry = await self.store.get(orthanc_id)
        if entry is None or self.coherence is None:
            return entry
        return await self.coherence.check(entry)

    async def confirmed(self, entries: list[Instance | None]) -> list[Instance | None]:
        """:meth:`stored` for entries already looked up (one confirmation per series)."""
        if self.coherence is None:
            return entries
        return await self.coherence.check_many(entries)

    async def by_uids(self, sop_uid: str, study_uid: str | None = None,
                      series_uid: str | None = None) -> tuple[Instance, bool]:
        """The one instance these UIDs name (see :meth:`find`) and whether it came from
        the store.

        A remembered resolution whose instance Orthanc no longer has (deleted, or
        re-created under another patient) is forgotten and the UIDs resolved afresh,
        so the answer is what Orthanc answers now.
        """
        remembered = await self.store.resolution(sop_uid, study_uid, series_uid) is not None
        entry, oid = await self.locate(sop_uid, study_uid, series_uid)
        if entry is not None:
            return entry, True
        try:
            return await self.by_orthanc_id(oid), False
        except NotFoundUpstream:
            if not remembered:
                raise
        await asyncio.to_thread(self.store.sync.forget_resolutions, sop_uid)
        oid = await self.resolve(sop_uid, study_uid, series_uid)
        return await self.by_orthanc_id(oid), False

    async def by_orthanc_id(self, orthanc_id: str, *, viewer: bool = True) -> Instance:
        """Download and verify, unless a download of this instance is already in flight.

        ``viewer=False`` (prefetch) waits for a free slot in :attr:`limiter`.
        """
        return await self._single_flight(orthanc_id, lambda: self._download(orthanc_id),
                                         viewer=viewer)

    async def locate(self, sop_uid: str, study_uid: str | None = None,
                     series_uid: str | None = None) -> tuple[Instance | None, str]:
        """The one Orthanc instance these UIDs name (see :meth:`find`) and its stored
        copy, if any: a route serves the copy (a hit) or downloads the instance."""
        oid = await self.resolve(sop_uid, study_uid, series_uid)
        return await self.stored(oid), oid

    async def find(self, sop_uid: str, study_uid: str | None = None,
                   series_uid: str | None = None) -> Instance:
        """The one instance these UIDs name, as Orthanc would answer a request naming them.

        :class:`NotFoundUpstream` (a 404, as from Orthanc) when they name none, or
        several: the same UIDs under two patients are never answered with either.
        """
        return await self.instance(await self.resolve(sop_uid, study_uid, series_uid))

    async def resolve(self, sop_uid: str, study_uid: str | None = None,
                      series_uid: str | None = None) -> str:
        """The Orthanc instance these UIDs name (see :meth:`find`).

        Orthanc's answer is kept (:meth:`Store.resolution`), so a hit costs no request.
        While Orthanc cannot be asked, the entries stored with these UIDs stand in:
        exactly one is served, several are ambiguous.
        """
        known = await self.store.resolution(sop_uid, study_uid, series_uid)
        if known is None:
            key = f"find:{self.store.sync.uids_key(sop_uid, study_uid, series_uid)}"
            try:
                known = await self._single_flight(
                    key, lambda: self._find(sop_uid, study_uid, series_uid))
            except UpstreamError:
                stored = await self.store.by_uids(sop_uid, study_uid, series_uid)
                if not stored:
                    raise
                known = [i.orthanc_id for i in stored]
        return only_one(known, sop_uid, study_uid, series_uid)

    async def _find(self, sop_uid: str, study_uid: str | None,
                    series_uid: str | None) -> list[str]:
        found = await self.client.find_instances(sop_uid, study_uid, series_uid)
        await self.store.resolve_as(sop_uid, study_uid, series_uid, found)
        return found

    async def _single_flight(self, key: str, start: Callable[[], Awaitable[T]], *,
                             viewer: bool = True) -> T:
        running = key in self._flights
        if viewer and key not in self._urgent:
            self._urgent.add(key)
            if running:  # a queued prefetch of it: now a viewer waits for it
                self.limiter.wake()
        if running:
            self.metrics.coalesced.inc()
        flight = self._flights.start(key, start)
        if not running:
            flight.add_done_callback(functools.partial(self._landed, key))
        result: T = await asyncio.shield(flight)
        return result

    def claim(self, keys: list[str]) -> dict[str, asyncio.Future[Any]]:
        """Register downloads another source (a series stream) is about to deliver.

        For each key with no download in flight, a future is entered in the
        single-flight map, so a concurrent :meth:`by_orthanc_id` waits for it
        instead of starting a download of its own.  Returns the futures claimed
        (keys already in flight are left out).  The claimer must settle every
        one: with a verified :class:`Instance`, or by :meth:`fall_back`.
        """
        claimed: dict[str, asyncio.Future[Any]] = {}
        for key in keys:
            fut = self._flights.claim(key)
            if fut is None:
                continue
            fut.add_done_callback(functools.partial(self._landed, key))
            claimed[key] = fut
        return claimed

    def _landed(self, key: str, _flight: asyncio.Future[Any]) -> None:
        self._urgent.discard(key)

    def fall_back(self, orthanc_id: str, fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Settle a claimed future through the ordinary per-instance download (retried).

        Returns the download task (its outcome is also copied into ``fut``).
        """
        self._urgent.add(orthanc_id)  # a viewer is waiting for it
        task = asyncio.ensure_future(self._download(orthanc_id))

        def copy(t: asyncio.Future[Any]) -> None:
            if t.cancelled():
                if not fut.done():
                    fut.cancel()
                return
            exc = t.exception()
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(t.result())
        task.add_done_callback(copy)
        return task

    async def _download(self, orthanc_id: str) -> Instance:
        # A download that finished just before this one was asked for: no second trip.
        entry = await self.store.get(orthanc_id)
        if entry is not None:
            return entry
        async with self.limiter.slot(lambda: orthanc_id in self._urgent):
            entry = await self.store.get(orthanc_id)  # waited: maybe there now
            if entry is not None:
                return entry
            summary, md5, data = await self.client.retrying(
                lambda attempt: self._attempt(orthanc_id),
                what=f"instance {orthanc_id}")
        self.metrics.fetched_bytes.inc(len(data))
        fetched = Instance.verified(summary, md5, data, orthanc_id)
        try:
            stored = await self.store.commit_now(fetched)
        except OSError as exc:  # StoreFull included
            # The viewer still gets its verified image; only caching is lost.
            self.metrics.note_uncached(orthanc_id, exc)
            return fetched
        return stored or fetched  # None: evicted at once, bigger than the whole cache

    async def _attempt(self, orthanc_id: str) -> tuple[DicomSummary, str, bytes]:
        md5_task = asyncio.create_task(self.client.instance_md5(orthanc_id))
        try:
            headers, body = await self.client.get(
                f"/instances/{orthanc_id}/file", kind="instance",
                headers=GZIP if self.client.settings.compression == "all" else None)
            expected_md5 = await md5_task
        finally:
            md5_task.cancel()
        declared = headers.get("Content-Length")
        expected_length = int(declared) if declared and declared.isdigit() else None
        encoding = headers.get("Content-Encoding", "identity").lower()
        if expected_md5 is None:
            log.warning("Orthanc has no MD5 for instance %s (StoreMD5ForAttachments off?): "
                        "relying on length and a full parse", orthanc_id)

        def check() -> tuple[DicomSummary, str, bytes]:
            data = body
            if expected_length is not None and len(body) != expected_length:
                raise IntegrityError(Cause.LENGTH_MISMATCH, f"received {len(body)} bytes, "
                                     f"Content-Length said {expected_length}")
            if encoding in ("gzip", "deflate"):
                try:
                    data = zlib.decompress(body, 47)  # gzip or zlib, auto-detected
                except zlib.error as exc:
                    raise IntegrityError(Cause.SHORT_BODY, f"bad {encoding} stream: {exc}") from exc
            elif encoding != "identity":
                raise UpstreamError(Cause.ENCODING, f"unsupported Content-Encoding {encoding!r}")
            summary = verify_bytes(data, expected_md5=expected_md5)
            return summary, expected_md5 or md5_hex(data), data

        try:
            summary, md5, data = await asyncio.to_thread(check)
            await self._check_identity(orthanc_id, summary)
        except IntegrityError as exc:
            log.warning("integrity check failed for instance %s: %s", orthanc_id, exc)
            raise
        return summary, md5, data

    async def _check_identity(self, orthanc_id: str, summary: DicomSummary) -> None:
        """:func:`~dicomcache.dicom.verify.identity_problem`, asking Orthanc for the
        instance's tags when the body's identifiers alone do not settle it."""
        if identity_problem(summary, orthanc_id) is None:
            return
        tags = await self.client.get_json(f"/instances/{orthanc_id}/tags?short",
                                          kind="identity", retry=False)
        problem = identity_problem(summary, orthanc_id, tags if isinstance(tags, dict) else {})
        if problem is not None:
            raise IntegrityError(Cause.IDENTITY_MISMATCH, problem)
