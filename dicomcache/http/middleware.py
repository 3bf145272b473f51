"""Middleware: the ``Host:`` check, one spelling per path, one place mapping errors to
answers and timing every request."""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from dicomcache.config import ServerSettings
from dicomcache.errors import (
    Cause,
    IntegrityError,
    NotFoundUpstream,
    UpstreamError,
    UpstreamUnavailable,
)
from dicomcache.http.keys import ANSWER, FAMILY, HOST_NAMES, METRICS, OUTCOME
from dicomcache.http.respond import BodyCut, json_error
from dicomcache.metrics import ANSWER_OUTCOMES

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


_HOST_SYNTAX = re.compile(r"(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def host_names(server: ServerSettings, public_url: str | None, machine: Iterable[str]
               ) -> frozenset[str]:
    """The ``Host:`` names this service answers to (pure; ``machine``: this machine's
    names and addresses, looked up once at start).

    ``server.allowed_hosts`` when set; else the listen address (unless a wildcard),
    ``localhost``, the loopback addresses and the machine's names.  The host of
    ``dicomweb.public_url`` is always one of them.
    """
    names = {h.lower() for h in server.allowed_hosts}
    if not names:
        names = {"localhost", "127.0.0.1", "[::1]", *(m.lower() for m in machine)}
        if server.host not in ("", "0.0.0.0", "::"):
            names.add(f"[{server.host}]" if ":" in server.host else server.host.lower())
    if public_url:
        names.add((urlsplit(public_url).hostname or "").lower())
    return frozenset(n for n in names if n)


def host_of(header: str) -> str:
    """The name of a ``Host:`` value without its port (IPv6 kept in brackets)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(header: str | None, names: frozenset[str]) -> bool:
    """Whether a request's ``Host:`` names this service (``*.x`` patterns allowed)."""
    if not header:
        return False
    host = host_of(header)
    return host in names or any(fnmatch.fnmatchcase(host, n) for n in names if "*" in n)


@web.middleware
async def host_check(request: web.Request, handler: Handler) -> web.StreamResponse:
    """421 for a ``Host:`` that does not name this service, before anything else.

    A web page on another site can make a browser send requests to a clinic box by
    pointing its own DNS name at the box's address (DNS rebinding); the browser then
    reads the answers as same-origin.  Such requests carry the page's host name.
    """
    names = request.app.get(HOST_NAMES)
    header = request.headers.get(hdrs.HOST) or ""
    # Liveness stays open to load balancers probing by whatever address they use.
    if names is not None and request.path != "/healthz" and not host_allowed(header, names):
        if not _HOST_SYNTAX.fullmatch(header):
            return json_error(400, "bad request", f"Host {header[:80]!r} is not a host name "
                              "(with an optional port)")
        return json_error(421, "misdirected request", f"Host {header[:80]!r} is not a name "
                          "of this service (server.allowed_hosts)")
    return await handler(request)


@web.middleware
async def canonical_path(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One spelling per resource, before anything else sees the path.

    Orthanc collapses repeated slashes and ignores a trailing one, so
    ``//instances/X/file`` *is* ``/instances/X/file`` to it; the router here
    would send it to the read-through instead, past the verified store and the
    closed list.  Such a request is redirected (308: method and body kept) to
    its canonical path, which a viewer with a trailing slash in its base URL
    follows at LAN cost; nothing is ever answered for a non-canonical path.
    A target that is not a path (``GET http://host/… HTTP/1.1``, the form clients
    use with a forward proxy) is a 400: dicomcache is nobody's proxy.
    """
    raw, sep, query = request.raw_path.partition("?")
    if not raw.startswith("/"):
        return json_error(400, "bad request", "the request target must be a path "
                          "(absolute-form targets are for proxies; dicomcache is not one)")
    good = canonical(raw)
    if good != raw:
        raise web.HTTPPermanentRedirect(good + sep + query)
    return await handler(request)


def failure_reason(status: int, outcome: str | None,
                   exc: BaseException | None = None) -> str | None:
    """Why a viewer's request failed (:data:`~dicomcache.metrics.REQUEST_FAILURES`), or
    ``None`` when it did not: a 4xx is the request's own problem (not found, not allowed),
    not a failure of the service.  ``exc``: the error that made the answer, if any."""
    if outcome == "cut":
        return "cut"
    if isinstance(exc, UpstreamUnavailable):
        return "unavailable"
    if isinstance(exc, IntegrityError) or (isinstance(exc, UpstreamError)
                                           and exc.cause.integrity):
        return "corrupt"
    if isinstance(exc, UpstreamError) or (outcome == "passthrough" and status >= 500):
        return "upstream"  # the read-through passes Orthanc's own 5xx on
    return "other" if status >= 500 else None


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map dicomcache's errors to answers, and observe every labelled request."""
    started = time.monotonic()
    status = 500  # an exception that escapes becomes aiohttp's 500
    error: BaseException | None = None
    try:
        response = await handler(request)
        status = response.status
    except UpstreamUnavailable as exc:
        request[OUTCOME] = "unavailable"
        response, error = error_answer(exc), exc
        status = response.status
    except (UpstreamError, IntegrityError, NotFoundUpstream) as exc:
        request[OUTCOME] = "error"
        response, error = error_answer(exc), exc
        status = response.status
    except web.HTTPException as exc:
        request.setdefault(OUTCOME, "error")
        status = exc.status
        raise
    except BodyCut as exc:  # logged where it was cut
        if request.transport is not None:
            request.transport.abort()  # aiohttp's last write then fails quietly
        response = exc.response
        status = response.status
    finally:
        _observe(request, time.monotonic() - started, failure_reason(
            status, request.get(OUTCOME), error))
    return response


def _observe(request: web.Request, seconds: float, failure: str | None) -> None:
    """Count a labelled request: latency; a hit or miss of the store (the hit ratio) or
    of the answer cache; a failure."""
    metrics = request.app[METRICS]
    family = request.get(FAMILY)
    if family is None:
        return
    outcome = request.get(OUTCOME, "error")
    metrics.request_seconds.labels(family, outcome).observe(seconds)
    if request.get(ANSWER):
        if outcome in ANSWER_OUTCOMES:
            metrics.answers.labels(outcome).inc()
    elif outcome == "hit":
        metrics.cache_hits.labels(family).inc()
    elif outcome == "miss":
        metrics.cache_misses.labels(family).inc()
    if failure is not None:
        metrics.failed_requests.labels(family, failure).inc()


#: ``X-Cache`` values by request outcome (nginx's ``$upstream_cache_status``, Varnish's
#: ``X-Cache``): what an operator checks with ``curl -I``.
CACHE_STATUS = {"hit": "HIT", "miss": "MISS", "stale": "STALE", "passthrough": "PASS"}


async def cache_status(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: ``X-Cache: HIT|MISS|STALE|PASS`` on answers the cache
    decided (hits and misses of every family, copies served while Orthanc is away,
    read-through)."""
    value = CACHE_STATUS.get(request.get(OUTCOME, ""))
    if value is not None:
        response.headers["X-Cache"] = value
