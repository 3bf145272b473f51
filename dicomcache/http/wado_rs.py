"""WADO-RS retrieve: a study, a series or an instance as ``application/dicom`` parts.

Every part is a verified instance (see :mod:`dicomcache.dicomweb.retrieve` for
where each comes from).  Orthanc's plugin sends the stored bytes when ``Accept``
says ``transfer-syntax=*`` (or names the stored syntax) and transcodes
otherwise; so does dicomcache.  Series and study answers are streamed in
Orthanc's order; when one instance cannot be had after the retries the
connection is broken (no closing boundary, no last chunk) so no client mistakes
a short multipart for a whole one.  Stored parts are sent from their files
(sendfile), with an exact ``Content-Length`` when every size is known.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import hdrs, web

from dicomcache.cache.instance import Instance
from dicomcache.dicom import accept, multipart
from dicomcache.dicom.accept import DICOM
from dicomcache.dicomweb import retrieve as engine
from dicomcache.dicomweb.retrieve import Part, Plan
from dicomcache.errors import Cause, IntegrityError, NotFoundUpstream
from dicomcache.http.keys import DICOMWEB, FETCHER, METRICS, OUTCOME, STORE
from dicomcache.http.params import dicomweb_uids, family_of
from dicomcache.http.passthrough import passthrough
from dicomcache.http.respond import REVALIDATE, send_file_range

log = logging.getLogger(__name__)


async def instance(request: web.Request) -> web.StreamResponse:
    """One instance as one ``application/dicom`` part (read through when transcoded)."""
    study, series, sop = dicomweb_uids(request)
    assert sop is not None
    wanted = accept.instance_syntax(request.headers.get(hdrs.ACCEPT))
    if wanted is None:
        return await passthrough(request)
    family_of(request, "dicomweb")
    fetcher = request.app[FETCHER]
    found, hit = await fetcher.by_uids(sop, study, series)
    request[OUTCOME] = "hit" if hit else "miss"
    if not engine.serves(found.transfer_syntax, wanted):
        request[OUTCOME] = "passthrough"
        return await passthrough(request)
    return await _one_part(request, found)


async def _one_part(request: web.Request, found: Instance) -> web.StreamResponse:
    """One part framed as Orthanc frames it; a stored instance is sent from its file (by
    sendfile), never read whole: a multi-frame instance can be hundreds of MB."""
    etag = f'"{found.md5}-mp"'
    headers = {hdrs.CACHE_CONTROL: REVALIDATE, hdrs.ETAG: etag}
    if etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers=headers)
    # The boundary follows from the content, so the strong ETag names these exact bytes.
    b = f"dicomcache-{found.md5}"
    headers[hdrs.CONTENT_TYPE] = multipart.content_type(DICOM, b)
    plan = Plan([found], sizes=[found.size], length=multipart.body_length(b, DICOM, [found.size]))
    if request.method == "HEAD":
        return web.Response(headers={**headers, hdrs.CONTENT_LENGTH: str(plan.length)})
    resp = web.StreamResponse(headers=headers)
    try:
        part = await engine.open_part(request.app[STORE].sync, found)
    except FileNotFoundError:  # vanished, or found bad, since the lookup
        part = await engine.refetched_part(request.app[DICOMWEB], found)
    try:
        await _send(request, resp, b, part, plan, 0, found.sop_uid)
    except OSError as exc:  # the stored file cut on disk, or the viewer gone
        if not resp.prepared:
            raise
        raise _cut(request, f"instance {found.sop_uid}", exc) from exc
    await resp.write(multipart.closing(b))
    await resp.write_eof()
    return resp


async def retrieve(request: web.Request) -> web.StreamResponse:
    """A whole series or study as one multipart, streamed from verified instances.

    Parts come in Orthanc's order.  Up to ``dicomweb.retrieve_concurrency``
    instances are read or fetched ahead of the one being sent.  The length is
    announced when it is known; a part whose size differs from the one announced
    breaks the connection.  A failure before the first byte is an ordinary JSON
    error; after it, the connection is broken.
    """
    study, series, _ = dicomweb_uids(request)
    asked = request.headers.get(hdrs.ACCEPT)
    wanted = accept.instance_syntax(asked)
    if wanted is None:
        return await passthrough(request)
    family_of(request, "dicomweb")
    dw = request.app[DICOMWEB]
    listing, _stale = await dw.listing(study, series)
    oids: list[str] = listing.value[1]
    if not oids:
        raise NotFoundUpstream(404, f"{series or study} has no instances")
    b = multipart.new_boundary()
    ctype = multipart.content_type(DICOM, b)
    if request.method == "HEAD":
        return web.Response(headers={hdrs.CONTENT_TYPE: ctype})
    plan = await engine.plan(dw, listing, b, wanted, study, series)
    if plan.outdated:  # Orthanc changed the series since the listing: ask it again
        dw.cache.expire(study)
        listing, _stale = await dw.listing(study, series)
        oids = listing.value[1]
        if not oids:
            raise NotFoundUpstream(404, f"{series or study} has no instances")
        plan = await engine.plan(dw, listing, b, wanted, study, series)
    request[OUTCOME] = "hit" if plan.hit else "miss"
    parts = engine.Parts(dw, oids, plan, asked, wanted, study, series)
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
    await resp.write(multipart.closing(b))
    await resp.write_eof()
    await parts.remember()
    return resp


async def _send(request: web.Request, resp: web.StreamResponse, b: str, part: Part,
                plan: Plan, i: int, oid: str) -> None:
    """Part ``i`` on the wire (the headers first, with the first part); closes its file."""
    try:
        if plan.sizes is not None and part.size != plan.sizes[i]:
            if not resp.prepared:  # nothing announced yet: send it chunked instead
                log.info("instance %s changed size since it was listed (replaced in "
                         "Orthanc?): the answer is sent chunked", oid)
                plan.sizes = plan.length = None
            else:
                raise IntegrityError(Cause.LENGTH_MISMATCH, f"instance {oid} is {part.size} "
                                     f"bytes, Orthanc's listing said {plan.sizes[i]}: the "
                                     "announced length cannot be kept")
        if not resp.prepared:
            if plan.length is not None:
                resp.content_length = plan.length
            else:
                resp.enable_chunked_encoding()
            await resp.prepare(request)
        await resp.write(multipart.part_head(b, DICOM, part.size))
        if part.file is not None:
            await send_file_range(request, resp, part.file, 0, part.size)
        else:
            assert part.data is not None
            await resp.write(part.data)
        await resp.write(multipart.PART_END)
    finally:
        part.close()
    request.app[METRICS].served_bytes.inc(part.size)


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
