"""Cold series/study retrieves in one upstream request, verified part by part.

A WADO-RS retrieve of a series (or study) whose instances are mostly missing
from the cache would otherwise cost two upstream requests per instance (body
and MD5).  :class:`SeriesStream` asks Orthanc's DICOMweb plugin once for the
whole series as stored (``transfer-syntax=*``), splits the length-less
multipart as it arrives (:class:`~dicomcache.dicom.multipart.Splitter`; every
part must carry its own ``Content-Length``; bad framing, a cut or a reset ends
the stream), and for every part:

* checks its length against its ``Content-Length``, computes its MD5 and
  parses it fully (:func:`~dicomcache.dicom.verify.verify_bytes`, in a worker
  thread);
* knows which instance it is from its Patient ID and UIDs (their hash is
  Orthanc's instance ID), and compares its MD5 with Orthanc's stored MD5 of
  that instance (``/instances/{id}/attachments/dicom/md5``, looked up
  :data:`LOOKUPS` at a time while the stream is read); a part of none of the
  instances asked for, or whose MD5 differs, is dropped (and its instance
  fetched on its own);
* hands the verified bytes at once to the retrieve waiting for it, and queues
  them for the store's next group commit (:meth:`AsyncStore.queue_commit`):
  the retrieve never waits for durability, and reading goes on while earlier
  parts are being written (up to :data:`COMMIT_BACKLOG` bytes not yet durable);
* settles the single-flight future that :meth:`Fetcher.claim` registered for
  it with the verified bytes, so a concurrent viewer asking for that instance
  waits for the stream instead of downloading it a second time (and a later
  lookup of it waits for its commit).

Everything goes through :meth:`OrthancClient.open` (its timeouts, its metrics,
its error causes).  A part is read only while fewer than :data:`PARALLEL` are
being verified, which bounds the memory a fast link can fill.

Every claimed instance the stream did not deliver verified (cut stream,
corrupted part, its MD5 not to be looked up, upstream error) falls back to the ordinary
per-instance download with its retries (:meth:`Fetcher.fall_back`) as soon as
the stream ends, without waiting for the commits.  Nothing unverified is sent
or stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from dicomcache.cache.fetch import Fetcher
from dicomcache.cache.instance import Instance
from dicomcache.cache.store import StoreClosed
from dicomcache.dicom import multipart
from dicomcache.dicom.verify import DicomSummary, md5_hex, verify_bytes
from dicomcache.errors import Cause, IntegrityError, NotFoundUpstream, UpstreamError
from dicomcache.metrics import Metrics
from dicomcache.upstream.client import OrthancClient, check_status

log = logging.getLogger(__name__)

ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Largest part accepted from the stream (a bigger one ends it: fetched one by one).
MAX_PART = 1 << 30
#: Parts read ahead or being verified at once (bounds the memory held).
PARALLEL = 16
#: Orthanc's stored MD5s asked for at once while the stream is read.
LOOKUPS = 8
#: Bytes of verified parts queued or being committed before reading waits, shared
#: by every stream of an app (the memory held when the cache disk is slower than
#: the link, however many cold retrieves run at once).
COMMIT_BACKLOG = 128 << 20


class StreamBroken(Exception):
    """Orthanc's answer cannot be used as a multipart of stored instances."""


def _settle(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _copy_into(fut: asyncio.Future[Any]) -> Any:
    def copy(t: asyncio.Future[Any]) -> None:
        if fut.done():
            return
        if t.cancelled():
            fut.cancel()
        elif t.exception() is not None:
            fut.set_exception(t.exception())  # type: ignore[arg-type]
        else:
            fut.set_result(t.result())
    return copy


def _quiet(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # nobody may ever take it (viewer hung up)


class Budget:
    """Bytes held: :meth:`take` waits while over ``limit`` (one item is always let in)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._freed = asyncio.Event()

    async def take(self, n: int) -> None:
        while self.held and self.held + n > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.held += n

    def give_back(self, n: int) -> None:
        self.held -= n
        self._freed.set()


class SeriesStream:
    """One upstream series/study retrieve feeding the instances ``oids`` it delivers.

    :meth:`take` gives the future of an instance's verified :class:`Instance`
    (``None`` for instances not claimed: already being downloaded elsewhere).
    """

    def __init__(self, fetcher: Fetcher, path: str, oids: list[str],
                 backlog: Budget | None = None) -> None:
        self.fetcher = fetcher
        self.path = path
        #: Verified bytes not yet durable (shared with the app's other streams).
        self.backlog = backlog if backlog is not None else Budget(COMMIT_BACKLOG)
        self.claimed = fetcher.claim(oids)
        loop = asyncio.get_running_loop()
        #: What :meth:`take` gives (popped when taken).
        self._ready: dict[str, asyncio.Future[Instance]] = {}
        #: The first future of each instance, settled with its first verified copy.
        self._first: dict[str, asyncio.Future[Instance]] = {}
        for oid in self.claimed:
            fut: asyncio.Future[Instance] = loop.create_future()
            fut.add_done_callback(_quiet)
            self._ready[oid] = self._first[oid] = fut
        self.delivered = 0
        self.task = asyncio.ensure_future(self._run())

    def take(self, oid: str) -> asyncio.Future[Instance] | None:
        return self._ready.pop(oid, None)

    def _publish(self, oid: str, found: Instance, *, final: bool) -> None:
        first = self._first.get(oid)
        if first is not None and not first.done():
            first.set_result(found)
        elif oid in self._ready:  # verified bytes not taken yet: replace by the stored entry
            done: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
            done.set_result(found)
            self._ready[oid] = done
        if final:  # the bytes in memory are no longer held here
            self._first.pop(oid, None)

    async def _run(self) -> None:
        if not self.claimed:  # every instance is being downloaded already: nothing to feed
            return
        metrics = self.fetcher.metrics
        #: Instance -> Orthanc's stored MD5 of it, learnt by the lookups.
        md5_of: dict[str, str] = {}
        #: Parts whose instance's MD5 is not learnt yet, waiting for it.
        waiting: dict[str, asyncio.Future[str | None]] = {}
        lookups_over = False
        #: The lookups ended on a refusal: parts without a learnt MD5 are not trusted.
        lookups_failed = False
        #: Claimed instances a verified part was found for (their commit may be pending).
        delivered: set[str] = set()
        commits: set[asyncio.Future[None]] = set()
        handlers: set[asyncio.Future[None]] = set()
        slots = asyncio.Semaphore(PARALLEL)
        backlog = self.backlog

        def learn(oid: str, md5: str) -> None:
            md5_of[oid] = md5
            fut = waiting.pop(oid, None)
            if fut is not None and not fut.done():
                fut.set_result(md5)

        def lookups_ended(error: BaseException | None) -> None:
            nonlocal lookups_over, lookups_failed
            lookups_over = True
            lookups_failed = error is not None
            if error is not None:
                log.warning("series stream %s: MD5 lookups cut (%s): parts not matched "
                            "yet are fetched one by one", self.path, error)
            for fut in waiting.values():
                _settle(fut, None)
            waiting.clear()

        async def stored_md5(oid: str) -> str | None:
            """Orthanc's MD5 of ``oid`` once learnt (``None``: it has none, or the
            lookups ended first)."""
            if oid in md5_of or lookups_over:
                return md5_of.get(oid)
            fut = waiting.get(oid)
            if fut is None:
                fut = waiting[oid] = asyncio.get_running_loop().create_future()
            return await asyncio.shield(fut)

        async def handle(length: int, data: bytes) -> None:
            def check() -> tuple[str, DicomSummary]:
                # Length against the part's Content-Length and a full parse; the MD5
                # is compared below, by looking it up among Orthanc's stored MD5s.
                return md5_hex(data), verify_bytes(data, expected_length=length)
            try:
                md5, summary = await asyncio.to_thread(check)
            except IntegrityError as exc:
                metrics.note_integrity_failure(exc.cause, self.path, exc.reason)
                log.warning("series stream %s: a part failed verification: %s", self.path, exc)
                return
            # The part *is* the instance its Patient ID and UIDs hash to (Orthanc's own
            # key), confirmed by Orthanc's stored MD5 of that instance when it has one.
            oid = summary.orthanc_id
            fut = self.claimed.get(oid)
            if fut is None or fut.done() or oid in delivered:
                if fut is None:
                    log.info("series stream %s: part %s (instance %s) is none of the "
                             "instances it was asked for: dropped", self.path,
                             summary.sop_instance_uid, oid)
                return
            expected = await stored_md5(oid)
            if expected != md5 and (expected is not None or lookups_failed):
                reason = (f"part of instance {oid} has MD5 {md5}, Orthanc stored {expected}"
                          if expected else f"no MD5 could be looked up for instance {oid}")
                metrics.note_integrity_failure(Cause.MD5_MISMATCH, self.path, reason)
                log.warning("series stream %s: %s: fetched on its own", self.path, reason)
                return
            metrics.fetched_bytes.inc(len(data))
            fetched = Instance.verified(summary, md5, data)
            delivered.add(oid)
            # Queued before the retrieve can send it: from now on a lookup of the
            # instance waits for its commit instead of missing it.
            durable = self.fetcher.store.queue_commit(fetched)
            self._publish(oid, fetched, final=False)  # sent while it is being committed
            # Concurrent viewers waiting for it get the verified bytes now, not after
            # the commit; later lookups wait for the commit.
            _settle(fut, fetched)
            self.delivered += 1
            await backlog.take(len(data))  # reading waits while too much is not durable
            task = asyncio.ensure_future(self._when_durable(oid, fetched, durable))
            task.add_done_callback(lambda _t: backlog.give_back(len(data)))
            commits.add(task)
            task.add_done_callback(commits.discard)

        async def on_part(part: multipart.Part) -> None:
            declared = part.headers.get("content-length", "")
            if not declared.isdigit():
                raise StreamBroken(f"a part without a Content-Length ({declared[:20]!r})")
            await slots.acquire()  # reading waits while PARALLEL parts are being verified
            task = asyncio.ensure_future(handle(int(declared), part.body))
            task.add_done_callback(lambda _t: slots.release())
            handlers.add(task)
            task.add_done_callback(handlers.discard)

        lookups = asyncio.ensure_future(look_up_md5s(self.fetcher.client, list(self.claimed),
                                                      learn, self.fetcher.metrics))
        lookups.add_done_callback(
            lambda t: lookups_ended(None if t.cancelled() else t.exception()))
        try:
            try:
                await self._read(on_part)
            except multipart.PartTooLarge:
                log.info("series stream %s: a part above cache.stream_above; the rest is "
                         "fetched instance by instance, each streamed to disk", self.path)
            except (StreamBroken, UpstreamError, NotFoundUpstream,
                    multipart.MultipartError) as exc:
                log.warning("series stream %s cut (%s): the rest is fetched instance by "
                            "instance", self.path, exc)
            except Exception:  # whatever it was, every claimed instance must settle
                log.exception("series stream %s failed: the rest is fetched instance by "
                              "instance", self.path)
            if handlers:
                await asyncio.gather(*handlers, return_exceptions=True)
            # What the stream did not deliver is fetched now, not after the commits.
            self._fall_back([oid for oid in self.claimed if oid not in delivered])
            if commits:
                await asyncio.gather(*commits, return_exceptions=True)
        except asyncio.CancelledError:  # shutting down: nobody to serve
            for task in (*handlers, *commits):
                task.cancel()
            for fut in (*self.claimed.values(), *self._ready.values(), *self._first.values()):
                fut.cancel()
            raise
        finally:
            lookups.cancel()
        log.debug("series stream %s: %d of %d instances delivered", self.path,
                  self.delivered, len(self.claimed))

    async def _read(self, on_part: Any) -> None:
        """Read the retrieve, handing each whole part to ``on_part`` as it arrives."""
        client = self.fetcher.client
        async with client.open("GET", self.path, kind="series",
                               headers={"Accept": ACCEPT_AS_STORED}) as resp:
            if resp.status != 200:
                check_status(resp.status, resp.headers, f"GET {self.path}",
                             await resp.content.read(200))
            boundary = multipart.boundary_of(resp.headers.get("Content-Type", ""))
            if boundary is None or resp.headers.get("Content-Encoding", "identity") != "identity":
                raise StreamBroken("not an identity-encoded multipart answer")
            # A part above the fetcher's streaming threshold ends the stream: it and the
            # rest are fetched one by one, each streamed to disk, never held whole.
            splitter = multipart.Splitter(boundary,
                                          max_part=min(MAX_PART, self.fetcher.stream_above))
            async for chunk in resp.content.iter_any():
                for part in splitter.feed(chunk):
                    await on_part(part)
            splitter.end()

    async def _when_durable(self, oid: str, fetched: Instance,
                            durable: asyncio.Future[Instance | None]) -> None:
        """Once the part is durable, hand out the stored entry instead of the bytes.

        The single-flight future was settled with the verified bytes already.
        """
        found: Instance = fetched
        try:
            entry = await asyncio.shield(durable)
            if entry is not None:
                found = entry
        except StoreClosed:
            log.info("instance %s not cached: shutting down", oid)
        except OSError as exc:
            self.fetcher.metrics.note_uncached(oid, exc)
        except Exception:  # whatever it was, the waiters must not wait forever
            log.exception("cannot cache instance %s; serving it uncached", oid)
        self._publish(oid, found, final=True)

    def _fall_back(self, missed: list[str]) -> None:
        if missed:
            log.info("series stream %s: %d of %d instances fall back to single downloads",
                     self.path, len(missed), len(self.claimed))
        for oid in missed:
            download = self.fetcher.fall_back(oid, self.claimed[oid])
            ready = self._first.pop(oid, None)
            if ready is not None and not ready.done():
                download.add_done_callback(_copy_into(ready))


async def look_up_md5s(client: OrthancClient, oids: list[str],
                       learn: Callable[[str, str], None], metrics: Metrics) -> None:
    """Orthanc's stored MD5 of each instance, :data:`LOOKUPS` at a time, to ``learn``.

    An instance Orthanc stored no MD5 for (404: ``StoreMD5ForAttachments`` off) is
    left out: its part is then accepted on its length, a full parse and its
    identity, as a single download of it would be.  A malformed MD5 answer leaves
    it out too, and its part falls back to a single download; any other refusal
    ends the lookups (raised; the parts without an MD5 then fall back, and their
    single downloads say why).
    """
    todo = iter(oids)
    started = time.monotonic()

    async def worker() -> None:
        for oid in todo:
            try:
                md5 = await client.instance_md5(oid)
            except IntegrityError as exc:
                log.info("series stream: no usable MD5 for %s (%s): fetched on its own",
                         oid, exc)
                continue
            if md5 is not None:  # None: Orthanc stored none (StoreMD5ForAttachments off)
                learn(oid, md5)
    try:
        async with asyncio.TaskGroup() as group:  # the first refusal ends them all
            for _ in range(LOOKUPS):
                group.create_task(worker())
    finally:
        metrics.upstream_seconds.labels("md5_lookups").observe(time.monotonic() - started)
