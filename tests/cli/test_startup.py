"""dicomcache.cli.startup: what stops ``serve`` before it listens, as one clear line.

The daemon runs as a process (as systemd runs it); a port held by another
program, a file where the cache directory should be and a configuration without
an Orthanc each give exit 2, one line naming the key, and no "listening" line, no
traceback, no demo Orthanc.  A cache directory that cannot be written (a real
read-only tmpfs) is only a warning: serve starts with its cache degraded.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomcache.cli.startup import directory_problem, min_free_warning, size_warning
from dicomcache.devtools.orthanc import free_port, loopback_env
from tests.conftest import tmpfs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A real read-only file system (tmpfs mounted ro)."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as where:
        yield where


def test_directory_problem(tmp_path: Path, read_only: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert directory_problem(tmp_path) is None
    assert directory_problem(tmp_path / "new" / "cache") is None  # created at start
    assert "is not a directory" in str(directory_problem(tmp_path / "file"))
    assert "is not a directory" in str(directory_problem(tmp_path / "file" / "cache"))
    assert "read-only" in str(directory_problem(read_only))
    assert f"create {read_only / 'cache'} in {read_only}" in str(
        directory_problem(read_only / "cache"))


def _config(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(textwrap.dedent(body))
    return cfg


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomcache", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=loopback_env(),
                          check=False)


def _refused(done: subprocess.CompletedProcess[str], key: str, text: str) -> None:
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f": {key}: " in lines[0] and text in lines[0], out
    assert "listening" not in out and "Traceback" not in out
    assert "Demo ready" not in out and "starting a local demo" not in out


@pytest.mark.parametrize("which", ["port", "admin_port"])
def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path, which: str) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    ports = {"port": free_port(), "admin_port": free_port(), which: taken}
    cfg = _config(tmp_path, f"""
        [server]
        port = {ports["port"]}
        admin_port = {ports["admin_port"]}
        [upstream]
        url = "http://127.0.0.1:9"
        [cache]
        directory = "{tmp_path / 'cache'}"
    """)
    try:
        _refused(_run("serve", "--config", str(cfg)), f"server.{which}",
                 f"cannot listen on 127.0.0.1:{taken}: Address already in use")
    finally:
        holder.close()
    assert not (tmp_path / "cache").exists()  # nothing started


def test_a_read_only_cache_directory_is_a_warning_not_a_refusal(
        tmp_path: Path, read_only: Path) -> None:
    """serve starts with its cache degraded (tests/cli/test_serve_degraded.py), so the
    unit's ExecStartPre (check-config) must let it: a warning naming the key, exit 0."""
    cfg = _config(tmp_path, f"""
        [server]
        port = {free_port()}
        [upstream]
        url = "http://127.0.0.1:9"
        [cache]
        directory = "{read_only / 'cache'}"
        min_free = 0
    """)
    checked = _run("check-config", "--config", str(cfg))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    [warning] = [line for line in checked.stderr.splitlines() if "cache.directory" in line]
    assert "read-only" in warning and "cache degraded" in warning
    assert "Traceback" not in checked.stderr


def test_a_file_for_a_cache_directory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    cfg = _config(tmp_path, f"""
        [server]
        port = {free_port()}
        [upstream]
        url = "http://127.0.0.1:9"
        [cache]
        directory = "{tmp_path / 'file' / 'cache'}"
    """)
    for command in ("serve", "check-config"):
        _refused(_run(command, "--config", str(cfg)), "cache.directory", "is not a directory")


def test_a_config_without_an_orthanc_never_starts_the_demo(tmp_path: Path) -> None:
    """One commented-out url must not put a fake patient in front of a clinic."""
    cfg = _config(tmp_path, f"""
        [server]
        port = {free_port()}
        [cache]
        directory = "{tmp_path / 'cache'}"
    """)
    for command in ("serve", "check-config"):
        _refused(_run(command, "--config", str(cfg)), "upstream.url", "required")


def test_a_max_size_beyond_the_file_system_is_warned_about(tmp_path: Path,
                                                          read_only: Path) -> None:
    """A real 1 MiB tmpfs (the read_only fixture's): 2 MiB cannot fit, 512 KiB can."""
    assert "larger than the file system" in str(size_warning(read_only / "cache", 2 << 20))
    assert size_warning(read_only / "cache", 512 << 10) is None
    cfg = _config(tmp_path, f"""
        [upstream]
        url = "http://127.0.0.1:9"
        [cache]
        directory = "{tmp_path / 'cache'}"
        max_size = "1000TB"
    """)
    checked = _run("check-config", "--config", str(cfg))
    assert checked.returncode == 0  # a warning: it still runs, and says so
    assert "cache.max_size (" in checked.stderr and "larger than the file system" in checked.stderr


def test_a_min_free_the_file_system_cannot_meet_is_warned_about(tmp_path: Path,
                                                              read_only: Path) -> None:
    """The read_only fixture's real 1 MiB tmpfs: min_free 2 MiB can never be met; 512 KiB
    can (it is empty); a guard of 0 is off."""
    assert "not smaller than the file system" in str(min_free_warning(read_only, 2 << 20))
    assert min_free_warning(read_only, 512 << 10) is None
    assert min_free_warning(read_only, 0) is None
    cfg = _config(tmp_path, f"""
        [upstream]
        url = "http://127.0.0.1:9"
        [cache]
        directory = "{tmp_path / 'cache'}"
        min_free = "1000TB"
    """)
    checked = _run("check-config", "--config", str(cfg))
    assert checked.returncode == 0  # a warning: it still runs (degraded), and says so
    assert "cache.min_free (" in checked.stderr and "nothing would ever be cached" in \
        checked.stderr
