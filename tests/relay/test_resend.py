"""Re-sends and crashes end to end, counted at the receiving peer by content hash.

storescu (the modality) → the relay → storescp keeping every copy it receives
(``+uf``: unique file names), Orthanc with its default settings (it keeps the
first copy of a SOP Instance and ignores later ones), a pynetdicom PACS that
answers one transient refusal, and ``dicomcache relay run`` killed with SIGKILL
while it forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections import Counter
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomcache.config import DestinationSettings
from dicomcache.devtools.orthanc import OrthancProcess, free_port
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.dicom import syntaxes
from dicomcache.relay.forward import DUPLICATES_AFTER_CRASH
from tests.relay.conftest import (
    StoreSCP,
    content_hash,
    daemon_config,
    kill_9,
    needs_dcmtk,
    pending,
    queue_depth,
    received,
    relay_settings,
    start_dicomcache,
    stop_process,
    storescu,
    wait_until,
    wait_until_sync,
)

pytestmark = [
    needs_dcmtk,
    # pynetdicom 3.0.4 leaks the socket of a refused connection (peer down).
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _series_and_correction(directory: Path, n: int, *, seed: int,
                           study_uid: str | None = None) -> tuple[list[Path], Path]:
    """A CT series as first sent, and a corrected re-send of its second instance (same SOP
    Instance UID; other patient name and pixels; another study when ``study_uid``)."""
    series = make_ct_series(n, rows=64, columns=64, seed=seed)
    files = write_series(series, directory / "first")
    fixed = series[1].copy()
    fixed.PatientName = "Corrected^Name"
    fixed.PixelData = bytes(reversed(fixed.PixelData))
    if study_uid is not None:
        fixed.StudyInstanceUID = study_uid
    [corrected] = write_series([fixed], directory / "corrected")
    return files, corrected


def _unique_filenames_pacs(directory: Path) -> StoreSCP:
    """A storescp that keeps every copy it receives (``+uf``), all syntaxes."""
    return StoreSCP(free_port(), "PACS", directory, ["+xa", "+uf"])


@pytest.mark.slow
async def test_a_corrected_resend_replaces_the_copy_waiting_for_a_pacs(
        tmp_path: Path, relay_factory) -> None:
    files, corrected = _series_and_correction(tmp_path / "modality", 3, seed=21)
    stale, fixed = content_hash(files[1].read_bytes()), content_hash(corrected.read_bytes())
    sop = str(corrected.stem)
    pacs = _unique_filenames_pacs(tmp_path / "pacs")
    orthanc = OrthancProcess(tmp_path / "orthanc", dicom=True, aet="ORTHANC",
                             overrides={"DicomCheckCalledAet": False})
    dests = [pacs.destination("STORESCP"),
             DestinationSettings(name="ORTHANC", remote_ae_title="ORTHANC",
                                 remote_host="127.0.0.1", remote_port=orthanc.dicom_port)]
    r = await relay_factory(relay_settings(tmp_path / "spool", dests))
    try:
        # Both PACS are down: the series waits in the spool…
        res = await asyncio.to_thread(storescu, files, r.port)
        assert res.returncode == 0, res.stderr
        await wait_until(lambda: all(r.relay.spool.destination_state(d.name)["last_error"]
                                     for d in dests), 30, "both PACS found down")
        # …when the modality re-sends a corrected second instance.
        res = await asyncio.to_thread(storescu, [corrected], r.port)
        assert res.returncode == 0, res.stderr
        await asyncio.to_thread(pacs.start)
        await asyncio.to_thread(orthanc.start)
        await wait_until(lambda: all(queue_depth(r.relay, d.name) == 0 for d in dests), 90,
                         "both queues empty")
        # Every instance arrived once; the corrected one instead of the first copy.
        got = await asyncio.to_thread(received, pacs.directory)
        want = Counter(content_hash(f.read_bytes()) for f in (files[0], corrected, files[2]))
        assert got == want, f"stale copy received {got[stale]} time(s)"
        # Orthanc keeps the first copy it is sent: it must be the corrected one.
        [oid] = await asyncio.to_thread(orthanc.json, "POST", "/tools/lookup", sop.encode())
        kept = await asyncio.to_thread(orthanc.request, "GET", f"/instances/{oid['ID']}/file")
        assert content_hash(kept) == fixed
        snap = await asyncio.to_thread(r.relay.spool.snapshot)
        for d in dests:  # what `relay status` shows
            assert any(e["message"].startswith(f"superseded: a newer copy of {sop}")
                       for e in snap["destinations"][d.name]["recent_errors"])
    finally:
        orthanc.stop()
        pacs.stop()


class _RefusesOnce:
    """A pynetdicom PACS that answers 0xA700 (out of resources) to the first C-STORE of
    ``refuse``, stores everything else, and keeps the content hash of every copy stored,
    in order (the last one is what it ends with)."""

    def __init__(self, refuse: str) -> None:
        self.refuse = refuse
        self.refused = threading.Event()
        self.stored: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage, [syntaxes.EXPLICIT_LE, syntaxes.IMPLICIT_LE])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        if sop == self.refuse and not self.refused.is_set():
            self.refused.set()
            return 0xA700
        ds = event.dataset
        ds.file_meta = event.file_meta
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        with self.lock:
            self.stored.append((sop, content_hash(buf.getvalue())))
        return 0

    def versions(self, sop: str) -> list[str]:
        with self.lock:
            return [h for s, h in self.stored if s == sop]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.slow
async def test_a_corrected_resend_in_another_study_is_not_overtaken_by_the_stale_copy(
        tmp_path: Path, relay_factory) -> None:
    """The first copy's study backs off after a transient refusal; the correction moved
    the instance to another study, which goes on meanwhile.  The stale copy must not be
    sent after it (the PACS would end with it)."""
    files, corrected = _series_and_correction(
        tmp_path / "modality", 2, seed=22, study_uid="1.2.826.0.1.3680043.10.1234.22.2")
    sop = corrected.stem
    pacs = _RefusesOnce(refuse=files[0].stem)
    try:
        r = await relay_factory(relay_settings(
            tmp_path / "spool", [DestinationSettings(
                name="PACS", remote_ae_title="PACS", remote_host="127.0.0.1",
                remote_port=pacs.port)], retry_backoff_base=4.0, retry_backoff_max=4.0))
        res = await asyncio.to_thread(storescu, files, r.port)
        assert res.returncode == 0, res.stderr
        await wait_until(pacs.refused.is_set, 30, "the transient refusal")
        res = await asyncio.to_thread(storescu, [corrected], r.port)
        assert res.returncode == 0, res.stderr
        await wait_until(lambda: queue_depth(r.relay, "PACS") == 0, 60, "an empty queue")
        assert pacs.versions(files[0].stem)  # the refused instance went after its back-off
        assert pacs.versions(sop) == [content_hash(corrected.read_bytes())]
    finally:
        pacs.stop()


@pytest.mark.slow
def test_kill_9_while_forwarding_sends_at_most_the_instances_in_flight_again(
        tmp_path: Path) -> None:
    n, kills = 240, 3
    relay_port = free_port()
    pacs = _unique_filenames_pacs(tmp_path / "pacs")
    config = daemon_config(tmp_path, relay_port, pacs.port)
    series = make_ct_series(n, rows=256, columns=256, seed=23)
    files = write_series(series, tmp_path / "modality")
    want = Counter(content_hash(f.read_bytes()) for f in files)
    assert len(want) == n
    log = tmp_path / "relay.log"
    relay_run = ["relay", "run", "--config", str(config)]
    proc = start_dicomcache(relay_run, log, relay_port)
    try:
        # The PACS is down while the modality sends: the whole series is spooled.
        res = storescu(files, relay_port)
        assert res.returncode == 0, res.stderr
        pacs.start()
        at_kill = []
        for k in range(1, kills + 1):  # killed while it delivers, then restarted
            with contextlib.suppress(AssertionError):  # (it may have finished: see below)
                wait_until_sync(lambda k=k: len(pacs.files()) >= k * n // (kills + 1), 60,
                                "deliveries", poll=0.01)
            at_kill.append(len(pacs.files()))
            kill_9(proc)
            proc = start_dicomcache(relay_run, log, relay_port)
        wait_until_sync(lambda: pending(tmp_path / "spool") == 0, 120, "an empty queue")
    finally:
        stop_process(proc, timeout=30)
        pacs.stop()
    assert at_kill[0] < n, f"the relay was not killed while it was forwarding: {at_kill}"
    got = received(pacs.directory)
    lost = set(want) - set(got)
    duplicates = sum(got.values()) - len(got)
    assert not lost, f"{len(lost)} instance(s) lost"
    assert set(got) == set(want)  # nothing else arrived (no half-written copy)
    assert duplicates <= kills * DUPLICATES_AFTER_CRASH, \
        f"{duplicates} duplicate(s) after {kills} kill -9"
    assert "Traceback" not in log.read_text()
