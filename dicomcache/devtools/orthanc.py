"""Run a real Orthanc as a plain child process on 127.0.0.1.

Used by ``dicomcache serve`` when no upstream is configured (the demo), by the
test fixtures and by the benchmarks.  Never uses systemd.

Orthanc 1.10 (and DCMTK 3.6.7) cannot choose a listen address: they bind every
interface.  A dozen lines of C preloaded with ``LD_PRELOAD`` rewrite wildcard
``bind()`` calls to loopback, so nothing we start is reachable from the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/socket.h>
/* Rewrite bind() on a wildcard address to the loopback address. */
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in a; memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real(fd, (const struct sockaddr *)&a, sizeof a);
        }
    }
    if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a; memcpy(&a, addr, sizeof a);
        if (memcmp(&a.sin6_addr, &in6addr_any, sizeof a.sin6_addr) == 0) {
            a.sin6_addr = in6addr_loopback;
            return real(fd, (const struct sockaddr *)&a, sizeof a);
        }
    }
    return real(fd, addr, len);
}
"""


def loopback_shim() -> Path | None:
    """Build (once, cached by source hash) the bind-to-loopback preload library.

    Returns ``None`` (and logs why) when no C compiler is available; the caller
    then still talks to 127.0.0.1 only, but the child binds every interface.
    """
    digest = hashlib.sha256(_SHIM_SOURCE.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dicomcache"
    lib = cache / f"bind-loopback-{digest}.so"
    if lib.exists():
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler: child servers will bind all interfaces, not only loopback")
        return None
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "shim.c"
        src.write_text(_SHIM_SOURCE)
        out = Path(tmp) / "shim.so"
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
                       check=True, capture_output=True)
        os.replace(out, lib)  # atomic: concurrent builders never see half a file
    return lib


def loopback_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child that must listen on loopback only (plus TCP_NODELAY for DCMTK)."""
    env = dict(os.environ if base is None else base)
    shim = loopback_shim()
    if shim is not None:
        env["LD_PRELOAD"] = f"{shim} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(shim)
    env.setdefault("TCP_NODELAY", "1")  # DCMTK stalls ~40 ms per message on Nagle otherwise
    return env


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (for children that cannot report theirs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` different free ports (two :func:`free_port` calls may return the same one:
    each socket is closed before the next is bound)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_http(url: str, timeout: float = 30) -> None:
    """Poll ``url`` until it answers (any status) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


class OrthancProcess:
    """A real Orthanc with its own temp storage, on loopback ports.

    ``overrides`` are merged into the generated JSON configuration (e.g.
    ``{"AcceptedTransferSyntaxes": [...]}`` or ``{"HttpCompressionEnabled": False}``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        username: str = "orthanc",
        password: str = "orthanc-test",
        dicom: bool = False,
        aet: str = "ORTHANC",
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.username = username
        self.password = password
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port() if dicom else 0
        self.dicom = dicom
        self.overrides = overrides or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def auth_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": "dicomcache-orthanc",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomServerEnabled": self.dicom,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port or 4242,
            "Plugins": [DICOMWEB_PLUGIN] if Path(DICOMWEB_PLUGIN).exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 2,
            "ConcurrentJobs": 2,
            "HttpThreadsCount": 50,
        }
        cfg.update(self.overrides)
        return cfg

    def start(self, timeout: float = 60.0) -> None:
        if not Path(ORTHANC_BINARY).exists():
            raise RuntimeError(f"{ORTHANC_BINARY} not found: install the Debian packages "
                               "orthanc and orthanc-dicomweb")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "orthanc.json"
        # It holds the Orthanc password: readable by its owner only.
        cfg_path.unlink(missing_ok=True)
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.config(), indent=2))
        logf = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [ORTHANC_BINARY, str(cfg_path)], stdout=logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=loopback_env(), start_new_session=True)
        logf.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.workdir / "orthanc.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{tail}")
            try:
                self.request("GET", "/system", timeout=2)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.05)
        raise RuntimeError(f"Orthanc did not answer /system within {timeout} s")

    def stop(self) -> None:
        """Stop the child we started (by PID), waiting for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def request(self, method: str, path: str, body: bytes | None = None, *,
                timeout: float = 60, headers: dict[str, str] | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Authorization", self.auth_header)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()  # type: ignore[no-any-return]

    def json(self, method: str, path: str, body: bytes | None = None) -> Any:
        return json.loads(self.request(method, path, body))

    def upload(self, blobs: Iterable[bytes]) -> list[str]:
        """POST each Part-10 file to ``/instances``; returns the Orthanc instance IDs."""
        ids = []
        for blob in blobs:
            answer = json.loads(self.request("POST", "/instances", blob))
            ids.append(str(answer["ID"]))
        return ids

    def __enter__(self) -> OrthancProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
