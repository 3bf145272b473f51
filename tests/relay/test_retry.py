"""``dicomcache relay retry``: after fixing a PACS, the running relay sends at once
instead of waiting out its back-off (a real daemon, a real storescp first down, then up)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicomcache.devtools.orthanc import free_ports
from dicomcache.devtools.samples import make_ct_series, write_series
from tests.relay.conftest import (
    content_hash,
    daemon_config,
    needs_dcmtk,
    received,
    run_dicomcache,
    spool_row,
    start_dicomcache,
    stop_process,
    storescu,
    wait_until_sync,
)

pytestmark = [needs_dcmtk, pytest.mark.slow]


def _backing_off(spool: Path) -> bool:
    if not (spool / "state.sqlite").exists():
        return False
    row = spool_row(spool, "SELECT next_attempt FROM destinations WHERE name='PACS'")
    return row is not None and row[0] > time.time() + 60


@pytest.mark.blocking_allowed(reason="a synchronous test driving processes")
def test_retry_sends_at_once_after_the_pacs_is_fixed(tmp_path: Path, storescp) -> None:
    relay_port, pacs_port = free_ports(2)
    spool = tmp_path / "spool"
    # After one failed association the next attempt is 5-10 minutes away.
    config = daemon_config(tmp_path, relay_port, pacs_port, backoff=(600, 600))
    files = write_series(make_ct_series(3, rows=64, columns=64, seed=181), tmp_path / "ct")
    proc = start_dicomcache(["relay", "run", "--config", str(config)], tmp_path / "relay.log",
                            relay_port)
    try:
        sent = storescu(files, relay_port)
        assert sent.returncode == 0, sent.stderr
        wait_until_sync(lambda: _backing_off(spool), 30, "the destination backing off")

        pacs = storescp("all", port=pacs_port)  # the PACS is fixed
        assert run_dicomcache("relay", "retry", "--destination", "NOPE", "--config",
                              str(config)).returncode == 2
        done = run_dicomcache("relay", "retry", "--destination", "PACS", "--config", str(config))
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
    done = run_dicomcache("relay", "retry", "--config", str(config))
    assert done.returncode == 1 and "no relay spool" in done.stderr
