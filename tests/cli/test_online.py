"""``check-config --online`` against real parts: each misconfiguration found by name.

Before it existed, every case below said "OK" (the file was valid) and the
operator learnt of the problem from the first viewer's error.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomcache.devtools.orthanc import OrthancProcess, free_ports, loopback_env
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom import syntaxes
from tests.conftest import Sample
from tests.relay.conftest import StoreSCP, needs_dcmtk

ROOT = Path(__file__).resolve().parents[2]


def check(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomcache", "check-config", "--online",
                           "--config", str(cfg)], capture_output=True, text=True,
                          cwd=ROOT, env=loopback_env(), stdin=subprocess.DEVNULL, timeout=120,
                          check=False)


def config(tmp_path: Path, url: str, *, password: str = "orthanc-test", port: int = 0,
           relay: str = "") -> Path:
    port = port or free_ports(1)[0]
    cfg = tmp_path / "config.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [server]
        host = "127.0.0.1"
        port = {port}
        [upstream]
        url = "{url}"
        username = "orthanc"
        password = "{password}"
        [cache]
        directory = "{tmp_path / 'cache'}"
        max_size = "64MiB"
        [audit]
        file = "{tmp_path / 'audit.jsonl'}"
        """) + relay)
    return cfg


def problems(out: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """``key -> message`` of every PROBLEM line."""
    found = {}
    for line in out.stdout.splitlines():
        if line.strip().startswith("PROBLEM"):
            key, _, message = line.strip()[len("PROBLEM"):].strip().partition(": ")
            found[key] = message
    return found


def test_a_ready_orthanc_passes_every_check(tmp_path: Path, orthanc: OrthancProcess,
                                            samples: dict[str, list[Sample]]) -> None:
    out = check(config(tmp_path, orthanc.url))
    assert out.returncode == 0, out.stderr
    assert "online checks:" in out.stdout
    for key in ("upstream.url", "Orthanc DICOMweb plugin", "Orthanc /changes",
                "Orthanc StoreMD5ForAttachments", "server.port"):
        assert f"ok      {key}: " in out.stdout, (key, out.stdout)
    assert "Orthanc 1." in out.stdout


def test_wrong_credentials_name_the_username(tmp_path: Path, orthanc: OrthancProcess) -> None:
    out = check(config(tmp_path, orthanc.url, password="not-the-password"))
    assert out.returncode == 1
    assert "refused dicomcache's credentials (401)" in problems(out)["upstream.username"]
    assert "1 online problem(s): upstream.username" in out.stderr
    assert "OK" in out.stdout  # the file itself is valid: that is the offline verdict


def test_an_upstream_down_or_unresolvable(tmp_path: Path) -> None:
    nobody = free_ports(1)[0]
    out = check(config(tmp_path, f"http://127.0.0.1:{nobody}"))
    assert out.returncode == 1
    assert "cannot connect" in problems(out)["upstream.url"]
    out = check(config(tmp_path, "http://no-such-orthanc.invalid:8042"))
    assert out.returncode == 1
    assert "does not resolve" in problems(out)["upstream.url"]


@pytest.fixture(scope="module")
def bare_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """An Orthanc as installed without care: no DICOMweb plugin, no MD5s stored."""
    proc = OrthancProcess(tmp_path_factory.mktemp("bare"),
                          overrides={"Plugins": [], "StoreMD5ForAttachments": False})
    proc.start()
    proc.upload([encode(ds, syntaxes.EXPLICIT_LE)
                 for ds in make_ct_series(1, rows=8, columns=8, seed=7)])
    yield proc
    proc.stop()


def test_no_dicomweb_plugin_and_no_md5s(tmp_path: Path, bare_orthanc: OrthancProcess) -> None:
    out = check(config(tmp_path, bare_orthanc.url))
    assert out.returncode == 1
    found = problems(out)
    assert "not loaded" in found["Orthanc DICOMweb plugin"]
    assert "stored without an MD5" in found["Orthanc StoreMD5ForAttachments"]
    assert "ok      upstream.url: " in out.stdout  # the rest still checked


def test_a_port_taken(tmp_path: Path, orthanc: OrthancProcess) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = check(config(tmp_path, orthanc.url, port=taken.getsockname()[1]))
    assert out.returncode == 1
    assert "Address already in use" in problems(out)["server.port"]


def relay_block(tmp_path: Path, *destinations: tuple[str, int]) -> str:
    relay_port = free_ports(1)[0]
    text = textwrap.dedent(f"""\
        [relay]
        enabled = true
        ae_title = "CLINICGW"
        host = "127.0.0.1"
        port = {relay_port}
        spool_directory = "{tmp_path / 'spool'}"
        timeout = 5
        """)
    for name, port in destinations:
        text += textwrap.dedent(f"""\
            [[relay.destinations]]
            name = "{name}"
            remote_ae_title = "PACS"
            remote_host = "127.0.0.1"
            remote_port = {port}
            """)
    return text


@needs_dcmtk
def test_each_relay_destination_is_echoed(tmp_path: Path, orthanc: OrthancProcess) -> None:
    up, down = free_ports(2)
    pacs = StoreSCP(up, "PACS", tmp_path / "pacs", ["+xa"]).start()
    try:
        out = check(config(tmp_path, orthanc.url,
                           relay=relay_block(tmp_path, ("MAIN", up), ("BACKUP", down))))
    finally:
        pacs.stop()
    assert out.returncode == 1
    assert "answered C-ECHO from CLINICGW" in out.stdout
    assert "ok      relay.destinations[MAIN]" in out.stdout
    assert "no association" in problems(out)["relay.destinations[BACKUP]"]
    assert "ok      relay.port: " in out.stdout
