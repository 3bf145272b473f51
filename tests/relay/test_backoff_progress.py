"""A PACS that answers one transient failure (0xA700) for the first attempt of each
instance: the study's back-off starts again from its base after every batch that
delivered something, so the study arrives in seconds, not in hours."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomcache.config import DestinationSettings
from dicomcache.devtools.orthanc import free_port
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.dicom import syntaxes
from tests.relay.conftest import needs_dcmtk, relay_settings, storescu, wait_until


class FlakyPACS:
    """Refuses each SOP instance once (0xA700, out of resources), then stores it."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.stored: set[str] = set()
        self.lock = threading.Lock()
        ae = AE(ae_title="FLAKY")
        ae.add_supported_context(CTImageStorage, [syntaxes.EXPLICIT_LE, syntaxes.IMPLICIT_LE])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            if sop not in self.seen:
                self.seen.add(sop)
                return 0xA700
            self.stored.add(sop)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@needs_dcmtk
async def test_one_transient_failure_per_instance_does_not_stretch_the_study(
        tmp_path: Path, relay_factory) -> None:
    pacs = FlakyPACS()
    try:
        dest = DestinationSettings(name="FLAKY", remote_ae_title="FLAKY",
                                   remote_host="127.0.0.1", remote_port=pacs.port,
                                   transfer_syntax_strategy="standard")
        running = await relay_factory(relay_settings(
            tmp_path / "spool", [dest], retry_backoff_base=0.5, retry_backoff_max=60.0),
            forward_in_process=True)
        files = await asyncio.to_thread(write_series, make_ct_series(8, rows=16, columns=16,
                                                                     seed=9), tmp_path / "src")
        started = time.monotonic()
        sent = await asyncio.to_thread(storescu, files, running.port, timeout=60)
        assert sent.returncode == 0, sent.stderr
        # Doubling from 0.5 s without a reset: 0.5+1+2+…+60 ≈ 100 s for 8 instances.
        await wait_until(lambda: len(pacs.stored) == 8, 30, "all 8 instances stored")
        assert time.monotonic() - started < 30
    finally:
        pacs.stop()
