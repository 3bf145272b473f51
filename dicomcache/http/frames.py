"""DICOMweb frames and bulk pixel data, cut from the verified instance.

``…/frames/{list}`` is answered locally when the stored bytes are what Orthanc
would send (see :func:`dicomcache.dicom.frames.plan_frames`); anything Orthanc
must decode or transcode is read through whole and passed on only once it is a
complete multipart, its links on dicomcache.

Local answers carry a strong ``ETag`` made from the instance's MD5 and what was
asked (their multipart boundary is derived from it too, so one tag is one byte
sequence), with ``Cache-Control: private, no-cache``: browsers keep frames but
ask before each use, and ``If-None-Match`` is answered with a 304 before any
frame is read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from aiohttp import hdrs, web

from dicomcache.cache.instance import Instance
from dicomcache.dicom import accept, multipart
from dicomcache.dicom.accept import OCTET
from dicomcache.dicom.frames import frame_ranges, parse_frame_list, plan_frames
from dicomcache.dicom.syntaxes import NATIVE_LE
from dicomcache.dicomweb.answers import relink_parts
from dicomcache.dicomweb.frames import read_frames, transcoded_frames, transcoding_accept
from dicomcache.dicomweb.state import DicomWeb
from dicomcache.errors import IntegrityError, NotFoundUpstream, UpstreamError
from dicomcache.http.keys import DICOMWEB, OUTCOME
from dicomcache.http.metadata import public_base
from dicomcache.http.params import dicomweb_uids, family_of
from dicomcache.http.passthrough import passthrough
from dicomcache.http.respond import REVALIDATE
from dicomcache.upstream.client import check_status

log = logging.getLogger(__name__)


def cut_tag(md5: str, *asked: str) -> str:
    """The validator of an answer cut from the verified instance with MD5 ``md5``: the
    same instance and the same ``asked`` (frames, media type, link base) give the same
    bytes.  Also its multipart boundary (32 hex digits, as a random one)."""
    return hashlib.md5("|".join((md5, *asked)).encode(), usedforsecurity=False).hexdigest()


def _validated(request: web.Request, tag: str) -> tuple[dict[str, str], web.Response | None]:
    """The caching headers of a cut answer, and the 304 when the browser has it already."""
    headers: dict[str, str] = {hdrs.CACHE_CONTROL: REVALIDATE, hdrs.ETAG: f'"{tag}"'}
    if headers[hdrs.ETAG] in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return headers, web.Response(status=304, headers=headers)
    return headers, None


async def _stored_or_fetched(request: web.Request, dw: DicomWeb, study: str, series: str,
                             sop: str) -> Instance | None:
    """The verified instance: from the store, else downloaded (None: Orthanc could not
    give it, and the caller reads the answer through instead)."""
    try:
        found, hit = await dw.fetcher.by_uids(sop, study, series)
        request[OUTCOME] = "hit" if hit else "miss"
        return found
    except (UpstreamError, NotFoundUpstream) as exc:
        log.info("%s read through: %s", request.path, exc)
        return None


async def frames(request: web.Request) -> web.StreamResponse:
    """Frames cut from the verified instance, framed as Orthanc frames them."""
    study, series, sop = dicomweb_uids(request)
    assert series is not None and sop is not None
    family_of(request, "dicomweb")
    dw = request.app[DICOMWEB]
    syntax = dw.client.settings.frames_transfer_syntax
    compressed = transcoding_accept(request.headers.get(hdrs.ACCEPT), syntax) \
        if syntax and not dw.frames_refused else None
    if compressed is not None and await _cold(dw, study, series, sop):
        answer = await _frames_compressed(request, dw, compressed, syntax)
        if answer is not None:
            return answer
    found = await _stored_or_fetched(request, dw, study, series, sop)
    if found is None:
        return await frames_through(request)
    found.check_in(study, series)
    plan = plan_frames(request.headers.get(hdrs.ACCEPT), found.transfer_syntax)
    try:
        pixel = await dw.pixel_info(found) if plan is not None else None
    except FileNotFoundError:  # gone or bad since the lookup: Orthanc answers
        return await frames_through(request)
    numbers = parse_frame_list(request.match_info["frames"], max(1, pixel.number_of_frames)) \
        if pixel is not None else None
    ranges = [frame_ranges(pixel, n) for n in numbers] if pixel and numbers else None
    if plan is None or not numbers or not ranges or any(r is None for r in ranges):
        return await frames_through(request)
    base = public_base(request)
    b = cut_tag(found.md5, "frames", ",".join(map(str, numbers)), plan.part_type, base)
    headers, not_modified = _validated(request, b)
    if not_modified is not None:
        return not_modified
    try:
        bodies = await read_frames(dw.store.sync, found, [r for r in ranges if r is not None])
    except FileNotFoundError:
        return await frames_through(request)
    where = f"{base}/studies/{study}/series/{series}/instances/{sop}/frames"
    body = multipart.write(b, plan.part_type, bodies,
                           [[("Content-Location", f"{where}/{n}")] for n in numbers])
    headers[hdrs.CONTENT_TYPE] = multipart.content_type(plan.part_type, b)
    return web.Response(body=body, headers=headers)


async def _cold(dw: DicomWeb, study: str, series: str, sop: str) -> bool:
    """The one instance these UIDs name is not stored yet (its Orthanc ID is usually
    known from the series metadata, so this costs no request)."""
    try:
        entry, _oid = await dw.fetcher.locate(sop, study, series)
    except (UpstreamError, NotFoundUpstream):
        return False  # the usual path answers (or reports) it
    return entry is None


async def _frames_compressed(request: web.Request, dw: DicomWeb, accept_up: str,
                             syntax: str) -> web.Response | None:
    """Cold frames as Orthanc transcodes them to ``syntax`` (opt-in:
    ``upstream.frames_transfer_syntax``), for a viewer that takes any syntax.

    Nothing is stored: the instance itself is still downloaded as stored (by the
    prefetch, or the next request) and serves everything else.  ``None`` (the
    caller then serves frames cut from the original): Orthanc could not, or its
    answer is not whole (:func:`~dicomcache.dicomweb.frames.transcoded_frames`).  An
    Orthanc that cannot make the syntax is soon no longer asked
    (:meth:`~dicomcache.dicomweb.state.DicomWeb.frames_failed`).
    """
    count = len(parse_frame_list(request.match_info["frames"], 1 << 30) or ())
    if not count:
        return None
    what = f"frames {request.path} in {syntax}"

    async def once(_attempt: int) -> tuple[int, str, bytes]:
        async with dw.client.open("GET", request.raw_path, kind="frames",
                                  headers={"Accept": accept_up}, encoded=True) as up:
            data = await up.read()
            status, ctype = up.status, up.headers.get(hdrs.CONTENT_TYPE, "")
        if status in (401, 403, 429):
            check_status(status, {}, what, data)
        return status, ctype, data

    try:
        status, ctype, data = await dw.client.retrying(once, what=what)
        if status in (400, 406, 415, 500, 501) or status == 200:
            dw.frames_failed(syntax, status, repr(data[:200]) if status != 200 else "")
        if status != 200:
            return None
        await asyncio.to_thread(transcoded_frames, data, ctype, syntax, count)
    except (UpstreamError, NotFoundUpstream, IntegrityError) as exc:
        log.info("%s: the original's frames instead (%s)", what, exc)
        return None
    request[OUTCOME] = "passthrough"
    out = web.Response(body=relink_parts(data, ctype, public_base(request)))
    out.headers[hdrs.CONTENT_TYPE] = ctype
    return out


def _asks_native_pixels(header: str | None) -> bool:
    """A bulk-data ``Accept`` that the stored native Pixel Data satisfies as it is."""
    first = accept.parse(header)[0]
    return first.media in ("*/*", OCTET) or (
        first.media == accept.MULTIPART and first.part_type == OCTET)


async def bulk_pixel_data(request: web.Request) -> web.StreamResponse:
    """``…/bulk/7fe00010`` (a ``BulkDataURI`` viewers follow): the native Pixel Data value
    from the verified instance, framed as Orthanc frames it; anything else read through."""
    study, series, sop = dicomweb_uids(request)
    assert series is not None and sop is not None
    if request.match_info["tag"].lower() != "7fe00010" \
            or not _asks_native_pixels(request.headers.get(hdrs.ACCEPT)):
        return await passthrough(request)
    family_of(request, "dicomweb")
    dw = request.app[DICOMWEB]
    found = await _stored_or_fetched(request, dw, study, series, sop)
    if found is None:
        return await passthrough(request)
    found.check_in(study, series)
    try:
        pixel = await dw.pixel_info(found) if found.transfer_syntax in NATIVE_LE else None
    except FileNotFoundError:
        return await passthrough(request)
    if pixel is None or pixel.encapsulated or pixel.length is None:
        request[OUTCOME] = "passthrough"
        return await passthrough(request)
    b = cut_tag(found.md5, "bulk", "7fe00010", OCTET)
    headers, not_modified = _validated(request, b)
    if not_modified is not None:
        return not_modified
    try:
        (value,) = await read_frames(dw.store.sync, found, [[(pixel.offset, pixel.length)]])
    except FileNotFoundError:
        return await passthrough(request)
    headers[hdrs.CONTENT_TYPE] = multipart.content_type(OCTET, b)
    return web.Response(body=multipart.write(b, OCTET, [value]), headers=headers)


async def frames_through(request: web.Request) -> web.StreamResponse:
    """Frames Orthanc must decode or transcode: read through whole, links on dicomcache.

    Orthanc's own status and error body are kept; a 200 is only passed on once it
    is a complete multipart.
    """
    request[OUTCOME] = "passthrough"
    client = request.app[DICOMWEB].client
    base = public_base(request)
    headers = {"Accept": request.headers[hdrs.ACCEPT]} if hdrs.ACCEPT in request.headers else {}
    what = f"frames {request.path}"

    async def once(_attempt: int) -> tuple[int, str, bytes]:
        async with client.open("GET", request.raw_path, kind="frames", headers=headers,
                               encoded=True) as up:
            data = await up.read()
            status, ctype = up.status, up.headers.get(hdrs.CONTENT_TYPE, "")
        if status in (401, 403, 429):
            check_status(status, {}, what, data)
        if status == 200:
            data = relink_parts(data, ctype, base)
        return status, ctype, data

    status, ctype, data = await client.retrying(once, what=what)
    out = web.Response(status=status, body=data)
    if ctype:
        out.headers[hdrs.CONTENT_TYPE] = ctype
    return out
