"""``dicomcache check-config``: validate a configuration file and print what it means."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicomcache.cli.common import USAGE, load_settings


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "check-config", help="validate a config file and print a summary",
        description="Validate a configuration file: exit 0 with a summary, or 2 listing "
                    "every problem with its key.")
    p.add_argument("--config", "-c", type=Path, help="TOML config (default: embedded demo)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    s = load_settings(args)
    if s is None:
        return USAGE
    print(f"{args.config or '(embedded default)'}: OK")
    print(f"  listen        http://{s.server.host}:{s.server.port}"
          + (f" (status and metrics on {s.server.admin_host}:{s.server.admin_port})"
             if s.server.admin_port else ""))
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
