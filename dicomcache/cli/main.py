"""The ``dicomcache`` command: one subcommand per module of this package."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dicomcache import __version__
from dicomcache.cli import (
    admin,
    audit,
    check_config,
    config_reference,
    prefetch,
    relay,
    revalidate,
    serve,
    users,
    wan_emulator,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomcache", description="Verified edge cache and relay for a remote Orthanc PACS.")
    parser.add_argument("--version", action="version", version=f"dicomcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (serve, check_config, admin, prefetch, revalidate, relay, users, audit,
                   wan_emulator, config_reference):
        module.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
