"""The relay's audit records: every C-STORE received from a modality (DCMTK storescu) and
every forward to the PACS (DCMTK storescp), written by the receiving process and by the
forwarder process into one shared file; with ``[audit] required`` and a trail that cannot
be written, C-STOREs are refused with 0xA700."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dicomcache.audit.query import read_records
from dicomcache.audit.trail import AuditLog
from dicomcache.config import AuditSettings
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.metrics import Metrics
from dicomcache.relay.service import Relay
from tests.relay.conftest import needs_dcmtk, relay_settings, storescu, wait_until


@pytest.fixture
async def audited_relay(accelerate: bool) -> AsyncIterator[Callable[..., Any]]:
    """``await audited_relay(settings, audit_settings, forward_in_process=…)`` →
    ``(relay, trail)``, both stopped at teardown."""
    running: list[tuple[Relay, AuditLog]] = []

    async def make(settings: Any, audit: AuditSettings, **kw: Any) -> tuple[Relay, AuditLog]:
        metrics = Metrics()
        trail = AuditLog(audit, metrics, source="relay")
        try:
            await asyncio.to_thread(trail.open)
        except OSError:
            pass  # the test wants a failing trail
        trail.start()
        relay = Relay(replace(settings, accelerate=accelerate), metrics, audit=trail, **kw)
        await relay.start()
        running.append((relay, trail))
        return relay, trail

    yield make
    for relay, trail in running:
        await relay.stop(5.0)
        await asyncio.to_thread(trail.close)


def read(path: Path) -> list[dict[str, Any]]:
    return list(read_records([path]))


@needs_dcmtk
@pytest.mark.parametrize("forward_in_process", [False, True], ids=["child", "in-process"])
async def test_storescu_receipts_and_forwards_recorded(tmp_path: Path, storescp,
                                                       audited_relay: Callable[..., Any],
                                                       forward_in_process: bool) -> None:
    pacs = storescp("all")
    audit = AuditSettings(file=tmp_path / "audit" / "audit.jsonl")
    relay, _trail = await audited_relay(
        relay_settings(tmp_path / "spool", [pacs.destination("PACS")]), audit,
        forward_in_process=forward_in_process)
    series = make_ct_series(3, rows=64, columns=64, seed=21, patient_id="PRELAY")
    files = write_series(series, tmp_path / "modality")
    res = await asyncio.to_thread(storescu, files, relay.port, calling="CT_ROOM_2")
    assert res.returncode == 0, res.stderr
    await wait_until(lambda: len(pacs.files()) == 3, 60, "delivery")

    sops = sorted(str(ds.SOPInstanceUID) for ds in series)

    def both() -> bool:
        recs = read(audit.file)
        return all(sorted(r["sop_uid"] for r in recs if r["action"] == action
                          and r["outcome"] == "success") == sops
                   for action in ("relay-receive", "relay-forward"))
    await wait_until(both, 20, "three receipts and three forwards in the file")
    recs = await asyncio.to_thread(read, audit.file)
    receipts = [r for r in recs if r["action"] == "relay-receive"]
    assert sorted(r["sop_uid"] for r in receipts) == sops
    for rec in receipts:
        assert rec["principal"] == "CT_ROOM_2" and rec["auth"] == "dimse"
        assert rec["role"] == "modality" and rec["client"] == "127.0.0.1"
        assert rec["patient_id"] == "PRELAY" and rec["outcome"] == "success"
        assert rec["status"] == "0x0000" and rec["bytes"] > 64 * 64 * 2
        assert rec["study_uid"] == str(series[0].StudyInstanceUID)
        assert rec["series_uid"] == str(series[0].SeriesInstanceUID)
        assert rec["source"] == "relay"
    # (A forward the PACS answered that we did not hear is sent again: at least once.)
    forwards = [r for r in recs if r["action"] == "relay-forward" and r["outcome"] == "success"]
    for rec in forwards:
        assert rec["destination"] == f"PACS PACS@127.0.0.1:{pacs.port}"
        assert rec["outcome"] == "success" and rec["principal"] == "DICOMCACHE"
        assert rec["study_uid"] == str(series[0].StudyInstanceUID)
        assert rec["source"] == ("relay" if forward_in_process else "relay-forwarder")
    assert len({r["id"] for r in recs}) == len(recs)


@needs_dcmtk
async def test_required_trail_unwritable_refuses_c_store(tmp_path: Path, storescp,
                                                         audited_relay: Callable[..., Any]
                                                         ) -> None:
    pacs = storescp("all")
    blocker = tmp_path / "not-a-directory"
    await asyncio.to_thread(blocker.write_text, "a file where the audit directory should be")
    audit = AuditSettings(file=blocker / "audit.jsonl", required=True)
    relay, trail = await audited_relay(
        relay_settings(tmp_path / "spool", [pacs.destination("PACS")]), audit,
        forward_in_process=True)
    assert not trail.healthy
    files = write_series(make_ct_series(1, rows=64, columns=64, seed=22), tmp_path / "m")
    res = await asyncio.to_thread(storescu, files, relay.port, extra=("-v",))
    said = (res.stdout + res.stderr).lower()
    assert "refused: outofresources" in said, said
    assert trail.refused == 1
    assert await asyncio.to_thread(lambda: list((tmp_path / "spool" / "objects").iterdir())
                                   if (tmp_path / "spool" / "objects").exists() else []) == []


@needs_dcmtk
async def test_a_superseded_copy_is_recorded_as_a_forward_that_did_not_happen(
        tmp_path: Path, audited_relay: Callable[..., Any]) -> None:
    from dicomcache.config import DestinationSettings
    from dicomcache.devtools.orthanc import free_port

    down = DestinationSettings(name="PACS", remote_ae_title="PACS", remote_host="127.0.0.1",
                               remote_port=free_port())  # nothing listens: it waits
    audit = AuditSettings(file=tmp_path / "audit" / "audit.jsonl")
    relay, _trail = await audited_relay(relay_settings(tmp_path / "spool", [down]), audit)
    ds = make_ct_series(1, rows=16, columns=16, seed=24, patient_id="PRESEND")[0]
    [first] = write_series([ds], tmp_path / "first")
    ds.PatientName = "Corrected^Name"
    [again] = write_series([ds], tmp_path / "again")
    for path in (first, again):
        res = await asyncio.to_thread(storescu, [path], relay.port, calling="CT_ROOM_2")
        assert res.returncode == 0, res.stderr

    def superseded() -> list[dict[str, Any]]:
        return [r for r in read(audit.file) if r["action"] == "relay-forward"]
    await wait_until(lambda: bool(superseded()), 20, "the superseded copy's record")
    [rec] = await asyncio.to_thread(superseded)
    assert rec["outcome"] == "failed"
    assert rec["sop_uid"] == str(ds.SOPInstanceUID)
    assert rec["destination"] == f"PACS PACS@127.0.0.1:{down.remote_port}"
    assert rec["detail"].startswith("superseded: a newer copy received ")
    assert "'CT_ROOM_2'" in rec["detail"]
