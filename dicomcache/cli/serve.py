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

from aiohttp import web

from dicomcache import __version__, tls
from dicomcache.cli.check_config import users_problem
from dicomcache.cli.common import USAGE, load_settings, setup_logging, state_dir
from dicomcache.config import Settings, exposure_problem
from dicomcache.http import listeners
from dicomcache.http.app import make_app
from dicomcache.http.keys import AUDIT, METRICS, RELAY, RELOADERS, SERVER_TLS

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


def start_problem(settings: Settings) -> str | None:
    """Why the daemon must not start with these settings (after --host/--port), or None."""
    exposure = exposure_problem(settings.server, settings.auth)
    if exposure is not None:
        return f"auth.mode: {exposure}"
    if settings.auth.mode == "basic" and settings.auth.users_file is not None:
        problem = users_problem(settings.auth.users_file)
        if problem is not None:
            return f"auth.users_file: {problem}"
    return None


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if settings is None:
        return USAGE
    if args.port is not None or args.host is not None:
        server = dataclasses.replace(settings.server, port=args.port or settings.server.port,
                                     host=args.host or settings.server.host)
        settings = dataclasses.replace(settings, server=server)
    refused = start_problem(settings)
    if refused is not None:
        print(f"{args.config or '(embedded default)'}: {refused}", file=sys.stderr)
        return USAGE
    setup_logging(settings.server.log_level, settings.server.log_format)
    demo = None
    if settings.upstream.url is None:
        from dicomcache.devtools.demo import demo_urls, start_demo_orthanc

        log.info("no upstream.url configured: starting a local demo Orthanc")
        demo, settings = start_demo_orthanc(settings, state_dir())
    try:
        try:
            server_tls = viewer_tls(settings)
        except tls.TLSFileError as exc:  # changed since the configuration was read
            print(f"server.tls_{'key' if exc.which == 'key' else 'certificate'}: {exc.message}",
                  file=sys.stderr)
            return USAGE
        app = build_app(settings, server_tls)
        scheme = "https" if server_tls is not None else "http"
        base = f"{scheme}://{settings.server.host}:{settings.server.port}"
        log.info("dicomcache %s listening on %s → %s; cache %s (max %.1f GiB)", __version__,
                 base, settings.upstream.url, settings.cache.directory,
                 settings.cache.max_size / (1 << 30))
        if demo is not None:
            print("Demo ready. Try:", *demo_urls(demo, base), sep="\n  ", flush=True)
        web.run_app(app, host=settings.server.host, port=settings.server.port,
                    ssl_context=server_tls.context if server_tls is not None else None,
                    shutdown_timeout=settings.server.shutdown_timeout, print=None,
                    access_log=None, handle_signals=True)
    finally:
        if demo is not None:
            demo.stop()
    log.info("dicomcache stopped")
    return 0
