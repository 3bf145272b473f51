"""``dicomcache relay retry``: after fixing a PACS, the running relay sends at once
instead of waiting out its back-off (a real daemon, a real storescp first down, then up)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomcache.devtools.orthanc import free_ports
from dicomcache.devtools.samples import make_ct_series, write_series
from tests.relay.conftest import (
    content_hash,
    needs_dcmtk,
    received,
    stop_process,
    storescu,
    wait_port,
    wait_until_sync,
)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [needs_dcmtk, pytest.mark.slow]


def _dicomcache(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomcache", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def _backing_off(spool: Path) -> bool:
    if not (spool / "state.sqlite").exists():
        return False
    with sqlite3.connect(f"file:{spool / 'state.sqlite'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT next_attempt FROM destinations WHERE name='PACS'").fetchone()
    return row is not None and row[0] > time.time() + 60


@pytest.mark.blocking_allowed(reason="a synchronous test driving processes")
def test_retry_sends_at_once_after_the_pacs_is_fixed(tmp_path: Path, storescp) -> None:
    relay_port, pacs_port = free_ports(2)
    spool = tmp_path / "spool"
    config = tmp_path / "relay.toml"
    config.write_text(f"""
[audit]
file = "{tmp_path / 'audit' / 'audit.jsonl'}"
[relay]
enabled = true
port = {relay_port}
spool_directory = "{spool}"
# After one failed association the next attempt is 5-10 minutes away.
retry_backoff_base = 600
retry_backoff_max = 600
[[relay.destinations]]
name = "PACS"
remote_ae_title = "PACS"
remote_host = "127.0.0.1"
remote_port = {pacs_port}
""")
    files = write_series(make_ct_series(3, rows=64, columns=64, seed=181), tmp_path / "ct")
    with open(tmp_path / "relay.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomcache", "relay", "run", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
            start_new_session=True)
    try:
        wait_port(relay_port, proc)
        sent = storescu(files, relay_port)
        assert sent.returncode == 0, sent.stderr
        wait_until_sync(lambda: _backing_off(spool), 30, "the destination backing off")

        pacs = storescp("all", port=pacs_port)  # the PACS is fixed
        assert _dicomcache("relay", "retry", "--destination", "NOPE", "--config",
                           str(config)).returncode == 2
        done = _dicomcache("relay", "retry", "--destination", "PACS", "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert "PACS: back-off cleared, 3 instance(s) waiting" in done.stdout
        want = {content_hash(f.read_bytes()): 1 for f in files}
        wait_until_sync(lambda: received(pacs.directory) == want, 60,
                        "the spooled instances at the PACS, long before the back-off ends")
        assert proc.poll() is None  # no restart
    finally:
        stop_process(proc)


def test_retry_without_a_spool(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[relay]\nenabled = true\nspool_directory = "{tmp_path / "none"}"\n')
    done = _dicomcache("relay", "retry", "--config", str(config))
    assert done.returncode == 1 and "no relay spool" in done.stderr
