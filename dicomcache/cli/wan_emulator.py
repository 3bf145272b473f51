"""``dicomcache wan-emulator``: the WAN emulator and fault injector (:mod:`.devtools.wanem`)."""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
from typing import Final

from dicomcache.devtools.wanem import FAULT_KINDS, LinkProfile, WanEmulator


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


_FAULT_HELP: Final = {
    "status_503": "answer 503 + Retry-After: 1 without contacting upstream",
    "reset": "send part of the body, then a TCP RST",
    "close_early": "close after the response head",
    "truncate": "send part of the body with the original framing, then close",
    "truncate_lying": "cut the body and rewrite Content-Length to match (looks complete)",
    "corrupt": "flip a few body bytes, length kept",
    "stall": "pause mid-body for --stall-seconds",
}


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``wan-emulator`` subcommand; its ``func`` default is
    :func:`run_cli`, which returns the exit status."""
    p = subparsers.add_parser(
        "wan-emulator",
        help="run a WAN emulator / fault injector in front of an HTTP server",
        description=(
            "Loopback HTTP/1.1 proxy adding latency (one-way, per direction), a shared "
            "bandwidth cap and per-response faults. Fault rates are probabilities per "
            "response and must add up to at most 1. Stops on SIGINT/SIGTERM and prints "
            "its counters."
        ),
    )
    p.add_argument(
        "--listen", type=_host_port, default=("127.0.0.1", 9042), metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:9042; port 0 picks a free one)",
    )
    p.add_argument(
        "--upstream", type=_host_port, required=True, metavar="HOST:PORT",
        help="the server to forward to, e.g. Orthanc at 127.0.0.1:8042",
    )
    p.add_argument("--latency-ms", type=_non_negative, default=0.0, metavar="MS",
                   help="one-way delay per direction (RTT = 2x)")
    p.add_argument("--jitter-ms", type=_non_negative, default=0.0, metavar="MS",
                   help="uniform +/- jitter on the delay")
    p.add_argument("--bandwidth-mbit", type=_non_negative, default=None, metavar="MBIT",
                   help="per-direction cap shared by all connections (default or 0: unlimited)")
    for kind in FAULT_KINDS:
        p.add_argument(
            "--" + kind.replace("_", "-"), dest=kind, type=_rate, default=0.0,
            metavar="P", help=f"probability per response: {_FAULT_HELP[kind]}",
        )
    p.add_argument("--stall-seconds", type=_non_negative, default=5.0, metavar="S")
    p.add_argument("--stall-close", action="store_true",
                   help="close the connection after a stall instead of resuming")
    p.add_argument("--fault-paths", metavar="REGEX",
                   help="only inject faults into requests whose target matches (re.search)")
    p.add_argument("--fault-methods", default="GET", metavar="M[,M...]",
                   help="methods eligible for faults (default GET)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for a reproducible fault sequence")
    p.set_defaults(func=run_cli)


def profile_from_args(args: argparse.Namespace) -> LinkProfile:
    """The :class:`LinkProfile` described by parsed ``wan-emulator`` arguments."""
    return LinkProfile(
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        bandwidth_mbit=args.bandwidth_mbit or None,
        stall_seconds=args.stall_seconds,
        stall_close=args.stall_close,
        fault_paths=args.fault_paths,
        fault_methods=frozenset(m.strip() for m in args.fault_methods.split(",") if m.strip()),
        seed=args.seed,
        **{kind: getattr(args, kind) for kind in FAULT_KINDS},
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run the emulator until SIGINT/SIGTERM, print the counters; exit status."""
    try:
        profile = profile_from_args(args)
    except ValueError as exc:
        print(f"wan-emulator: error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args.listen, args.upstream, profile))


async def _serve(listen: tuple[str, int], upstream: tuple[str, int], profile: LinkProfile) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        emu = WanEmulator(upstream[0], upstream[1], profile, listen[0], listen[1])
        try:
            await emu.start()
        except OSError as exc:
            print(f"wan-emulator: error: cannot listen on {listen[0]}:{listen[1]}: {exc}",
                  file=sys.stderr)
            return 1
        try:
            rates = " ".join(f"{k}={v:g}" for k, v in profile.fault_rates().items())
            print(
                f"wan-emulator: listening on {listen[0]}:{emu.port} -> {upstream[0]}:{upstream[1]}"
                f" latency_ms={profile.latency_ms:g} bandwidth_mbit={profile.bandwidth_mbit}"
                f" faults: {rates or 'none'}",
                flush=True,
            )
            await stop.wait()
        finally:
            await emu.stop()
        print(f"wan-emulator: {emu.stats.summary()}", flush=True)
        return 0
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)

