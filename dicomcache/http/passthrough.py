"""Read-through of everything else viewers read, and the closed-by-default policy.

GET/HEAD on Orthanc's read-only REST resources and DICOMweb paths are streamed
from Orthanc (never buffered whole), keeping its status and content type.
Writes and dangerous endpoints answer 403 unless ``[access] allow`` lists them.
Orthanc's redirects reach the viewer as paths of ours (so the next request
meets the policy again); one leaving Orthanc is a 502 (dicomcache follows none).
"""

from __future__ import annotations

import fnmatch
import re

import aiohttp
from aiohttp import hdrs, web

from dicomcache.http.keys import CLIENT, FAMILY, OUTCOME, SETTINGS
from dicomcache.http.params import family_of
from dicomcache.http.respond import BadRequest, json_error
from dicomcache.upstream import policy
from dicomcache.upstream.client import FORWARDED_REQUEST_HEADERS, check_status, redirect_error

#: Closed even for GET unless explicitly allowed (they change or reveal the PACS's setup).
CLOSED_PATHS = ("/tools/execute-script", "/tools/reset", "/tools/shutdown",
                "/modalities", "/modalities/*", "/peers", "/peers/*", "/jobs", "/jobs/*")
SAFE_METHODS = ("GET", "HEAD")

#: Response headers passed back to viewers (hop-by-hop and auth headers never are;
#: ``Location`` only as a path of ours).
_PASSED_RESPONSE_HEADERS = (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH, hdrs.CONTENT_DISPOSITION,
                            hdrs.CONTENT_ENCODING, hdrs.ETAG, hdrs.LAST_MODIFIED,
                            hdrs.CACHE_CONTROL)
_BAD_RAW = re.compile(r"%(2f|5c|00)|\\|\x00", re.IGNORECASE)


def check_path(raw_path: str) -> None:
    """400 for encoded slashes/backslashes, NULs and ``..`` segments."""
    path = raw_path.split("?", 1)[0]
    if _BAD_RAW.search(path):
        raise BadRequest("encoded slashes, backslashes and NUL are not allowed in paths")
    if any(seg in ("..", ".") for seg in path.split("/")) or "%2e" in path.lower():
        raise BadRequest("'.' and '..' path segments are not allowed")


def denial(method: str, path: str, allow: tuple[str, ...]) -> str | None:
    """Why ``method path`` is closed, or ``None`` when it may pass."""
    if any(fnmatch.fnmatchcase(f"{method} {path}", rule) for rule in allow):
        return None
    if method not in SAFE_METHODS:
        return (f"{method} is closed: dicomcache is read-only unless [access] allow "
                f"lists \"{method} {path}\"")
    if any(fnmatch.fnmatchcase(path, p) for p in CLOSED_PATHS):
        return f"{path} is closed by default; list \"{method} {path}\" in [access] allow to open it"
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
    headers = {h: request.headers[h] for h in FORWARDED_REQUEST_HEADERS if h in request.headers}
    # Orthanc answers 404 to every HEAD: ask with GET and drop the body.
    method = "GET" if request.method == "HEAD" else request.method
    body = await request.read() if method not in SAFE_METHODS else None
    what = f"{request.method} {request.path}"

    async def once(_attempt: int) -> web.StreamResponse:
        async with client.open(method, request.raw_path, kind="passthrough", headers=headers,
                               body=body, encoded=True, redirects=True) as upstream:
            if upstream.status >= 500 or upstream.status in (401, 403, 429):
                check_status(upstream.status, upstream.headers, what, await upstream.read())
            location = _location(client.base, str(upstream.url), upstream)
            if upstream.status in policy.REDIRECT_STATUSES and location is None:
                raise redirect_error(what, upstream.status, str(upstream.url),
                                     upstream.headers.get(hdrs.LOCATION, ""),
                                     "it leaves Orthanc and dicomcache follows no redirect")
            return await _relay_response(request, upstream, location)

    if method in SAFE_METHODS:
        return await client.retrying(once, what=what)
    return await once(1)  # writes are not idempotent: one attempt


def _location(base: str, url: str, upstream: aiohttp.ClientResponse) -> str | None:
    """Orthanc's ``Location`` as a path of ours; ``None`` if absent or leaving Orthanc."""
    location = upstream.headers.get(hdrs.LOCATION)
    return policy.viewer_location(base, url, location) if location else None


async def _relay_response(request: web.Request, upstream: aiohttp.ClientResponse,
                          location: str | None) -> web.StreamResponse:
    out = web.StreamResponse(status=upstream.status)
    for name in _PASSED_RESPONSE_HEADERS:
        if name in upstream.headers:
            out.headers[name] = upstream.headers[name]
    if location is not None:
        out.headers[hdrs.LOCATION] = location
    if request.method == "HEAD":
        await out.prepare(request)
        return out
    await out.prepare(request)
    try:
        async for chunk in upstream.content.iter_chunked(1 << 16):
            await out.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are gone already: the only honest signal left is to break the
        # connection, so the viewer sees an incomplete body, not a complete short one.
        # (Raised as a ConnectionResetError, not an upstream error, so nothing retries.)
        raise ConnectionResetError(f"upstream body cut short: {exc!r}") from exc
    await out.write_eof()
    return out


def add_routes(app: web.Application) -> None:
    app.router.add_route("*", "/{tail:.*}", passthrough)
