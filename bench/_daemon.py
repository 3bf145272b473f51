"""What the benchmarks do with ``dicomcache serve``: one way, here.

Each benchmark keeps its own measurement and command line; this module writes the
configuration (the benchmark defaults in one place: loopback, warnings only, no
per-client limits, the audit trail in the work directory), starts ``dicomcache
serve`` as a child process, waits until ``/healthz`` answers (bounded), stops only
the process it started, by its PID, and reads a process's resident memory and
descriptors for the benchmarks that sample them.

    settings = serve_settings(work, orthanc.url, orthanc, max_size="2GiB",
                              prefetch={"mode": "off"})
    with Daemon(work, settings) as daemon:
        ... daemon.base ...
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicomcache.devtools import tomlfile  # noqa: E402
from dicomcache.devtools.orthanc import free_port  # noqa: E402

#: ``[server]`` keys of every benchmark: many simulated viewers share one loopback
#: address, so the per-client limits (server.max_requests_per_client, client_rate,
#: max_connections_per_client; client_burst only matters with a rate) are off.
NO_CLIENT_LIMITS: dict[str, object] = {"max_requests_per_client": 0, "client_rate": 0,
                                     "max_connections_per_client": 0}

#: Seconds ``dicomcache serve`` gets to answer ``/healthz``, and to stop on SIGTERM.
READY_SECONDS = 60.0
STOP_SECONDS = 60.0

Settings = dict[str, dict[str, object]]


class Credentials(Protocol):
    """Orthanc's login (``OrthancProcess`` has it)."""

    username: str
    password: str


def serve_settings(workdir: Path, upstream_url: str, login: Credentials, *,
                   max_size: str | int, **sections: Mapping[str, object]) -> Settings:
    """The benchmark configuration of ``dicomcache serve`` (the port is the daemon's):
    the cache in ``workdir/cache``, the audit trail in ``workdir/audit.jsonl``;
    ``sections`` add or override keys, section by section."""
    settings: Settings = {
        "server": {"log_level": "WARNING", **NO_CLIENT_LIMITS},
        "upstream": {"url": upstream_url, "username": login.username,
                     "password": login.password},
        "cache": {"directory": str(workdir / "cache"), "max_size": max_size},
        "audit": {"file": str(workdir / "audit.jsonl")},
    }
    for name, keys in sections.items():
        settings.setdefault(name, {}).update(keys)
    return settings


def stop(proc: subprocess.Popen[bytes], timeout: float = STOP_SECONDS) -> None:
    """Stop a child this benchmark started: SIGTERM to its PID, SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Daemon:
    """``dicomcache serve`` as a child process on a free loopback port, restartable on
    the same configuration and cache.  Its stdout is dropped; its stderr goes to
    ``log`` (stdout too) when given, else to this process's stderr."""

    def __init__(self, workdir: Path, settings: Settings, *, config_name: str = "config.toml",
                 log: Path | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        server = {"host": "127.0.0.1", "port": self.port, **settings.get("server", {})}
        self.config = workdir / config_name
        self.config.write_text(tomlfile.dumps({**settings, "server": server}))
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until ``/healthz`` answers (at most ``READY_SECONDS``)."""
        with contextlib.ExitStack() as stack:
            out: int | IO[bytes] = subprocess.DEVNULL
            err: int | None = None
            if self.log is not None:
                out = stack.enter_context(self.log.open("ab"))
                err = subprocess.STDOUT
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomcache", "serve", "--config", str(self.config)],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        deadline = time.monotonic() + READY_SECONDS
        while True:
            try:
                urllib.request.urlopen(self.base + "/healthz", timeout=1).read()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    where = f": see {self.log}" if self.log else ""
                    raise RuntimeError(f"dicomcache did not start{where}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory in bytes (0 once it is gone): ``VmRSS`` (all),
    ``RssAnon`` (its own allocations) or ``RssFile`` (file pages it maps: reclaimable
    page cache)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descriptors(pid: int) -> int:
    """A process's open file descriptors (0 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@contextlib.contextmanager
def sampling(every: float, sample: Callable[[], None]) -> Iterator[None]:
    """Call ``sample`` every ``every`` seconds in a thread while the block runs (a thread:
    the measured work may keep this process's event loop busy)."""
    done = threading.Event()

    def run() -> None:
        while not done.wait(every):
            sample()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
