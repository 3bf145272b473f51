"""WADO-RS retrieve: a study, a series or an instance as ``application/dicom`` parts.

Every part is a verified instance from the store, or downloaded, verified and
stored on the way (coalesced with every other family).  Orthanc's plugin sends
the stored bytes when ``Accept`` says ``transfer-syntax=*`` (or names the stored
syntax) and transcodes otherwise; parts whose stored syntax is not the one asked
for are fetched transcoded from Orthanc one instance at a time and bounds-checked
before they are sent.  Series and study answers are streamed in Orthanc's order;
when one instance cannot be had after the retries the connection is broken (no
closing boundary, no last chunk) so no client mistakes a short multipart for a
whole one.  Stored parts are sent from their files (sendfile), with an exact
``Content-Length`` when every size is known.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from contextlib import suppress
from dataclasses import dataclass
from typing import BinaryIO

from aiohttp import hdrs, web, web_fileresponse

from dicomcache.cache.instance import Instance
from dicomcache.cache.store import AsyncStore
from dicomcache.dicom.multipart import new_boundary
from dicomcache.dicomweb.answers import Cached
from dicomcache.dicomweb.series_stream import SeriesStream
from dicomcache.dicomweb.state import DicomWeb
from dicomcache.errors import Cause, IntegrityError, NotFoundUpstream
from dicomcache.http.keys import DICOMWEB, FETCHER, METRICS, OUTCOME, STORE
from dicomcache.http.params import dicomweb_uids, family_of
from dicomcache.http.passthrough import passthrough
from dicomcache.http.respond import DICOM, IMMUTABLE
from dicomcache.http.wado_uri import _check_parents

log = logging.getLogger(__name__)

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def wanted_syntax(accept: str | None) -> str | None:
    """The transfer syntax an ``Accept`` header asks of a DICOM instance retrieve.

    Returns ``"*"`` (as stored), a UID, ``EXPLICIT_VR_LE`` when a DICOM type is
    accepted without a syntax (Orthanc's default), or ``None`` when the header
    asks for something other than ``application/dicom`` parts.
    """
    if not accept:
        return EXPLICIT_VR_LE
    for item in accept.split(","):
        params = [p.strip() for p in item.split(";")]
        media = params[0].lower()
        values = {k.strip().lower(): v.strip().strip('"')
                  for k, _, v in (p.partition("=") for p in params[1:])}
        if media in ("*/*", "multipart/*") or (
                media == "multipart/related" and values.get("type", DICOM).lower() == DICOM):
            return values.get("transfer-syntax", EXPLICIT_VR_LE)
    return None


def _serves(stored: str, wanted: str | None) -> bool:
    return wanted == "*" or wanted == stored


def _part_head(b: str, length: int) -> bytes:
    return (f"--{b}\r\nContent-Type: {DICOM}\r\nContent-Length: {length}\r\n"
            f"MIME-Version: 1.0\r\n\r\n").encode()


async def instance(request: web.Request) -> web.StreamResponse:
    study, series, sop = dicomweb_uids(request)
    assert sop is not None
    wanted = wanted_syntax(request.headers.get(hdrs.ACCEPT))
    if wanted is None:
        return await passthrough(request)
    family_of(request, "dicomweb")
    entry = await request.app[STORE].get(sop)
    request[OUTCOME] = "miss" if entry is None else "hit"
    found = entry or await request.app[FETCHER].instance_by_sop(sop)
    _check_parents(found.study_uid, found.series_uid, study, series, sop)
    if not _serves(found.transfer_syntax, wanted):
        request[OUTCOME] = "passthrough"
        return await passthrough(request)
    return await _multipart(request, found)


async def _multipart(request: web.Request, found: Instance) -> web.StreamResponse:
    """One ``application/dicom`` part, framed exactly as Orthanc frames it.

    A stored instance is sent from its file (by sendfile), never read whole: a
    multi-frame instance can be hundreds of MB.
    """
    md5 = found.md5
    etag = f'"{md5}-mp"'
    headers = {hdrs.CACHE_CONTROL: IMMUTABLE, hdrs.ETAG: etag}
    if etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers=headers)
    b = new_boundary()
    headers[hdrs.CONTENT_TYPE] = f'multipart/related; type="{DICOM}"; boundary={b}'
    plan = _Plan([found], sizes=[found.size], length=_length(b, [found.size]))
    if request.method == "HEAD":
        return web.Response(headers={**headers, hdrs.CONTENT_LENGTH: str(plan.length)})
    resp = web.StreamResponse(headers=headers)
    try:
        await _send(request, resp, b, await _open_part(found), plan, 0, found.sop_uid)
    except OSError as exc:  # the stored file cut on disk, or the viewer gone
        if not resp.prepared:
            raise
        raise _cut(request, f"instance {found.sop_uid}", exc) from exc
    await resp.write(f"--{b}--\r\n".encode())
    await resp.write_eof()
    return resp


def _cut(request: web.Request, what: str, exc: BaseException, after: str = ""
         ) -> ConnectionResetError:
    """An answer that cannot be finished after its headers: logged, and the error that
    breaks the connection (no closing boundary, no last chunk): the only honest signal
    left to the client."""
    request[OUTCOME] = "aborted"
    # A viewer that goes away (a closed tab, a cancelled load) is routine; a cut file is not.
    log.log(logging.INFO if isinstance(exc, ConnectionError) else logging.WARNING,
            "%s aborted%s: %s", what, after, exc)
    return ConnectionResetError(f"{what} cut{after}: {exc}")


#: A stored part is sent from its open file: by ``sendfile`` (the kernel copies the
#: page cache to the socket, no bytes through Python) when the body has a length,
#: else read in chunks of this size (a window of large multi-frame instances must not
#: fill the memory).
CHUNK = 1 << 20
Part = bytes | tuple[BinaryIO, int]


async def _open_part(found: Instance) -> Part:
    """The instance bytes when in memory, or for a stored one its open file and size."""
    if found.path is not None:
        f = await asyncio.to_thread(found.path.open, "rb")
        return f, found.size
    return await found.read()


#: Stored files opened per thread hop.  Measured on a warm 200-instance retrieve: a
#: hop per file (its wake-ups on both sides) cost 30 ms of a 90 ms answer.
OPEN_BATCH = 16
Opened = tuple[BinaryIO, int] | OSError


async def _open_files(entries: list[Instance]) -> list[Opened]:
    """Stored files opened in one thread hop; an entry whose file fails gets its error."""
    def work() -> list[Opened]:
        out: list[Opened] = []
        for e in entries:
            try:
                assert e.path is not None
                out.append((e.path.open("rb"), e.size))
            except OSError as exc:
                out.append(exc)
        return out
    return await asyncio.to_thread(work)


async def _claim(batch: asyncio.Future[list[Opened]], k: int) -> Opened:
    """File ``k`` of a batch (or its error); cancelled while the batch still opens
    (the retrieve given up), the file is closed once it is open."""
    try:
        return (await asyncio.shield(batch))[k]
    except asyncio.CancelledError:
        batch.add_done_callback(functools.partial(_close_opened, k))
        raise


def _close_opened(k: int, batch: asyncio.Future[list[Opened]]) -> None:
    if not batch.cancelled() and batch.exception() is None:
        got = batch.result()[k]
        if not isinstance(got, OSError):
            got[0].close()


def _part_size(part: Part) -> int:
    return len(part) if isinstance(part, bytes) else part[1]


def _close_part(part: Part) -> None:
    if not isinstance(part, bytes):
        part[0].close()


async def _write_part(request: web.Request, resp: web.StreamResponse, b: str,
                      part: Part) -> None:
    if isinstance(part, bytes):
        await resp.write(_part_head(b, len(part)))
        await resp.write(part)
        await resp.write(b"\r\n")
        return
    f, size = part
    try:
        await resp.write(_part_head(b, size))
        if not await _sendfile(request, resp, f, size):
            left = size
            while left:
                chunk = await asyncio.to_thread(f.read, min(CHUNK, left))
                if not chunk:
                    raise OSError(f"stored file {f.name} is shorter than its index says")
                left -= len(chunk)
                await resp.write(chunk)
        await resp.write(b"\r\n")
    finally:
        f.close()


async def _sendfile(request: web.Request, resp: web.StreamResponse, f: BinaryIO,
                    size: int) -> bool:
    """Send ``size`` bytes of ``f`` with the loop's sendfile; False when it cannot be used.

    Only a body with a Content-Length qualifies (chunked framing would have to be
    written around aiohttp's writer).  As in aiohttp's FileResponse, the bytes go
    to the transport directly: loop.sendfile first waits for what the writer has
    queued (this part's head) to be flushed, so the order on the wire is kept.
    """
    if resp.chunked or resp.compression or request.transport is None or size == 0 \
            or web_fileresponse.NOSENDFILE:  # AIOHTTP_NOSENDFILE, as for /file and WADO-URI
        return False
    try:
        sent = await asyncio.get_running_loop().sendfile(request.transport, f, 0, size)
    except NotImplementedError:  # e.g. a TLS transport
        return False
    if sent != size:
        raise OSError(f"stored file {f.name} is shorter than its index says "
                      f"({sent} of {size} bytes)")
    return True


#: Missing instances from which a cold retrieve asks Orthanc for the whole series at once.
STREAM_MIN_MISSING = 2


@dataclass
class _Plan:
    """What a series/study retrieve sends: where each part comes from, and its length."""

    #: Each instance as known before the first byte: stored, in memory, or None (missing).
    known: list[Instance | None]
    #: Each part's size and the whole body's length, when they can be announced.
    sizes: list[int] | None = None
    length: int | None = None
    #: One upstream retrieve of the series feeding the missing instances.
    stream: SeriesStream | None = None

    @property
    def hit(self) -> bool:
        """Every part from the store (or memory), sent as stored: its length is known
        without asking Orthanc (a stream's sizes come from Orthanc)."""
        return self.stream is None and self.length is not None


def _length(b: str, sizes: list[int]) -> int:
    return sum(len(_part_head(b, n)) + n + 2 for n in sizes) + len(b) + 6


async def _known(store: AsyncStore, oids: list[str]) -> list[Instance | None]:
    """Each instance from the hot map, from memory (being committed), else the index."""
    known: list[Instance | None] = [store.sync.peek_orthanc_id(oid) for oid in oids]
    for i, oid in enumerate(oids):  # a retrieve just sent them: still in memory
        body = store.pending_body(oid) if known[i] is None else None
        if body is not None:
            known[i] = body
    unknown = [i for i, e in enumerate(known) if e is None]
    if unknown:  # not in the hot map (e.g. after a restart): one thread hop, not one each
        def look_up() -> list[Instance | None]:
            return [store.sync.get_by_orthanc_id(oids[i]) for i in unknown]
        for i, e in zip(unknown, await asyncio.to_thread(look_up), strict=True):
            known[i] = e
    return known


async def _plan(dw: DicomWeb, listing: Cached, b: str, wanted: str, study: str,
                series: str | None) -> _Plan:
    oids: list[str] = listing.value[1]
    plan = _Plan(await _known(dw.store, oids))
    if all(e is not None and _serves(e.transfer_syntax, wanted) for e in plan.known):
        plan.sizes = [e.size for e in plan.known if e]  # all stored, sent as stored
        plan.length = _length(b, plan.sizes)
    # Several instances missing and the stored bytes wanted: one upstream retrieve of
    # the whole series feeds them (verified part by part; single downloads for the rest).
    missing = [oid for oid, e in zip(oids, plan.known, strict=True) if e is None]
    if wanted == "*" and len(missing) >= STREAM_MIN_MISSING and 2 * len(missing) >= len(oids):
        plan.stream = dw.series_stream(study, series, missing)
        # Orthanc's sizes, asked while the stream starts, announce the length.
        stored = await dw.file_sizes(listing.value[0], "Series" if series else "Study")
        if stored is not None and all(oid in stored for oid in missing):
            plan.sizes = [e.size if e else stored[oid]
                          for oid, e in zip(oids, plan.known, strict=True)]
            plan.length = _length(b, plan.sizes)
    return plan


class _Parts:
    """The parts of one retrieve in order, up to ``window`` of them read or fetched ahead.

    Runs of stored parts are opened :data:`OPEN_BATCH` files per thread hop.
    """

    def __init__(self, dw: DicomWeb, oids: list[str], plan: _Plan, accept: str | None,
                 wanted: str, study: str, series: str | None) -> None:
        self.dw, self.oids, self.plan = dw, oids, plan
        self.accept, self.wanted, self.study, self.series = accept, wanted, study, series
        self.window = dw.settings.retrieve_concurrency
        self.pending: collections.deque[asyncio.Future[Part]] = collections.deque()
        self.ahead = 0
        self._launch()

    async def next(self) -> Part | None:
        """The next part (its file open, or its bytes); ``None`` after the last."""
        if not self.pending:
            return None
        part = await self.pending.popleft()
        self._launch()
        return part

    async def abandon(self) -> None:
        """Cancel what is ahead and close the files opened for parts never sent."""
        for task in self.pending:
            task.cancel()
        with suppress(BaseException):
            await asyncio.gather(*self.pending, return_exceptions=True)
        for task in self.pending:
            if task.done() and not task.cancelled() and task.exception() is None:
                _close_part(task.result())

    def _stored_run(self, i: int) -> list[Instance]:
        """Stored instances sent as stored, from part ``i`` on (one open batch)."""
        run: list[Instance] = []
        while i < len(self.oids) and len(run) < OPEN_BATCH:
            e = self.plan.known[i]
            if e is None or not e.stored or not _serves(e.transfer_syntax, self.wanted):
                break
            run.append(e)
            i += 1
        return run

    def _launch(self) -> None:
        while len(self.pending) < self.window and self.ahead < len(self.oids):
            run = self._stored_run(self.ahead)
            if len(run) < 2:
                self.pending.append(asyncio.ensure_future(self._part(self.ahead)))
                self.ahead += 1
                continue
            batch = asyncio.ensure_future(_open_files(run))
            self.pending.extend(asyncio.ensure_future(self._part(self.ahead + k, batch, k))
                                for k in range(len(run)))
            self.ahead += len(run)

    async def _part(self, i: int, batch: asyncio.Future[list[Opened]] | None = None,
                    k: int = 0) -> Part:
        """Part ``i``; ``batch`` holds its stored file (index ``k``) when opened in a batch."""
        oid, known, stream = self.oids[i], self.plan.known[i], self.plan.stream
        opened = await _claim(batch, k) if batch is not None else None
        streamed = stream.take(oid) if stream is not None else None
        fetcher = self.dw.fetcher
        found: Instance
        try:
            if known is not None:
                found = known
            elif streamed is not None:
                found = await asyncio.shield(streamed)
            else:
                found = await fetcher.by_orthanc_id(oid)
            _check_parents(found.study_uid, found.series_uid, self.study, self.series,
                           found.sop_uid)
            if not _serves(found.transfer_syntax, self.wanted):
                return await self.dw.transcoded(
                    found, self.accept or f'multipart/related; type="{DICOM}"')
            if isinstance(opened, OSError):
                raise opened
            return opened or await _open_part(found)
        except FileNotFoundError:  # evicted or deleted since the lookup
            if found.stored:
                await asyncio.to_thread(self.dw.store.sync.forget, found.sop_uid)
            return await _open_part(await fetcher.by_orthanc_id(oid))
        except BaseException:
            if opened is not None and not isinstance(opened, OSError):
                opened[0].close()
            raise


async def retrieve(request: web.Request) -> web.StreamResponse:
    """A whole series or study as one multipart, streamed from verified instances.

    Parts come in Orthanc's order.  Up to ``dicomweb.retrieve_concurrency``
    instances are read or fetched ahead of the one being sent.  The length is
    announced when it is known: every instance stored and served as stored, or a
    cold retrieve as stored (Orthanc's stored sizes); a part whose size differs
    from the one announced breaks the connection.  A failure before
    the first byte is an ordinary JSON error; after it, the connection is broken.
    """
    study, series, _ = dicomweb_uids(request)
    accept = request.headers.get(hdrs.ACCEPT)
    wanted = wanted_syntax(accept)
    if wanted is None:
        return await passthrough(request)
    family_of(request, "dicomweb")
    dw = request.app[DICOMWEB]
    listing, _stale = await dw.listing(study, series)
    oids: list[str] = listing.value[1]
    if not oids:
        raise NotFoundUpstream(404, f"{series or study} has no instances")
    b = new_boundary()
    ctype = f'multipart/related; type="{DICOM}"; boundary={b}'
    if request.method == "HEAD":
        return web.Response(headers={hdrs.CONTENT_TYPE: ctype})
    plan = await _plan(dw, listing, b, wanted, study, series)
    request[OUTCOME] = "hit" if plan.hit else "miss"
    parts = _Parts(dw, oids, plan, accept, wanted, study, series)
    resp = web.StreamResponse(headers={hdrs.CONTENT_TYPE: ctype})
    sent = 0
    try:
        while (part := await parts.next()) is not None:
            await _send(request, resp, b, part, plan, sent, oids[sent])
            sent += 1
    except BaseException as exc:
        await parts.abandon()
        if not resp.prepared or isinstance(exc, asyncio.CancelledError):
            raise
        raise _cut(request, f"retrieve of {series or study}", exc,
                   f" after {sent} of {len(oids)} instances") from exc
    # No wait for the stream's last commits: every part sent was verified, and
    # lookups of an instance whose commit is pending wait for it (AsyncStore.get).
    await resp.write(f"--{b}--\r\n".encode())
    await resp.write_eof()
    return resp


async def _send(request: web.Request, resp: web.StreamResponse, b: str, part: Part,
                plan: _Plan, i: int, oid: str) -> None:
    """Part ``i`` on the wire (the headers first, with the first part); closes its file."""
    if plan.sizes is not None and _part_size(part) != plan.sizes[i]:
        _close_part(part)
        raise IntegrityError(Cause.LENGTH_MISMATCH, f"instance {oid} is {_part_size(part)} "
                             f"bytes, Orthanc's listing said {plan.sizes[i]}: the announced "
                             "length cannot be kept")
    if not resp.prepared:
        if plan.length is not None:
            resp.content_length = plan.length
        else:
            resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
        except BaseException:
            _close_part(part)
            raise
    await _write_part(request, resp, b, part)  # closes a part's file, whatever happens
    request.app[METRICS].served_bytes.inc(_part_size(part))
