"""Answers: JSON errors, and instance bodies (the hit path, kept short).

An instance from the store is sent with ``sendfile`` from an open descriptor:
like nginx's ``open_file_cache``, :class:`OpenFiles` keeps descriptors of
recently served entries open, and each response gets its own ``dup`` of one
(no disk I/O on the event loop).  ``HEAD``, ``Range`` (single ranges, see
:mod:`.ranges`), ``If-None-Match``/``If-Match`` against the MD5 ETag,
``If-Range`` and ``If-Modified-Since`` are answered here, on aiohttp's public
API (``StreamResponse``, ``request.transport``, ``loop.sendfile``).

Stored files are immutable (a re-commit gets a new name), so a cached
descriptor can never show different bytes.  Entries are found through the index
first, so a removed entry is never served from a descriptor still open; the store
has the descriptor of a file it deletes closed at once (:meth:`OpenFiles.forget`),
or its disk space would stay in use.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import hdrs, web, web_fileresponse
from aiohttp.abc import AbstractStreamWriter

from dicomcache.cache.instance import Instance
from dicomcache.cache.store import Store, signature
from dicomcache.errors import UpstreamError
from dicomcache.http import ranges
from dicomcache.http.keys import METRICS, OUTCOME, SERVED, STORE

log = logging.getLogger(__name__)

DICOM = "application/dicom"


class BodyCut(ConnectionResetError):
    """An answer broken off after its headers went out.  No closing boundary, no last
    chunk: breaking the connection is the only honest signal left to the client.
    :func:`~dicomcache.http.middleware.errors_and_metrics` closes the connection and
    hands ``response`` back to aiohttp, so the cut is one log line (written by
    :func:`cut`), not a traceback per viewer."""

    def __init__(self, response: web.StreamResponse, message: str) -> None:
        super().__init__(message)
        self.response = response


def cut(request: web.Request, response: web.StreamResponse, what: str, exc: BaseException,
        after: str = "", *, by_viewer: bool | None = None) -> BodyCut:
    """Log why ``response`` cannot be finished and return the error that ends it.

    ``by_viewer``: the viewer ended it (default: a connection error that is not
    Orthanc's, i.e. the viewer's socket)."""
    # A viewer that goes away (a closed tab, a cancelled load) is routine: logged quietly,
    # not a failure ("aborted"); one that stops reading is worth a line.  A cut file or an
    # upstream that stopped sending is a failed request ("cut").
    gone = isinstance(exc, ConnectionError) and not isinstance(exc, UpstreamError)
    request[OUTCOME] = "aborted" if (gone if by_viewer is None else by_viewer) else "cut"
    log.log(logging.INFO if gone else logging.WARNING,
            "%s aborted%s: %s: %s", what, after, type(exc).__name__, exc)
    return BodyCut(response, f"{what} cut{after}: {exc}")


def json_text(error: str, reason: str, **extra: Any) -> str:
    return json.dumps({"error": error, "reason": reason, **extra})


def json_error(status: int, error: str, reason: str, **extra: Any) -> web.Response:
    """An error answer: ``{"error": …, "reason": …}`` and any extra fields."""
    return web.Response(status=status, text=json_text(error, reason, **extra),
                        content_type="application/json")


class BadRequest(web.HTTPBadRequest):
    """A malformed identifier or path; the JSON body names the problem."""

    def __init__(self, reason: str) -> None:
        super().__init__(text=json_text("bad request", reason), content_type="application/json")


#: For everything named by a UID or an Orthanc ID (instance bodies, frames, metadata):
#: Orthanc deletes, re-creates and overwrites what a name points at, so browsers keep
#: a copy but ask before each use (``If-None-Match``: a 304 at LAN speed, a 404 once
#: the instance is gone).  ``private``: patient data never sits in shared caches.
REVALIDATE = "private, no-cache"

class OpenFiles:
    """A bounded LRU of open descriptors of stored files (used on the event loop only)."""

    def __init__(self, store: Store, capacity: int = 512) -> None:
        self.store = store
        self.capacity = capacity
        self._fds: OrderedDict[Path, tuple[int, os.stat_result]] = OrderedDict()

    async def open(self, instance: Instance) -> tuple[io.BufferedReader, os.stat_result]:
        """A private file object for a stored instance and its stat (checked the first time
        this process opens it: :meth:`Store.open_checked`); ``FileNotFoundError`` when it
        is gone or bad."""
        path = instance.path
        assert path is not None
        cached = self._fds.get(path)
        if cached is not None and signature(os.fstat(cached[0])) != signature(cached[1]):
            # Written to since it was checked (fstat of an open file: no disk I/O):
            # opened and checked again below.
            self._fds.pop(path)
            os.close(cached[0])
            cached = None
        if cached is None:
            cached = await asyncio.to_thread(self.store.open_checked, instance)
            if path in self._fds:  # another request opened it meanwhile
                os.close(cached[0])
                cached = self._fds[path]
            else:
                self._fds[path] = cached
                while len(self._fds) > self.capacity:
                    _, (old, _st) = self._fds.popitem(last=False)
                    os.close(old)
        self._fds.move_to_end(path)
        # dup: the response owns (and closes) its own descriptor; closing a
        # duplicate never releases the file, so it cannot block.
        return os.fdopen(os.dup(cached[0]), "rb"), cached[1]

    def forget(self, path: Path) -> None:
        """The store deleted this file: close its descriptor (closed in a worker thread:
        the last close of a deleted file frees its blocks, which may take disk I/O), so
        its space returns to the file system now, not when the LRU pushes it out."""
        cached = self._fds.pop(path, None)
        if cached is not None:
            asyncio.get_running_loop().run_in_executor(None, os.close, cached[0])

    def close(self) -> None:
        while self._fds:
            _, (fd, _st) = self._fds.popitem()
            os.close(fd)


OPEN_FILES = web.AppKey("open_files", OpenFiles)


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


Refetch = Callable[[], Awaitable[Instance]]
#: Instances remembered per request for its audit record (a count beyond is not needed).
MAX_SERVED = 10_000


async def serve_instance(request: web.Request, found: Instance, *,
                         filename: str | None = None,
                         refetch: Refetch | None = None) -> web.StreamResponse:
    """Answer with one instance body: from the store by sendfile, else from memory.

    Conditional requests are judged against the MD5 ETag.  A stored file that
    vanished (deleted by hand) is dropped from the store and, with
    ``refetch``, fetched again instead of failing the viewer.
    """
    served = request.get(SERVED)
    if served is not None and len(served) < MAX_SERVED:
        served.append(found)  # who the audit record is about
    etag = found.etag
    headers: dict[str, str] = {hdrs.CACHE_CONTROL: REVALIDATE, hdrs.ETAG: etag}
    if filename:
        headers[hdrs.CONTENT_DISPOSITION] = f'filename="{filename}"'
    if _matches(request.headers.get(hdrs.IF_NONE_MATCH), etag):
        return web.Response(status=304, headers=headers)
    if_match = request.headers.get(hdrs.IF_MATCH)
    if if_match is not None and not _matches(if_match, etag):
        return web.Response(status=412, headers=headers)
    metrics = request.app[METRICS]
    if found.path is not None:
        try:
            fobj, st = await request.app[OPEN_FILES].open(found)
        except FileNotFoundError:  # vanished, or quarantined as bad (BadStoredFile)
            await asyncio.to_thread(request.app[STORE].sync.forget, found.orthanc_id)
            if refetch is None:
                raise
            request[OUTCOME] = "miss"  # purged or bad since the lookup: fetched again
            return await serve_instance(request, await refetch(), filename=filename)
        if _not_modified_since(request, st.st_mtime):
            fobj.close()
            return web.Response(status=304, headers=headers)
        metrics.served_bytes.inc(found.size)
        return await _send_file(request, headers, etag, fobj, st)
    data = await found.read()
    metrics.served_bytes.inc(len(data))
    span = _span(request, len(data), etag, None)
    if span is None:
        return _unsatisfiable(headers, len(data))
    if span.partial:
        headers[hdrs.CONTENT_RANGE] = span.content_range(len(data))
    return web.Response(status=206 if span.partial else 200, content_type=DICOM,
                        headers={**headers, hdrs.ACCEPT_RANGES: "bytes"},
                        body=data[span.start:span.start + span.count])


def _span(request: web.Request, size: int, etag: str, mtime: float | None
          ) -> ranges.Span | None:
    """The bytes to send (see :func:`ranges.plan`); an ``If-Range`` (an ETag or a date)
    that does not match the body means the whole body."""
    header = request.headers.get(hdrs.RANGE)
    if_range = request.headers.get(hdrs.IF_RANGE, "").strip()
    if header is not None and if_range:
        if if_range.startswith(('"', "W/")):
            matches = if_range == etag
        else:
            date = request.if_range
            matches = date is not None and mtime is not None and mtime <= date.timestamp()
        header = header if matches else None
    return ranges.plan(header, size)


def _not_modified_since(request: web.Request, mtime: float) -> bool:
    ims = request.if_modified_since
    return ims is not None and request.headers.get(hdrs.IF_NONE_MATCH) is None \
        and mtime <= ims.timestamp()


def _unsatisfiable(headers: dict[str, str], size: int) -> web.Response:
    return web.Response(status=416, headers={**headers, hdrs.CONTENT_RANGE: f"bytes */{size}"})


async def _send_file(request: web.Request, headers: dict[str, str], etag: str,
                     fobj: io.BufferedReader, st: os.stat_result) -> web.StreamResponse:
    """The stored body (or its range), sent once aiohttp prepares the answer."""
    span = _span(request, st.st_size, etag, st.st_mtime)
    if span is None:
        fobj.close()
        return _unsatisfiable(headers, st.st_size)
    resp = StoredBody(fobj, span, status=206 if span.partial else 200, headers=headers)
    resp.content_type = DICOM
    resp.content_length = span.count
    resp.last_modified = st.st_mtime
    resp.headers[hdrs.ACCEPT_RANGES] = "bytes"
    if span.partial:
        resp.headers[hdrs.CONTENT_RANGE] = span.content_range(st.st_size)
    return resp


class StoredBody(web.StreamResponse):
    """An answer whose body is a range of an open stored file, sent when it is prepared.

    Returned unprepared by the handler (as aiohttp's own FileResponse is), so the
    middleware has labelled and timed the request before the body goes out.  It
    owns ``fobj`` and closes it.
    """

    def __init__(self, fobj: io.BufferedReader, span: ranges.Span, *, status: int,
                 headers: dict[str, str]) -> None:
        super().__init__(status=status, headers=headers)
        self._fobj = fobj
        self._span = span
        #: Body bytes sent by ``sendfile`` (which bypasses ``body_length``).
        self.file_bytes = 0

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:  # prepared already (by the audit middleware): sent once
            return await super().prepare(request)
        try:
            writer = await super().prepare(request)
            if request.method != "HEAD" and self._span.count:
                assert isinstance(request, web.Request)
                if await send_file_range(request, self, self._fobj, self._span.start,
                                         self._span.count):
                    self.file_bytes = self._span.count
            await self.write_eof()
            return writer
        finally:
            self._fobj.close()


async def send_file_range(request: web.Request, resp: web.StreamResponse, f: BinaryIO,
                          offset: int, count: int) -> bool:
    """Send ``count`` bytes of ``f`` from ``offset`` after ``resp``'s headers; True when
    it went by ``sendfile``.

    By the loop's ``sendfile`` when the answer has a length and is not compressed
    (the kernel copies the page cache to the socket), else read in
    :data:`CHUNK` pieces in a worker thread.  ``OSError`` when the file is
    shorter than it should be: the connection must then be broken.
    """
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the viewer went away")
    if not (resp.chunked or resp.compression or web_fileresponse.NOSENDFILE):
        try:
            sent = await asyncio.get_running_loop().sendfile(transport, f, offset, count)
        except NotImplementedError:  # a TLS transport: read and write instead
            pass
        else:
            if sent != count:
                # The kernel stops early at the end of the file, or when the viewer's
                # socket goes away (a closed tab, a benchmark ending): tell them apart.
                if os.fstat(f.fileno()).st_size < offset + count:
                    raise OSError(f"stored file {f.name} is shorter than its index says")
                raise ConnectionResetError("the viewer went away during sendfile")
            return True
    f.seek(offset)
    left = count
    while left:
        chunk = await asyncio.to_thread(f.read, min(CHUNK, left))
        if not chunk:
            raise OSError(f"stored file {f.name} is shorter than its index says")
        left -= len(chunk)
        await resp.write(chunk)
    return False


#: Read size where ``sendfile`` cannot be used (bounded memory for big multi-frame files).
CHUNK = 1 << 20
