"""The forwarder process (relay/worker.py) and the event-driven pynetdicom waits (fastdul.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomcache.config import DestinationSettings
from dicomcache.devtools.orthanc import free_port
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.relay import negotiation as neg
from dicomcache.relay.accel import fastdul
from dicomcache.relay.scu import DELIVERED, SendItem, StoreSCU
from tests.relay.conftest import needs_dcmtk, queue_depth, relay_settings, storescu, wait_until

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


class _CountingSCP:
    """A pynetdicom C-STORE SCP (this process) that counts what it stored."""

    def __init__(self) -> None:
        self.stored: list[str] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="COUNT")
        ae.add_supported_context(CTImageStorage, [neg.EXPLICIT_LE, neg.IMPLICIT_LE])
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


def test_fastdul_is_installed_for_this_pynetdicom() -> None:
    assert fastdul.install() is True


def test_many_c_stores_in_one_association_keep_request_response_pairing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The SCU pauses its association reactor around each C-STORE; with event-driven
    waits a reactor that missed the pause would take the response ("Received unexpected
    C-STORE service message") and the send would wait for the DIMSE timeout."""
    caplog.set_level(logging.WARNING)
    series = make_ct_series(300, rows=8, columns=8, seed=5)
    files = write_series(series, tmp_path / "src")
    scp = _CountingSCP()
    try:
        scu = StoreSCU("RELAY", scp.destination(), timeout=5.0)
        items = [SendItem(i, f, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                          str(ds.file_meta.TransferSyntaxUID))
                 for i, (f, ds) in enumerate(zip(files, series, strict=True))]
        report = scu.send(items)
    finally:
        scp.stop()
    assert [r.outcome for r in report.results] == [DELIVERED] * 300
    assert report.associations == 1
    assert scp.stored == [str(ds.SOPInstanceUID) for ds in series]
    assert "unexpected" not in caplog.text.lower()


@needs_dcmtk
async def test_forwarder_process_is_restarted_after_a_crash(
        tmp_path: Path, relay_factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomcache.relay")
    scp = _CountingSCP()
    try:
        r = await relay_factory(relay_settings(tmp_path / "spool", [scp.destination()]))
        assert r.relay.worker is not None
        first = r.relay.worker.pid
        assert first is not None and first != os.getpid()
        os.kill(first, signal.SIGKILL)  # our own child, by its PID
        await wait_until(lambda: r.relay.worker.pid not in (None, first), 30,
                         "a new forwarder process")
        assert "exited unexpectedly" in caplog.text
        files = write_series(make_ct_series(3, rows=16, columns=16, seed=8), tmp_path / "m")
        res = await asyncio.to_thread(storescu, files, r.port)
        assert res.returncode == 0, res.stderr
        await wait_until(lambda: len(scp.stored) == 3, 30, "delivery by the new process")
        await wait_until(lambda: queue_depth(r.relay, "COUNT") == 0, 10, "empty queue")
    finally:
        scp.stop()


async def test_relay_stop_ends_its_forwarder_process(tmp_path: Path) -> None:
    from dicomcache.metrics import Metrics
    from dicomcache.relay.service import Relay

    scp = _CountingSCP()
    try:
        relay = Relay(relay_settings(tmp_path / "spool", [scp.destination()]), Metrics())
        await relay.start()
        worker = relay.worker
        assert worker is not None and worker.pid is not None
        pid = worker.pid
        await relay.stop(5.0)
        assert worker.pid is None
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    finally:
        scp.stop()


def test_a_forwarder_process_that_cannot_start_fails_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from dicomcache.metrics import Metrics
    from dicomcache.relay.worker import ForwarderProcess

    dest = DestinationSettings(name="X", remote_ae_title="X", remote_host="127.0.0.1",
                               remote_port=free_port())
    worker = ForwarderProcess(relay_settings(tmp_path / "spool", [dest]), Metrics())
    monkeypatch.setattr(sys, "executable", "/bin/false")  # exits at once: never ready
    with pytest.raises(RuntimeError, match="did not start"):
        worker.start(timeout=20)
    assert worker.wait(5)
    assert worker.pid is None
