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
* **Connections per client** (:class:`GatedSite`, :func:`run`): the viewer port
  accepts connections itself and asks :class:`~.limits.ConnectionGate` before
  handing each to aiohttp (``loop.connect_accepted_socket`` with the runner's
  protocol factory), so ``server.max_connections_per_client`` holds from accept(),
  before the TLS handshake and any request.  When accept() finds no descriptor left
  (EMFILE), the longest idle connection is closed to make room and it is said once
  a minute — asyncio's own accept loop logged a traceback per attempt (tens of
  thousands a minute) and served nobody new until a keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import hdrs, web
from yarl import URL

from dicomcache.http.keys import (
    HOST_NAMES,
    REDIRECT_SOCKETS,
    RELOADERS,
    SERVER_TLS,
    SETTINGS,
)
from dicomcache.http.limits import CONNECTION_GATE, Connection, ConnectionGate
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


# --- the viewer port: connections counted per client -----------------------------------------
#: accept() errors that mean "no descriptor or memory left now", not "this connection".
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Seconds an idle keep-alive connection is kept (aiohttp's run_app default).
KEEPALIVE_TIMEOUT = 75.0
#: Seconds between accept() attempts while no descriptor can be freed.
ACCEPT_RETRY = 0.1


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the gate told when the connection is
    set up, receives bytes and closes (everything else passed through unchanged)."""

    def __init__(self, inner: asyncio.Protocol, gate: ConnectionGate, conn: Connection
                 ) -> None:
        self._inner, self._gate, self._conn = inner, gate, conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._gate.made(self._conn, transport)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._conn.last_used = time.monotonic()  # a request arriving: not the one to close
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate.lost(self._conn)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _canceller(task: asyncio.Task[None]) -> Callable[[], None]:
    def cancel() -> None:
        task.cancel()
    return cancel


class GatedSite(web.BaseSite):
    """A listening socket whose connections :class:`~.limits.ConnectionGate` admits
    before aiohttp sees them (a :class:`web.SockSite` otherwise)."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, gate: ConnectionGate,
                 *, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._owner, self._listener, self._gate, self._tls = runner, sock, gate, ssl_context
        host, port = sock.getsockname()[:2]
        self._label = str(URL.build(scheme="https" if ssl_context else "http", host=host,
                                    port=port))
        self._accepting: asyncio.Task[None] | None = None
        self._starting: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return self._label

    async def start(self) -> None:
        await super().start()  # registered with the runner, which stops it on cleanup
        factory = self._owner.server
        assert factory is not None, "runner.setup() first"
        self._accepting = asyncio.create_task(self._accept(factory),
                                              name=f"accept {self._label}")

    async def stop(self) -> None:
        tasks = [t for t in (self._accepting, *self._starting) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._listener.close()  # new connections are refused, not left in the queue
        await super().stop()

    async def _accept(self, factory: Callable[[], asyncio.Protocol]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(self._listener)
            except OSError as exc:
                await self._accept_failed(exc)
                continue
            conn = self._gate.accept(str(address[0]))
            if conn is None:
                sock.close()
                continue
            task = loop.create_task(self._set_up(sock, conn, factory))
            self._starting.add(task)
            task.add_done_callback(self._set_up_done(sock))
            conn.closer = _canceller(task)  # until set up (then the transport's abort)

    def _set_up_done(self, sock: socket.socket) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._starting.discard(task)
            if task.cancelled():  # perhaps before it ran: the socket is still ours
                sock.close()
        return done

    async def _accept_failed(self, exc: OSError) -> None:
        if exc.errno in OUT_OF_DESCRIPTORS:
            freed = self._gate.make_room()
            self._gate.out_of_descriptors(exc, freed)
            # A closed connection's descriptor is released by a callback already queued.
            await asyncio.sleep(0 if freed else ACCEPT_RETRY)
        elif exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
            log.debug("accept() on %s: %s (the client left first)", self._label, exc)
        else:  # never stop accepting for good; say it, then try again
            log.error("accept() on %s failed: %s", self._label, exc)
            await asyncio.sleep(ACCEPT_RETRY)

    async def _set_up(self, sock: socket.socket, conn: Connection,
                      factory: Callable[[], asyncio.Protocol]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: _Counted(factory(), self._gate, conn), sock, ssl=self._tls)
        except OSError as exc:  # a failed TLS handshake (a timeout too), a reset
            log.debug("connection from %s not set up: %s", conn.client, exc)
            self._gate.lost(conn)
            sock.close()
        except BaseException:
            self._gate.lost(conn)
            sock.close()
            raise


def run(app: web.Application, sockets: list[socket.socket], *,
        ssl_context: ssl.SSLContext | None, shutdown_timeout: float) -> None:
    """Serve ``app`` on the viewer ``sockets`` (already listening) until SIGTERM or
    SIGINT, then stop as ``web.run_app`` does: stop accepting, let requests in progress
    finish within ``shutdown_timeout``, clean up.  Raises what start-up raised."""
    asyncio.run(_serve(app, sockets, ssl_context, shutdown_timeout))


async def _serve(app: web.Application, sockets: list[socket.socket],
                 ssl_context: ssl.SSLContext | None, shutdown_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT,
                           shutdown_timeout=shutdown_timeout)
    try:
        await runner.setup()
        for sock in sockets:
            await GatedSite(runner, sock, app[CONNECTION_GATE], ssl_context=ssl_context
                            ).start()
        await stop.wait()
    finally:
        await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
