"""The relay inside the daemon: `dicomcache serve` with [relay] enabled, end to end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from dicomcache.devtools.orthanc import OrthancProcess, free_ports
from dicomcache.devtools.samples import make_ct_series, write_series
from tests.relay.conftest import (
    StoreSCP,
    daemon_config,
    run_dicomcache,
    start_dicomcache,
    stop_process,
    storescu,
    wait_until_sync,
)


def test_serve_runs_cache_and_relay(tmp_path: Path, orthanc: OrthancProcess,
                                    storescp: Callable[..., StoreSCP], accelerate: bool) -> None:
    pacs = storescp("implicit")
    http_port, dicom_port = free_ports(2)
    cfg = daemon_config(tmp_path, dicom_port, pacs.port, name="c.toml", backoff=(0.2, None),
                        relay_extra=f"accelerate = {str(accelerate).lower()}",
                        serve=(http_port, orthanc))
    files = write_series(make_ct_series(3, rows=64, columns=64, seed=21), tmp_path / "src")
    proc = start_dicomcache(["serve", "--config", str(cfg)], tmp_path / "serve.log",
                            dicom_port, http_port)
    try:
        sent = storescu(files, dicom_port)
        assert sent.returncode == 0, sent.stderr
        wait_until_sync(lambda: len(pacs.files()) >= 3, 60, "three files on the PACS")
        assert len(pacs.files()) == 3
        status = run_dicomcache("relay", "status", "--config", str(cfg), "--json", timeout=60,
                                check=True)
        assert json.loads(status.stdout)
    finally:
        stop_process(proc, timeout=30)
        assert proc.returncode == 0
