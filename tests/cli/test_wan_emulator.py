"""``dicomcache wan-emulator``: arguments, and a run until SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from dicomcache.cli import wan_emulator
from dicomcache.devtools.wanem import LinkProfile
from tests.devtools.test_wanem import SMALL, upstream_server

ROOT = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomcache")
    wan_emulator.add_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_arguments_to_profile() -> None:
    args = build_parser().parse_args(
        ["wan-emulator", "--upstream", "127.0.0.1:8042", "--latency-ms", "40",
         "--bandwidth-mbit", "50", "--truncate-lying", "0.05", "--status-503", "0.1",
         "--fault-paths", "^/instances/", "--fault-methods", "get,head", "--seed", "3",
         "--stall-seconds", "2"]
    )
    assert args.func is wan_emulator.run_cli
    assert args.listen == ("127.0.0.1", 9042) and args.upstream == ("127.0.0.1", 8042)
    assert wan_emulator.profile_from_args(args) == LinkProfile(
        latency_ms=40, bandwidth_mbit=50, truncate_lying=0.05, status_503=0.1,
        fault_paths="^/instances/", fault_methods=frozenset({"GET", "HEAD"}), seed=3,
        stall_seconds=2,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--upstream", "nowhere"],
        ["--upstream", "127.0.0.1:1", "--reset", "2"],
        ["--upstream", "127.0.0.1:1", "--latency-ms", "-5"],
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["wan-emulator", *argv])


def test_cli_rejects_rates_over_one(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["wan-emulator", "--upstream", "127.0.0.1:1", "--reset", "0.7", "--corrupt", "0.7"]
    )
    assert args.func(args) == 2
    assert "add up to" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_cli_runs_until_signal() -> None:
    async with upstream_server() as up:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dicomcache", "wan-emulator",
            "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{up.port}",
            "--latency-ms", "1",
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            assert "listening on 127.0.0.1:" in line, line
            port = int(line.split("listening on 127.0.0.1:")[1].split()[0])
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://127.0.0.1:{port}/small") as resp:
                assert await resp.read() == SMALL
            proc.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(proc.communicate(), 10)
            assert proc.returncode == 0, err
            assert "requests=1 " in out.decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
