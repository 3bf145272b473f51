"""A destination removed from the configuration: what waits for it is kept, reported,
and can be moved (``dicomcache relay reroute``) — never dropped by a config edit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom import syntaxes
from dicomcache.relay.outcome import DELIVERED, Outcome
from dicomcache.relay.spool import Spool, info_from_bytes

ROOT = Path(__file__).resolve().parents[2]


def _spool_with(directory: Path, destinations: list[str], n: int) -> list[int]:
    spool = Spool(directory, destinations)
    spool.open()
    try:
        blobs = [encode(ds, syntaxes.EXPLICIT_LE)
                 for ds in make_ct_series(n, rows=16, columns=16, seed=81)]
        return [spool.put(b, info_from_bytes(b), "MODALITY") for b in blobs]
    finally:
        spool.close()


def test_a_removed_destination_keeps_its_instances(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    keys = _spool_with(tmp_path / "spool", ["OLD", "PACS"], 5)
    spool = Spool(tmp_path / "spool", ["PACS"])  # OLD removed from the configuration
    spool.open()
    try:
        assert spool.unconfigured() == {"OLD": 5}
        assert "5 instance(s) wait for destination 'OLD'" in caplog.text
        spool.record("PACS", [Outcome(k, DELIVERED, 0, "") for k in keys])
        # Delivered to PACS, still waiting for OLD: every file is kept.
        assert len(list(spool.objects.iterdir())) == 5
        snap = spool.snapshot(["PACS"])
        assert snap["destinations"]["OLD"]["queue_depth"] == 5
        assert snap["destinations"]["OLD"]["configured"] is False
        assert snap["destinations"]["PACS"]["configured"] is True
    finally:
        spool.close()


def test_reroute_moves_what_waits_without_sending_anything_twice(tmp_path: Path) -> None:
    keys = _spool_with(tmp_path / "spool", ["OLD", "NEW"], 4)
    spool = Spool(tmp_path / "spool", ["NEW"])
    spool.open()
    try:
        spool.record("NEW", [Outcome(keys[0], DELIVERED, 0, "")])  # NEW had one already
        assert spool.reroute("OLD", "NEW") == (3, 1)
        assert spool.unconfigured() == {}
        assert len(spool.next_batch("NEW", 10)) == 3
    finally:
        spool.close()
    # A destination never configured before: the instances become its own.
    _spool_with(tmp_path / "spool2", ["OLD"], 3)
    spool = Spool(tmp_path / "spool2", ["OTHER", "NEW"])
    spool.open()
    try:
        assert spool.reroute("OLD", "NEW") == (3, 0)
        assert spool.reroute("OLD", "NEW") == (0, 0)  # nothing left
    finally:
        spool.close()


def test_relay_reroute_and_check_config(tmp_path: Path) -> None:
    _spool_with(tmp_path / "spool", ["OLD"], 3)
    cfg = tmp_path / "c.toml"
    cfg.write_text(textwrap.dedent(f"""
        [upstream]
        url = "http://127.0.0.1:9"
        [cache]
        directory = "{tmp_path / 'cache'}"
        [relay]
        enabled = true
        spool_directory = "{tmp_path / 'spool'}"
        [[relay.destinations]]
        name = "NEW"
        remote_ae_title = "PACS"
        remote_host = "127.0.0.1"
        remote_port = 11112
    """))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicomcache", *args, "--config", str(cfg)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)

    checked = run("check-config")
    assert checked.returncode == 0
    assert "3 instance(s) in the spool wait for destination 'OLD'" in checked.stderr
    status = run("relay", "status")
    assert status.returncode == 1  # something waits
    assert "NOT CONFIGURED" in status.stdout.split("\nOLD\n", 1)[1]
    assert "configured conservative" in status.stdout  # NEW, before its first delivery
    bad = run("relay", "reroute", "--from", "OLD", "--to", "ELSEWHERE")
    assert bad.returncode == 2 and "not a configured destination" in bad.stderr
    moved = run("relay", "reroute", "--from", "OLD", "--to", "NEW")
    assert moved.returncode == 0, moved.stderr
    assert "3 instance(s) now wait for NEW" in moved.stdout
    assert "wait for destination" not in run("check-config").stderr
    assert run("relay", "reroute", "--from", "OLD", "--to", "NEW").returncode == 1
