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
import os
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from dicomcache.cache.coherence import Coherence
from dicomcache.cache.instance import Instance
from dicomcache.cache.receive import Received, Sink, held_in_memory, receive
from dicomcache.cache.store import AsyncStore
from dicomcache.config import format_size
from dicomcache.dicom.verify import (
    MAX_INFLATED,
    DicomSummary,
    identity_problem,
    md5_hex,
    verify_bytes,
    verify_file,
)
from dicomcache.errors import Cause, IntegrityError, NotFoundUpstream, UpstreamError
from dicomcache.metrics import Metrics
from dicomcache.singleflight import SingleFlight
from dicomcache.upstream.client import GZIP, OrthancClient, check_status

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
                 coherence: Coherence | None = None, *, stream_above: int = 32 << 20) -> None:
        self.client = client
        #: Bodies larger (or of unknown length) are streamed to a temp file.
        self.stream_above = stream_above
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
            plain = _PlainAfterTimeout()
            try:
                summary, received = await self.client.retrying(
                    lambda attempt: plain.run(self._attempt(orthanc_id, plain=plain.now)),
                    what=f"instance {orthanc_id}")
            except OSError as exc:
                if isinstance(exc, UpstreamError):
                    raise
                # Streaming into the store's tmp/ failed (disk full, read-only): the store
                # is degraded, and the body is fetched again in memory, served uncached.
                self.store.sync.note_failure(exc)
                log.warning("instance %s could not be streamed to the cache disk (%s): "
                            "fetched again in memory", orthanc_id, exc)
                summary, received = await self.client.retrying(
                    lambda attempt: plain.run(self._attempt(orthanc_id, stream=False,
                                                            plain=plain.now)),
                    what=f"instance {orthanc_id}")
        self.metrics.fetched_bytes.inc(received.size)
        if received.temp is not None:
            return await self._commit_file(orthanc_id, summary, received, received.temp)
        assert received.data is not None
        fetched = Instance.verified(summary, received.md5, received.data, orthanc_id)
        if orthanc_id in self._urgent:
            # A viewer waits: it gets the verified body now; the disk copy follows (a
            # lookup meanwhile waits for it: AsyncStore.commit_soon).
            self.store.commit_soon(fetched).add_done_callback(
                functools.partial(self._committed_late, orthanc_id))
            return fetched
        try:
            stored = await self.store.commit_now(fetched)
        except OSError as exc:  # StoreFull included
            # The viewer still gets its verified image; only caching is lost.
            self.metrics.note_uncached(orthanc_id, exc)
            return fetched
        return stored or fetched  # None: evicted at once, bigger than the whole cache

    def _committed_late(self, orthanc_id: str, done: asyncio.Future[Instance | None]) -> None:
        """The disk copy of a body already served: only caching can have failed."""
        if done.cancelled():
            return
        exc = done.exception()
        if isinstance(exc, OSError):  # StoreFull included
            self.metrics.note_uncached(orthanc_id, exc)
        elif exc is not None:
            log.error("instance %s: its disk copy failed (%s: %s); served uncached",
                      orthanc_id, type(exc).__name__, exc)

    async def _commit_file(self, orthanc_id: str, summary: DicomSummary, received: Received,
                           temp: Path) -> Instance:
        """Adopt a verified temp file as the store's entry (a rename: the body is never
        read into memory).  Should the store refuse it (disk full, bigger than the whole
        cache), the viewer still gets the verified body, read from the file."""
        instance = Instance.verified_file(summary, received.md5, received.size, orthanc_id)
        keep = await asyncio.to_thread(os.open, temp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                stored = await self.store.commit_file(temp, instance)
            except OSError as exc:
                self.metrics.note_uncached(orthanc_id, exc)
                stored = None
            if stored is not None:
                return stored
            # Served from memory after all, once: the exception to the memory bound,
            # only while the cache cannot take what it verified.
            data = await asyncio.to_thread(_read_all, keep, received.size)
            return Instance.verified(summary, received.md5, data, orthanc_id)
        finally:
            await asyncio.to_thread(_close_and_remove, keep, temp)

    async def _attempt(self, orthanc_id: str, *, stream: bool = True,
                       plain: bool = False) -> tuple[DicomSummary, Received]:
        md5_task = asyncio.create_task(self.client.instance_md5(orthanc_id))
        path = f"/instances/{orthanc_id}/file"
        ask = "identity" if plain else self.client.body_encoding(
            background=orthanc_id not in self._urgent)
        asked = time.monotonic()
        try:
            async with self.client.open("GET", path, kind="instance",
                                        headers=GZIP if ask == "gzip" else None) as resp:
                if resp.status != 200:
                    check_status(resp.status, resp.headers, f"GET {path}", await resp.read())
                declared = resp.headers.get("Content-Length")
                expected_length = int(declared) if declared and declared.isdigit() else None
                encoding = resp.headers.get("Content-Encoding", "identity").lower()
                # Measured for upstream.compression = "auto": the body's time on the
                # link, and Orthanc's time to answer (its gzip included).
                with self.client.link.body(time.monotonic() - asked) as body:
                    received = await self._receive(resp, encoding, expected_length,
                                                   stream=stream and self.store.sync.caching)
                    body.done(encoding, received.wire_bytes, received.size,
                              streamed=expected_length is None)
                self.metrics.upstream_bodies.labels(
                    "identity" if encoding == "identity" else "gzip").inc()
            expected_md5 = await md5_task
        finally:
            md5_task.cancel()
        try:
            summary, received = await asyncio.to_thread(_verify, received, expected_length,
                                                        expected_md5)
            await self._check_identity(orthanc_id, summary)
        except IntegrityError as exc:
            log.warning("integrity check failed for instance %s: %s", orthanc_id, exc)
            await asyncio.to_thread(_remove, received.temp)
            raise
        except BaseException:
            await asyncio.to_thread(_remove, received.temp)
            raise
        if expected_md5 is None:
            log.warning("Orthanc has no MD5 for instance %s (StoreMD5ForAttachments off?): "
                        "relying on length and a full parse", orthanc_id)
        return summary, received

    async def _receive(self, resp: aiohttp.ClientResponse, encoding: str,
                       expected_length: int | None, *, stream: bool) -> Received:
        """The body: read whole when it is known to be small (one thread hop to verify
        it) or the cache cannot take files (degraded: served from memory, uncached),
        else streamed through a :class:`~.receive.Sink` into a temp file."""
        hold = held_in_memory(encoding, expected_length, self.stream_above)
        if not stream or hold is None:
            body = await resp.read()
            if encoding in ("gzip", "deflate"):
                return await asyncio.to_thread(_inflate_whole, body, encoding)
            if encoding != "identity":
                raise UpstreamError(Cause.ENCODING, f"unsupported Content-Encoding {encoding!r}")
            return Received(len(body), len(body), "", data=body)
        return await receive(resp, Sink(encoding, hold, self.store.sync.temp_path))

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


class _PlainAfterTimeout:
    """Once an attempt at a body timed out, its retries ask for it as stored: Orthanc
    gzips a whole file before its first byte (2.2 s for 24 MiB on an idle core,
    measured), which for a large multi-frame can outlast ``upstream.read_timeout``."""

    def __init__(self) -> None:
        self.now = False

    async def run(self, attempt: Awaitable[T]) -> T:
        try:
            return await attempt
        except UpstreamError as exc:
            if exc.cause is Cause.TIMEOUT:
                self.now = True
            raise


def _verify(received: Received, expected_length: int | None,
            expected_md5: str | None) -> tuple[DicomSummary, Received]:
    """Length (on the wire), MD5 and a full parse of a received body (a worker thread);
    the body with its MD5 (Orthanc's, when it has one)."""
    if expected_length is not None and received.wire_bytes != expected_length:
        raise IntegrityError(Cause.LENGTH_MISMATCH, f"received {received.wire_bytes} bytes, "
                             f"Content-Length said {expected_length}")
    if received.temp is None:
        assert received.data is not None
        summary = verify_bytes(received.data, expected_md5=expected_md5)
        return summary, replace(received, md5=expected_md5 or md5_hex(received.data))
    if expected_md5 is not None and expected_md5 != received.md5:
        raise IntegrityError(Cause.MD5_MISMATCH, f"body MD5 is {received.md5}, expected "
                             f"{expected_md5}")
    # The MD5 was taken on the way in; the parse reads element headers, not the pixels.
    return verify_file(received.temp), received


def _inflate_whole(body: bytes, encoding: str) -> Received:
    """A compressed body read whole (only when the cache cannot take files), inflated
    to at most :data:`~dicomcache.dicom.verify.MAX_INFLATED` (a lying upstream's
    small gzip of zeros must not become gigabytes here)."""
    inflater = zlib.decompressobj(47)  # gzip or zlib, auto-detected
    try:
        data = inflater.decompress(body, MAX_INFLATED + 1)
    except zlib.error as exc:
        raise IntegrityError(Cause.SHORT_BODY, f"bad {encoding} stream: {exc}") from exc
    if len(data) > MAX_INFLATED:
        raise IntegrityError(Cause.SHORT_BODY, f"{encoding} body inflates beyond "
                                               f"{format_size(MAX_INFLATED)}")
    if not inflater.eof:
        raise IntegrityError(Cause.SHORT_BODY, f"{encoding} stream cut short")
    return Received(len(body), len(data), "", data=data)


def _read_all(fd: int, size: int) -> bytes:
    return os.pread(fd, size, 0)


def _remove(temp: Path | None) -> None:
    if temp is not None:
        temp.unlink(missing_ok=True)


def _close_and_remove(fd: int, temp: Path) -> None:
    os.close(fd)
    temp.unlink(missing_ok=True)  # gone already when committed (renamed)
