"""The forwarder keeps its PACS association open between batches (``[relay]
forward_idle_release``): several batches on one association, a new one when a batch
needs contexts it lacks, a peer that ends it while idle, released when idle, on
shutdown and at the end of a drain.  The PACS is a pynetdicom SCP in this process
counting associations (EVT_ACCEPTED, EVT_RELEASED, EVT_ABORTED) and what it stored by
content hash."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from dicomcache.config import DestinationSettings
from dicomcache.devtools.orthanc import free_port
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.dicom import syntaxes
from dicomcache.metrics import Metrics
from dicomcache.relay import drain
from dicomcache.relay.outcome import DELIVERED
from dicomcache.relay.scu import SendItem, StoreSCU
from dicomcache.relay.service import Relay
from dicomcache.relay.spool import Spool, info_from_bytes
from tests.relay.conftest import (
    content_hash,
    needs_dcmtk,
    relay_settings,
    storescu,
    wait_until,
    wait_until_sync,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


class Peer:
    """A PACS (pynetdicom SCP, CT and MR in Explicit/Implicit VR LE) that counts its
    associations and stores by content hash; it can end an association itself."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted = self.released = self.aborted = 0
        self.open: list[Association] = []
        self.most_open = 0
        self.stored: Counter[str] = Counter()
        #: When (monotonic) the last C-STORE was answered, and each release seen.
        self.last_store = 0.0
        self.release_times: list[float] = []
        #: The next C-STORE's connection is shut down before it is answered (not stored).
        self.cut_next_store = False
        #: Answer this status (not stored) to the next C-STORE.
        self.refuse_next: int | None = None
        ae = AE(ae_title="PACS")
        for sop_class in (CTImageStorage, MRImageStorage):
            ae.add_supported_context(sop_class, [syntaxes.EXPLICIT_LE, syntaxes.IMPLICIT_LE])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_ACCEPTED, self._accepted), (evt.EVT_RELEASED, self._released),
            (evt.EVT_ABORTED, self._aborted), (evt.EVT_CONN_CLOSE, self._closed),
            (evt.EVT_C_STORE, self._store)])

    def _accepted(self, event: evt.Event) -> None:
        with self.lock:
            self.accepted += 1
            self.open.append(event.assoc)
            self.most_open = max(self.most_open, len(self.open))

    def _released(self, event: evt.Event) -> None:
        with self.lock:
            self.released += 1
            self.release_times.append(time.monotonic())

    def _aborted(self, event: evt.Event) -> None:
        with self.lock:
            self.aborted += 1

    def _closed(self, event: evt.Event) -> None:
        with self.lock:
            if event.assoc in self.open:
                self.open.remove(event.assoc)

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            cut, self.cut_next_store = self.cut_next_store, False
            refuse, self.refuse_next = self.refuse_next, None
        if cut:
            event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
            return 0xA700  # never arrives
        if refuse is not None:
            return refuse
        digest = content_hash(bytes(event.encoded_dataset()))
        with self.lock:
            self.stored[digest] += 1
            self.last_store = time.monotonic()
        return 0x0000

    def n_open(self) -> int:
        with self.lock:
            return len(self.open)

    def only_association(self) -> Association:
        with self.lock:
            assert len(self.open) == 1, self.open
            return self.open[0]

    def destination(self) -> DestinationSettings:
        return DestinationSettings(name="PACS", remote_ae_title="PACS", remote_host="127.0.0.1",
                                   remote_port=self.port)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def peer() -> Any:
    p = Peer()
    yield p
    p.stop()


@dataclass
class Study:
    files: list[Path]
    items: list[SendItem]

    @property
    def hashes(self) -> set[str]:
        return {content_hash(f.read_bytes()) for f in self.files}


def make_study(where: Path, seed: int, n: int = 3, *, mr: bool = False) -> Study:
    """``n`` small instances of one study (CT, or relabelled MR), Explicit VR LE."""
    series = make_ct_series(n, rows=16, columns=16, seed=seed)
    if mr:
        for ds in series:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    files = write_series(series, where / f"study{seed}")
    items = [SendItem(seed * 100 + i, f, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                      str(ds.file_meta.TransferSyntaxUID))
             for i, (f, ds) in enumerate(zip(files, series, strict=True))]
    return Study(files, items)


def scu_for(peer: Peer) -> StoreSCU:
    return StoreSCU("RELAY", peer.destination(), timeout=10.0, keep_open=True)


def delivered_all(report: Any, study: Study) -> bool:
    return (report.destination_error is None and len(report.results) == len(study.items)
            and all(r.outcome == DELIVERED for r in report.results))


# --- StoreSCU ---------------------------------------------------------------------------------
def test_several_batches_go_over_one_association(tmp_path: Path, peer: Peer,
                                                 accelerate: bool) -> None:
    scu = scu_for(peer)
    studies = [make_study(tmp_path, seed) for seed in (1, 2, 3)]
    reports = [scu.send(s.items) for s in studies]
    assert all(delivered_all(r, s) for r, s in zip(reports, studies, strict=True))
    assert [r.associations for r in reports] == [1, 0, 0]
    assert peer.accepted == 1 and peer.n_open() == 1
    scu.close()
    wait_until_sync(lambda: peer.released == 1 and peer.n_open() == 0, 10,
                    "the kept association released")
    assert peer.aborted == 0
    assert peer.stored == Counter({h: 1 for s in studies for h in s.hashes})


def test_a_batch_needing_contexts_the_open_association_lacks_renegotiates(
        tmp_path: Path, peer: Peer, accelerate: bool) -> None:
    scu = scu_for(peer)
    ct, mr, ct2 = (make_study(tmp_path, 4), make_study(tmp_path, 5, mr=True),
                   make_study(tmp_path, 6))
    assert delivered_all(scu.send(ct.items), ct)
    report = scu.send(mr.items)  # MR was never proposed on the open (CT) association
    assert delivered_all(report, mr) and report.associations == 1
    wait_until_sync(lambda: peer.released == 1, 10, "the CT association released")
    assert peer.accepted == 2
    report = scu.send(ct2.items)  # nor CT on the MR one
    assert delivered_all(report, ct2) and report.associations == 1
    scu.close()
    wait_until_sync(lambda: peer.released == 3 and peer.n_open() == 0, 10, "all released")
    assert peer.accepted == 3 and peer.most_open == 1 and peer.aborted == 0
    assert peer.stored == Counter({h: 1 for s in (ct, mr, ct2) for h in s.hashes})


def test_a_kept_association_keeps_every_context_it_was_negotiated_with(
        tmp_path: Path, peer: Peer, accelerate: bool) -> None:
    """A CT-only batch on an association negotiated for CT and MR leaves it able to
    carry an MR batch next."""
    scu = scu_for(peer)
    ct, mr = make_study(tmp_path, 21), make_study(tmp_path, 22, mr=True)
    ct2, mr2 = make_study(tmp_path, 23), make_study(tmp_path, 24, mr=True)
    both = Study(ct.files + mr.files, ct.items + mr.items)
    reports = [scu.send(s.items) for s in (both, ct2, mr2)]
    assert all(delivered_all(r, s) for r, s in zip(reports, (both, ct2, mr2), strict=True))
    assert [r.associations for r in reports] == [1, 0, 0] and peer.accepted == 1
    scu.close()
    assert peer.stored == Counter({h: 1 for s in (both, ct2, mr2) for h in s.hashes})


@pytest.mark.parametrize("how", ["release", "abort", "close"])
def test_a_peer_ending_the_idle_association_loses_nothing(
        tmp_path: Path, peer: Peer, accelerate: bool, how: str) -> None:
    """The PACS releases, aborts or closes the socket of the idle association; the next
    batch goes on a new one, each instance stored once, the destination not failed."""
    scu = scu_for(peer)
    first, second = make_study(tmp_path, 7), make_study(tmp_path, 8)
    assert delivered_all(scu.send(first.items), first)
    idle = peer.only_association()
    if how == "release":
        idle.release()
    elif how == "abort":
        idle.abort()
    else:
        idle.dul.socket.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    report = scu.send(second.items)
    assert delivered_all(report, second), report
    assert peer.accepted == 2 and peer.most_open == 1
    assert peer.stored == Counter({h: 1 for s in (first, second) for h in s.hashes})
    scu.close()


def test_a_kept_association_closed_at_the_next_batchs_first_store_sends_it_again(
        tmp_path: Path, peer: Peer, accelerate: bool) -> None:
    """The peer closes the connection as the first C-STORE of the next batch arrives,
    unanswered: that instance goes again on a new association at once; nothing is
    reported for the unanswered attempt, and the destination is not failed."""
    scu = scu_for(peer)
    first, second = make_study(tmp_path, 9), make_study(tmp_path, 10)
    assert delivered_all(scu.send(first.items), first)
    peer.cut_next_store = True
    report = scu.send(second.items)
    assert delivered_all(report, second), report
    assert [r.key for r in report.results] == [i.key for i in second.items]
    assert report.associations == 1 and peer.accepted == 2
    assert peer.stored == Counter({h: 1 for s in (first, second) for h in s.hashes})
    scu.close()


def test_a_batch_ending_on_a_transient_refusal_releases_its_association(
        tmp_path: Path, peer: Peer, accelerate: bool) -> None:
    scu = scu_for(peer)
    study = make_study(tmp_path, 11)
    peer.refuse_next = 0xA700
    report = scu.send(study.items)
    assert report.results[0].outcome == "retry"
    assert scu.idle_seconds() is None
    wait_until_sync(lambda: peer.released == 1 and peer.n_open() == 0, 10,
                    "the association released")
    assert peer.aborted == 0


# --- the forwarder ------------------------------------------------------------------------
@needs_dcmtk
async def test_studies_in_a_row_share_one_association_and_shutdown_releases_it(
        tmp_path: Path, peer: Peer, accelerate: bool) -> None:
    settings = relay_settings(tmp_path / "spool", [peer.destination()], timeout=60.0,
                              forward_idle_release=30.0, accelerate=accelerate)
    relay = Relay(settings, Metrics())
    await relay.start()
    try:
        studies = [make_study(tmp_path, seed, n=2) for seed in (12, 13, 14)]
        for n, study in enumerate(studies, 1):
            res = await asyncio.to_thread(storescu, study.files, relay.port)
            assert res.returncode == 0, res.stderr
            await wait_until(lambda n=n: sum(peer.stored.values()) == 2 * n, 30,  # type: ignore[misc]
                             f"study {n} delivered")
        assert peer.accepted == 1 and peer.n_open() == 1
    finally:
        await relay.stop(10.0)
    await wait_until(lambda: peer.n_open() == 0, 10, "the association ended")
    assert (peer.released, peer.aborted) == (1, 0)
    assert peer.stored == Counter({h: 1 for s in studies for h in s.hashes})


@needs_dcmtk
async def test_an_idle_association_is_released_after_forward_idle_release(
        tmp_path: Path, peer: Peer, relay_factory: Any) -> None:
    """Released (A-RELEASE) once idle, not before: never sooner than ``forward_idle_release``
    after the last C-STORE (a lower bound the forwarder guarantees, whatever the load)."""
    idle = 1.0
    r = await relay_factory(relay_settings(tmp_path / "spool", [peer.destination()],
                                           forward_idle_release=idle))
    first, second = make_study(tmp_path, 15, n=2), make_study(tmp_path, 16, n=2)
    res = await asyncio.to_thread(storescu, first.files, r.port)
    assert res.returncode == 0, res.stderr
    await wait_until(lambda: peer.released == 1 and peer.n_open() == 0, 30,
                     "the idle association released")
    assert peer.aborted == 0 and sum(peer.stored.values()) == 2
    assert peer.release_times[0] - peer.last_store >= idle * 0.9  # (clock granularity)
    res = await asyncio.to_thread(storescu, second.files, r.port)
    assert res.returncode == 0, res.stderr
    await wait_until(lambda: sum(peer.stored.values()) == 4, 30, "the next study delivered")
    assert peer.accepted == 2
    assert peer.stored == Counter({h: 1 for s in (first, second) for h in s.hashes})


async def test_a_drain_with_no_relay_running_releases_the_association_at_its_end(
        tmp_path: Path, peer: Peer, accelerate: bool) -> None:
    settings = relay_settings(tmp_path / "spool", [peer.destination()], timeout=60.0,
                              forward_idle_release=30.0, accelerate=accelerate)
    spool = Spool(settings.spool_directory, ["PACS"])
    studies = [make_study(tmp_path, seed, n=2) for seed in (17, 18, 19)]

    def fill() -> None:
        spool.open()
        for study in studies:
            for f in study.files:
                data = f.read_bytes()
                spool.put(data, info_from_bytes(data), "MODALITY")

    await asyncio.to_thread(fill)
    try:
        loop = asyncio.get_running_loop()
        await drain.deliver_stopped(settings, spool, loop.time() + 60, None)
    finally:
        await asyncio.to_thread(spool.close)
    assert peer.stored == Counter({h: 1 for s in studies for h in s.hashes})
    await wait_until(lambda: peer.n_open() == 0, 10, "the association ended")
    assert (peer.accepted, peer.released, peer.aborted) == (1, 1, 0)

