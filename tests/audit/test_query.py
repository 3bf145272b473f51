"""Reading the trail back (pure parts and files): times, what matches and why, bad lines."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dicomcache.audit.query import MAX_LINE, Query, parse_when, read_records, search, stamp
from dicomcache.dicom.uids import orthanc_instance_id, orthanc_patient_id

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "end", "want"), [
    ("2026-12-01", False, "2026-12-01T00:00:00.000000Z"),
    ("2026-12-01", True, "2026-12-02T00:00:00.000000Z"),
    ("2026-12-01T08:00", False, "2026-12-01T08:00:00.000000Z"),
    ("2026-12-01T08:00+01:00", False, "2026-12-01T07:00:00.000000Z"),
    ("2h", False, "2026-12-04T10:00:00.000000Z"),
    ("90m", False, "2026-12-04T10:30:00.000000Z"),
    ("7d", False, "2026-11-27T12:00:00.000000Z"),
    ("1w", False, "2026-11-27T12:00:00.000000Z"),
])
def test_parse_when(text: str, end: bool, want: str) -> None:
    assert stamp(parse_when(text, end=end, now=NOW)) == want


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "-2h", "2026-13-01", ""])
def test_parse_when_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a date"):
        parse_when(text, now=NOW)


def rec(**fields: Any) -> dict[str, Any]:
    return {"time": "2026-12-01T10:00:00.000000Z", "action": "retrieve", **fields}


@pytest.mark.parametrize(("record", "why"), [
    (rec(patient_id="PX"), "patient"),
    (rec(patient_id="PY", study_uid="1.2"), None),  # another patient, even in the study
    (rec(study_uid="1.2"), "study"),  # learnt from PX's record
    (rec(orthanc_id=orthanc_patient_id("PX")), "orthanc id"),
    (rec(orthanc_id=orthanc_instance_id("PX", "1.2", "1.3", "1.4")), "orthanc id"),
    (rec(action="query", query="PatientID=PX"), "query"),
    (rec(action="query", query="00100020=P*"), "query"),
    (rec(action="query", query="PatientID=*"), None),  # a listing of everyone names no one
    (rec(action="query", query="PatientID=PZ"), None),
    (rec(study_uid="9.9"), None),
])
def test_matches_and_why(record: dict[str, Any], why: str | None) -> None:
    q = Query(patient="PX")
    q.learn(rec(patient_id="PX", study_uid="1.2", series_uid="1.3", sop_uid="1.4"))
    assert q.matches(record) == why


def test_time_window_and_principal() -> None:
    q = Query(patient="PX", principal="bob", since="2026-12-01T09:00:00.000000Z",
              until="2026-12-01T10:00:00.000000Z")
    assert q.matches(rec(patient_id="PX", principal="bob",
                         time="2026-12-01T09:30:00.000000Z")) == "patient"
    assert q.matches(rec(patient_id="PX", principal="bob")) is None  # until is excluded
    assert q.matches(rec(patient_id="PX", principal="eve",
                         time="2026-12-01T09:30:00.000000Z")) is None


@pytest.mark.blocking_allowed(reason="reads files synchronously")
def test_overlong_and_broken_lines_skipped_and_counted(tmp_path: Path) -> None:
    good = b'{"time":"2026-12-01T10:00:00.000000Z","action":"retrieve","patient_id":"PX"}\n'
    path = tmp_path / "a.jsonl"
    path.write_bytes(good + b"x" * (MAX_LINE + 10) + b"\n" + b"{broken\n\n" + good)
    gz = tmp_path / "a.jsonl.20261201T000000.000000Z.gz"
    with gzip.open(gz, "wb") as f:
        f.write(good)
    bad = [0]
    found = list(search(Query(patient="PX"), [gz, path], bad))
    assert [why for why, _ in found] == ["patient"] * 3
    assert bad[0] == 2
    assert list(read_records([tmp_path / "missing.jsonl"])) == []
