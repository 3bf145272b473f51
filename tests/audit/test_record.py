"""What a record says (pure): credentials never written, every field bounded, one line."""

from __future__ import annotations

import json

import pytest

from dicomcache.audit import record as r
from dicomcache.audit.record import Actor, Record, Subject, decode, encode
from dicomcache.http.audit import (
    TrustedProxies,
    action_of,
    audited,
    client_of,
    subject_of,
)
from dicomcache.principal import VIEWER, Principal


@pytest.mark.parametrize(("raw", "want"), [
    ("", ""),
    ("PatientID=P1", "PatientID=P1"),
    ("access_token=abc&PatientID=P1", "access_token=[redacted]&PatientID=P1"),
    ("Token=x&api_key=y&apiKey=z&password=w", "Token=[redacted]&api_key=[redacted]&"
                                              "apiKey=[redacted]&password=[redacted]"),
    ("a%63cess_token=abc", "a%63cess_token=[redacted]"),  # the name decoded first
    ("jwt=e.y.j&session=1&sig=2", "jwt=[redacted]&session=[redacted]&sig=[redacted]"),
    ("tokenize=1&keyword=2", "tokenize=1&keyword=2"),  # whole names only
    ("token", "token"),  # no value, nothing to hide
])
def test_redact_query(raw: str, want: str) -> None:
    assert r.redact_query(raw) == want


@pytest.mark.parametrize(("status", "outcome"), [
    (200, "success"), (206, "success"), (304, "success"), (401, "denied"), (403, "denied"),
    (404, "failed"), (503, "failed"),
])
def test_outcome_of_http(status: int, outcome: str) -> None:
    assert r.outcome_of_http(status) == outcome


@pytest.mark.parametrize(("status", "outcome"), [
    (0x0000, "success"), (0xB000, "success"), (0xB007, "success"), (0xA700, "failed"),
    (0xC000, "failed"), (None, "aborted"),
])
def test_outcome_of_dimse(status: int | None, outcome: str) -> None:
    assert r.outcome_of_dimse(status) == outcome


def test_actor_never_holds_the_token() -> None:
    p = Principal("alice", VIEWER, "bearer", token="eyJ.secret.sig")
    rec = Record(r.RETRIEVE, Actor.of(p, "10.0.0.1"), Subject(), r.SUCCESS)
    line = encode(rec, source="serve")
    assert b"secret" not in line and b"eyJ" not in line
    assert decode(line)["principal"] == "alice"  # type: ignore[index]


def test_one_bounded_ascii_line_whatever_comes_in() -> None:
    hostile = "P\n{\"action\":\"x\"}\r\u2028\x00é" + "A" * 10_000
    rec = Record(r.QUERY, Actor(hostile, "viewer", "basic", hostile), Subject(
        patient_id=hostile, query=hostile, study_uid=hostile), r.SUCCESS, path=hostile,
        detail=hostile, bytes=-5, seconds=float("nan"))
    line = encode(rec, source="serve")
    assert line.count(b"\n") == 1 and line.endswith(b"\n") and line.isascii()
    assert len(line) < 8_000
    back = decode(line)
    assert back is not None and back["patient_id"].startswith("P\n{")
    assert len(back["patient_id"]) == 256 and back["patient_id"].endswith("…")
    assert back["bytes"] == 0 and back["seconds"] == 0.0


@pytest.mark.parametrize("line", [b"", b"{", b"[1]", b'{"time": 1, "action": "x"}',
                                  b'{"cut by a cra', b"\xff\xfe"])
def test_decode_rejects_what_is_not_a_record(line: bytes) -> None:
    assert decode(line) is None


def test_dimse_status_written_as_hex() -> None:
    rec = Record(r.RELAY_RECEIVE, Actor("CT1", "modality", "dimse"), Subject(), r.FAILED,
                 status=0xA700, dimse=True)
    assert json.loads(encode(rec, source="relay"))["status"] == "0xA700"


# --- what the HTTP side makes of a request (pure) -----------------------------------------
@pytest.mark.parametrize(("method", "path", "action"), [
    ("GET", "/instances/0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a/file", "retrieve"),
    ("GET", "/wado", "retrieve"),
    ("GET", "/dicom-web/studies", "query"),
    ("GET", "/dicom-web/series", "query"),
    ("GET", "/dicom-web/studies/1.2/series", "query"),
    ("GET", "/dicom-web/studies/1.2/series/1.3/instances", "query"),
    ("GET", "/dicom-web/studies/1.2/instances", "query"),
    ("GET", "/dicom-web/studies/1.2", "retrieve"),
    ("GET", "/dicom-web/studies/1.2/metadata", "retrieve"),
    ("GET", "/dicom-web/studies/1.2/series/1.3/instances/1.4/frames/1", "retrieve"),
    ("GET", "/patients", "query"),
    ("POST", "/tools/find", "query"),
    ("DELETE", "/studies/0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a", "delete"),
    ("POST", "/instances", "modify"),
    ("PUT", "/instances/x/metadata/y", "modify"),
])
def test_action_of(method: str, path: str, action: str) -> None:
    assert action_of(method, path) == action


@pytest.mark.parametrize(("path", "query", "want"), [
    ("/dicom-web/studies/1.2/series/1.3/instances/1.4/frames/1", "",
     Subject(study_uid="1.2", series_uid="1.3", sop_uid="1.4")),
    ("/dicom-web/studies/1.2/metadata", "", Subject(study_uid="1.2")),
    ("/dicom-web/studies/1.02/metadata", "", Subject()),  # not a UID: names nothing
    ("/dicom-web/studies/../etc", "", Subject()),
    ("/wado", "requestType=WADO&studyUID=1.2&seriesUID=1.3&objectUID=1.4",
     Subject(study_uid="1.2", series_uid="1.3", sop_uid="1.4")),
    ("/instances/0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a/file", "",
     Subject(orthanc_id="0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a", level="instance")),
    ("/studies/0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a", "",
     Subject(orthanc_id="0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a-0a0a0a0a", level="study")),
    ("/studies/not-an-id", "", Subject()),
])
def test_subject_of(path: str, query: str, want: Subject) -> None:
    assert subject_of(path, query) == want


@pytest.mark.parametrize(("remote", "xff", "trusted", "want"), [
    ("10.0.0.1", None, (), ("10.0.0.1", None)),
    ("10.0.0.1", "1.2.3.4", (), ("10.0.0.1", None)),  # nobody trusted: the header ignored
    ("10.0.0.1", "1.2.3.4", ("10.0.0.0/8",), ("1.2.3.4", "10.0.0.1")),
    ("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2", ("10.0.0.0/8",), ("1.2.3.4", "10.0.0.1")),
    ("192.168.1.1", "1.2.3.4", ("10.0.0.0/8",), ("192.168.1.1", None)),  # not the proxy
    ("10.0.0.1", "garbage", ("10.0.0.0/8",), ("garbage", "10.0.0.1")),
])
def test_client_of(remote: str, xff: str | None, trusted: tuple[str, ...],
                   want: tuple[str, str | None]) -> None:
    assert client_of(remote, xff, TrustedProxies.parse(trusted)) == want


@pytest.mark.parametrize(("method", "path", "want"), [
    ("GET", "/healthz", False), ("GET", "/metrics", False), ("GET", "/", False),
    ("OPTIONS", "/wado", False), ("GET", "/wado", True), ("GET", "/system", True),
])
def test_audited(method: str, path: str, want: bool) -> None:
    assert audited(method, path) is want
