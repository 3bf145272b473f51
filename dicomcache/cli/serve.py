"""``dicomcache serve``: the daemon (HTTP cache, and the DIMSE relay when enabled).

This is the one place that wires both sides together: the HTTP application
never imports the relay (the status page sees it through the ``RELAY`` key).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from dicomcache import __version__, tls
from dicomcache.cli import startup
from dicomcache.cli.common import USAGE, load_settings, setup_daemon, state_dir
from dicomcache.config import Settings, format_size
from dicomcache.http import listeners
from dicomcache.http.app import make_app
from dicomcache.http.keys import (
    ADMIN_SOCKETS,
    AUDIT,
    METRICS,
    REDIRECT_SOCKETS,
    RELAY,
    RELOADERS,
    SERVER_TLS,
)

log = logging.getLogger("dicomcache")


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve", help="run the cache (and the relay when enabled)",
        description="Run dicomcache until SIGTERM/SIGINT.  Without --config it runs the "
                    "embedded demo: a local Orthanc with a sample study.")
    p.add_argument("--config", "-c", type=Path, help="TOML config (default: embedded demo)")
    p.add_argument("--port", type=int, help="override server.port")
    p.add_argument("--host", help="override server.host")
    p.set_defaults(func=run)


def relay_context(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """The relay as one of the application's long-lived resources."""
    async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
        from dicomcache.relay.service import Relay  # the relay's imports only when it runs

        relay = Relay(settings.relay, app[METRICS], audit=app.get(AUDIT))
        await relay.start()
        app[RELAY] = relay
        app[RELOADERS].append(relay.reload_tls)
        yield
        await relay.stop(settings.server.shutdown_timeout)
    return relay_ctx


def build_app(settings: Settings, server_tls: tls.ServerTLS | None = None
              ) -> web.Application:
    """The daemon's application: :func:`make_app`, its listeners (HTTPS with
    ``server_tls``, the redirect, SIGHUP reloads), plus the relay when enabled."""
    app = make_app(settings)
    if server_tls is not None:
        app[SERVER_TLS] = server_tls
    listeners.setup(app)
    if settings.relay.enabled:
        app.cleanup_ctx.append(relay_context(settings))
    return app


def viewer_tls(settings: Settings) -> tls.ServerTLS | None:
    """The viewer listener's certificate (files read and checked: blocking, before the
    loop runs), or None for plain HTTP."""
    server = settings.server
    if server.tls_certificate is None or server.tls_key is None:
        return None
    return tls.ServerTLS(server.tls_certificate, server.tls_key, name="viewer listener")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if settings is None:
        return USAGE
    if args.port is not None or args.host is not None:
        server = dataclasses.replace(settings.server, port=args.port or settings.server.port,
                                     host=args.host or settings.server.host)
        settings = dataclasses.replace(settings, server=server)
    where = args.config or "(embedded default)"
    found = startup.problems(settings, from_file=args.config is not None)
    for key, message in found:
        print(f"{where}: {key}: {message}", file=sys.stderr)
    if found:
        return USAGE
    try:
        bound = startup.bind_all(settings)  # before anything starts: one clear line
    except startup.ListenError as exc:
        print(f"{where}: {exc.key}: {exc}", file=sys.stderr)
        return USAGE
    setup_daemon(settings.server.log_level, settings.server.log_format)
    demo = None
    try:
        if settings.upstream.url is None:  # only without --config (startup.problems)
            from dicomcache.devtools.demo import start_demo_orthanc

            log.info("no --config: starting a local demo Orthanc with a sample study")
            demo, settings = start_demo_orthanc(settings, state_dir())
        return _serve(settings, bound, demo)
    finally:
        bound.close()
        if demo is not None:
            demo.stop()


def _serve(settings: Settings, bound: startup.Bound, demo: Any) -> int:
    try:
        server_tls = viewer_tls(settings)
    except tls.TLSFileError as exc:  # changed since the configuration was read
        print(f"server.tls_{'key' if exc.which == 'key' else 'certificate'}: {exc.message}",
              file=sys.stderr)
        return USAGE
    app = build_app(settings, server_tls)
    app[ADMIN_SOCKETS], app[REDIRECT_SOCKETS] = bound.admin, bound.redirect
    scheme = "https" if server_tls is not None else "http"
    base = f"{scheme}://{settings.server.host}:{settings.server.port}"
    started = False

    async def say_listening(_app: web.Application) -> None:
        # After every component started (cleanup_ctx runs first): a "listening" line
        # is only ever followed by a working service.
        nonlocal started
        started = True
        log.info("dicomcache %s listening on %s → %s; cache %s (max %s)",
                 __version__, base, settings.upstream.url, settings.cache.directory,
                 format_size(settings.cache.max_size))
        if demo is not None:
            from dicomcache.devtools.demo import demo_urls

            print("Demo ready. Try:", *demo_urls(demo, base), sep="\n  ", flush=True)

    app.on_startup.append(say_listening)
    try:
        # As web.run_app, with connections counted per client (http/listeners.py).
        listeners.run(app, bound.viewer,
                      ssl_context=server_tls.context if server_tls is not None else None,
                      shutdown_timeout=settings.server.shutdown_timeout)
    except Exception as exc:
        if started:
            raise
        log.debug("start-up failed", exc_info=True)
        log.error("dicomcache could not start: %s: %s", type(exc).__name__, exc)
        return 1
    log.info("dicomcache stopped")
    return 0
