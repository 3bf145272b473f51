"""Real peers for the relay tests: DCMTK storescu/storescp, Orthanc, the relay itself.

Everything listens on 127.0.0.1 (DCMTK and Orthanc through the bind-to-loopback
shim of ``loopback_env()``), on free ports, in temp dirs; every process is
started here and stopped by PID in teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import shutil
import signal
import sqlite3
import subprocess
import textwrap
import threading
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomcache.config import DestinationSettings, RelaySettings
from dicomcache.devtools.orthanc import OrthancProcess, free_port, loopback_env
from dicomcache.dicom import syntaxes
from dicomcache.metrics import Metrics
from dicomcache.relay import accel
from dicomcache.relay.service import Relay

# dicomcache as a process (start_dicomcache, run_dicomcache, stop_process, wait_port, the
# ``processes`` fixture) lives in tests/conftest.py, one way for every test; re-exported
# here, where the relay tests import it from.
from tests.conftest import eventually, eventually_sync, stop_process, tmpfs, wait_port
from tests.conftest import run_dicomcache as run_dicomcache
from tests.conftest import start_dicomcache as start_dicomcache


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a relay test taking more than a few seconds")


HAVE_DCMTK = shutil.which("storescp") is not None and shutil.which("storescu") is not None
needs_dcmtk = pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK (storescu/storescp) not installed")

#: One pydicom test file per source transfer syntax (name, file).
SOURCE_FILES: dict[str, str] = {
    syntaxes.IMPLICIT_LE: "MR_small_implicit.dcm",
    syntaxes.EXPLICIT_LE: "CT_small.dcm",
    syntaxes.EXPLICIT_BE: "MR_small_bigendian.dcm",
    syntaxes.DEFLATED_LE: "image_dfl.dcm",
    syntaxes.RLE_LOSSLESS: "MR_small_RLE.dcm",
    syntaxes.JPEG_BASELINE: "SC_rgb_jpeg_dcmtk.dcm",
    syntaxes.JPEG_EXTENDED: "JPGExtended.dcm",
    syntaxes.JPEG_LOSSLESS_SV1: "SC_rgb_jpeg_gdcm.dcm",
    syntaxes.JPEG_LS_LOSSLESS: "MR_small_jpeg_ls_lossless.dcm",
    syntaxes.JPEG_LS_NEAR_LOSSLESS: "(generated: MR_small.dcm, near-lossless)",
    syntaxes.JPEG_2000_LOSSLESS: "MR_small_jp2klossless.dcm",
    syntaxes.JPEG_2000: "JPEG2000.dcm",
}

#: storescu option proposing (among others) the file's own syntax.
STORESCU_PROPOSE: dict[str, str] = {
    syntaxes.IMPLICIT_LE: "-xi", syntaxes.EXPLICIT_LE: "-xe", syntaxes.EXPLICIT_BE: "-xb",
    syntaxes.DEFLATED_LE: "-xd", syntaxes.RLE_LOSSLESS: "-xr", syntaxes.JPEG_BASELINE: "-xy",
    syntaxes.JPEG_EXTENDED: "-xx", syntaxes.JPEG_LOSSLESS_SV1: "-xs",
    syntaxes.JPEG_LS_LOSSLESS: "-xt", syntaxes.JPEG_LS_NEAR_LOSSLESS: "-xu",
    syntaxes.JPEG_2000_LOSSLESS: "-xv", syntaxes.JPEG_2000: "-xw",
}

#: SOP classes the restricted storescp profiles accept.
PROFILE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",      # CT
    "1.2.840.10008.5.1.4.1.1.4",      # MR
    "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.6.1",    # US
    "1.2.840.10008.5.1.4.1.1.2.1",    # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
)


def source_path(ts: str) -> Path:
    """A source file in ``ts``, with a SOP Instance UID of its own.

    pydicom's test files share UIDs (a PACS would overwrite one with the next)
    and its JPEG-LS near-lossless files have no Study Instance UID (a PACS
    refuses them): copies are made once, in the syntax they were in.
    """
    import tempfile

    out = Path(tempfile.gettempdir()) / "dicomcache-relay-tests" / f"source-{ts}.dcm"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if ts == syntaxes.JPEG_LS_NEAR_LOSSLESS:
        ds = read_quiet(Path(get_testdata_file("MR_small.dcm")))  # type: ignore[arg-type]
        ds.compress(syntaxes.JPEG_LS_NEAR_LOSSLESS, jls_error=3, generate_instance_uid=False)
        ds.LossyImageCompression = "01"
    else:
        ds = read_quiet(Path(get_testdata_file(SOURCE_FILES[ts])))  # type: ignore[arg-type]
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1234.{ts.replace('1.2.840.10008.', '')}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    assert str(read_quiet(tmp).file_meta.TransferSyntaxUID) == ts
    os.replace(tmp, out)
    return out


def read_quiet(path: Path | bytes) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(path, bytes):
            return pydicom.dcmread(io.BytesIO(path))
        return pydicom.dcmread(path)


def storescp_config(path: Path, syntaxes: tuple[str, ...]) -> Path:
    """A DCMTK association profile ``Restricted`` accepting only ``syntaxes``."""
    lines = ["[[TransferSyntaxes]]", "[Allowed]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(syntaxes, 1)]
    lines += ["[Echo]", "TransferSyntax1 = 1.2.840.10008.1.2",
              "[[PresentationContexts]]", "[RestrictedContexts]",
              "PresentationContext1 = 1.2.840.10008.1.1\\Echo"]
    lines += [f"PresentationContext{i} = {uid}\\Allowed"
              for i, uid in enumerate(PROFILE_SOP_CLASSES, 2)]
    lines += ["[[Profiles]]", "[Restricted]", "PresentationContexts = RestrictedContexts", ""]
    path.write_text("\n".join(lines))
    return path


@dataclass
class StoreSCP:
    """A running DCMTK storescp: the PACS."""

    port: int
    aet: str
    directory: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self) -> StoreSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = self.directory.parent / f"storescp-{self.port}.log"
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                ["storescp", "-aet", self.aet, "-od", str(self.directory), *self.args,
                 str(self.port)], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=loopback_env(), start_new_session=True)
        wait_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def destination(self, name: str, **kw: Any) -> DestinationSettings:
        return DestinationSettings(name=name, remote_ae_title=self.aet, remote_host="127.0.0.1",
                                   remote_port=self.port, **kw)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Factory: ``storescp(mode)`` with mode ``implicit``, ``explicit``, ``jpeg-lossless``,
    ``all`` or a tuple of syntaxes."""
    started: list[StoreSCP] = []

    def make(mode: str | tuple[str, ...] = "all", aet: str = "PACS", port: int | None = None
             ) -> StoreSCP:
        n = len(started)
        if mode == "implicit":
            args = ["+xi"]
        elif mode == "all":
            args = ["+xa"]
        else:
            named = {"explicit": (syntaxes.EXPLICIT_LE,),
                     "jpeg-lossless": (syntaxes.JPEG_LOSSLESS_SV1,)}
            chosen = named.get(mode, mode) if isinstance(mode, str) else mode
            cfg = storescp_config(tmp_path / f"storescp{n}.cfg", tuple(chosen))
            args = ["-xf", str(cfg), "Restricted"]
        scp = StoreSCP(port or free_port(), aet, tmp_path / f"pacs{n}", args)
        started.append(scp.start())
        return scp

    yield make
    for scp in started:
        scp.stop()


def storescu(files: list[Path], port: int, *, called: str = "DICOMCACHE",
             calling: str = "MODALITY", propose: str = "-xe", timeout: float = 120,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run storescu (the modality) against 127.0.0.1:port."""
    return subprocess.run(
        ["storescu", "-aet", calling, "-aec", called, propose, *extra, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, env=loopback_env(), timeout=timeout, check=False)


class CountingSCP:
    """A pynetdicom C-STORE SCP (this process) that counts what it stored."""

    def __init__(self) -> None:
        self.stored: list[str] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="COUNT")
        ae.add_supported_context(CTImageStorage, [syntaxes.EXPLICIT_LE, syntaxes.IMPLICIT_LE])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    def destination(self) -> DestinationSettings:
        return DestinationSettings(name="COUNT", remote_ae_title="COUNT",
                                   remote_host="127.0.0.1", remote_port=self.port)

    def stop(self) -> None:
        self.server.shutdown()


def relay_settings(spool: Path, destinations: list[DestinationSettings], **kw: Any
                   ) -> RelaySettings:
    base = RelaySettings(enabled=True, ae_title="DICOMCACHE", host="127.0.0.1", port=0,
                         spool_directory=spool, retry_backoff_base=0.2, retry_backoff_max=1.0,
                         timeout=15.0, destinations=tuple(destinations))
    return replace(base, **kw)


@pytest.fixture(params=[True, False], ids=["accel", "plain"])
def accelerate(request: pytest.FixtureRequest) -> Iterator[bool]:
    """The DIMSE path both ways: with ``relay/accel/`` installed, and pynetdicom as
    published (``[relay] accelerate``).  :func:`relay_factory` gives its relays the
    same setting (their forwarder process installs it from there)."""
    if request.param:
        accel.install()
    else:
        accel.uninstall()
    yield bool(request.param)
    accel.uninstall()


@dataclass
class RunningRelay:
    relay: Relay
    metrics: Metrics
    settings: RelaySettings

    @property
    def port(self) -> int:
        return self.relay.port


@pytest.fixture
async def relay_factory(accelerate: bool) -> AsyncIterator[Callable[..., Any]]:
    """``await relay_factory(settings)`` → a started in-process relay, stopped at teardown;
    its settings get the test's ``accelerate``."""
    running: list[Relay] = []

    async def make(settings: RelaySettings, **kw: Any) -> RunningRelay:
        settings = replace(settings, accelerate=accelerate)
        metrics = Metrics()
        relay = Relay(settings, metrics, **kw)
        await relay.start()
        running.append(relay)
        assert accel.installed() is accelerate
        return RunningRelay(relay, metrics, settings)

    yield make
    for relay in running:
        await relay.stop(5.0)


async def wait_until(predicate: Callable[[], bool], seconds: float = 60.0,
                     what: str = "condition") -> None:
    """:func:`tests.conftest.eventually` for the relay's state, read in a thread (the spool
    is a database, never read on the event loop)."""
    await eventually(lambda: asyncio.to_thread(predicate), timeout=seconds, what=what)


def wait_until_sync(predicate: Callable[[], bool], seconds: float = 60.0,
                    what: str = "condition", *, poll: float = 0.05) -> None:
    """:func:`tests.conftest.eventually_sync` with the relay's longer default; an
    ``AssertionError`` when it times out (a test may expect the wait to fail)."""
    try:
        eventually_sync(predicate, timeout=seconds, interval=poll, what=what)
    except pytest.fail.Exception as exc:
        raise AssertionError(str(exc)) from None


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """A metric's current value from its registry (0 when never set)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def queue_depth(relay: Relay, name: str) -> int:
    return int(relay.spool.snapshot([name])["destinations"][name]["queue_depth"])


def content_hash(data: bytes) -> str:
    """SHA-256 of what a PACS keeps of an instance: its identity and its pixels (the
    PACS writes its own file meta and encoding around them)."""
    ds = read_quiet(data)
    h = hashlib.sha256()
    for part in (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        h.update(str(part).encode() + b"\0")
    h.update(bytes(ds.PixelData))
    return h.hexdigest()


def sop_uid(data: bytes) -> str:
    """The SOP Instance UID of an instance's bytes."""
    return str(read_quiet(data).SOPInstanceUID)


def sop_uids(files: list[Path]) -> set[str]:
    """The SOP Instance UIDs of the files a modality sends."""
    return {sop_uid(f.read_bytes()) for f in files}


def received(pacs_dir: Path, by: Callable[[bytes], str] = content_hash) -> Counter[str]:
    """What a PACS (a storescp's directory) received: how many copies of each instance,
    counted by ``by`` (:func:`content_hash`, or :func:`sop_uid`); none yet when the
    directory is not there."""
    if not pacs_dir.exists():
        return Counter()
    return Counter(by(p.read_bytes()) for p in pacs_dir.iterdir() if p.is_file())


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs (for a spool on a file system that fills up)."""
    with tmpfs(tmp_path / "small", "size=8m") as where:
        yield where


# --- dicomcache as a process of its own (`relay run`, `serve`), as an operator runs it ----
# (started, waited for and stopped by tests/conftest.py's helpers, imported above)


def daemon_config(tmp_path: Path, relay_port: int, pacs_port: int, *,
                  name: str = "relay.toml", backoff: tuple[float, float | None] = (0.2, 1.0),
                  relay_extra: str = "", serve: tuple[int, OrthancProcess] | None = None
                  ) -> Path:
    """The configuration file of a relay process: the relay on ``relay_port`` with one
    destination ``PACS`` (AE title PACS) on ``pacs_port``, the spool in ``tmp_path/spool``,
    the audit trail in ``tmp_path/audit``; ``backoff`` is (retry_backoff_base,
    retry_backoff_max), the latter left out when ``None``; ``relay_extra``: more lines of
    ``[relay]``.  ``serve``: (HTTP port, Orthanc) for ``dicomcache serve``, the cache in
    ``tmp_path/cache``."""
    base, most = backoff
    cache = "" if serve is None else textwrap.dedent(f"""\
        [server]
        port = {serve[0]}
        [upstream]
        url = "{serve[1].url}"
        username = "{serve[1].username}"
        password = "{serve[1].password}"
        [cache]
        directory = "{tmp_path / 'cache'}"
    """)
    text = (f'[audit]\nfile = "{tmp_path / "audit" / "audit.jsonl"}"\n{cache}'
            f'[relay]\nenabled = true\nport = {relay_port}\n'
            f'spool_directory = "{tmp_path / "spool"}"\nretry_backoff_base = {base}\n'
            + ("" if most is None else f"retry_backoff_max = {most}\n")
            + relay_extra.strip() + ("\n" if relay_extra.strip() else "")
            + '[[relay.destinations]]\nname = "PACS"\nremote_ae_title = "PACS"\n'
            f'remote_host = "127.0.0.1"\nremote_port = {pacs_port}\n')
    config = tmp_path / name
    config.write_text(text)
    return config


def children_now(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def children(pid: int) -> list[int]:
    """:func:`children_now`, waiting up to 20 s for one to appear."""
    with contextlib.suppress(AssertionError):
        wait_until_sync(lambda: bool(children_now(pid)), 20, "a child process")
    return children_now(pid)


def kill_9(proc: subprocess.Popen[bytes]) -> list[int]:
    """SIGKILL a relay the test started (by its PID) and wait until its forwarder process
    died with it (PR_SET_PDEATHSIG); returns the children it had."""
    had = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_until_sync(lambda: not any(Path(f"/proc/{c}").exists() for c in had), 10,
                    "the forwarder process to die with the relay (it outlived kill -9)")
    return had


def spool_row(spool: Path, sql: str, *params: object) -> tuple[Any, ...] | None:
    """One row of a relay process's spool database, read-only (``None``: no such row)."""
    with contextlib.closing(sqlite3.connect(f"file:{spool / 'state.sqlite'}?mode=ro",
                                            uri=True)) as db:
        row: tuple[Any, ...] | None = db.execute(sql, params).fetchone()
    return row


def pending(spool: Path) -> int:
    """Deliveries still waiting in a relay process's spool."""
    row = spool_row(spool, "SELECT COUNT(*) FROM deliveries WHERE state='pending'")
    assert row is not None
    return int(row[0])
