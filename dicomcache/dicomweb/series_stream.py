"""Cold series/study retrieves in one upstream request, verified part by part.

A WADO-RS retrieve of a series (or study) whose instances are mostly missing
from the cache would otherwise cost two upstream requests per instance (body
and MD5).  :class:`SeriesStream` asks Orthanc's DICOMweb plugin once for the
whole series as stored (``transfer-syntax=*``), splits the length-less
multipart incrementally (every part must carry its own ``Content-Length``;
a part without one, bad framing, a cut or a reset ends the stream), and for
every part:

* checks its length against its ``Content-Length``, computes its MD5 and
  parses it fully (:func:`~dicomcache.dicom.verify.verify_bytes`, in a worker thread);
* matches the MD5 against Orthanc's stored MD5s of the instances asked for
  (``/instances/{id}/attachments/dicom/md5``, looked up one after the other
  on a keep-alive connection while the stream is read): the part *is* the
  instance whose stored MD5 it has; a part that matches none is dropped;
* hands the verified bytes at once to the retrieve waiting for it, and queues
  them for the store's next group commit (:meth:`AsyncStore.queue_commit`):
  the retrieve never waits for durability, and reading goes on while earlier
  parts are being written (up to :data:`COMMIT_BACKLOG` bytes not yet durable);
* settles the single-flight future that :meth:`Fetcher.claim` registered for
  it with the verified bytes, so a concurrent viewer asking for that instance
  waits for the stream instead of downloading it a second time (and a later
  lookup of it waits for its commit).  Commits are deferred while the stream
  is read (:meth:`AsyncStore.deferring_commits`), unless somebody waits for
  one or too much is queued.

The stream and the MD5 lookups are read by two threads of their own with
blocking connections (:class:`~dicomcache.upstream.client.BlockingConnection`), not
on the event loop: there a hundred megabytes cost a copy and a callback per
socket read and two hundred lookups a task each, and the loop is what every
viewer waits for (measured: a cold 200-instance retrieve about 15 % faster,
0.1 CPU-second less).  Only whole parts and MD5s are handed to the loop, and a
part is read only when one of :data:`PARALLEL` slots is free.

Every claimed instance the stream did not deliver verified (cut stream,
corrupted part, no MD5 at Orthanc, upstream error) falls back to the ordinary
per-instance download with its retries (:meth:`Fetcher.fall_back`) as soon as
the stream ends, without waiting for the commits.  Nothing unverified is sent
or stored.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from typing import Any, Protocol

from dicomcache.errors import IntegrityError
from dicomcache.cache.fetch import Fetched, Fetcher
from dicomcache.cache.store import Entry, StoreClosed, Verified
from dicomcache.upstream.client import PIPELINE_WINDOW, BlockingConnection, OrthancClient, md5_path, parse_md5
from dicomcache.dicom.verify import DicomSummary, md5_hex, verify_bytes

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
_BOUNDARY_RE = re.compile(r'boundary="?([^";,\s]+)"?', re.IGNORECASE)


class StreamBroken(Exception):
    """The multipart stream cannot be split further (bad framing, cut)."""


class Readable(Protocol):
    """What :func:`split_parts` reads from (``http.client.HTTPResponse`` is one)."""

    def readline(self, limit: int = -1, /) -> bytes: ...
    def read(self, n: int = -1, /) -> bytes: ...


#: Longest boundary or part-header line accepted.
MAX_LINE = 8192


def _line(fp: Readable, where: str) -> bytes:
    line = fp.readline(MAX_LINE)
    if not line.endswith(b"\r\n"):
        raise StreamBroken(f"stream ended or line too long {where}")
    return line


def split_parts(fp: Readable, boundary: str,
                max_part: int = MAX_PART) -> Iterator[tuple[int, bytes]]:
    """``(Content-Length, body)`` of each part; returns only at the closing boundary.

    Blocking (it runs in the stream's reader thread).  Raises
    :class:`StreamBroken` on anything else: the end of the stream before the
    closing boundary, a part without a ``Content-Length``, bad framing.
    """
    delim = b"--" + boundary.encode()
    line = _line(fp, "before the first boundary")
    for _ in range(8):  # a short preamble is allowed (RFC 2046), never needed in practice
        if line.startswith(delim):
            break
        line = _line(fp, "before the first boundary")
    while True:
        if line == delim + b"--\r\n":
            return
        if line != delim + b"\r\n":
            raise StreamBroken(f"expected a boundary, found {line[:80]!r}")
        headers: dict[str, str] = {}
        for _ in range(32):
            hline = _line(fp, "inside part headers")
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
        body = fp.read(length)
        crlf = fp.read(2) if len(body) == length else b""
        if len(body) != length or len(crlf) != 2:
            raise StreamBroken(f"stream ended inside a part ({len(body)} bytes of {length} "
                               "or of its CRLF)")
        if crlf != b"\r\n":
            raise StreamBroken("part not followed by CRLF")
        yield length, body
        line = fp.readline(MAX_LINE)
        if line == delim + b"--":  # closing boundary at the very end, without its CRLF
            return
        if not line.endswith(b"\r\n"):
            raise StreamBroken("stream ended after a part, before the closing boundary")


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


class _Thread:
    """A blocking job on a thread of its own with its own upstream connection.

    The job gets ``post(callback, *args)``, which runs ``callback`` on the loop;
    :meth:`run` returns the exception that ended the job (``None``: it finished).
    :meth:`stop` makes the job end soon: :attr:`stopped` is set and a blocked
    read on the connection fails.
    """

    def __init__(self, client: OrthancClient, name: str) -> None:
        self.conn = BlockingConnection(client)
        self.name = name
        self.stopped = threading.Event()

    async def run(self, job: Callable[[Callable[..., None]], None]) -> BaseException | None:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[BaseException | None] = loop.create_future()

        def post(callback: Callable[..., None], *args: Any) -> None:
            with suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(callback, *args)

        def main() -> None:
            error: BaseException | None = None
            try:
                job(post)
            except BaseException as exc:  # handed to the loop, which decides
                error = exc
            finally:
                self.conn.close()
            post(_settle, ended, error)

        threading.Thread(target=main, name=self.name, daemon=True).start()
        return await ended

    def stop(self) -> None:
        self.stopped.set()
        self.conn.abort()


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
        client, metrics = self.fetcher.client, self.fetcher.metrics
        #: Orthanc's stored MD5 -> instance, learnt by the lookup thread.
        by_md5: dict[str, str] = {}
        #: Parts whose MD5 is not learnt yet, waiting for it (``None``: it never will be).
        waiting: dict[str, asyncio.Future[str | None]] = {}
        lookups_over = False
        #: Claimed instances a verified part was found for (their commit may be pending).
        delivered: set[str] = set()
        commits: set[asyncio.Task[None]] = set()
        handlers: set[asyncio.Task[None]] = set()
        slots = threading.Semaphore(PARALLEL)
        backlog = self.backlog
        md5s = _Thread(client, "series-stream-md5")
        parts = _Thread(client, "series-stream")

        def learn(learnt: list[tuple[str, str]]) -> None:
            for oid, md5 in learnt:
                by_md5[md5] = oid
                fut = waiting.pop(md5, None)
                if fut is not None and not fut.done():
                    fut.set_result(oid)

        def lookups_ended(error: BaseException | None) -> None:
            nonlocal lookups_over
            lookups_over = True
            if error is not None:
                log.warning("series stream %s: MD5 lookups cut (%s): parts not matched "
                            "yet are fetched one by one", self.path, error)
            for fut in waiting.values():
                _settle(fut, None)
            waiting.clear()

        async def owner(md5: str) -> str | None:
            if md5 in by_md5 or lookups_over:
                return by_md5.get(md5)
            fut = waiting.get(md5)
            if fut is None:
                fut = waiting[md5] = asyncio.get_running_loop().create_future()
            return await asyncio.shield(fut)

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
            oid = await owner(md5)
            fut = self.claimed.get(oid) if oid else None
            if oid is None or fut is None or fut.done() or oid in delivered:
                if oid is None:
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
            # Concurrent viewers waiting for it get the verified bytes now, not after
            # the (perhaps deferred) commit; later lookups wait for the commit.
            _settle(fut, fetched)
            self.delivered += 1
            await backlog.take(len(data))  # reading waits while too much is not durable
            task = asyncio.ensure_future(self._when_durable(oid, fetched, durable))
            task.add_done_callback(lambda _t: backlog.give_back(len(data)))
            commits.add(task)
            task.add_done_callback(commits.discard)

        def on_part(length: int, data: bytes) -> None:
            task = asyncio.ensure_future(handle(length, data))
            task.add_done_callback(lambda _t: slots.release())
            handlers.add(task)
            task.add_done_callback(handlers.discard)

        async def look_up_md5s() -> None:
            oids = list(self.claimed)
            started = time.monotonic()
            error = await md5s.run(lambda post: _look_up_md5s(md5s, oids, post, learn))
            metrics.upstream_seconds.labels("md5_pipelined").observe(time.monotonic() - started)
            lookups_ended(error)

        md5_task = asyncio.ensure_future(look_up_md5s())
        try:
            # The parts are written to disk once they are all read (or when somebody
            # waits for one): the retrieve needs the CPU more than the cache does.
            with self.fetcher.store.deferring_commits():
                started = time.monotonic()
                error = await parts.run(
                    lambda post: _read_stream(parts, self.path, slots, post, on_part))
                metrics.upstream_seconds.labels("series").observe(time.monotonic() - started)
                if isinstance(error, (StreamBroken, http.client.HTTPException, OSError,
                                      ValueError)):
                    log.warning("series stream %s cut (%s): the rest is fetched instance by "
                                "instance", self.path, error)
                elif error is not None:  # whatever it was, every claimed instance must settle
                    log.error("series stream %s failed: the rest is fetched instance by "
                              "instance", self.path, exc_info=error)
                if handlers:
                    await asyncio.gather(*handlers, return_exceptions=True)
            # What the stream did not deliver is fetched now, not after the commits.
            self._fall_back([oid for oid in self.claimed if oid not in delivered])
            if commits:
                await asyncio.gather(*commits, return_exceptions=True)
        except asyncio.CancelledError:  # shutting down: nobody to serve
            parts.stop()
            for task in (*handlers, *commits):
                task.cancel()
            for fut in (*self.claimed.values(), *self._ready.values(), *self._first.values()):
                fut.cancel()
            raise
        finally:
            md5s.stop()
            md5_task.cancel()
        log.debug("series stream %s: %d of %d instances delivered", self.path,
                  self.delivered, len(self.claimed))

    async def _when_durable(self, oid: str, fetched: Fetched,
                            durable: asyncio.Future[Entry | None]) -> None:
        """Once the part is durable, hand out the stored entry instead of the bytes.

        The single-flight future was settled with the verified bytes already.
        """
        found: Entry | Fetched = fetched
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


def _read_stream(thread: _Thread, path: str, slots: threading.Semaphore,
                 post: Callable[..., None], on_part: Callable[[int, bytes], None]) -> None:
    """The reader thread: one retrieve of ``path``, each part posted to ``on_part``.

    A part is read only once one of ``slots`` is free (the loop releases it when
    the part is handled), which bounds what is read ahead.
    """
    resp = thread.conn.get(path, {"Accept": ACCEPT_AS_STORED})
    if resp.status != 200:
        raise StreamBroken(f"Orthanc answered {resp.status}")
    m = _BOUNDARY_RE.search(resp.getheader("Content-Type", ""))
    if not m or resp.getheader("Content-Encoding", "identity") != "identity":
        raise StreamBroken("not an identity-encoded multipart answer")
    parts = split_parts(resp, m.group(1))
    while True:
        while not slots.acquire(timeout=0.25):
            if thread.stopped.is_set():
                return
        if thread.stopped.is_set():
            return
        part = next(parts, None)
        if part is None:
            return
        post(on_part, *part)


def _look_up_md5s(thread: _Thread, oids: list[str], post: Callable[..., None],
                  learn: Callable[[list[tuple[str, str]]], None]) -> None:
    """The lookup thread: Orthanc's stored MD5 of each instance, posted to ``learn``.

    Pipelined (:meth:`BlockingConnection.get_all`): the lookups must keep ahead
    of the stream, and one by one they could not on a loaded machine (2 ms each
    while Orthanc streams).  An instance without an MD5 (404) is left out: its
    part, unmatched, falls back to a single download; any other refusal ends
    the lookups (the single downloads then say why).
    """
    learnt: list[tuple[str, str]] = []  # posted a window at a time: one wake-up of the loop
    try:
        with closing(thread.conn.get_all([md5_path(oid) for oid in oids])) as answers:
            for i, (oid, (_, status, data)) in enumerate(zip(oids, answers, strict=True), 1):
                if thread.stopped.is_set():
                    return
                if status == 404:  # Orthanc stored none (StoreMD5ForAttachments off)
                    pass
                elif status != 200:  # refused credentials, 5xx...
                    raise StreamBroken(f"Orthanc answered {status} to {md5_path(oid)}")
                else:
                    try:
                        learnt.append((oid, parse_md5(data, oid)))
                    except IntegrityError as exc:
                        log.info("series stream: no MD5 for %s (%s): fetched on its own",
                                 oid, exc)
                if learnt and i % PIPELINE_WINDOW == 0:
                    post(learn, learnt)
                    learnt = []
    finally:
        if learnt:
            post(learn, learnt)
