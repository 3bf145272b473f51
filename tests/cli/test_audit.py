"""``dicomcache audit``: who looked at patient X, over the current and rotated (and gzipped)
files; purges audited, and refused when a required trail cannot be written."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest

from dicomcache.audit.record import (
    DENIED,
    PURGE,
    QUERY,
    RETRIEVE,
    SUCCESS,
    Actor,
    Record,
    Subject,
    encode,
)
from dicomcache.audit.trail import AuditFile, rotated_files
from dicomcache.cli.main import main
from dicomcache.dicom.uids import orthanc_study_id
from dicomcache.http.app import make_app
from dicomcache.http.keys import AUDIT
from tests.conftest import Sample, SettingsFactory
from tests.http.test_audit import records, with_guard

ALICE = Actor("alice", "viewer", "bearer", "10.0.0.5")
BOB = Actor("bob", "viewer", "basic", "10.0.0.6")
EVE = Actor("eve", "viewer", "bearer", "10.0.0.7")
T0 = 1_795_910_400.0  # 2026-11-29T00:00:00Z


def config(tmp_path: Path, audit: Path, **extra: Any) -> Path:
    cfg = tmp_path / "c.toml"
    more = "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())
    cfg.write_text(f'[cache]\ndirectory = "{tmp_path / "cache"}"\n'
                   f'[audit]\nfile = "{audit}"\n{more}')
    return cfg


def write_trail(path: Path) -> None:
    """Three files: a gzipped rotated one, a rotated one, the current one."""
    recs = [
        Record(RETRIEVE, ALICE, Subject(patient_id="PX", study_uid="1.2.3", sop_uid="1.2.3.4"),
               SUCCESS, status=200, bytes=1000, time=T0),
        Record(RETRIEVE, EVE, Subject(patient_id="PY", study_uid="9.9"), SUCCESS, time=T0 + 1),
        # Names only the study (metadata): learnt from alice's record.
        Record(RETRIEVE, BOB, Subject(study_uid="1.2.3"), SUCCESS, status=200, time=T0 + 3600,
               path="/dicom-web/studies/1.2.3/metadata"),
        # Names only Orthanc's study ID.
        Record(RETRIEVE, BOB, Subject(orthanc_id=orthanc_study_id("PX", "1.2.3"),
                                      level="study"), SUCCESS, time=T0 + 7200),
        # A search for the patient.
        Record(QUERY, EVE, Subject(query="PatientID=P*"), SUCCESS, time=T0 + 7300,
               path="/dicom-web/studies"),
        Record(RETRIEVE, Actor("anonymous", "admin", "none", "10.0.0.9"),
               Subject(patient_id="PX", study_uid="1.2.3"), DENIED, status=401,
               time=T0 + 86400),
    ]
    lines = [encode(r, source="serve") for r in recs]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path.with_name(path.name + ".20261129T000000.000000Z.gz"), "wb") as f:
        f.writelines(lines[:2])
    path.with_name(path.name + ".20261129T120000.000000Z").write_bytes(
        b"".join(lines[2:4]) + b'{"cut by a cra')
    path.write_bytes(b"".join(lines[4:]))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_who_looked_at_patient_over_rotated_and_gzipped_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trail = tmp_path / "audit" / "audit.jsonl"
    write_trail(trail)
    cfg = config(tmp_path, trail)
    code, out, err = run(capsys, "audit", "--patient", "PX", "--config", str(cfg), "--json")
    assert code == 0, err
    found = [json.loads(line) for line in out.splitlines()]
    assert [(r["principal"], r["match"]) for r in found] == [
        ("alice", "patient"), ("bob", "study"), ("bob", "orthanc id"), ("eve", "query"),
        ("anonymous", "patient")]
    assert found[-1]["outcome"] == "denied"
    code, out, err = run(capsys, "audit", "--patient", "PX", "--config", str(cfg))
    assert code == 0 and "1 line(s) were not records" in err
    assert len(out.splitlines()) == 5 and "alice (bearer) from 10.0.0.5" in out
    # Filters: principal, time window (ISO and "ago"), study.
    code, out, _ = run(capsys, "audit", "--patient", "PX", "--principal", "bob", "--json",
                       "--config", str(cfg))
    assert code == 0 and len(out.splitlines()) == 2
    code, out, _ = run(capsys, "audit", "--patient", "PX", "--json", "--config", str(cfg),
                       "--since", "2026-11-29T01:30:00+01:00", "--until", "2026-11-30T00:00")
    assert [json.loads(x)["principal"] for x in out.splitlines()] == ["bob", "bob", "eve"]
    code, out, _ = run(capsys, "audit", "--patient", "PX", "--since", "2h", "--config",
                       str(cfg))
    assert code == 1 and out == ""  # all older than two hours
    code, out, _ = run(capsys, "audit", "--study", "1.2.3", "--json", "--config", str(cfg))
    assert [json.loads(x)["principal"] for x in out.splitlines()] == ["alice", "bob",
                                                                      "anonymous"]
    code, out, _ = run(capsys, "audit", "--patient", "NOBODY", "--config", str(cfg))
    assert code == 1
    assert run(capsys, "audit", "--config", str(cfg))[0] == 2
    assert run(capsys, "audit", "--patient", "PX", "--since", "yesterday",
               "--config", str(cfg))[0] == 2


def test_rotated_by_the_writer_then_read_back(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    trail = tmp_path / "audit" / "audit.jsonl"
    f = AuditFile(trail, max_size=64 << 10)
    for i in range(400):
        f.append([encode(Record(RETRIEVE, ALICE, Subject(patient_id=f"P{i % 3}"), SUCCESS),
                         source="serve")])
    f.close()
    assert len(rotated_files(trail)) >= 1
    code, out, _ = run(capsys, "audit", "--patient", "P1", "--json", "--config",
                       str(config(tmp_path, trail)))
    assert code == 0 and len(out.splitlines()) == 133


async def test_who_looked_at_patient_after_real_accesses(
        aiohttp_client: Any, make_settings: SettingsFactory, tmp_path: Path,
        samples: dict[str, list[Sample]], capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings()
    client = await aiohttp_client(with_guard(make_app(settings)))
    s = samples["deflated"][0]
    for who in ("alice", "bob"):
        resp = await client.get(f"/instances/{s.orthanc_id}/file",
                                headers={"Authorization": f"Bearer {who}"})
        assert resp.status == 200
        await resp.read()
    resp = await client.get(f"/dicom-web/studies/{s.study}/metadata",
                            headers={"Authorization": "Bearer carol"})
    assert resp.status == 200
    await resp.read()
    await records(client, 3)
    cfg = config(tmp_path, client.app[AUDIT].settings.file)
    code, out, _ = await asyncio.to_thread(
        run, capsys, "audit", "--patient", "PDEFLATED", "--json", "--config", str(cfg))
    assert code == 0
    assert [json.loads(x)["principal"] for x in out.splitlines()] == ["alice", "bob", "carol"]


def test_purge_is_audited_and_refused_when_the_trail_cannot_be_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicomcache.cache.store import Store
    from dicomcache.config import load
    from tests.cli.test_admin import commit, study

    trail = tmp_path / "audit" / "audit.jsonl"
    cfg = config(tmp_path, trail)
    store = Store(load(cfg).cache.directory, 1 << 30)
    entries = [commit(store, b) for b in study(2, seed=31)]
    store.close()
    patient = entries[0].patient_id
    # A trail that cannot be written (its directory is a file): refused, nothing deleted.
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace(str(trail), str(blocked / "audit.jsonl")))
    code, _, err = run(capsys, "purge", "--config", str(bad), "--patient", patient)
    assert code == 1 and "refused: the audit trail" in err
    store = Store(load(cfg).cache.directory, 1 << 30)
    assert len(list(store.entries())) == 2
    store.close()
    code, out, _ = run(capsys, "purge", "--config", str(cfg), "--patient", patient)
    assert code == 0 and "purged 2 instance(s)" in out
    (rec,) = [json.loads(x) for x in trail.read_text().splitlines()]
    assert rec["action"] == PURGE and rec["patient_id"] == patient and rec["instances"] == 2
    assert rec["source"] == "cli" and rec["auth"] == "os" and rec["bytes"] > 0
    assert rec["principal"] and os.stat(trail).st_mode & 0o777 == 0o600
