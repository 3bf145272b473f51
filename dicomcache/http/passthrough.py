"""Read-through of what viewers read that no cache route serves: an allow-list.

Only the Orthanc REST and DICOMweb resources a viewer needs (:data:`READ_THROUGH`,
documented in docs/security.md) are relayed from Orthanc, keeping its status and
content type, through a bounded buffer (:mod:`.spill`: memory, then a temp file)
so that Orthanc's connection is released at the link's speed, whatever the
viewer's.  Everything else answers 403 unless
``[access] allow`` lists it: listings of every patient or study, Orthanc
Explorer and other web apps, ``/tools/*``, archive and media ZIP builders,
``/system``, ``/statistics``, ``/plugins``, ``/changes``, ``/exports``, the
DICOMweb plugin's server table, every write.  A request read through acts with
dicomcache's own Orthanc account, so what is not listed here is never reachable
from the network by default.
Orthanc's redirects reach the viewer as paths of ours (so the next request
meets the policy again); one leaving Orthanc is a 502 (dicomcache follows none).
"""

from __future__ import annotations

import asyncio
import fnmatch
import re

import aiohttp
from aiohttp import hdrs, web

from dicomcache.http.keys import CLIENT, FAMILY, OUTCOME, SETTINGS, STORE
from dicomcache.http.params import family_of
from dicomcache.http.respond import BadRequest, cut, json_error
from dicomcache.http.spill import Spill, SpillBudget
from dicomcache.upstream import policy
from dicomcache.upstream.client import FORWARDED_REQUEST_HEADERS, check_status, redirect_error

SAFE_METHODS = ("GET", "HEAD")
_OID = r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}"
_UID = r"[0-9]+(?:\.[0-9]+)*"
#: What GET/HEAD may read through, as (pattern, what it is for).  One resource of one
#: patient at a time, never a listing of everyone, never a ZIP of anything.
READ_THROUGH: tuple[tuple[str, str], ...] = (
    (rf"/(patients|studies|series|instances)/{_OID}", "one resource's main tags"),
    (rf"/instances/{_OID}/(tags|simplified-tags|header|preview|rendered|image-uint8|"
     r"image-uint16|image-int16|frames|study|series|patient|pdf|metadata(/[A-Za-z0-9]+)?|"
     r"content(/[0-9a-fA-F,/\-]+)?)", "an instance's tags, renderings and parents"),
    (rf"/instances/{_OID}/frames/[0-9]+(/(preview|rendered|image-uint8|image-uint16|"
     r"image-int16|raw))?", "one frame, rendered or raw"),
    (rf"/series/{_OID}/(instances|shared-tags|study|patient|ordered-slices|"
     r"instances-tags|metadata(/[A-Za-z0-9]+)?)", "a series' instances and shared tags"),
    (rf"/studies/{_OID}/(series|instances|shared-tags|patient|instances-tags|"
     r"metadata(/[A-Za-z0-9]+)?)", "a study's series and instances"),
    (rf"/patients/{_OID}/(studies|series|instances|shared-tags)", "one patient's studies"),
    (rf"/dicom-web/(studies|series|instances)(/{_UID}(/[A-Za-z0-9.,/\-]*)?)?",
     "DICOMweb QIDO-RS and WADO-RS: searches, retrieves, metadata, frames, renderings"),
    (r"/wado", "WADO-URI (renderings; application/dicom is served from the store)"),
)
_READ_THROUGH = re.compile("|".join(f"(?:{p})" for p, _ in READ_THROUGH))

#: Response headers passed back to viewers (hop-by-hop and auth headers never are;
#: ``Location`` only as a path of ours).
_PASSED_RESPONSE_HEADERS = (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH, hdrs.CONTENT_DISPOSITION,
                            hdrs.CONTENT_ENCODING, hdrs.ETAG, hdrs.LAST_MODIFIED,
                            hdrs.CACHE_CONTROL)
#: Temp-file bytes all read-through answers may hold (``upstream.read_through_temp``).
SPILL_BUDGET = web.AppKey("spill_budget", SpillBudget)
_BAD_RAW = re.compile(r"%(2f|5c|00)|\\|\x00", re.IGNORECASE)


def check_path(raw_path: str) -> None:
    """400 for encoded slashes/backslashes, NULs and ``..`` segments."""
    path = raw_path.split("?", 1)[0]
    if _BAD_RAW.search(path):
        raise BadRequest("encoded slashes, backslashes and NUL are not allowed in paths")
    if any(seg in ("..", ".") for seg in path.split("/")) or "%2e" in path.lower():
        raise BadRequest("'.' and '..' path segments are not allowed")


def denial(method: str, path: str, allow: tuple[str, ...]) -> str | None:
    """Why ``method path`` may not be read through, or ``None`` when it may (pure)."""
    if any(fnmatch.fnmatchcase(f"{method} {path}", rule) for rule in allow):
        return None
    if method not in SAFE_METHODS:
        return (f"{method} is closed: dicomcache is read-only unless [access] allow "
                f"lists \"{method} {path}\"")
    if _READ_THROUGH.fullmatch(path) is None:
        return (f"{path} is not among what viewers read through dicomcache; list "
                f"\"{method} {path}\" in [access] allow to open it")
    return None


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Stream Orthanc's answer for a request no cache route handles."""
    check_path(request.raw_path)
    family_of(request, request.get(FAMILY, "passthrough"), "passthrough")
    reason = denial(request.method, request.path, request.app[SETTINGS].access.allow)
    if reason is not None:
        request[OUTCOME] = "denied"
        return json_error(403, "forbidden", reason)
    client = request.app[CLIENT]
    upstream_settings = request.app[SETTINGS].upstream
    headers = {h: request.headers[h] for h in FORWARDED_REQUEST_HEADERS if h in request.headers}
    # Orthanc answers 404 to every HEAD: ask with GET and drop the body.
    method = "GET" if request.method == "HEAD" else request.method
    body = await request.read() if method not in SAFE_METHODS else None
    what = f"{request.method} {request.path}"

    async def once(_attempt: int) -> web.StreamResponse:
        # A slot of the read-through's share of the pool, held while Orthanc's answer is
        # read: however many slow resources, viewers' own requests keep the rest of the
        # connections to Orthanc.  The answer is buffered (memory, then a temp file), so
        # a slow reader does not hold the slot: it is read at the link's speed and the
        # viewer is served from the buffer after the connection went back to the pool.
        async with client.read_through_slots, client.open(
                method, request.raw_path, kind="passthrough", headers=headers, body=body,
                encoded=True, redirects=True) as upstream:
            if upstream.status >= 500 or upstream.status in (401, 403, 429):
                check_status(upstream.status, upstream.headers, what, await upstream.read())
            location = _location(client.base, str(upstream.url), upstream)
            if upstream.status in policy.REDIRECT_STATUSES and location is None:
                raise redirect_error(what, upstream.status, str(upstream.url),
                                     upstream.headers.get(hdrs.LOCATION, ""),
                                     "it leaves Orthanc and dicomcache follows no redirect")
            out = await _start_response(request, upstream, location)
            if request.method == "HEAD":
                return out
            spill = Spill(upstream_settings.read_through_buffer, request.app[SPILL_BUDGET],
                          request.app[STORE].sync.tmp_dir)
            sending = asyncio.create_task(_send(request, out, spill))
            try:
                await _fill(spill, upstream)
            except BaseException:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
                await spill.close()
                raise
        # Orthanc's connection is back in the pool; the viewer reads at its own pace.
        return await sending

    if method in SAFE_METHODS:
        # The path is the viewer's choice: its failures judge that resource, not the link.
        return await client.retrying(once, what=what, judges_link=False)
    return await once(1)  # writes are not idempotent: one attempt


def _location(base: str, url: str, upstream: aiohttp.ClientResponse) -> str | None:
    """Orthanc's ``Location`` as a path of ours; ``None`` if absent or leaving Orthanc."""
    location = upstream.headers.get(hdrs.LOCATION)
    return policy.viewer_location(base, url, location) if location else None


async def _start_response(request: web.Request, upstream: aiohttp.ClientResponse,
                          location: str | None) -> web.StreamResponse:
    """The viewer's response with Orthanc's status and headers, prepared (sent)."""
    out = web.StreamResponse(status=upstream.status)
    for name in _PASSED_RESPONSE_HEADERS:
        if name in upstream.headers:
            out.headers[name] = upstream.headers[name]
    if location is not None:
        out.headers[hdrs.LOCATION] = location
    await out.prepare(request)
    return out


async def _fill(spill: Spill, upstream: aiohttp.ClientResponse) -> None:
    """Read Orthanc's answer into ``spill``; a cut answer is passed on as its end."""
    try:
        async for chunk in upstream.content.iter_chunked(1 << 16):
            await spill.put(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are gone already: the viewer must see an incomplete body, not a
        # complete short one.  (Not an upstream error, so nothing retries.)
        spill.finish(exc)
    except ConnectionResetError:
        return  # the viewer's side ended first: it reports why
    else:
        spill.finish()


async def _send(request: web.Request, out: web.StreamResponse,
                spill: Spill) -> web.StreamResponse:
    """Write the buffered answer to the viewer, at its pace (bounded by send_timeout)."""
    send_timeout = request.app[SETTINGS].server.send_timeout
    try:
        while True:
            try:
                chunk = await spill.get()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise cut(request, out, f"read-through of {request.path}",
                          exc, " (Orthanc's answer stopped)", by_viewer=False) from exc
            if chunk is None:
                break
            try:
                async with asyncio.timeout(send_timeout):
                    await out.write(chunk)
            except TimeoutError as exc:  # the viewer stopped reading: not Orthanc's fault
                raise cut(request, out, f"read-through of {request.path}", exc,
                          f" (the viewer read nothing for {send_timeout:g} s)",
                          by_viewer=True) from exc
        await out.write_eof()
        return out
    finally:
        await spill.close()


def setup_budget(app: web.Application) -> None:
    """The temp-file bytes every read-through answer may hold together."""
    app[SPILL_BUDGET] = SpillBudget(app[SETTINGS].upstream.read_through_temp)


def add_routes(app: web.Application) -> None:
    setup_budget(app)
    app.router.add_route("*", "/{tail:.*}", passthrough)
