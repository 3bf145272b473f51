"""Idle keep-alive connections cannot take the viewer port's descriptors: a real
``dicomcache serve`` (with a small ``RLIMIT_NOFILE``, as a busy host would reach
``LimitNOFILE``) in front of the real Orthanc, real TCP clients from distinct loopback
addresses (Linux routes all of 127.0.0.0/8 to the loopback interface)."""

from __future__ import annotations

import errno
import http.client
import re
import resource
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomcache.devtools.orthanc import OrthancProcess, free_ports, loopback_env
from tests.conftest import eventually_sync, serve_config, start_dicomcache

pytestmark = pytest.mark.blocking_allowed(reason="synchronous tests of a daemon process")

#: The daemon's descriptor limit in these tests (the unit's LimitNOFILE is 65536).
NOFILE = 200
#: The default of server.max_connections_per_client.
PER_CLIENT = 64


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def get(self, path: str, source: str, timeout: float = 20.0) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout,
                                          source_address=(source, 0))
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _nofile() -> None:  # in the child, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture
def daemon(tmp_path: Path, orthanc: OrthancProcess,
           processes: list[subprocess.Popen[bytes]]) -> Daemon:
    (port,) = free_ports(1)
    cfg = serve_config(tmp_path / "c.toml", port, orthanc.url, orthanc)
    log = tmp_path / "serve.log"
    processes.append(start_dicomcache(["serve", "--config", str(cfg)], log, port,
                                      env=loopback_env(), preexec_fn=_nofile))
    return Daemon(processes[-1], port, log)


def open_idle(port: int, source: str, count: int) -> list[socket.socket]:
    """``count`` connections from ``source`` that never send a request."""
    opened: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        opened.append(sock)
    return opened


def still_open(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock``'s other end (no FIN or RST seen)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            return False
        raise


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_one_client_cannot_hold_the_descriptors_with_idle_connections(
        daemon: Daemon) -> None:
    """One address opens 240 connections and sends nothing (on the daemon's 200
    descriptors): it keeps at most the per-client bound (its longest idle ones are
    closed as new ones come), and another viewer is still served."""
    greedy = open_idle(daemon.port, "127.0.0.2", 240)
    try:
        status, _ = daemon.get("/healthz", "127.0.0.3")
        assert status == 200
        eventually_sync(lambda: sum(map(still_open, greedy)) == PER_CLIENT, timeout=30,
                        what=f"127.0.0.2 down to {PER_CLIENT} open connections")
        assert all(still_open(s) for s in greedy[-PER_CLIENT:])  # the newest kept
        # The greedy client is still served itself (its longest idle one makes room).
        assert daemon.get("/healthz", "127.0.0.2")[0] == 200
        _, metrics = daemon.get("/metrics", "127.0.0.3")
        assert metric(metrics, "dicomcache_client_limited_total",
                      limit="connections") >= 240 - PER_CLIENT
        lines = [line for line in daemon.log_text().splitlines()
                 if "127.0.0.2" in line and "max_connections_per_client" in line]
        assert len(lines) == 1, lines  # once a minute per client
    finally:
        for sock in greedy:
            sock.close()


def test_out_of_descriptors_the_longest_idle_connection_makes_room(daemon: Daemon) -> None:
    """Four addresses, each within its bound, hold 240 idle connections together: when
    accept() finds no descriptor left, the longest idle connection is closed and the new
    viewer is served; said once, without a traceback per attempt."""
    idle: list[socket.socket] = []
    try:
        for n in range(4):
            idle += open_idle(daemon.port, f"127.0.0.{10 + n}", 60)
        for _ in range(3):
            status, _ = daemon.get("/healthz", "127.0.0.3")
            assert status == 200
        assert not still_open(idle[0])  # the longest idle made room
        text = daemon.log_text()
        assert "Traceback" not in text
        assert len(re.findall("out of descriptors", text)) == 1, text
    finally:
        for sock in idle:
            sock.close()
