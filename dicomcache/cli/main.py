"""The ``dicomcache`` command: argument parsing, logging, running the app."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from dicomcache import __version__
from dicomcache.config import Settings, from_dict, load
from dicomcache.errors import ConfigError

log = logging.getLogger("dicomcache")


def state_dir() -> Path:
    """Where the embedded default keeps its cache and demo Orthanc (no config given)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dicomcache"


def settings_from(args: argparse.Namespace) -> Settings:
    """The config file's settings, or the embedded default (a per-user cache dir)."""
    if args.config:
        return load(args.config)
    return from_dict({"cache": {"directory": str(state_dir() / "cache"), "max_size": "2GB"}})


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``server.log_format = "json"``)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "INFO", fmt: str = "plain") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's per-request access log is not an event a person needs; nor are
    # pynetdicom's per-message INFO lines (the relay logs what matters), unless debugging.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if root.getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"{args.config}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for key, message in exc.problems:
            print(f"  {key}: {message}", file=sys.stderr)
        return 2
    s = settings
    print(f"{args.config or '(embedded default)'}: OK")
    print(f"  listen        http://{s.server.host}:{s.server.port}"
          + (f" (metrics on :{s.server.metrics_port})" if s.server.metrics_port else ""))
    print(f"  upstream      {s.upstream.url or '(none: a demo Orthanc is started)'}"
          f" user={s.upstream.username or '-'} timeouts={s.upstream.connect_timeout:g}/"
          f"{s.upstream.read_timeout:g}s retries={s.upstream.retries}")
    print(f"  cache         {s.cache.directory} max {s.cache.max_size / (1 << 30):.2f} GiB")
    print(f"  access.allow  {', '.join(s.access.allow) or '(read-only)'}")
    if s.relay.enabled:
        print(f"  relay         {s.relay.ae_title}@{s.relay.host}:{s.relay.port} → "
              + (", ".join(f"{d.name} ({d.transfer_syntax_strategy})"
                           for d in s.relay.destinations) or "no destinations"))
    else:
        print("  relay         disabled")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        for key, message in exc.problems:
            print(f"config error: {key}: {message}", file=sys.stderr)
        return 2
    if args.port is not None or args.host is not None:
        server = dataclasses.replace(settings.server, port=args.port or settings.server.port,
                                     host=args.host or settings.server.host)
        settings = dataclasses.replace(settings, server=server)
    setup_logging(settings.server.log_level, settings.server.log_format)
    demo = None
    if settings.upstream.url is None:
        from dicomcache.devtools.demo import demo_urls, start_demo_orthanc

        log.info("no upstream.url configured: starting a local demo Orthanc")
        demo, settings = start_demo_orthanc(settings, state_dir())
    try:
        from dicomcache.http.app import make_app

        app = make_app(settings)
        base = f"http://{settings.server.host}:{settings.server.port}"
        log.info("dicomcache %s listening on %s → %s; cache %s (max %.1f GiB)", __version__,
                 base, settings.upstream.url, settings.cache.directory,
                 settings.cache.max_size / (1 << 30))
        if demo is not None:
            print("Demo ready. Try:", *demo_urls(demo, base), sep="\n  ", flush=True)
        # What exists now (modules, pydicom's dictionaries, the app) lives as long as
        # the process: kept out of the cyclic collector's sight, its full collections
        # stop walking a few hundred thousand objects (a cold 200-instance retrieve
        # spent about 50 ms of the event loop in them).
        gc.collect()
        gc.freeze()
        web.run_app(app, host=settings.server.host, port=settings.server.port,
                    shutdown_timeout=settings.server.shutdown_timeout, print=None,
                    access_log=None, handle_signals=True)
    finally:
        if demo is not None:
            demo.stop()
    log.info("dicomcache stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomcache", description="Verified edge cache and relay for a remote Orthanc PACS.")
    parser.add_argument("--version", action="version", version=f"dicomcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("serve", cmd_serve, "run the cache (and the relay when enabled)"),
        ("check-config", cmd_check_config, "validate a config file and print a summary"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", "-c", type=Path, help="TOML config (default: embedded demo)")
        if name == "serve":
            p.add_argument("--port", type=int, help="override server.port")
            p.add_argument("--host", help="override server.host")
        p.set_defaults(func=func)
    _optional_commands(sub)
    return parser


def _optional_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Subcommands owned by other modules register themselves."""
    from dicomcache.cli import admin
    from dicomcache.cli import prefetch as prefetch_cli
    from dicomcache.devtools import wanem
    from dicomcache.cli import relay as relay_cli

    wanem.add_cli(sub)
    relay_cli.add_cli(sub)
    admin.add_cli(sub)
    prefetch_cli.add_cli(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130

