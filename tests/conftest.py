"""Shared fixtures: a real Orthanc with generated instances, settings factories, and
blockbuster watching the event loop in every test; the one bounded-polling helper
(:func:`eventually`, :func:`eventually_sync`) and :func:`metric_value`; dicomcache as a
process of its own (:func:`serve_config`, :func:`start_dicomcache`, :func:`stop_process`,
the ``processes`` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicomcache.config import AuditSettings, Settings, from_dict
from dicomcache.devtools import tomlfile
from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.metrics import Metrics


@dataclasses.dataclass(frozen=True)
class Sample:
    """One instance uploaded to the session's Orthanc."""

    orthanc_id: str
    sop: str
    study: str
    series: str
    syntax: str
    data: bytes


#: (label, transfer syntax, extra make_ct_series arguments)
SAMPLE_SYNTAXES: list[tuple[str, str, dict[str, Any]]] = [
    ("explicit", ExplicitVRLittleEndian, {}),
    ("implicit", ImplicitVRLittleEndian, {}),
    ("bigendian", ExplicitVRBigEndian, {}),
    ("deflated", DeflatedExplicitVRLittleEndian, {}),
    ("rle", RLELossless, {}),
    ("jpegls", JPEGLSLossless, {}),
    ("j2k", JPEG2000Lossless, {}),
    ("multiframe", ExplicitVRLittleEndian, {"frames": 4}),
]


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """A real Orthanc (with the DICOMweb plugin) on a free loopback port."""
    proc = OrthancProcess(tmp_path_factory.mktemp("orthanc"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def samples(orthanc: OrthancProcess) -> dict[str, list[Sample]]:
    """Small generated series, one per transfer syntax, uploaded to Orthanc."""
    out: dict[str, list[Sample]] = {}
    for i, (label, syntax, extra) in enumerate(SAMPLE_SYNTAXES):
        datasets = make_ct_series(3, rows=64, columns=64, transfer_syntax=syntax, seed=i,
                                  patient_id=f"P{label.upper()}", **extra)
        blobs = [encode(ds, syntax) for ds in datasets]
        ids = orthanc.upload(blobs)
        out[label] = [Sample(oid, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                             str(ds.SeriesInstanceUID), syntax, blob)
                      for oid, ds, blob in zip(ids, datasets, blobs, strict=True)]
    return out


@pytest.fixture(scope="session")
def ct_series(orthanc: OrthancProcess) -> list[Sample]:
    """A 12-slice 512×512 CT (512 KiB per slice) for size and coalescing tests."""
    datasets = make_ct_series(12, seed=99, patient_id="PBIG")
    blobs = [encode(ds, ExplicitVRLittleEndian) for ds in datasets]
    ids = orthanc.upload(blobs)
    return [Sample(oid, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                   str(ds.SeriesInstanceUID), ExplicitVRLittleEndian, blob)
            for oid, ds, blob in zip(ids, datasets, blobs, strict=True)]


SettingsFactory = Callable[..., Settings]


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real tmpfs at ``where`` (``options``: ``size=1m``, ``ro``…), unmounted afterwards.
    Mounting needs root, as the suite runs (``./run test``, CI); skipped otherwise."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on ``directory``'s file system."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def fill_filesystem(directory: Path, leave: int = 0) -> Path:
    """Another program fills ``directory``'s file system, up to ``leave`` bytes free;
    the filler file (delete it to free the space).

    Unbuffered writes no larger than the room left, so ENOSPC, if it comes, ends the
    fill and is never raised later by a close() flushing a buffer (it once failed a
    test that way)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(1 << 16):  # bounded: a test's small tmpfs fills long before
            room = free_bytes(directory) - leave
            if room <= 0:
                break
            try:
                os.write(fd, bytes(min(1 << 16, max(512, room))))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    assert free_bytes(directory) <= max(leave, 4096), "the file system did not fill"
    return filler


async def eventually(predicate: Callable[[], object | Awaitable[object]], *,
                     timeout: float = 10.0, interval: float = 0.02,
                     what: str = "condition") -> Any:
    """Poll ``predicate()`` until its result (awaited if awaitable) is truthy; return it.

    For state nothing announces (a counter at the emulator, a breaker's state, an
    HTTP answer).  Fails the test, naming ``what``, once ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"waited {timeout} s for: {what}")
        await asyncio.sleep(interval)


def eventually_sync(predicate: Callable[[], object], *, timeout: float = 10.0,
                    interval: float = 0.05, what: str = "condition") -> Any:
    """:func:`eventually` for synchronous tests (never on the event loop)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"waited {timeout} s for: {what}")
        time.sleep(interval)


def metric_value(metrics: Metrics, name: str, **labels: str) -> float:
    """The value of one exported sample (``dicomcache_…`` name, every label given).

    Read through the registry's public ``get_sample_value``; a sample that does not
    exist fails the test rather than comparing as ``None``.
    """
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


@pytest.fixture
async def wan(orthanc: OrthancProcess) -> AsyncIterator[WanEmulator]:
    """The WAN emulator (fault injector) in front of the session Orthanc; no faults yet."""
    async with WanEmulator("127.0.0.1", orthanc.http_port, LinkProfile()) as emulator:
        yield emulator


@pytest.fixture(scope="session", autouse=True)
def no_system_audit_trail() -> Iterator[None]:
    """Tests give every daemon and command an audit file of their own: none may write
    the system's default one (/var/log/dicomcache, which root could create)."""
    default = AuditSettings().file.parent
    existed = default.exists()
    yield
    assert existed or not default.exists(), f"a test wrote the default audit trail {default}"


@pytest.fixture(autouse=True)
def no_blocking(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail on blocking calls (disk, sqlite, sockets) that dicomcache makes on the event loop.

    On for every test, as aiohttp's own suite does (blockbuster).  A test that must
    block on purpose says why: ``@pytest.mark.blocking_allowed(reason="…")``.
    """
    marker = request.node.get_closest_marker("blocking_allowed")
    if marker is not None:
        assert marker.kwargs.get("reason"), "blocking_allowed needs a reason="
        yield
        return
    from blockbuster import blockbuster_ctx

    # The product is watched; devtools (the WAN emulator, sample data, the test Orthanc)
    # is the tests' own tooling, which sets up a test before the loop matters.
    with blockbuster_ctx("dicomcache", excluded_modules=["dicomcache.devtools"]) as bb:
        # /proc reads for process_* metrics: a virtual file system, never disk I/O.
        for func in ("io.BufferedReader.read", "io.TextIOWrapper.read", "io.FileIO.read",
                     "os.stat", "io.open", "os.listdir", "os.scandir"):
            if func in bb.functions:
                bb.functions[func].can_block_in("prometheus_client/process_collector.py",
                                                {"collect", "_boot_time", "__init__"})
        yield


@pytest.fixture
def make_settings(tmp_path: Path, orthanc: OrthancProcess) -> SettingsFactory:
    """Build Settings pointing at the session Orthanc (or ``url``), cache in tmp_path."""

    def factory(url: str | None = None, **sections: dict[str, Any]) -> Settings:
        data: dict[str, Any] = {
            "upstream": {"url": url or orthanc.url, "username": orthanc.username,
                         "password": orthanc.password, "connect_timeout": 2,
                         "read_timeout": 5, "retries": 3, "backoff_base": 0.01,
                         "backoff_max": 0.05},
            "cache": {"directory": str(tmp_path / "cache"), "max_size": "1GiB",
                      "confirm_interval": 0},
            # Background prefetch, the change feed and the confirmation of series in use
            # would add upstream requests that tests count; their own tests turn them on.
            "prefetch": {"mode": "off"},
            "changes": {"enabled": False},
            "audit": {"file": str(tmp_path / "audit" / "audit.jsonl")},
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        return from_dict(data)

    return factory


# --- dicomcache as a process of its own (`serve`, `relay run`…), as an operator runs it ---
ROOT = Path(__file__).resolve().parents[1]


class Login(Protocol):
    """Orthanc's login (``OrthancProcess`` has it)."""

    username: str
    password: str


def serve_config(path: Path, port: int, url: str, login: Login, /,
                 **sections: Mapping[str, object] | None) -> Path:
    """Write the configuration of a ``dicomcache serve`` a test starts, to ``path``.

    The defaults: the viewer port on 127.0.0.1:``port``; the upstream at ``url`` (the
    session Orthanc's or a WAN emulator's) with Orthanc's ``login``; the cache in
    ``path.parent/cache``; prefetch and the change feed off (background requests a test
    would not expect); the audit trail in ``path.parent/audit/audit.jsonl`` (never the
    system's).  ``sections`` add or override keys, section by section; a key or a whole
    section given as ``None`` is left out (the daemon's own default)."""
    settings: dict[str, dict[str, object]] = {
        "server": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": url, "username": login.username,
                     "password": login.password},
        "cache": {"directory": str(path.parent / "cache")},
        "prefetch": {"mode": "off"},
        "changes": {"enabled": False},
        "audit": {"file": str(path.parent / "audit" / "audit.jsonl")},
    }
    for name, keys in sections.items():
        if keys is None:
            settings.pop(name, None)
        else:
            settings[name] = {**settings.get(name, {}), **keys}
    path.write_text(tomlfile.dumps(settings))
    return path


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _answers_healthz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:  # not listening yet, or not answering yet
        return False


def _alive(proc: subprocess.Popen[bytes] | None, waiting_for: str) -> None:
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"process exited with {proc.returncode} before {waiting_for}")


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None,
              timeout: float = 20.0) -> None:
    """Wait until something listens on 127.0.0.1:``port`` (``proc``: fail if it exits)."""

    def ready() -> bool:
        _alive(proc, "listening")
        return _listening(port)

    eventually_sync(ready, timeout=timeout, what=f"a listener on port {port}")


def wait_healthz(port: int, proc: subprocess.Popen[bytes] | None = None,
                 timeout: float = 60.0) -> None:
    """Wait until ``http://127.0.0.1:port/healthz`` answers 200 (``proc``: fail if it
    exits): the daemon serves, not only listens (it binds its ports before it starts)."""

    def ready() -> bool:
        _alive(proc, "answering")
        return _answers_healthz(port)

    eventually_sync(ready, timeout=timeout, what=f"dicomcache answering on port {port}")


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                 timeout: float = 15) -> None:
    """Stop a process the test started, by its PID: ``sig``, SIGKILL after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_dicomcache(args: list[str], log: Path, *listening: int, healthz: int | None = None,
                     timeout: float = 60, env: Mapping[str, str] | None = None,
                     preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """``python -m dicomcache ARGS`` in a session of its own, its output appended to
    ``log``; returns once it listens on every port of ``listening`` and, with ``healthz``,
    once that HTTP port answers ``/healthz`` (``timeout`` seconds for each).  ``env``: its
    environment (this one's by default); ``preexec_fn``: run in the child before exec
    (resource limits).  Stopped again, its log's end in the error, when it does not
    come up."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dicomcache", *args], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=env, preexec_fn=preexec_fn)
    try:
        for port in listening:
            wait_port(port, proc, timeout=timeout)
        if healthz is not None:
            wait_healthz(healthz, proc, timeout=timeout)
    except BaseException as exc:
        stop_process(proc)
        exc.add_note(f"{log}:\n{log.read_text(errors='replace')[-3000:]}")
        raise
    return proc


def run_dicomcache(*args: str, timeout: float = 120, check: bool = False
                   ) -> subprocess.CompletedProcess[str]:
    """A ``dicomcache`` command as an operator runs it (its output captured)."""
    return subprocess.run([sys.executable, "-m", "dicomcache", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The processes a test started (it appends them): stopped by PID at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        stop_process(proc)
