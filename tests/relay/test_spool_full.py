"""The spool's file system fills up while the forwarder delivers: what the PACS has
stored can no longer be recorded.  The forwarder must pause, not send the same
instances again in a loop (seen: 3,292 C-STOREs for 102 instances in 60 s)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomcache.devtools.orthanc import free_port
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom import syntaxes
from dicomcache.relay.spool import info_from_bytes
from tests.conftest import fill_filesystem, tmpfs
from tests.relay.conftest import CountingSCP, relay_settings

pytestmark = [
    # pynetdicom leaves the socket of a refused connection to the garbage collector
    # (the PACS is down at first, on purpose).
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs."""
    with tmpfs(tmp_path / "small", "size=4m") as where:
        yield where


class LatePACS(CountingSCP):
    """A CountingSCP on a port chosen beforehand, started when the test says."""

    def __init__(self, port: int) -> None:
        self.stored = []
        self.lock = threading.Lock()
        self.port = port

    def start(self) -> None:
        ae = AE(ae_title="COUNT")
        ae.add_supported_context(CTImageStorage, [syntaxes.EXPLICIT_LE, syntaxes.IMPLICIT_LE])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])


async def test_a_full_spool_pauses_forwarding_instead_of_resending(
        small_fs: Path, relay_factory) -> None:
    """The PACS comes up after the spool's file system filled: it stores the batch,
    the spool cannot record it; the forwarder pauses instead of re-sending in a loop,
    and once space is back nothing is sent twice more."""
    pacs = LatePACS(free_port())
    spool_dir = small_fs / "spool"
    settings = relay_settings(spool_dir, [pacs.destination()], retry_backoff_base=0.2,
                              retry_backoff_max=1.0)
    running = await relay_factory(settings, forward_in_process=True)
    blobs = [encode(ds, syntaxes.EXPLICIT_LE)
             for ds in make_ct_series(4, rows=16, columns=16, seed=61)]
    for blob in blobs:
        await asyncio.to_thread(running.relay.spool.put, blob, info_from_bytes(blob), "MOD")
    await asyncio.sleep(1.5)  # the PACS is down: the forwarder backs off
    await asyncio.to_thread(fill_filesystem, small_fs)
    await asyncio.to_thread(pacs.start)
    try:
        await asyncio.sleep(12)
        with pacs.lock:
            stored = list(pacs.stored)
        # Each instance stored once; at most a few re-sends while the record fails.
        assert len(stored) <= 3 * len(blobs), f"{len(stored)} C-STOREs for {len(blobs)} instances"
        await asyncio.to_thread((small_fs / "filler").unlink)  # space comes back
        await asyncio.sleep(4)
        with pacs.lock:
            assert len(pacs.stored) <= 3 * len(blobs)
            assert set(pacs.stored) == {str(info_from_bytes(b).sop_instance) for b in blobs}
    finally:
        pacs.stop()
