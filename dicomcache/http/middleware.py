"""Middleware: one place mapping errors to answers, and timing every request."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from dicomcache.errors import (
    Cause,
    IntegrityError,
    NotFoundUpstream,
    UpstreamError,
    UpstreamUnavailable,
)
from dicomcache.http.keys import FAMILY, METRICS, OUTCOME
from dicomcache.http.respond import json_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CORRUPT = "upstream sent a corrupt or incomplete instance"


def error_answer(exc: UpstreamError | IntegrityError | NotFoundUpstream) -> web.Response:
    """The JSON answer a viewer gets for a failure of Orthanc or of the link.

    ``503`` + ``Retry-After`` while the circuit is open (cached instances still
    work); ``504`` on timeouts; ``502`` naming the cause otherwise; Orthanc's own
    4xx (``404`` for anything else) when the resource does not exist.
    """
    if isinstance(exc, UpstreamUnavailable):
        retry_after = int(exc.retry_after or 5)
        response = json_error(503, "upstream unavailable", exc.reason,
                              retry_after=retry_after, cached_only=True)
        response.headers["Retry-After"] = str(retry_after)
        return response
    if isinstance(exc, UpstreamError):
        error = CORRUPT if exc.cause.integrity else "upstream unavailable"
        return json_error(504 if exc.cause is Cause.TIMEOUT else 502, error, exc.reason,
                          attempts=exc.attempts)
    if isinstance(exc, IntegrityError):  # only reachable outside the retry loop
        return json_error(502, CORRUPT, exc.reason, attempts=1)
    return json_error(exc.status if 400 <= exc.status < 500 else 404, "not found", exc.reason)


def canonical(path: str) -> str:
    """A path as Orthanc reads it: empty segments (``//``, a trailing ``/``) removed."""
    return "/" + "/".join(segment for segment in path.split("/") if segment)


@web.middleware
async def canonical_path(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One spelling per resource, before anything else sees the path.

    Orthanc collapses repeated slashes and ignores a trailing one, so
    ``//instances/X/file`` *is* ``/instances/X/file`` to it; the router here
    would send it to the read-through instead, past the verified store and the
    closed list.  Such a request is redirected (308: method and body kept) to
    its canonical path, which a viewer with a trailing slash in its base URL
    follows at LAN cost; nothing is ever answered for a non-canonical path.
    """
    raw, sep, query = request.raw_path.partition("?")
    good = canonical(raw)
    if good != raw:
        raise web.HTTPPermanentRedirect(good + sep + query)
    return await handler(request)


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map dicomcache's errors to answers, and observe every labelled request."""
    started = time.monotonic()
    try:
        response = await handler(request)
    except UpstreamUnavailable as exc:
        request[OUTCOME] = "unavailable"
        response = error_answer(exc)
    except (UpstreamError, IntegrityError, NotFoundUpstream) as exc:
        request[OUTCOME] = "error"
        response = error_answer(exc)
    except web.HTTPException:
        request.setdefault(OUTCOME, "error")
        raise
    finally:
        metrics = request.app[METRICS]
        family = request.get(FAMILY)
        if family is not None:
            metrics.request_seconds.labels(family, request.get(OUTCOME, "error")).observe(
                time.monotonic() - started)
            if request.get(OUTCOME) == "hit":
                metrics.cache_hits.labels(family).inc()
            elif request.get(OUTCOME) == "miss":
                metrics.cache_misses.labels(family).inc()
    return response
