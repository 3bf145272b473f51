"""Cold series/study retrieves in one upstream request, verified part by part.

A WADO-RS retrieve of a series (or study) whose instances are mostly missing
from the cache would otherwise cost two upstream requests per instance (body
and MD5).  :class:`SeriesStream` asks Orthanc's DICOMweb plugin once for the
whole series as stored (``transfer-syntax=*``), splits the length-less
multipart incrementally (every part must carry its own ``Content-Length``;
a part without one, bad framing, a cut or a reset ends the stream), and for
every part:

* checks its length against its ``Content-Length``, computes its MD5 and
  parses it fully (:func:`~dicomcache.verify.verify_bytes`, in a worker thread);
* matches the MD5 against Orthanc's stored MD5s of the instances asked for
  (``/instances/{id}/attachments/dicom/md5``, fetched in parallel, bounded):
  the part *is* the instance whose stored MD5 it has; a part that matches
  none is dropped;
* hands the verified bytes at once to the retrieve waiting for it, and queues
  them for the store's next group commit (:meth:`AsyncStore.queue_commit`):
  the retrieve never waits for durability, and reading goes on while earlier
  parts are being written (up to :data:`COMMIT_BACKLOG` bytes not yet durable);
* once the part is durable, settles the single-flight future that
  :meth:`Fetcher.claim` registered for it, so a concurrent viewer asking for
  that instance waits for the stream instead of downloading it a second time
  (and a lookup of it by SOPInstanceUID waits for its commit meanwhile).

Every claimed instance the stream did not deliver verified (cut stream,
corrupted part, no MD5 at Orthanc, upstream error) falls back to the ordinary
per-instance download with its retries (:meth:`Fetcher.fall_back`) as soon as
the stream ends, without waiting for the commits.  Nothing unverified is sent
or stored.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from .errors import IntegrityError, NotFoundUpstream, UpstreamError
from .fetch import Fetched, Fetcher
from .store import Entry, StoreClosed, Verified
from .verify import DicomSummary, md5_hex, verify_bytes

log = logging.getLogger(__name__)

ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Largest part accepted from the stream (a bigger one ends it: fetched one by one).
MAX_PART = 1 << 30
#: Parts read ahead or being verified at once (bounds the memory held).
PARALLEL = 16
#: Bytes of verified parts queued or being committed before reading waits, shared
#: by every stream of an app (the memory held when the cache disk is slower than
#: the link, however many cold retrieves run at once).
COMMIT_BACKLOG = 128 << 20
#: MD5 requests in flight at once.
MD5_PARALLEL = 16
#: Read buffer of the upstream stream.
READ_BUFFER = 4 << 20
_BOUNDARY_RE = re.compile(r'boundary="?([^";,\s]+)"?', re.IGNORECASE)


class StreamBroken(Exception):
    """The multipart stream cannot be split further (bad framing, cut)."""


async def read_parts(content: aiohttp.StreamReader, boundary: str,
                     max_part: int = MAX_PART) -> AsyncIterator[tuple[int, bytes]]:
    """``(Content-Length, body)`` of each part; returns only at the closing boundary.

    Raises :class:`StreamBroken` on anything else: the end of the stream before
    the closing boundary, a part without a ``Content-Length``, bad framing.
    """
    delim = b"--" + boundary.encode()
    line = await content.readuntil(b"\r\n")
    for _ in range(8):  # a short preamble is allowed (RFC 2046), never needed in practice
        if line.startswith(delim):
            break
        if not line.endswith(b"\r\n"):
            raise StreamBroken("stream ended before the first boundary")
        line = await content.readuntil(b"\r\n")
    while True:
        if line == delim + b"--\r\n" or line == delim + b"--":
            return
        if line != delim + b"\r\n":
            raise StreamBroken(f"expected a boundary, found {line[:80]!r}")
        headers: dict[str, str] = {}
        for _ in range(32):
            hline = await content.readuntil(b"\r\n")
            if not hline.endswith(b"\r\n"):
                raise StreamBroken("stream ended inside part headers")
            if hline == b"\r\n":
                break
            name, _, value = hline.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            raise StreamBroken("too many part headers")
        declared = headers.get("content-length", "")
        if not declared.isdigit() or int(declared) > max_part:
            raise StreamBroken(f"part without a usable Content-Length ({declared[:20]!r})")
        length = int(declared)
        try:
            body = await content.readexactly(length)
            crlf = await content.readexactly(2)
        except asyncio.IncompleteReadError as exc:
            raise StreamBroken(f"stream ended inside a part ({len(exc.partial)} bytes "
                               f"of {length} or of its CRLF)") from exc
        if crlf != b"\r\n":
            raise StreamBroken("part not followed by CRLF")
        yield length, body
        line = await content.readuntil(b"\r\n")


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

    :meth:`take` gives the future of an instance's verified ``Entry``/``Fetched``
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
        self._ready: dict[str, asyncio.Future[Entry | Fetched]] = {}
        #: The first future of each instance, settled with its first verified copy.
        self._first: dict[str, asyncio.Future[Entry | Fetched]] = {}
        for oid in self.claimed:
            fut: asyncio.Future[Entry | Fetched] = loop.create_future()
            fut.add_done_callback(_quiet)
            self._ready[oid] = self._first[oid] = fut
        self.delivered = 0
        self.task = asyncio.ensure_future(self._run())

    def take(self, oid: str) -> asyncio.Future[Entry | Fetched] | None:
        return self._ready.pop(oid, None)

    def _publish(self, oid: str, found: Entry | Fetched, *, final: bool) -> None:
        first = self._first.get(oid)
        if first is not None and not first.done():
            first.set_result(found)
        elif oid in self._ready:  # verified bytes not taken yet: replace by the stored entry
            done: asyncio.Future[Entry | Fetched] = asyncio.get_running_loop().create_future()
            done.set_result(found)
            self._ready[oid] = done
        if final:  # the bytes in memory are no longer held here
            self._first.pop(oid, None)

    async def _run(self) -> None:
        if not self.claimed:  # every instance is being downloaded already: nothing to feed
            return
        client = self.fetcher.client
        by_md5: dict[str, str] = {}
        pending_md5 = len(self.claimed)
        learnt = asyncio.Condition()
        md5_slots = asyncio.Semaphore(MD5_PARALLEL)
        #: Claimed instances a verified part was found for (their commit may be pending).
        delivered: set[str] = set()
        commits: set[asyncio.Task[None]] = set()
        backlog = self.backlog

        async def md5_of(oid: str) -> None:
            nonlocal pending_md5
            try:
                async with md5_slots:
                    md5 = await client.instance_md5(oid)
                if md5:
                    by_md5[md5] = oid
            except (UpstreamError, IntegrityError, NotFoundUpstream) as exc:
                log.info("series stream: no MD5 for %s (%s): fetched on its own", oid, exc)
            finally:
                pending_md5 -= 1
                async with learnt:
                    learnt.notify_all()

        async def handle(length: int, data: bytes) -> None:
            def check() -> tuple[str, DicomSummary]:
                # Length against the part's Content-Length and a full parse; the MD5
                # is compared below, by looking it up among Orthanc's stored MD5s.
                return md5_hex(data), verify_bytes(data, expected_length=length)
            try:
                md5, summary = await asyncio.to_thread(check)
            except IntegrityError as exc:
                self.fetcher.metrics.note_integrity_failure(exc.cause, self.path, exc.reason)
                log.warning("series stream %s: a part failed verification: %s", self.path, exc)
                return
            async with learnt:
                await learnt.wait_for(lambda: md5 in by_md5 or pending_md5 == 0)
            oid = by_md5.get(md5)
            fut = self.claimed.get(oid) if oid else None
            if oid is None or fut is None or fut.done() or oid in delivered:
                if md5 not in by_md5 and pending_md5 == 0:
                    log.info("series stream %s: part %s (MD5 %s) is none of the instances "
                             "it was asked for (or its MD5 is not Orthanc's): dropped",
                             self.path, summary.sop_instance_uid, md5)
                return
            self.fetcher.metrics.fetched_bytes.inc(len(data))
            fetched = Fetched.of(summary, md5, oid, data)
            delivered.add(oid)
            # Queued before the retrieve can send it: from now on a lookup of the
            # instance waits for its commit instead of missing it.
            durable = self.fetcher.store.queue_commit(Verified(data, summary, md5, oid))
            self._publish(oid, fetched, final=False)  # sent while it is being committed
            self.delivered += 1
            await backlog.take(len(data))  # reading waits while too much is not durable
            task = asyncio.ensure_future(self._settle_when_durable(oid, fut, fetched, durable))
            task.add_done_callback(lambda _t: backlog.give_back(len(data)))
            commits.add(task)
            task.add_done_callback(commits.discard)

        md5_tasks = [asyncio.ensure_future(md5_of(oid)) for oid in self.claimed]
        handlers: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(PARALLEL)
        try:
            try:
                # A big read buffer: aiohttp's default (64 KiB) pauses the socket so
                # often that the stream is read at half of Orthanc's speed.
                async with client.session.request(
                        "GET", client.base + self.path, headers={"Accept": ACCEPT_AS_STORED},
                        read_bufsize=READ_BUFFER) as resp:
                    if resp.status != 200:
                        raise StreamBroken(f"Orthanc answered {resp.status}")
                    m = _BOUNDARY_RE.search(resp.headers.get("Content-Type", ""))
                    if not m or resp.headers.get("Content-Encoding", "identity") != "identity":
                        raise StreamBroken("not an identity-encoded multipart answer")
                    async for length, data in read_parts(resp.content, m.group(1)):
                        await slots.acquire()
                        task = asyncio.ensure_future(handle(length, data))
                        task.add_done_callback(lambda _t: slots.release())
                        handlers.add(task)
                        task.add_done_callback(handlers.discard)
            except (StreamBroken, aiohttp.ClientError, ConnectionError, ValueError,
                    TimeoutError) as exc:
                log.warning("series stream %s cut (%s): the rest is fetched instance by "
                            "instance", self.path, exc)
            except Exception:  # whatever it was, every claimed instance must still settle
                log.exception("series stream %s failed: the rest is fetched instance by "
                              "instance", self.path)
            if handlers:
                await asyncio.gather(*handlers, return_exceptions=True)
            # What the stream did not deliver is fetched now, not after the commits.
            self._fall_back([oid for oid in self.claimed if oid not in delivered])
            if commits:
                await asyncio.gather(*commits, return_exceptions=True)
        except asyncio.CancelledError:  # shutting down: nobody to serve
            for task in (*handlers, *md5_tasks, *commits):
                task.cancel()
            for fut in (*self.claimed.values(), *self._ready.values(), *self._first.values()):
                fut.cancel()
            raise
        finally:
            for task in md5_tasks:
                task.cancel()
        log.debug("series stream %s: %d of %d instances delivered", self.path,
                  self.delivered, len(self.claimed))

    async def _settle_when_durable(self, oid: str, fut: asyncio.Future[Any], fetched: Fetched,
                                   durable: asyncio.Future[Entry | None]) -> None:
        """Settle the instance's single-flight future once its commit is done.

        Concurrent viewers get the stored entry (or the verified bytes if the
        disk refused them); the retrieve already has the bytes.
        """
        found: Entry | Fetched = fetched
        try:
            entry = await asyncio.shield(durable)
            if entry is not None:
                found = entry
        except StoreClosed:
            log.info("instance %s not cached: shutting down", oid)
        except OSError as exc:
            log.error("cannot cache instance %s: %s; serving it uncached", oid, exc)
        except Exception:  # whatever it was, the waiters must not wait forever
            log.exception("cannot cache instance %s; serving it uncached", oid)
        _settle(fut, found)
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
