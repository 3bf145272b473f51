"""The spool's database records its schema version: older layouts are migrated, a
newer one is refused with one line (exit 2) before anything starts or changes."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dicomcache.devtools.orthanc import free_ports
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom import syntaxes
from dicomcache.relay.spool import SCHEMA_VERSION, Spool, SpoolSchemaError, info_from_bytes

ROOT = Path(__file__).resolve().parents[2]


def _spool_with(directory: Path, n: int) -> None:
    spool = Spool(directory, ["PACS"])
    spool.open()
    try:
        for ds in make_ct_series(n, rows=16, columns=16, seed=191):
            blob = encode(ds, syntaxes.EXPLICIT_LE)
            spool.put(blob, info_from_bytes(blob), "MODALITY")
    finally:
        spool.close()


def _schema(directory: Path) -> str | None:
    with sqlite3.connect(directory / "state.sqlite") as db:
        try:
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.OperationalError:
            return None
    return None if row is None else str(row[0])


def _set_schema(directory: Path, value: str) -> None:
    with sqlite3.connect(directory / "state.sqlite") as db:
        db.execute("UPDATE meta SET value=? WHERE key='schema'", (value,))


def test_a_new_spool_records_its_version(tmp_path: Path) -> None:
    _spool_with(tmp_path / "spool", 1)
    assert _schema(tmp_path / "spool") == str(SCHEMA_VERSION) == "2"


def test_a_spool_from_before_versions_is_migrated(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    spool_dir = tmp_path / "spool"
    _spool_with(spool_dir, 3)
    with sqlite3.connect(spool_dir / "state.sqlite") as db:  # version 1: no meta table
        db.execute("DROP TABLE meta")
    assert _schema(spool_dir) is None
    spool = Spool(spool_dir, ["PACS"])
    spool.open()
    try:
        assert len(spool.next_batch("PACS", 10)) == 3  # what waited still waits
    finally:
        spool.close()
    assert _schema(spool_dir) == str(SCHEMA_VERSION)
    assert "schema migrated from version 1 to 2" in caplog.text


def test_a_newer_spool_is_refused_and_left_alone(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    _spool_with(spool_dir, 2)
    _set_schema(spool_dir, "3")
    before = hashlib.sha256((spool_dir / "state.sqlite").read_bytes()).hexdigest()
    for opener in (lambda s: s.open(), lambda s: s.open(recover=False),
                   lambda s: s.open_readonly()):
        spool = Spool(spool_dir, ["PACS"])
        with pytest.raises(SpoolSchemaError) as caught:
            opener(spool)
        spool.close()
        assert "has schema version 3; this dicomcache reads version 2 and older" in str(
            caught.value)
    assert hashlib.sha256((spool_dir / "state.sqlite").read_bytes()).hexdigest() == before
    assert len(list((spool_dir / "objects").iterdir())) == 2


def test_relay_run_serve_and_check_config_refuse_a_newer_spool(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    _spool_with(spool_dir, 1)
    _set_schema(spool_dir, "7")
    http_port, dimse_port = free_ports(2)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[server]
port = {http_port}
[upstream]
url = "http://127.0.0.1:9"
[cache]
directory = "{tmp_path / 'cache'}"
[audit]
file = "{tmp_path / 'audit.jsonl'}"
[relay]
enabled = true
port = {dimse_port}
spool_directory = "{spool_dir}"
[[relay.destinations]]
name = "PACS"
remote_ae_title = "PACS"
remote_host = "127.0.0.1"
remote_port = 11112
""")
    for args in (["relay", "run"], ["serve"], ["check-config"], ["relay", "status"],
                 ["relay", "retry"]):
        done = subprocess.run([sys.executable, "-m", "dicomcache", *args, "--config", str(cfg)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = [line for line in done.stderr.splitlines() if "schema version" in line]
        assert len(lines) == 1, (args, done.stderr)
        assert f"spool database {spool_dir / 'state.sqlite'} has schema version 7; this " \
               "dicomcache reads version 2 and older" in lines[0]
        assert "Traceback" not in done.stderr and "listening" not in done.stdout + done.stderr
    assert _schema(spool_dir) == "7"
