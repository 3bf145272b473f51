"""DICOMweb for OHIF-style viewers, served from the verified cache where possible.

* **WADO-RS retrieve** of an instance, a series or a study
  (``multipart/related; type="application/dicom"``): every part is a verified
  instance from the store, or downloaded, verified and stored on the way
  (coalesced with every other family).  Orthanc's plugin sends the stored bytes
  when ``Accept`` says ``transfer-syntax=*`` (or names the stored syntax) and
  transcodes otherwise; parts whose stored syntax is not the one asked for are
  fetched transcoded from Orthanc one instance at a time and bounds-checked
  before they are sent.  Series and study answers are streamed in Orthanc's
  order; when one instance cannot be had after the retries the connection is
  broken (no closing boundary, no last chunk) so no client mistakes a short
  multipart for a whole one.  Answers assembled entirely from the store carry
  an exact ``Content-Length``.
* **Frames**: cut from the stored instance (see :mod:`dicomcache.frames`),
  read through when Orthanc would decode or transcode.
* **Metadata, QIDO-RS, rendered/thumbnail**: :class:`~dicomcache.metadata.AnswerCache`
  (instance metadata immutable; series/study metadata fresh for
  ``dicomweb.metadata_fresh`` seconds, then revalidated against the instance
  list; stale copies served with ``Warning: 110`` when Orthanc is unreachable).
  Every link points at dicomcache, on the host name the viewer used.
* JSON answers are gzipped for clients that accept it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import mmap
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
from aiohttp import hdrs, web, web_fileresponse
from yarl import URL

from ..changes import STUDY_CHANGED
from ..config import DicomwebSettings
from ..errors import IntegrityError, NotFoundUpstream, UpstreamError
from ..fetch import Fetched, Fetcher
from ..frames import NATIVE_LE, OCTET, frame_ranges, parse_frame_list, plan_frames
from ..metadata import (IMMUTABLE_FRESH, AnswerCache, Cached, DiskCopies, link_path,
                        normalise_json, plain)
from ..series_stream import COMMIT_BACKLOG, Budget, SeriesStream
from ..store import AsyncStore, Entry
from ..upstream import OrthancClient, check_status
from ..verify import PixelInfo, parse_dicom
from .common import (CLIENT, DICOM, FETCHER, METRICS, OUTCOME, SETTINGS, STORE, BadRequest,
                     boundary, dicom_uid, family_of)
from .passthrough import check_path, passthrough
from .serve import IMMUTABLE, read_instance
from .wado_uri import _check_parents

log = logging.getLogger(__name__)

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DICOM_JSON = "application/dicom+json"
#: ``Warning`` on a stale copy served because Orthanc could not be asked (RFC 7234 §5.5.1).
STALE_WARNING = '110 dicomcache "Response is Stale"'
_JSON_ACCEPTS = ("*/*", "application/*", "application/json", DICOM_JSON)
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")
_BAD_QUERY = re.compile(r"%0[0ad]|[\x00-\x1f]", re.IGNORECASE)


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


def accepts_json(accept: str | None) -> bool:
    """Whether a metadata/QIDO ``Accept`` is satisfied by DICOM JSON (else read through)."""
    if not accept:
        return True
    return any(item.split(";")[0].strip().lower() in _JSON_ACCEPTS for item in accept.split(","))


def accepts_gzip(header: str | None) -> bool:
    for item in (header or "").split(","):
        name, _, q = item.strip().partition(";")
        if name.strip().lower() in ("gzip", "x-gzip", "*"):
            q = q.strip()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


def public_base(request: web.Request) -> str:
    """``{scheme}://{host}/dicom-web`` as the viewer reached dicomcache.

    ``dicomweb.public_url`` wins; otherwise, like Orthanc, the first element of a
    ``Forwarded`` header, else ``Host``.  A host that is not a host name
    (injection into JSON, header splitting) is a 400.
    """
    configured = request.app[SETTINGS].dicomweb.public_url
    if configured:
        return configured + "/dicom-web"
    host = request.headers.get(hdrs.HOST) or request.host
    proto = request.scheme
    forwarded = request.headers.get(hdrs.FORWARDED)
    if forwarded:
        for pair in forwarded.split(",")[0].split(";"):
            key, _, value = pair.strip().partition("=")
            value = value.strip().strip('"')
            if key.strip().lower() == "host" and value:
                host = value
            elif key.strip().lower() == "proto" and value.lower() in ("http", "https"):
                proto = value.lower()
    if not _HOST_RE.match(host):
        raise BadRequest(f"Host {host[:80]!r} is not a host name (with an optional port)")
    return f"{proto}://{host}/dicom-web"


# --- state ---------------------------------------------------------------------------------

class DicomWeb:
    """The DICOMweb caches and the upstream calls they need (one per app)."""

    def __init__(self, settings: DicomwebSettings, client: OrthancClient, store: AsyncStore,
                 fetcher: Fetcher, directory: Path | None = None) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.fetcher = fetcher
        # Metadata, searches and instance lists also go to disk (not rendered images), so
        # a restart while Orthanc is unreachable still has them to stand in.
        self.disk = DiskCopies(directory, settings.memory_size) if directory else None
        self.cache = AnswerCache(settings.memory_size, settings.stale_if_error, disk=self.disk,
                                 persist=lambda key: not key.startswith("raw:"))
        self._pixels: collections.OrderedDict[str, PixelInfo | None] = collections.OrderedDict()
        #: Upstream series/study streams in progress (cancelled at shutdown).
        self.streams: set[asyncio.Future[None]] = set()
        #: Verified stream parts not yet durable, all streams together.
        self.commit_backlog = Budget(COMMIT_BACKLOG)

    def series_stream(self, study: str, series: str | None, oids: list[str]) -> SeriesStream:
        """One upstream retrieve of the series/study feeding the missing instances ``oids``."""
        path = f"/dicom-web/studies/{study}" + (f"/series/{series}" if series else "")
        stream = SeriesStream(self.fetcher, path, oids, self.commit_backlog)
        self.streams.add(stream.task)
        stream.task.add_done_callback(self.streams.discard)
        return stream

    async def file_sizes(self, oid: str, level: str) -> dict[str, int] | None:
        """Orthanc's size of each stored instance of a series or study (``None``: unknown).

        Lets a cold retrieve of instances as stored announce its Content-Length:
        a client reads a body of known length faster than a chunked one (the
        Python ``http.client`` of the benchmark spends half the CPU) and can show
        progress.  One attempt, no retries: without it the answer is chunked.
        """
        path = f"/{'series' if level == 'Series' else 'studies'}/{oid}/instances"
        try:
            _, data = await self.client.get(path, kind="listing")
            return {str(i["ID"]): int(i["FileSize"]) for i in json.loads(data)}
        except (UpstreamError, NotFoundUpstream, ValueError, KeyError, TypeError) as exc:
            log.info("no instance sizes for %s (%s): the retrieve is sent chunked", oid, exc)
            return None

    # upstream calls: retried when no copy exists; one attempt when a stale copy can stand in
    async def _ask(self, op: Callable[[int], Awaitable[Any]], *, what: str, retry: bool) -> Any:
        if retry:
            return await self.client.retrying(op, what=what)
        return await op(1)

    async def _lookup(self, uid: str, level: str) -> str:
        _, data = await self.client.get("/tools/lookup", kind="lookup", method="POST",
                                        body=uid.encode())
        for item in json.loads(data):
            if item.get("Type") == level:
                return str(item["ID"])
        raise NotFoundUpstream(404, f"Orthanc has no {level.lower()} with UID {uid}")

    async def listing(self, study: str, series: str | None) -> tuple[Cached, bool]:
        """Orthanc IDs of the instances of a series or study, in Orthanc's order.

        ``value`` is ``(orthanc id of the series/study, (instance ids…))``; the
        validator changes whenever an instance is added or the resource updated.
        """
        key = f"list:{study}/{series or ''}"
        return await self.cache.get(key, lambda old: self._load_listing(study, series, old))

    async def _load_listing(self, study: str, series: str | None, old: Cached | None) -> Cached:
        async def once(_attempt: int) -> Cached:
            if series is not None:
                oid = old.value[0] if old is not None else await self._lookup(series, "Series")
                _, data = await self.client.get(f"/series/{oid}", kind="listing")
                info = json.loads(data)
                if old is None and info.get("ParentStudy") != await self._lookup(study, "Study"):
                    raise NotFoundUpstream(404, f"series {series} is not in study {study}")
                ids = [str(i) for i in info.get("Instances", ())]
                validator: Any = [ids, info.get("LastUpdate")]
            else:
                oid = old.value[0] if old is not None else await self._lookup(study, "Study")
                _, data = await self.client.get(f"/studies/{oid}/series", kind="listing")
                items = json.loads(data)
                ids = [str(i) for s in items for i in s.get("Instances", ())]
                validator = plain([(s.get("ID"), s.get("LastUpdate"), len(s.get("Instances", ())))
                                   for s in items])
            if old is not None and old.validator == validator:
                return old.revalidated(time.monotonic())
            return Cached(b"", "", time.monotonic(), self.settings.metadata_fresh,
                          validator=validator, value=[oid, ids])

        try:
            result: Cached = await self._ask(once, what=f"instances of {series or study}",
                                             retry=old is None)
        except NotFoundUpstream:
            if old is None:
                raise
            # The cached Orthanc ID is gone (resource deleted, re-created): look up afresh.
            result = await self._load_listing(study, series, None)
        return result

    async def json_answer(self, key: str, path: str, fresh_for: float,
                          listing: tuple[str, str | None] | None = None) -> tuple[Cached, bool]:
        """A DICOM JSON answer (metadata or QIDO) from the cache, links normalised.

        With ``listing`` (study, series) a stale copy is confirmed against the
        instance list before it is downloaded again.
        """
        async def load(old: Cached | None) -> Cached:
            validator = None
            if listing is not None:
                found, stale = await self.listing(*listing)
                if stale:
                    raise UpstreamError("stale", "the instance list could not be revalidated")
                validator = found.validator
                if old is not None and old.validator == validator:
                    return old.revalidated(time.monotonic())

            async def once(_attempt: int) -> Cached:
                headers, data = await self.client.get(path, kind="metadata",
                                                      headers={"Accept": DICOM_JSON})
                try:
                    body = await asyncio.to_thread(normalise_json, data) if len(data) > 1 << 16 \
                        else normalise_json(data)
                except ValueError as exc:
                    raise UpstreamError("bad_json", f"{path}: Orthanc sent invalid JSON "
                                        f"({exc})") from exc
                return Cached(body, headers.get(hdrs.CONTENT_TYPE, DICOM_JSON),
                              time.monotonic(), fresh_for, validator=validator, has_links=True)

            result: Cached = await self._ask(once, what=f"GET {path}", retry=old is None)
            return result

        return await self.cache.get(key, load)

    async def raw_answer(self, key: str, path: str, accept: str | None,
                         fresh_for: float) -> tuple[Cached, bool]:
        """Any other small answer (rendered, thumbnail), cached as Orthanc sent it."""
        async def load(old: Cached | None) -> Cached:
            async def once(_attempt: int) -> Cached:
                headers, data = await self.client.get(
                    path, kind="rendered", headers={"Accept": accept} if accept else None)
                return Cached(data, headers.get(hdrs.CONTENT_TYPE, "application/octet-stream"),
                              time.monotonic(), fresh_for)
            result: Cached = await self._ask(once, what=f"GET {path}", retry=old is None)
            return result

        return await self.cache.get(key, load)

    async def study_changed(self, study_uid: str) -> None:
        """A change hook: the study's lists, metadata, QIDO and rendered answers go stale now.

        They are revalidated on the next request (and still stand in while Orthanc
        is unreachable); searches are short-lived anyway and all expire.
        """
        marker = f"/studies/{study_uid}/"
        self.cache.expire(lambda key: key.startswith(f"list:{study_uid}/") or marker in key
                          or key.startswith("qido:"))

    async def pixel_info(self, found: Entry | Fetched) -> PixelInfo | None:
        """Where the pixel data of a verified instance lives (parsed once per content)."""
        if found.md5 in self._pixels:
            self._pixels.move_to_end(found.md5)
            return self._pixels[found.md5]
        if isinstance(found, Entry):
            pixel = await asyncio.to_thread(_pixel_of_file, str(found.path))
        else:
            data = found.data
            pixel = await asyncio.to_thread(lambda: parse_dicom(data).pixel)
        self._pixels[found.md5] = pixel
        while len(self._pixels) > 4096:
            self._pixels.popitem(last=False)
        return pixel

    async def transcoded(self, found: Entry | Fetched, accept: str) -> bytes:
        """One instance as Orthanc transcodes it for ``accept``, bounds-checked before use."""
        path = (f"/dicom-web/studies/{found.study_uid}/series/{found.series_uid}"
                f"/instances/{found.sop_uid}")

        async def once(_attempt: int) -> bytes:
            headers, data = await self.client.get(path, kind="transcode",
                                                  headers={"Accept": accept})
            part = single_part(data, headers.get(hdrs.CONTENT_TYPE, ""))

            def check() -> None:
                summary = parse_dicom(part)
                if summary.sop_instance_uid != found.sop_uid:
                    raise IntegrityError("parse_failure", f"{path}: Orthanc sent instance "
                                         f"{summary.sop_instance_uid}")
            await asyncio.to_thread(check)
            return part

        result: bytes = await self.client.retrying(once, what=f"transcode {found.sop_uid}")
        return result


DICOMWEB = web.AppKey("dicomweb", DicomWeb)


def _pixel_of_file(path: str) -> PixelInfo | None:
    """Parse a stored file through a memory map (a big multi-frame file is not read whole)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return parse_dicom(b"").pixel
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return parse_dicom(m).pixel
        finally:
            with suppress(BufferError):  # a view still alive: the map goes with it
                m.close()


def single_part(body: bytes, content_type: str) -> bytes:
    """The body of a one-part multipart answer; :class:`IntegrityError` if it is not whole."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise IntegrityError("parse_failure", f"not a multipart answer: {content_type[:80]!r}")
    b = m.group(1).encode()
    if not body.startswith(b"--" + b + b"\r\n"):
        raise IntegrityError("parse_failure", "multipart answer does not start with its boundary")
    tail = b"\r\n--" + b + b"--\r\n"
    if not body.endswith(tail):
        raise IntegrityError("short_body", "multipart answer has no closing boundary")
    head, sep, rest = body.partition(b"\r\n\r\n")
    if not sep:
        raise IntegrityError("parse_failure", "multipart part has no header end")
    part = rest[: -len(tail)]
    declared = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if declared and int(declared.group(1)) != len(part):
        raise IntegrityError("length_mismatch", f"part is {len(part)} bytes, its "
                             f"Content-Length says {int(declared.group(1))}")
    return part


# --- answers from the answer cache -----------------------------------------------------------

async def _answer(request: web.Request, entry: Cached, stale: bool, cache_control: str,
                  *, json_body: bool) -> web.Response:
    base = public_base(request) if entry.has_links else ""
    gz = json_body and len(entry.body) >= 1024 and accepts_gzip(
        request.headers.get(hdrs.ACCEPT_ENCODING))
    etag = entry.etag(base, gz)
    headers = {hdrs.CACHE_CONTROL: cache_control, hdrs.ETAG: etag,
               hdrs.CONTENT_TYPE: entry.content_type}
    if json_body:
        headers[hdrs.VARY] = "Accept-Encoding"
    if stale:
        headers[hdrs.WARNING] = STALE_WARNING
        headers[hdrs.AGE] = str(int(time.monotonic() - entry.validated_at))
        request[OUTCOME] = "stale"
    if etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers=headers)
    body = await entry.render(base, gz)
    if gz:
        headers[hdrs.CONTENT_ENCODING] = "gzip"
    resp = web.Response(body=body, headers=headers)
    return resp


def _uids(request: web.Request) -> tuple[str, str | None, str | None]:
    mi = request.match_info
    study = dicom_uid(mi["study"], "StudyInstanceUID")
    series = dicom_uid(mi["series"], "SeriesInstanceUID") if "series" in mi else None
    sop = dicom_uid(mi["sop"], "SOPInstanceUID") if "sop" in mi else None
    return study, series, sop


async def metadata(request: web.Request) -> web.StreamResponse:
    """Study, series or instance metadata (DICOM JSON) with links on dicomcache."""
    study, series, sop = _uids(request)
    if not accepts_json(request.headers.get(hdrs.ACCEPT)):
        return await passthrough(request)
    _check_raw(request)
    family_of(request, "dicomweb")
    dw = request.app[DICOMWEB]
    path = request.raw_path  # a query (includefield…) is part of what is asked
    hit_before = dw.cache.peek(f"json:{path}")
    if sop is not None:
        entry, stale = await dw.json_answer(f"json:{path}", path, IMMUTABLE_FRESH)
        control = "private, max-age=86400"
    else:
        entry, stale = await dw.json_answer(f"json:{path}", path, dw.settings.metadata_fresh,
                                            listing=(study, series))
        control = "no-cache"
    request[OUTCOME] = "hit" if hit_before is entry else "miss"
    return await _answer(request, entry, stale, control, json_body=True)


async def qido(request: web.Request) -> web.StreamResponse:
    """QIDO-RS searches: read through once, then cached briefly; links on dicomcache."""
    mi = request.match_info
    for name, what in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID")):
        if name in mi:
            dicom_uid(mi[name], what)
    if not accepts_json(request.headers.get(hdrs.ACCEPT)):
        return await passthrough(request)
    _check_raw(request)
    family_of(request, "dicomweb")
    dw = request.app[DICOMWEB]
    key = f"qido:{request.raw_path}"
    before = dw.cache.peek(key)
    entry, stale = await dw.json_answer(key, request.raw_path, dw.settings.qido_fresh)
    request[OUTCOME] = "hit" if before is entry else "miss"
    return await _answer(request, entry, stale, "no-cache", json_body=True)


async def rendered(request: web.Request) -> web.StreamResponse:
    """Rendered images and thumbnails: cached as Orthanc renders them."""
    _study, _series, sop = _uids(request)
    _check_raw(request)
    family_of(request, "dicomweb")
    dw = request.app[DICOMWEB]
    accept = request.headers.get(hdrs.ACCEPT)
    key = f"raw:{request.raw_path}|{accept or ''}"
    before = dw.cache.peek(key)
    fresh = IMMUTABLE_FRESH if sop is not None else dw.settings.rendered_fresh
    entry, stale = await dw.raw_answer(key, request.raw_path, accept, fresh)
    request[OUTCOME] = "hit" if before is entry else "miss"
    control = "private, max-age=86400" if sop is not None else "no-cache"
    return await _answer(request, entry, stale, control, json_body=False)


def _check_raw(request: web.Request) -> None:
    """The read-through path checks, and no NUL or line breaks hidden in the query."""
    check_path(request.raw_path)
    query = request.raw_path.partition("?")[2]
    if _BAD_QUERY.search(query):
        raise BadRequest("NUL, CR and LF are not allowed in queries")


# --- WADO-RS retrieve ----------------------------------------------------------------------

def _part_head(b: str, length: int) -> bytes:
    return (f"--{b}\r\nContent-Type: {DICOM}\r\nContent-Length: {length}\r\n"
            f"MIME-Version: 1.0\r\n\r\n").encode()


async def instance(request: web.Request) -> web.StreamResponse:
    study, series, sop = _uids(request)
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


async def _multipart(request: web.Request, found: Entry | Fetched) -> web.StreamResponse:
    """One ``application/dicom`` part, framed exactly as Orthanc frames it.

    A stored instance is sent from its file (by sendfile), never read whole: a
    multi-frame instance can be hundreds of MB.
    """
    md5 = found.md5
    etag = f'"{md5}-mp"'
    headers = {hdrs.CACHE_CONTROL: IMMUTABLE, hdrs.ETAG: etag}
    if etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers=headers)
    b = boundary()
    headers[hdrs.CONTENT_TYPE] = f'multipart/related; type="{DICOM}"; boundary={b}'
    tail = f"--{b}--\r\n".encode()
    size = found.size
    headers[hdrs.CONTENT_LENGTH] = str(len(_part_head(b, size)) + size + 2 + len(tail))
    if request.method == "HEAD":
        return web.Response(headers=headers)
    part = await _open_part(found)
    if _part_size(part) != size:  # bytes in memory are what was verified; guard anyway
        _close_part(part)
        raise IntegrityError("length_mismatch", f"instance {found.sop_uid} is "
                             f"{_part_size(part)} bytes, not {size}")
    resp = web.StreamResponse(headers=headers)
    try:
        await resp.prepare(request)
    except BaseException:
        _close_part(part)
        raise
    try:
        await _write_part(request, resp, b, part)  # closes the part's file
        request.app[METRICS].served_bytes.inc(size)
    except OSError as exc:  # the stored file cut on disk, or the viewer gone
        request[OUTCOME] = "aborted"
        # A viewer that cancels (OHIF does, scrolling past) is routine; a cut file is not.
        log.log(logging.INFO if isinstance(exc, ConnectionError) else logging.WARNING,
                "instance %s: answer cut: %s", found.sop_uid, exc)
        # The headers are gone: breaking the connection is the only honest signal left.
        raise ConnectionResetError(f"instance answer cut: {exc}") from exc
    await resp.write(tail)
    await resp.write_eof()
    return resp


#: A stored part is sent from its open file: by ``sendfile`` (the kernel copies the
#: page cache to the socket, no bytes through Python) when the body has a length,
#: else read in chunks of this size (a window of large multi-frame instances must not
#: fill the memory).
CHUNK = 1 << 20
Part = bytes | tuple[BinaryIO, int]


async def _open_part(found: Entry | Fetched) -> Part:
    """The instance bytes when in memory, or for a stored one its open file and size."""
    if isinstance(found, Entry):
        f = await asyncio.to_thread(found.path.open, "rb")
        return f, found.size
    return await read_instance(found)


#: Stored files opened per thread hop.  Measured on a warm 200-instance retrieve: a
#: hop per file (its wake-ups on both sides) cost 30 ms of a 90 ms answer.
OPEN_BATCH = 16
Opened = tuple[BinaryIO, int] | OSError


async def _open_files(entries: list[Entry]) -> list[Opened]:
    """Stored files opened in one thread hop; an entry whose file fails gets its error."""
    def work() -> list[Opened]:
        out: list[Opened] = []
        for e in entries:
            try:
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


async def retrieve(request: web.Request) -> web.StreamResponse:
    """A whole series or study as one multipart, streamed from verified instances.

    Parts come in Orthanc's order.  Up to ``dicomweb.retrieve_concurrency``
    instances are read or fetched ahead of the one being sent.  The length is
    announced when it is known: every instance stored and served as stored, or a
    cold retrieve as stored (Orthanc's stored sizes); a part whose size differs
    from the one announced breaks the connection.  A failure before
    the first byte is an ordinary JSON error; after it, the connection is broken.
    """
    study, series, _ = _uids(request)
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
    b = boundary()
    ctype = f'multipart/related; type="{DICOM}"; boundary={b}'
    if request.method == "HEAD":
        return web.Response(headers={hdrs.CONTENT_TYPE: ctype})
    store, fetcher = dw.store, dw.fetcher

    # All in the store and served as stored: the length is known before the first byte.
    peeked: list[Entry | Fetched | None] = [store.sync.peek_orthanc_id(oid) for oid in oids]
    if not all(peeked):  # some may be being committed (a retrieve just sent them): from memory
        for i, oid in enumerate(oids):
            body = store.pending_body(oid) if peeked[i] is None else None
            if body is not None:
                peeked[i] = Fetched.of(body.summary, body.md5, oid, body.data)
    if not all(peeked):  # not in the hot map (e.g. after a restart): ask the index
        unknown = [i for i, e in enumerate(peeked) if e is None]
        def look_up() -> list[Entry | None]:  # one thread hop, not one per instance
            return [store.sync.get_by_orthanc_id(oids[i]) for i in unknown]
        for i, e in zip(unknown, await asyncio.to_thread(look_up), strict=True):
            peeked[i] = e
    length: int | None = None
    if all(e is not None and _serves(e.transfer_syntax, wanted) for e in peeked):
        length = sum(len(_part_head(b, e.size)) + e.size + 2 for e in peeked if e) + len(b) + 6
        request[OUTCOME] = "hit"
    else:
        request[OUTCOME] = "miss"
    # Several instances missing and the stored bytes wanted: one upstream retrieve of
    # the whole series feeds them (verified part by part; single downloads for the rest).
    missing = [oid for oid, e in zip(oids, peeked, strict=True) if e is None]
    stream: SeriesStream | None = None
    #: The size of each part, when the length is announced.
    sizes: list[int] | None = [e.size for e in peeked if e] if length is not None else None
    if wanted == "*" and len(missing) >= STREAM_MIN_MISSING and 2 * len(missing) >= len(oids):
        stream = dw.series_stream(study, series, missing)
        # Orthanc's sizes, asked while the stream starts, announce the length.
        stored = await dw.file_sizes(listing.value[0], "Series" if series else "Study")
        if stored is not None and all(oid in stored for oid in missing):
            sizes = [e.size if e else stored[oid] for oid, e in zip(oids, peeked, strict=True)]
            length = sum(len(_part_head(b, n)) + n + 2 for n in sizes) + len(b) + 6

    async def part(i: int, batch: asyncio.Future[list[Opened]] | None = None, k: int = 0
                   ) -> Part:
        """Part ``i``; ``batch`` holds its stored file (index ``k``) when opened in a batch."""
        oid = oids[i]
        opened = await _claim(batch, k) if batch is not None else None
        streamed = stream.take(oid) if stream is not None else None
        found: Entry | Fetched
        known = peeked[i]
        try:
            if known is not None:
                found = known
            elif streamed is not None:
                found = await asyncio.shield(streamed)
            else:
                found = await fetcher.by_orthanc_id(oid)
            _check_parents(found.study_uid, found.series_uid, study, series, found.sop_uid)
            if not _serves(found.transfer_syntax, wanted):
                return await dw.transcoded(found, accept or f'multipart/related; type="{DICOM}"')
            if isinstance(opened, OSError):
                raise opened
            return opened or await _open_part(found)
        except FileNotFoundError:  # evicted or deleted since the lookup
            if isinstance(found, Entry):
                await asyncio.to_thread(store.sync.forget, found.sop_uid)
            return await _open_part(await fetcher.by_orthanc_id(oid))
        except BaseException:
            if opened is not None and not isinstance(opened, OSError):
                opened[0].close()
            raise

    resp = web.StreamResponse(headers={hdrs.CONTENT_TYPE: ctype})
    window = dw.settings.retrieve_concurrency
    pending: collections.deque[asyncio.Future[Part]] = collections.deque()
    ahead = 0

    def stored_run(i: int) -> list[int]:
        """Parts from ``i`` on that are stored files sent as stored (one open batch)."""
        run: list[int] = []
        while i < len(oids) and len(run) < OPEN_BATCH:
            e = peeked[i]
            if not isinstance(e, Entry) or not _serves(e.transfer_syntax, wanted):
                break
            run.append(i)
            i += 1
        return run

    def launch() -> None:
        nonlocal ahead
        while len(pending) < window and ahead < len(oids):
            run = stored_run(ahead)
            if len(run) < 2:
                pending.append(asyncio.ensure_future(part(ahead)))
                ahead += 1
                continue
            batch = asyncio.ensure_future(_open_files([e for j in run
                                                       if isinstance(e := peeked[j], Entry)]))
            pending.extend(asyncio.ensure_future(part(j, batch, k)) for k, j in enumerate(run))
            ahead += len(run)

    launch()
    sent = 0
    served = request.app[METRICS].served_bytes
    try:
        while pending:
            data = await pending.popleft()
            launch()
            if sizes is not None and _part_size(data) != sizes[sent]:
                _close_part(data)
                raise IntegrityError("length_mismatch", f"instance {oids[sent]} is "
                                     f"{_part_size(data)} bytes, Orthanc's listing said "
                                     f"{sizes[sent]}: the announced length cannot be kept")
            if not resp.prepared:
                if length is not None:
                    resp.content_length = length
                else:
                    resp.enable_chunked_encoding()
                try:
                    await resp.prepare(request)
                except BaseException:
                    _close_part(data)
                    raise
            await _write_part(request, resp, b, data)  # closes a part's file, whatever happens
            served.inc(_part_size(data))
            sent += 1
    except BaseException as exc:
        for task in pending:
            task.cancel()
        with suppress(BaseException):
            await asyncio.gather(*pending, return_exceptions=True)
        for task in pending:  # parts opened but never sent
            if task.done() and not task.cancelled() and task.exception() is None:
                _close_part(task.result())
        if not resp.prepared or isinstance(exc, asyncio.CancelledError):
            raise
        request[OUTCOME] = "aborted"
        log.warning("retrieve of %s aborted after %d of %d instances: %s",
                    series or study, sent, len(oids), exc)
        # Headers and some parts are gone: breaking the connection is the only honest
        # signal left (no closing boundary, no final chunk).
        raise ConnectionResetError(f"retrieve cut after {sent} of {len(oids)} parts: "
                                   f"{exc}") from exc
    # No wait for the stream's last commits: every part sent was verified, and
    # lookups of an instance whose commit is pending wait for it (AsyncStore.get).
    await resp.write(f"--{b}--\r\n".encode())
    await resp.write_eof()
    return resp


# --- frames --------------------------------------------------------------------------------

def _read_ranges(path: str, ranges: list[list[tuple[int, int]]]) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = []
        for frame in ranges:
            chunks = []
            for off, length in frame:
                chunk = os.pread(fd, length, off)
                if len(chunk) != length:
                    raise FileNotFoundError(f"{path} is shorter than its index says")
                chunks.append(chunk)
            out.append(b"".join(chunks))
        return out
    finally:
        os.close(fd)


def _frame_parts(ranges: list[list[tuple[int, int]]], data: bytes) -> Iterator[bytes]:
    for frame in ranges:
        yield b"".join(data[off:off + length] for off, length in frame)


async def _stored_or_fetched(request: web.Request, dw: DicomWeb, sop: str
                             ) -> Entry | Fetched | None:
    """The verified instance: from the store, else downloaded (None: Orthanc could not
    give it, and the caller reads the answer through instead)."""
    found: Entry | Fetched | None = await dw.store.get(sop)
    request[OUTCOME] = "hit" if found is not None else "miss"
    if found is None:
        try:
            found = await dw.fetcher.instance_by_sop(sop)
        except (UpstreamError, NotFoundUpstream) as exc:
            log.info("%s read through: %s", request.path, exc)
            return None
    return found


async def frames(request: web.Request) -> web.StreamResponse:
    """Frames cut from the verified instance, framed as Orthanc frames them."""
    study, series, sop = _uids(request)
    assert series is not None and sop is not None
    family_of(request, "dicomweb")
    dw = request.app[DICOMWEB]
    found = await _stored_or_fetched(request, dw, sop)
    if found is None:
        return await frames_through(request)
    _check_parents(found.study_uid, found.series_uid, study, series, sop)
    plan = plan_frames(request.headers.get(hdrs.ACCEPT), found.transfer_syntax)
    pixel = await dw.pixel_info(found) if plan is not None else None
    numbers = parse_frame_list(request.match_info["frames"], max(1, pixel.number_of_frames)) \
        if pixel is not None else None
    ranges = [frame_ranges(pixel, n) for n in numbers] if pixel and numbers else None
    if plan is None or not ranges or any(r is None for r in ranges):
        return await frames_through(request)
    cut = [r for r in ranges if r is not None]
    if isinstance(found, Entry):
        try:
            bodies = await asyncio.to_thread(_read_ranges, str(found.path), cut)
        except FileNotFoundError:
            return await frames_through(request)
    else:
        bodies = list(_frame_parts(cut, found.data))
    base = public_base(request)
    b = boundary()
    out = []
    for n, body in zip(numbers or (), bodies, strict=True):
        out.append((f"--{b}\r\nContent-Location: {base}/studies/{study}/series/{series}"
                    f"/instances/{sop}/frames/{n}\r\nContent-Type: {plan.part_type}\r\n"
                    f"Content-Length: {len(body)}\r\nMIME-Version: 1.0\r\n\r\n").encode())
        out.append(body)
        out.append(b"\r\n")
    out.append(f"--{b}--\r\n".encode())
    headers = {hdrs.CONTENT_TYPE: f'multipart/related; type="{plan.part_type}"; boundary={b}',
               hdrs.CACHE_CONTROL: "private, max-age=86400"}
    return web.Response(body=b"".join(out), headers=headers)


async def bulk_pixel_data(request: web.Request) -> web.StreamResponse:
    """``…/bulk/7fe00010`` (a ``BulkDataURI`` viewers follow): the native Pixel Data value
    from the verified instance, framed as Orthanc frames it; anything else read through."""
    study, series, sop = _uids(request)
    assert series is not None and sop is not None
    accept = request.headers.get(hdrs.ACCEPT)
    items = [i.split(";")[0].strip().lower() for i in (accept or "*/*").split(",")]
    if request.match_info["tag"].lower() != "7fe00010" or items[0] not in (
            "*/*", "multipart/related", "application/octet-stream") or (
            items[0] == "multipart/related"
            and 'type="application/octet-stream"' not in (accept or "").lower()
            and "type=application/octet-stream" not in (accept or "").lower()):
        return await passthrough(request)
    family_of(request, "dicomweb")
    dw = request.app[DICOMWEB]
    found = await _stored_or_fetched(request, dw, sop)
    if found is None:
        return await passthrough(request)
    _check_parents(found.study_uid, found.series_uid, study, series, sop)
    pixel = await dw.pixel_info(found) if found.transfer_syntax in NATIVE_LE else None
    if pixel is None or pixel.encapsulated or pixel.length is None:
        request[OUTCOME] = "passthrough"
        return await passthrough(request)
    span = [[(pixel.offset, pixel.length)]]
    if isinstance(found, Entry):
        try:
            (value,) = await asyncio.to_thread(_read_ranges, str(found.path), span)
        except FileNotFoundError:
            return await passthrough(request)
    else:
        (value,) = _frame_parts(span, found.data)
    b = boundary()
    body = (f"--{b}\r\nContent-Type: {OCTET}\r\nContent-Length: {len(value)}\r\n"
            f"MIME-Version: 1.0\r\n\r\n").encode() + value + f"\r\n--{b}--\r\n".encode()
    return web.Response(body=body, headers={
        hdrs.CONTENT_TYPE: f'multipart/related; type="{OCTET}"; boundary={b}',
        hdrs.CACHE_CONTROL: "private, max-age=86400"})


def relink_parts(body: bytes, content_type: str, base: str) -> bytes:
    """A complete multipart answer with each part's ``Content-Location`` on ``base``.

    Walks the parts by their ``Content-Length``; :class:`IntegrityError` when the
    body is not a complete multipart (Orthanc sends frames without a length).
    """
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise IntegrityError("parse_failure", f"not a multipart answer: {content_type[:80]!r}")
    b = m.group(1).encode()
    out: list[bytes] = []
    pos = 0
    while True:
        if body.startswith(b"--" + b + b"--", pos):
            out.append(body[pos:])
            return b"".join(out)
        if not body.startswith(b"--" + b + b"\r\n", pos):
            raise IntegrityError("short_body", f"multipart answer cut at byte {pos}")
        end = body.find(b"\r\n\r\n", pos)
        if end < 0:
            raise IntegrityError("short_body", "multipart part head cut short")
        lines = body[pos:end].split(b"\r\n")
        length = None
        for i, line in enumerate(lines):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-location":
                path = link_path(value.strip().decode("latin-1"))
                if path is not None:
                    lines[i] = f"Content-Location: {base}{path}".encode()
            elif name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
        if length is None:
            raise IntegrityError("parse_failure", "multipart part without Content-Length")
        stop = end + 4 + length
        if body[stop:stop + 2] != b"\r\n":
            raise IntegrityError("short_body", "multipart part shorter than its Content-Length")
        out.append(b"\r\n".join(lines) + body[end:stop + 2])
        pos = stop + 2


async def frames_through(request: web.Request) -> web.StreamResponse:
    """Frames Orthanc must decode or transcode: read through whole, links on dicomcache.

    Orthanc's own status and error body are kept; a 200 is only passed on once it
    is a complete multipart (Orthanc sends several frames without a length).
    """
    request[OUTCOME] = "passthrough"
    dw = request.app[DICOMWEB]
    client = dw.client
    base = public_base(request)
    headers = {"Accept": request.headers[hdrs.ACCEPT]} if hdrs.ACCEPT in request.headers else {}
    url = URL(client.base + request.raw_path, encoded=True)

    async def once(_attempt: int) -> tuple[int, str, bytes]:
        try:
            async with client.session.get(url, headers=headers) as up:
                data = await up.read()
                status, ctype = up.status, up.headers.get(hdrs.CONTENT_TYPE, "")
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamError("timeout", f"frames {request.path}: no answer in time") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamError("reset", f"frames {request.path}: {exc!r}") from exc
        if status in (401, 403, 429):
            check_status(status, {}, f"frames {request.path}", data)
        if status == 200:
            data = relink_parts(data, ctype, base)
        return status, ctype, data

    status, ctype, data = await client.retrying(once, what=f"frames {request.path}")
    out = web.Response(status=status, body=data)
    if ctype:
        out.headers[hdrs.CONTENT_TYPE] = ctype
    return out


# --- wiring --------------------------------------------------------------------------------

async def _dicomweb_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    dw = DicomWeb(settings.dicomweb, app[CLIENT], app[STORE], app[FETCHER],
                  directory=settings.cache.directory / "dicomweb")
    app[DICOMWEB] = dw
    if dw.disk is not None:
        await asyncio.to_thread(dw.disk.prune)
    # Orthanc's /changes feed (when followed) says at once when a study grew.
    hooks = app.get(STUDY_CHANGED)
    if hooks is not None:
        hooks.append(dw.study_changed)
    yield
    for task in list(dw.streams):
        task.cancel()
    await asyncio.gather(*dw.streams, return_exceptions=True)
    # Parts already verified and queued are made durable by the store's own
    # clean-up (app._store_ctx drains the queue before closing the index).
    if hooks is not None and dw.study_changed in hooks:
        hooks.remove(dw.study_changed)


def add_routes(app: web.Application) -> None:
    """DICOMweb routes; the state is created after the store and upstream contexts."""
    app.cleanup_ctx.append(_dicomweb_ctx)
    r = app.router
    st = "/dicom-web/studies/{study}"
    se = st + "/series/{series}"
    inst = se + "/instances/{sop}"
    for path in ("/dicom-web/studies", "/dicom-web/series", "/dicom-web/instances",
                 st + "/series", st + "/instances", se + "/instances"):
        r.add_get(path, qido)
    r.add_get(st, retrieve)
    r.add_get(se, retrieve)
    r.add_get(inst, instance)
    for path in (st, se, inst):
        r.add_get(path + "/metadata", metadata)
        r.add_get(path + "/rendered", rendered)
        r.add_get(path + "/thumbnail", rendered)
    r.add_get(inst + "/frames/{frames}", frames)
    r.add_get(inst + "/bulk/{tag}", bulk_pixel_data)
    r.add_get(inst + "/frames/{frames}/rendered", rendered)
    r.add_get(inst + "/frames/{frames}/thumbnail", rendered)
