"""DICOMweb for OHIF-style viewers, served from the verified cache where possible.

* **WADO-RS retrieve** of an instance, a series or a study: :mod:`.wado_rs`.
* **Frames**: cut from the stored instance (see :mod:`dicomcache.dicom.frames`),
  read through when Orthanc would decode or transcode.
* **Metadata, QIDO-RS, rendered/thumbnail**: :class:`~dicomcache.dicomweb.answers.AnswerCache`
  (instance metadata immutable; series/study metadata fresh for
  ``dicomweb.metadata_fresh`` seconds, then revalidated against the instance
  list; stale copies served with ``Warning: 110`` when Orthanc is unreachable).
  Every link points at dicomcache, on the host name the viewer used.
* JSON answers are gzipped for clients that accept it.

The state behind them (caches, listings, streams) is :class:`~dicomcache.dicomweb.DicomWeb`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
from aiohttp import hdrs, web
from yarl import URL

from dicomcache.cache.instance import Instance
from dicomcache.dicom.syntaxes import NATIVE_LE
from dicomcache.dicom.frames import OCTET, frame_ranges, parse_frame_list, plan_frames
from dicomcache.dicom.multipart import new_boundary
from dicomcache.dicomweb.answers import IMMUTABLE_FRESH, Cached, link_path
from dicomcache.dicomweb.state import DICOM_JSON, DicomWeb
from dicomcache.errors import Cause, IntegrityError, NotFoundUpstream, UpstreamError
from dicomcache.http.keys import CLIENT, DICOMWEB, FETCHER, OUTCOME, SETTINGS, STORE, STUDY_CHANGED
from dicomcache.http.params import dicom_uid, dicomweb_uids, family_of
from dicomcache.http.passthrough import check_path, passthrough
from dicomcache.http.respond import BadRequest
from dicomcache.http.wado_rs import instance, retrieve
from dicomcache.upstream.client import check_status

log = logging.getLogger(__name__)

#: ``Warning`` on a stale copy served because Orthanc could not be asked (RFC 7234 §5.5.1).
STALE_WARNING = '110 dicomcache "Response is Stale"'
_JSON_ACCEPTS = ("*/*", "application/*", "application/json", DICOM_JSON)
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")
_BAD_QUERY = re.compile(r"%0[0ad]|[\x00-\x1f]", re.IGNORECASE)


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


async def metadata(request: web.Request) -> web.StreamResponse:
    """Study, series or instance metadata (DICOM JSON) with links on dicomcache."""
    study, series, sop = dicomweb_uids(request)
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
    _study, _series, sop = dicomweb_uids(request)
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
                             ) -> Instance | None:
    """The verified instance: from the store, else downloaded (None: Orthanc could not
    give it, and the caller reads the answer through instead)."""
    found: Instance | None = await dw.store.get(sop)
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
    study, series, sop = dicomweb_uids(request)
    assert series is not None and sop is not None
    family_of(request, "dicomweb")
    dw = request.app[DICOMWEB]
    found = await _stored_or_fetched(request, dw, sop)
    if found is None:
        return await frames_through(request)
    found.check_in(study, series)
    plan = plan_frames(request.headers.get(hdrs.ACCEPT), found.transfer_syntax)
    pixel = await dw.pixel_info(found) if plan is not None else None
    numbers = parse_frame_list(request.match_info["frames"], max(1, pixel.number_of_frames)) \
        if pixel is not None else None
    ranges = [frame_ranges(pixel, n) for n in numbers] if pixel and numbers else None
    if plan is None or not ranges or any(r is None for r in ranges):
        return await frames_through(request)
    cut = [r for r in ranges if r is not None]
    if found.stored:
        try:
            bodies = await asyncio.to_thread(_read_ranges, str(found.path), cut)
        except FileNotFoundError:
            return await frames_through(request)
    else:
        bodies = list(_frame_parts(cut, found.content()))
    base = public_base(request)
    b = new_boundary()
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
    study, series, sop = dicomweb_uids(request)
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
    found.check_in(study, series)
    pixel = await dw.pixel_info(found) if found.transfer_syntax in NATIVE_LE else None
    if pixel is None or pixel.encapsulated or pixel.length is None:
        request[OUTCOME] = "passthrough"
        return await passthrough(request)
    span = [[(pixel.offset, pixel.length)]]
    if found.stored:
        try:
            (value,) = await asyncio.to_thread(_read_ranges, str(found.path), span)
        except FileNotFoundError:
            return await passthrough(request)
    else:
        (value,) = _frame_parts(span, found.content())
    b = new_boundary()
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
        raise IntegrityError(Cause.PARSE_FAILURE, f"not a multipart answer: {content_type[:80]!r}")
    b = m.group(1).encode()
    out: list[bytes] = []
    pos = 0
    while True:
        if body.startswith(b"--" + b + b"--", pos):
            out.append(body[pos:])
            return b"".join(out)
        if not body.startswith(b"--" + b + b"\r\n", pos):
            raise IntegrityError(Cause.SHORT_BODY, f"multipart answer cut at byte {pos}")
        end = body.find(b"\r\n\r\n", pos)
        if end < 0:
            raise IntegrityError(Cause.SHORT_BODY, "multipart part head cut short")
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
            raise IntegrityError(Cause.PARSE_FAILURE, "multipart part without Content-Length")
        stop = end + 4 + length
        if body[stop:stop + 2] != b"\r\n":
            raise IntegrityError(Cause.SHORT_BODY, "multipart part shorter than its Content-Length")
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
            raise UpstreamError(Cause.TIMEOUT, f"frames {request.path}: no answer in time") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamError(Cause.RESET, f"frames {request.path}: {exc!r}") from exc
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
