"""What a destination learns is per (SOP class, source syntax), and is re-probed (issue 17).

A real pynetdicom PACS that rejects any association offering CT in Explicit VR Big
Endian (a legacy PACS choking on one syntax, the seed's case for the fallback), in
front of a ``compression`` destination: a CT study falls back to ``conservative``;
a later MR study in JPEG-LS still goes with ``compression`` (as received, not
decompressed: the 7.6x WAN bytes of the issue); after the re-probe interval the
configured strategy is tried again for CT.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from dicomcache.config import DestinationSettings
from dicomcache.devtools.orthanc import free_port
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.dicom import syntaxes
from dicomcache.relay import fallback as fb
from tests.relay.conftest import (
    needs_dcmtk,
    read_quiet,
    relay_settings,
    storescu,
    wait_until,
)

pytestmark = [
    needs_dcmtk,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
TAKES = [syntaxes.IMPLICIT_LE, syntaxes.EXPLICIT_LE, syntaxes.EXPLICIT_BE,
         syntaxes.JPEG_LS_LOSSLESS]


class _NoBigEndianCT:
    """Rejects (permanent, no reason) any association offering CT in Big Endian."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lock = threading.Lock()
        self.associations: list[set[tuple[str, str]]] = []
        ae = AE(ae_title="NOBE")
        ae.add_supported_context(CTImageStorage, TAKES)
        ae.add_supported_context(MRImageStorage, TAKES)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, self._store)])

    def _requested(self, event) -> None:
        proposed = {(str(cx.abstract_syntax), str(ts)) for cx in event.assoc.requestor.primitive
                    .presentation_context_definition_list for ts in cx.transfer_syntax}
        with self.lock:
            self.associations.append(proposed)
        if (CT, syntaxes.EXPLICIT_BE) in proposed:
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)
            event.assoc.kill()

    def _store(self, event) -> int:
        sop = event.request.AffectedSOPInstanceUID
        (self.directory / f"{sop}.dcm").write_bytes(event.encoded_dataset())
        return 0

    def offered_ct_big_endian(self, since: int) -> bool:
        with self.lock:
            return any((CT, syntaxes.EXPLICIT_BE) in a for a in self.associations[since:])

    def n_associations(self) -> int:
        with self.lock:
            return len(self.associations)

    def stop(self) -> None:
        self.server.shutdown()


def _learned(spool: Path) -> dict[tuple[str, str], tuple[str, float, int]]:
    with sqlite3.connect(spool / "state.sqlite") as db:
        return {(r[0], r[1]): (r[2], r[3], r[4]) for r in db.execute(
            "SELECT sop_class, transfer_syntax, strategy, since, batches FROM learned")}


async def test_learned_per_key_and_reprobed(tmp_path: Path, relay_factory) -> None:
    (tmp_path / "pacs").mkdir()
    pacs = _NoBigEndianCT(tmp_path / "pacs")
    try:
        dest = DestinationSettings(name="NOBE", remote_ae_title="NOBE", remote_host="127.0.0.1",
                                   remote_port=pacs.port, transfer_syntax_strategy="compression")
        spool = tmp_path / "spool"
        r = await relay_factory(relay_settings(spool, [dest]))

        def n_files() -> int:
            return len(list(pacs.directory.iterdir()))

        async def settled(study_uid: str) -> None:
            """The forwarder finished a batch of ``study_uid``, learning recorded, and is idle."""
            def idle() -> bool:
                st = r.relay.status()["forwarders"]["NOBE"]
                return (st["busy"] is False
                        and (st["last_batch"] or {}).get("study_uid") == study_uid)
            await wait_until(idle, 20, f"the forwarder done with {study_uid}")

        async def send(files: list[Path], propose: str = "-xe") -> None:
            res = await asyncio.to_thread(storescu, files, r.port, propose=propose)
            assert res.returncode == 0, res.stdout + res.stderr

        # 1. A CT study: compression and standard offer CT in Big Endian, rejected;
        #    conservative delivers, and is learned for (CT, Explicit VR LE) only.
        a = make_ct_series(2, rows=32, columns=32, seed=1)
        await send(write_series(a, tmp_path / "a"))
        await wait_until(lambda: n_files() == 2, 60, "the CT study delivered")
        await settled(str(a[0].StudyInstanceUID))
        await wait_until(lambda: (CT, syntaxes.EXPLICIT_LE) in _learned(spool), 10, "learned")
        assert _learned(spool)[(CT, syntaxes.EXPLICIT_LE)][0] == "conservative"
        snap = await asyncio.to_thread(r.relay.spool.snapshot, ["NOBE"])
        shown = snap["destinations"]["NOBE"]["learned_by_class"]
        assert [(e["sop_class"], e["transfer_syntax"], e["strategy"]) for e in shown] == \
            [(CT, syntaxes.EXPLICIT_LE, "conservative")]

        # 2. A later MR study in JPEG-LS: nothing learned for it, so the configured
        #    compression strategy: it arrives as sent, not decompressed.
        mr = make_ct_series(1, rows=32, columns=32, seed=2,
                            transfer_syntax=syntaxes.JPEG_LS_LOSSLESS)
        for ds in mr:
            ds.SOPClassUID = MR
            ds.file_meta.MediaStorageSOPClassUID = MR
        [mr_file] = write_series(mr, tmp_path / "b")
        await send([mr_file], propose="-xt")
        await wait_until(lambda: n_files() == 3, 60, "the MR study delivered")
        await settled(str(mr[0].StudyInstanceUID))
        got = read_quiet(pacs.directory / f"{mr[0].SOPInstanceUID}.dcm")
        assert got.file_meta.TransferSyntaxUID == syntaxes.JPEG_LS_LOSSLESS

        # 3. Another CT study starts from what was learned: no Big Endian offered.
        used = _learned(spool)[(CT, syntaxes.EXPLICIT_LE)][2]
        before = pacs.n_associations()
        c = make_ct_series(1, rows=32, columns=32, seed=3)
        await send(write_series(c, tmp_path / "c"))
        await wait_until(lambda: n_files() == 4, 60, "the second CT study delivered")
        await settled(str(c[0].StudyInstanceUID))
        assert not pacs.offered_ct_big_endian(before)
        assert _learned(spool)[(CT, syntaxes.EXPLICIT_LE)][2] == used + 1  # one more batch

        # 4. Past the re-probe interval (the entry aged as the clock would age it), the
        #    configured strategy is tried again, then conservative learned afresh.
        with sqlite3.connect(spool / "state.sqlite") as db:
            db.execute("UPDATE learned SET since = since - ?", (fb.REPROBE_AFTER_SECONDS + 60,))
        aged = _learned(spool)[(CT, syntaxes.EXPLICIT_LE)][1]
        before = pacs.n_associations()
        await send(write_series(make_ct_series(1, rows=32, columns=32, seed=4), tmp_path / "d"))
        await wait_until(lambda: n_files() == 5, 60, "the third CT study delivered")
        assert pacs.offered_ct_big_endian(before)
        await wait_until(lambda: _learned(spool)[(CT, syntaxes.EXPLICIT_LE)][1] > aged, 10,
                         "re-learned after the re-probe")
    finally:
        pacs.stop()
