"""CORS for viewers served from another origin (OHIF on its own host name).

Closed by default: with ``[cors] allowed_origins`` empty no CORS header is ever
sent, so browsers keep other origins out.  For an allowed origin:

* preflights (``OPTIONS`` with ``Access-Control-Request-Method``) are answered
  here, never forwarded to Orthanc: ``204`` allowing ``GET``/``HEAD`` and the
  request headers viewers send (``Authorization``, ``Accept``, ``Range``,
  conditional headers); a preflight from another origin, or asking for another
  method, gets ``403`` with a JSON reason;
* every answer (including errors and streamed retrieves) carries
  ``Access-Control-Allow-Origin`` and exposes the headers a viewer reads
  (``Content-Length``, ``Content-Range``, ``ETag``, ``Warning``…).

Headers are added in ``on_response_prepare``, the one hook that sees streamed
responses before their headers leave.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from dicomcache.config import CorsSettings
from dicomcache.http.respond import json_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALLOWED_METHODS = ("GET", "HEAD", "OPTIONS")
ALLOWED_HEADERS = ("Authorization", "Accept", "Range", "If-Range", "If-None-Match",
                   "If-Modified-Since", "If-Match", "Cache-Control", "Content-Type",
                   "X-Requested-With")
EXPOSED_HEADERS = ("Content-Length", "Content-Range", "Content-Type", "Content-Encoding",
                   "Accept-Ranges", "ETag", "Warning", "Age", "Retry-After")
CORS_SETTINGS = web.AppKey("cors_settings", CorsSettings)
_ALLOWED_LOWER = {h.lower() for h in ALLOWED_HEADERS}


def allowed_origin(settings: CorsSettings, origin: str | None) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for ``origin``, or ``None`` (not allowed)."""
    if not origin or not settings.allowed_origins:
        return None
    if "*" in settings.allowed_origins:
        return "*"
    return origin if origin.rstrip("/") in settings.allowed_origins else None


def preflight_problem(settings: CorsSettings, origin: str | None, method: str,
                      headers: str) -> str | None:
    """Why a preflight is refused, or ``None``."""
    if allowed_origin(settings, origin) is None:
        return f"origin {origin!r} is not in [cors] allowed_origins"
    if method.upper() not in ALLOWED_METHODS:
        return f"method {method!r} is not allowed cross-origin (only GET and HEAD)"
    asked = {h.strip().lower() for h in headers.split(",") if h.strip()}
    extra = sorted(asked - _ALLOWED_LOWER)
    if extra:
        return f"request header(s) {', '.join(extra)} are not allowed cross-origin"
    return None


@web.middleware
async def cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflights locally (never forwarded to Orthanc)."""
    if (request.method != "OPTIONS" or hdrs.ORIGIN not in request.headers
            or hdrs.ACCESS_CONTROL_REQUEST_METHOD not in request.headers):
        return await handler(request)
    settings = request.app[CORS_SETTINGS]
    origin = request.headers.get(hdrs.ORIGIN)
    problem = preflight_problem(settings, origin,
                                request.headers[hdrs.ACCESS_CONTROL_REQUEST_METHOD],
                                request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, ""))
    if problem is not None:
        resp = json_error(403, "forbidden", f"CORS preflight refused: {problem}")
        resp.headers[hdrs.VARY] = "Origin"
        return resp
    headers = {hdrs.ACCESS_CONTROL_ALLOW_METHODS: ", ".join(ALLOWED_METHODS),
               hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ", ".join(ALLOWED_HEADERS),
               hdrs.ACCESS_CONTROL_MAX_AGE: str(settings.max_age)}
    if settings.allow_credentials:  # never with "*" (refused by the config)
        headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
    return web.Response(status=204, headers=headers)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    settings = request.app[CORS_SETTINGS]
    if not settings.allowed_origins:
        return
    vary = response.headers.get(hdrs.VARY)
    if "*" not in settings.allowed_origins and "origin" not in (vary or "").lower():
        response.headers[hdrs.VARY] = f"{vary}, Origin" if vary else "Origin"
    value = allowed_origin(settings, request.headers.get(hdrs.ORIGIN))
    if value is None:
        return
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = value
    if settings.allow_credentials:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
    if request.method != "OPTIONS":
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ", ".join(EXPOSED_HEADERS)


def setup(app: web.Application, settings: CorsSettings) -> None:
    """The settings and the header hook; :func:`cors_preflight` is in the app's middleware
    list, right after the ``Host:`` check, so it sees every path."""
    app[CORS_SETTINGS] = settings
    app.on_response_prepare.append(_add_headers)
