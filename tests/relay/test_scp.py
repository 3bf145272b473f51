"""The SCP's edge: statuses for bad input, full disk, allow-lists, C-ECHO, kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from dicomcache.config import DestinationSettings
from dicomcache.devtools.orthanc import free_port, loopback_env
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.dicom import syntaxes
from dicomcache.durable import write_durably
from dicomcache.relay.spool import Spool
from tests.conftest import tmpfs
from tests.relay.conftest import (
    daemon_config,
    kill_9,
    needs_dcmtk,
    relay_settings,
    sample,
    start_dicomcache,
    stop_process,
    storescu,
    wait_until_sync,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def raw_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set as it is, unparsed (see :func:`send_raw`)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def send_raw(port: int, path: Path, sop_class: str = MRImageStorage,
             ts: str = syntaxes.EXPLICIT_LE) -> int | None:
    """C-STORE the file's bytes as they are (no parsing): what a buggy modality does."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMCACHE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


def _relay_settings(tmp_path: Path, **kw: object):
    return relay_settings(tmp_path / "spool", [], **kw)


async def test_truncated_dataset_is_quarantined_with_0xC000(tmp_path: Path, relay_factory
                                                            ) -> None:
    r = await relay_factory(_relay_settings(tmp_path))
    bad = Path(get_testdata_file("MR_truncated.dcm"))  # type: ignore[arg-type]
    status = await asyncio.to_thread(send_raw, r.port, bad)
    assert status == 0xC000
    spool = tmp_path / "spool"
    reasons = list((spool / "quarantine").glob("*.reason.json"))
    assert len(reasons) == 1
    info = json.loads(reasons[0].read_text())
    assert info["status"] == "0xC000" and "declares 8192 bytes" in info["reason"]
    kept = reasons[0].with_name(reasons[0].name.replace(".reason.json", ".dcm"))
    assert kept.read_bytes()[132:] and kept.stat().st_size > 8000  # the bytes as received
    assert not list((spool / "objects").iterdir())
    assert sample(r.metrics, "dicomcache_relay_received_total", status="0xC000") == 1


async def test_sop_class_mismatch_gets_0xA900(tmp_path: Path, relay_factory) -> None:
    r = await relay_factory(_relay_settings(tmp_path))
    mr = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    # Announced as CT, but the data set says MR.
    ds = dcmread(mr)
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    path = tmp_path / "liar.dcm"
    ds.save_as(path)
    assert await asyncio.to_thread(send_raw, r.port, path, CTImageStorage) == 0xA900
    assert len(list((tmp_path / "spool" / "quarantine").glob("*.reason.json"))) == 1


async def test_sop_instance_mismatch_gets_0xA900(tmp_path: Path, relay_factory) -> None:
    r = await relay_factory(_relay_settings(tmp_path))
    mr = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    # Announced as one instance (the File Meta, sent as the request's UID), another inside.
    ds = dcmread(mr)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    path = tmp_path / "liar.dcm"
    ds.save_as(path)
    assert await asyncio.to_thread(send_raw, r.port, path) == 0xA900
    reasons = list((tmp_path / "spool" / "quarantine").glob("*.reason.json"))
    assert len(reasons) == 1
    assert "1.2.3.4.5.6.7" in reasons[0].read_text()
    assert not list((tmp_path / "spool" / "objects").iterdir())


async def test_disk_full_answers_0xA700_and_keeps_nothing(tmp_path: Path, relay_factory
                                                          ) -> None:
    """ENOSPC from the spool's write path (injected: the writer is a parameter)."""
    r = await relay_factory(_relay_settings(tmp_path))

    def full(final: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    spooled = r.relay.spool.writer
    r.relay.spool.writer = full
    good = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    assert await asyncio.to_thread(send_raw, r.port, good) == 0xA700
    r.relay.spool.writer = spooled
    assert await asyncio.to_thread(send_raw, r.port, good) == 0x0000


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (1 MiB of it the spool's reserve)."""
    with tmpfs(tmp_path / "tiny", "size=4m") as where:
        yield where


async def test_real_full_disk_answers_0xA700(tiny_tmpfs: Path, tmp_path: Path,
                                             relay_factory) -> None:
    # min_free = 0: no guard, the write itself meets the full disk.  The destination
    # listens nowhere, so everything acknowledged stays queued (with none, an instance
    # is finished on arrival and may be purged while the test counts files).
    nowhere = DestinationSettings(name="DOWN", remote_ae_title="DOWN",
                                  remote_host="127.0.0.1", remote_port=free_port())
    r = await relay_factory(relay_settings(tiny_tmpfs / "spool", [nowhere], min_free=0))
    files = write_series(make_ct_series(8, rows=512, columns=512, seed=5), tmp_path / "ct")
    statuses = [await asyncio.to_thread(send_raw, r.port, f, CTImageStorage) for f in files]
    assert statuses[0] == 0x0000  # 512 KiB fits …
    assert 0xA700 in statuses[1:]  # … 4 MiB of them do not: no false success
    # What was acknowledged is intact; no partial file is left behind.
    assert not list((tiny_tmpfs / "spool" / "incoming").iterdir())
    objects = list((tiny_tmpfs / "spool" / "objects").iterdir())
    assert len(objects) == statuses.count(0)


@needs_dcmtk
async def test_unknown_calling_ae_is_rejected(tmp_path: Path, relay_factory) -> None:
    r = await relay_factory(_relay_settings(tmp_path, allowed_calling_ae_titles=("CT_SCANNER",)))
    mr = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    res = await asyncio.to_thread(storescu, [mr], r.port, calling="INTRUDER")
    assert res.returncode != 0
    assert "Calling AE Title Not Recognized" in (res.stdout + res.stderr)
    ok = await asyncio.to_thread(storescu, [mr], r.port, calling="CT_SCANNER")
    assert ok.returncode == 0, ok.stderr
    assert sample(r.metrics, "dicomcache_relay_associations_total", direction="inbound",
                  outcome="rejected") == 1


@needs_dcmtk
async def test_host_not_allowed_is_rejected(tmp_path: Path, relay_factory) -> None:
    r = await relay_factory(_relay_settings(tmp_path, allowed_hosts=("10.9.9.0/24",)))
    mr = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    res = await asyncio.to_thread(storescu, [mr], r.port)
    assert res.returncode != 0
    assert "Association Rejected" in (res.stdout + res.stderr)


@needs_dcmtk
async def test_c_echo(tmp_path: Path, relay_factory) -> None:
    r = await relay_factory(_relay_settings(tmp_path))
    res = await asyncio.to_thread(
        subprocess.run, ["echoscu", "-aec", "DICOMCACHE", "127.0.0.1", str(r.port)],
        capture_output=True, text=True, env=loopback_env(), timeout=30, check=False)
    assert res.returncode == 0, res.stderr


@needs_dcmtk
@pytest.mark.slow
def test_kill_9_mid_burst_then_restart_delivers_every_acknowledged(tmp_path: Path, storescp,
                                                                   accelerate: bool) -> None:
    pacs_port = free_port()
    relay_port = free_port()
    config = daemon_config(tmp_path, relay_port, pacs_port,
                           relay_extra=f"accelerate = {str(accelerate).lower()}")
    series = make_ct_series(120, rows=256, columns=256, seed=9)
    files = write_series(series, tmp_path / "ct")
    log = tmp_path / "relay.log"
    relay_run = ["relay", "run", "--config", str(config)]
    proc = start_dicomcache(relay_run, log, relay_port)
    try:
        # The PACS is down: everything acknowledged stays in the spool.  Kill the relay
        # while storescu is in the middle of the burst.
        scu = subprocess.Popen(
            ["storescu", "-v", "-aet", "MODALITY", "-aec", "DICOMCACHE", "-xe", "127.0.0.1",
             str(relay_port), *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=loopback_env())
        objects = tmp_path / "spool" / "objects"
        with contextlib.suppress(AssertionError):  # (then storescu has finished: see below)
            wait_until_sync(lambda: objects.exists() and len(list(objects.iterdir())) >= 20,
                            30, "20 spooled instances", poll=0.01)
        # The forwarder process dies with it (PR_SET_PDEATHSIG): no stale forwarder
        # beside the next one.
        children = kill_9(proc)
        assert len(children) == 1, children  # the forwarder process
        out, _ = scu.communicate(timeout=60)
        acked = _acknowledged(out, files)
        assert 10 <= len(acked) < len(files), out[-2000:]
        # Restart with the PACS up: every acknowledged instance arrives, intact.
        pacs = storescp("all", port=pacs_port)
        proc = start_dicomcache(relay_run, log, relay_port)
        with contextlib.suppress(AssertionError):  # (what is missing is named below)
            wait_until_sync(lambda: len(pacs.files()) >= len(acked), 60, "every delivery")
        received = {}
        for f in pacs.files():
            ds = dcmread(f)
            received[str(ds.SOPInstanceUID)] = ds
        by_path = {str(p): ds for p, ds in zip(files, series, strict=True)}
        for path in acked:
            original = by_path[path]
            got = received.get(str(original.SOPInstanceUID))
            assert got is not None, f"acknowledged {path} was not delivered"
            assert got.PixelData == original.PixelData
    finally:
        stop_process(proc)
    assert "Traceback" not in log.read_text()


def _acknowledged(storescu_output: str, files: list[Path]) -> list[str]:
    """Files storescu got a success response for (its -v log pairs them in order)."""
    acked: list[str] = []
    current: str | None = None
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def test_restart_requeues_files_without_a_queue_entry(tmp_path: Path) -> None:
    """A crash between the fsync (acknowledged) and the database row loses nothing."""
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    ds = make_ct_series(1, rows=16, columns=16)[0]
    [path] = write_series([ds], tmp_path / "src")
    name = f"{time.time_ns():019d}-1-000001.dcm"
    write_durably(spool.objects / name, path.read_bytes(), temp_dir=spool.incoming)
    (spool.incoming / "half-written.part").write_bytes(b"junk")  # never acknowledged
    spool.close()
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    try:
        [item] = spool.next_batch("PACS", 10)
        assert item.sop_instance == ds.SOPInstanceUID
        assert not list(spool.incoming.iterdir())
    finally:
        spool.close()
