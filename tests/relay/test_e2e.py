"""End to end with real peers: storescu (modality) → relay → storescp / Orthanc (PACS)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomcache.devtools.orthanc import OrthancProcess, free_port
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.dicom import syntaxes
from tests.relay.conftest import (
    SOURCE_FILES,
    STORESCU_PROPOSE,
    needs_dcmtk,
    queue_depth,
    read_quiet,
    relay_settings,
    sample,
    source_path,
    storescu,
    wait_until,
)

pytestmark = [
    needs_dcmtk,
    # pynetdicom 3.0.4 leaks the socket of a refused connection (peer down).
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _pixels(ds: object) -> np.ndarray:
    return np.asarray(ds.pixel_array)  # type: ignore[attr-defined]


def _spooled_syntaxes(spool: Path) -> dict[str, str]:
    with sqlite3.connect(spool / "state.sqlite") as db:
        return dict(db.execute("SELECT sop_instance, transfer_syntax FROM instances"))


@pytest.fixture
def orthanc_ile(tmp_path: Path):
    """A real Orthanc accepting Implicit VR Little Endian only."""
    proc = OrthancProcess(tmp_path / "orthanc", dicom=True, aet="ORTHANC",
                          overrides={"AcceptedTransferSyntaxes": [syntaxes.IMPLICIT_LE],
                                     "DicomCheckCalledAet": False})
    proc.start()
    yield proc
    proc.stop()


@pytest.mark.slow
async def test_every_source_syntax_reaches_every_restricted_peer(
        tmp_path: Path, storescp, relay_factory, orthanc_ile) -> None:
    implicit = storescp("implicit")
    explicit = storescp("explicit")
    jpeg_ll = storescp("jpeg-lossless")
    from dicomcache.config import DestinationSettings
    dests = [
        implicit.destination("IMPLICIT_ONLY"),
        explicit.destination("EXPLICIT_ONLY"),
        jpeg_ll.destination("JPEG_LOSSLESS_ONLY", transfer_syntax_strategy="compression"),
        DestinationSettings(name="ORTHANC_ILE", remote_ae_title="ORTHANC",
                            remote_host="127.0.0.1", remote_port=orthanc_ile.dicom_port,
                            transfer_syntax_strategy="standard"),
    ]
    spool = tmp_path / "spool"
    r = await relay_factory(relay_settings(spool, dests, retention=3600.0))
    originals = {}
    for ts in SOURCE_FILES:
        path = source_path(ts)
        res = await asyncio.to_thread(storescu, [path], r.port, propose=STORESCU_PROPOSE[ts])
        assert res.returncode == 0, (ts, res.stdout, res.stderr)
        originals[str(read_quiet(path).SOPInstanceUID)] = (ts, path)
    # Each arrived in its own syntax: nothing was converted on the way in.
    spooled = _spooled_syntaxes(spool)
    assert {uid: ts for uid, (ts, _) in originals.items()} == spooled
    n = len(originals)
    await wait_until(lambda: all(len(p.files()) == n for p in (implicit, explicit, jpeg_ll))
                     and len(orthanc_ile.json("GET", "/instances")) == n, 120,
                     "every instance on every peer")
    received: dict[str, list[bytes]] = {
        "IMPLICIT_ONLY": [f.read_bytes() for f in implicit.files()],
        "EXPLICIT_ONLY": [f.read_bytes() for f in explicit.files()],
        "JPEG_LOSSLESS_ONLY": [f.read_bytes() for f in jpeg_ll.files()],
        "ORTHANC_ILE": [orthanc_ile.request("GET", f"/instances/{i}/file")
                        for i in orthanc_ile.json("GET", "/instances")],
    }
    expected_ts = {"IMPLICIT_ONLY": syntaxes.IMPLICIT_LE, "EXPLICIT_ONLY": syntaxes.EXPLICIT_LE,
                   "JPEG_LOSSLESS_ONLY": syntaxes.JPEG_LOSSLESS_SV1,
                   "ORTHANC_ILE": syntaxes.IMPLICIT_LE}
    for dest, blobs in received.items():
        for blob in blobs:
            got = read_quiet(blob)
            src_ts, src_path = originals[str(got.SOPInstanceUID)]
            assert got.file_meta.TransferSyntaxUID == expected_ts[dest], (dest, src_ts)
            original = read_quiet(src_path)
            if src_ts in syntaxes.LOSSY:
                assert got.LossyImageCompression == "01", (dest, src_ts)
            else:  # lossless path: the very same pixels
                assert np.array_equal(_pixels(got), _pixels(original)), (dest, src_ts)
            assert got.StudyInstanceUID == original.StudyInstanceUID
    for name in expected_ts:
        await wait_until(lambda name=name: queue_depth(r.relay, name) == 0, 20,
                         f"{name} queue empty")
    assert n == len(SOURCE_FILES)
    assert sample(r.metrics, "dicomcache_relay_received_total", status="0x0000") == n


@pytest.mark.parametrize("forward_in_process", [False, True],
                         ids=["forwarder-process", "in-process"])
async def test_destination_down_spool_grows_then_delivered(tmp_path: Path, storescp,
                                                           relay_factory,
                                                           forward_in_process: bool) -> None:
    from dicomcache.config import DestinationSettings
    port = free_port()
    dest = DestinationSettings(name="LATER", remote_ae_title="PACS", remote_host="127.0.0.1",
                               remote_port=port)
    r = await relay_factory(relay_settings(tmp_path / "spool", [dest]),
                            forward_in_process=forward_in_process)
    assert (r.relay.worker is None) == forward_in_process
    series = make_ct_series(6, rows=64, columns=64, seed=11)
    files = write_series(series, tmp_path / "modality")
    res = await asyncio.to_thread(storescu, files, r.port)
    assert res.returncode == 0, res.stderr  # acknowledged although the PACS is down
    await wait_until(lambda: r.relay.spool.destination_state("LATER")["last_error"] is not None,
                     20, "a recorded connection failure")
    assert await asyncio.to_thread(queue_depth, r.relay, "LATER") == 6
    state = await asyncio.to_thread(r.relay.spool.destination_state, "LATER")
    assert "Cannot associate" in state["last_error"]
    pacs = storescp("all", port=port)
    await wait_until(lambda: len(pacs.files()) == 6, 60, "delivery after the PACS came up")
    await wait_until(lambda: queue_depth(r.relay, "LATER") == 0, 20, "empty queue")
    # Delivered instances leave the spool (retention 0); the forwarder process deletes them
    # just after recording the delivery.
    await wait_until(lambda: not list((tmp_path / "spool" / "objects").iterdir()), 10,
                     "delivered files deleted")
    got = sorted(int(read_quiet(f).InstanceNumber) for f in pacs.files())
    assert got == sorted(int(ds.InstanceNumber) for ds in series)
    # The forwarders' metrics reach this process's registry (batched by the child).
    await wait_until(lambda: sample(r.metrics, "dicomcache_relay_forwarded_total",
                                    destination="LATER", outcome="delivered") == 6,
                     10, "forwarded metric")

    def idle_after_a_batch() -> bool:
        st = r.relay.status()["forwarders"]["LATER"]
        return st["busy"] is False and (st["last_batch"] or {}).get("delivered", 0) >= 1

    await wait_until(idle_after_a_batch, 10, "forwarder idle after a batch")


class _PickyPACS:
    """A pynetdicom SCP that rejects any association proposing Explicit VR Big Endian,
    as some legacy PACS do: the seed's case for the fallback sequence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.associations: list[set[str]] = []
        ae = AE(ae_title="PICKY")
        ae.add_supported_context(CTImageStorage, [syntaxes.EXPLICIT_LE, syntaxes.IMPLICIT_LE])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, self._store)])

    def _requested(self, event) -> None:
        proposed = {str(ts) for cx in event.assoc.requestor.primitive
                    .presentation_context_definition_list for ts in cx.transfer_syntax}
        self.associations.append(proposed)
        if syntaxes.EXPLICIT_BE in proposed:
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)
            event.assoc.kill()

    def _store(self, event) -> int:
        sop = event.request.AffectedSOPInstanceUID
        (self.directory / f"{sop}.dcm").write_bytes(event.encoded_dataset())
        return 0

    def stop(self) -> None:
        self.server.shutdown()


async def test_fallback_sequence_and_learned_strategy(tmp_path: Path, relay_factory,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from dicomcache.config import DestinationSettings
    (tmp_path / "picky").mkdir()
    picky = _PickyPACS(tmp_path / "picky")
    try:
        dest = DestinationSettings(name="LEGACY", remote_ae_title="PICKY",
                                   remote_host="127.0.0.1", remote_port=picky.port,
                                   transfer_syntax_strategy="standard")
        caplog.set_level(logging.INFO, logger="dicomcache.relay")
        r = await relay_factory(relay_settings(tmp_path / "spool", [dest]))
        first = write_series(make_ct_series(2, rows=32, columns=32, seed=1), tmp_path / "a")
        res = await asyncio.to_thread(storescu, first, r.port)
        assert res.returncode == 0
        await wait_until(lambda: len(list(picky.directory.iterdir())) == 2, 30)
        # (logged by the forwarder process, re-emitted here: may trail the files a little)
        await wait_until(lambda: "C-STORE successful" in caplog.text, 10, "success logged")
        assert "Using conservative fallback" in caplog.text
        assert syntaxes.EXPLICIT_BE in picky.associations[0]
        await wait_until(lambda: r.relay.spool.destination_state("LEGACY")["learned_strategy"]
                         == "conservative", 10, "learned strategy persisted")
        # (status() figures refresh every 2 s)
        await wait_until(lambda: r.relay.status()["destinations"]["LEGACY"]["queue_depth"] == 0,
                         10, "status shows an empty queue")
        # Next time it starts with what worked: one association, no Big Endian proposed.
        before = len(picky.associations)
        second = write_series(make_ct_series(2, rows=32, columns=32, seed=2), tmp_path / "b")
        res = await asyncio.to_thread(storescu, second, r.port)
        assert res.returncode == 0
        await wait_until(lambda: len(list(picky.directory.iterdir())) == 4, 30)
        # (the association kept open from the first batch carries it, or new ones: it
        # serves only a batch starting at 'conservative', one with no Big Endian)
        assert all(syntaxes.EXPLICIT_BE not in a for a in picky.associations[before:])
        await wait_until(lambda: caplog.text.count("using 'conservative' strategy (attempts "
                                                   "made: 1") >= 1, 10, "sent at once")
    finally:
        picky.stop()


async def test_no_compatible_context_is_quarantined_with_the_seed_message(
        tmp_path: Path, storescp, relay_factory, caplog: pytest.LogCaptureFixture) -> None:
    # This PACS takes CT only as JPEG Baseline (lossy): a conservative relay has nothing to offer.
    pacs = storescp((syntaxes.JPEG_BASELINE,))
    caplog.set_level(logging.INFO, logger="dicomcache.relay")
    spool = tmp_path / "spool"
    r = await relay_factory(relay_settings(spool, [pacs.destination("JPEG_PACS")]))
    files = write_series(make_ct_series(1, rows=32, columns=32, seed=3), tmp_path / "m")
    res = await asyncio.to_thread(storescu, files, r.port)
    assert res.returncode == 0
    await wait_until(lambda: r.relay.spool.snapshot()["destinations"]["JPEG_PACS"]["quarantined"]
                     == 1, 30, "quarantine")
    await wait_until(lambda: "All C-STORE strategies failed" in caplog.text, 10, "logged")
    # The peer answered "transfer syntaxes not supported" (result 4): the relay widened
    # (issue 17) and the reason lists what the peer took.
    assert "Using compression widening" in caplog.text
    assert ("No compatible presentation context for '1.2.840.10008.5.1.4.1.1.2'. "
            "Peer accepted transfer syntaxes: ['1.2.840.10008.1.2.4.50']") in caplog.text
    reasons = list((spool / "quarantine").glob("*.reason.json"))
    assert len(reasons) == 1
    info = json.loads(reasons[0].read_text())
    assert info["destination"] == "JPEG_PACS"
    assert info["reason"].startswith("No compatible presentation context")
    assert "Recommendation:" in info["reason"]
    assert pacs.files() == []
