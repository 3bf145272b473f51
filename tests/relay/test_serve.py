"""The relay inside the daemon: `dicomcache serve` with [relay] enabled, end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from dicomcache.devtools.orthanc import OrthancProcess, free_ports
from dicomcache.devtools.samples import make_ct_series, write_series
from tests.relay.conftest import StoreSCP, storescu, wait_port, wait_until_sync

ROOT = Path(__file__).resolve().parents[2]


def test_serve_runs_cache_and_relay(tmp_path: Path, orthanc: OrthancProcess,
                                    storescp: Callable[..., StoreSCP], accelerate: bool) -> None:
    pacs = storescp("implicit")
    http_port, dicom_port = free_ports(2)
    cfg = tmp_path / "c.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        port = {http_port}
        [upstream]
        url = "{orthanc.url}"
        username = "{orthanc.username}"
        password = "{orthanc.password}"
        [cache]
        directory = "{tmp_path / 'cache'}"
        [audit]
        file = "{tmp_path / 'audit' / 'audit.jsonl'}"
        [relay]
        enabled = true
        port = {dicom_port}
        spool_directory = "{tmp_path / 'spool'}"
        retry_backoff_base = 0.2
        accelerate = {str(accelerate).lower()}
        [[relay.destinations]]
        name = "PACS"
        remote_ae_title = "{pacs.aet}"
        remote_host = "127.0.0.1"
        remote_port = {pacs.port}
    """))
    files = write_series(make_ct_series(3, rows=64, columns=64, seed=21), tmp_path / "src")
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dicomcache", "serve", "--config",
                                 str(cfg)], cwd=ROOT, stderr=log)
    try:
        wait_port(dicom_port, proc, timeout=60)
        wait_port(http_port, proc, timeout=60)
        sent = storescu(files, dicom_port)
        assert sent.returncode == 0, sent.stderr
        wait_until_sync(lambda: len(pacs.files()) >= 3, 60, "three files on the PACS")
        assert len(pacs.files()) == 3
        status = subprocess.run([sys.executable, "-m", "dicomcache", "relay", "status",
                                 "--config", str(cfg), "--json"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(status.stdout)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
