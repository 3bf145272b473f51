"""The listeners around the application: HTTPS, the HTTP→HTTPS redirect, SIGHUP.

* **HTTPS**: with ``server.tls_certificate``/``tls_key`` the viewer port speaks
  TLS only (``dicomcache serve`` hands :attr:`~dicomcache.tls.ServerTLS.context`
  to the listener; the policy is :mod:`dicomcache.tls`'s).  The admin port
  follows when it listens beyond loopback.
* **Redirect**: ``server.http_redirect_port`` answers every request with a 308
  to the same path and query on ``https://`` (the viewer port), for a ``Host:``
  of this service only (the same names as the viewer port; DNS rebinding gets a
  421 here too), and serves nothing else: no patient data ever travels in clear.
* **SIGHUP** (:func:`reload_on_sighup`): every ``app[RELOADERS]`` callable runs
  (the certificate, the users file…); connections already open keep going.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import hdrs, web

from dicomcache.http.keys import (
    HOST_NAMES,
    REDIRECT_SOCKETS,
    RELOADERS,
    SERVER_TLS,
    SETTINGS,
)
from dicomcache.http.middleware import host_allowed, host_of
from dicomcache.http.respond import json_error

log = logging.getLogger(__name__)


def https_location(host_header: str, path_qs: str, https_port: int) -> str:
    """Where a plain-HTTP request is sent: the same name, the HTTPS port (pure)."""
    host = host_of(host_header)
    port = "" if https_port == 443 else f":{https_port}"
    return f"https://{host}{port}{path_qs}"


def setup(app: web.Application) -> None:
    """Wire what ``server`` asks for: the redirect listener (when configured) and the
    reloads.  Call after :func:`~dicomcache.http.app.make_app` and before running."""
    app.setdefault(RELOADERS, [])
    server_tls = app.get(SERVER_TLS)
    if server_tls is not None:
        app[RELOADERS].append(lambda: asyncio.to_thread(server_tls.reload))
    if app[SETTINGS].server.http_redirect_port is not None:
        app.cleanup_ctx.append(_redirect_ctx)
    app.cleanup_ctx.append(reload_on_sighup)


async def _redirect(request: web.Request) -> web.Response:
    names = request.app[HOST_NAMES]
    header = request.headers.get(hdrs.HOST) or ""
    if not host_allowed(header, names):
        return json_error(421, "misdirected request", "this port redirects to HTTPS for "
                          "the names of this service only (server.allowed_hosts)")
    location = https_location(header, request.path_qs, request.app[SETTINGS].server.port)
    raise web.HTTPPermanentRedirect(location)


async def _redirect_ctx(app: web.Application) -> AsyncIterator[None]:
    server = app[SETTINGS].server
    assert server.http_redirect_port is not None
    redirect_app = web.Application()
    redirect_app[SETTINGS] = app[SETTINGS]
    redirect_app[HOST_NAMES] = app[HOST_NAMES]
    redirect_app.router.add_route("*", "/{tail:.*}", _redirect)
    runner = web.AppRunner(redirect_app, access_log=None, handle_signals=False)
    await runner.setup()
    bound = app.get(REDIRECT_SOCKETS)
    sites: list[web.BaseSite] = (
        [web.SockSite(runner, sock) for sock in bound] if bound
        else [web.TCPSite(runner, server.host, server.http_redirect_port)])
    for site in sites:
        await site.start()
    log.info("plain HTTP on port %d redirects to HTTPS on port %d",
             server.http_redirect_port, server.port)
    yield
    await runner.cleanup()


async def reload_on_sighup(app: web.Application) -> AsyncIterator[None]:
    """SIGHUP runs every reloader in turn (one reload at a time; a failure is logged and
    the next still runs)."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()
    lock = asyncio.Lock()

    async def reload_all() -> None:
        async with lock:
            log.info("SIGHUP: reloading")
            for reload in app[RELOADERS]:
                try:
                    await reload()
                except Exception:
                    log.exception("reload failed; what was loaded before stays in use")

    def on_signal() -> None:
        task = loop.create_task(reload_all(), name="sighup-reload")
        running.add(task)
        task.add_done_callback(running.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_signal)
    except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
        log.warning("SIGHUP reloads unavailable here (not the main thread)")
        yield
        return
    yield
    loop.remove_signal_handler(signal.SIGHUP)
    for task in running:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*running, return_exceptions=True)
