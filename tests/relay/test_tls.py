"""DICOM TLS (PS3.15 B.9-B.11) on the relay: DCMTK's storescu as the modality,
DCMTK's storescp as the PACS, both speaking TLS with certificates from a test CA."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trustme

from dicomcache.devtools.orthanc import free_port, loopback_env
from dicomcache.devtools.samples import make_ct_series, write_series
from tests.relay.conftest import (
    needs_dcmtk,
    relay_settings,
    storescu,
    wait_port,
    wait_until,
)
from tests.tls_support import Pair, write_ca, write_pair

pytestmark = needs_dcmtk


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca, other = trustme.CA(), trustme.CA()
    d = tmp_path / "pki"
    return {"ca": write_ca(ca, tmp_path / "ca.crt"),
            "relay": write_pair(ca, d, "relay"),           # the SCP's and the SCU's own
            "modality": write_pair(ca, d, "modality"),
            "pacs": write_pair(ca, d, "pacs"),
            "stranger": write_pair(other, d, "stranger")}  # a CA the relay does not trust


def tls_storescu(files: list[Path], port: int, pair: Pair, ca: Path
                 ) -> subprocess.CompletedProcess[str]:
    return storescu(files, port, extra=("+tls", str(pair.key), str(pair.cert), "+cf", str(ca)),
                    timeout=60)


class TLSStoreSCP:
    """DCMTK storescp requiring TLS and a client certificate from the test CA."""

    def __init__(self, directory: Path, pair: Pair, ca: Path) -> None:
        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True)
        self.log = directory.parent / "storescp-tls.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                ["storescp", "-aet", "PACS", "-od", str(directory), "+xa", "+tls",
                 str(pair.key), str(pair.cert), "+cf", str(ca), str(self.port)],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=loopback_env(), start_new_session=True)
        wait_port(self.port, self.proc)

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def tls_pacs(tmp_path: Path, pki: dict[str, Any]):  # type: ignore[no-untyped-def]
    pacs = TLSStoreSCP(tmp_path / "pacs", pki["pacs"], pki["ca"])
    yield pacs
    pacs.stop()


def _settings(tmp_path: Path, pki: dict[str, Any], pacs: TLSStoreSCP, **dest: Any) -> Any:
    from dicomcache.config import DestinationSettings

    destination = DestinationSettings(
        name="PACS", remote_ae_title="PACS", remote_host="127.0.0.1", remote_port=pacs.port,
        tls=True, tls_ca_file=pki["ca"], tls_certificate=pki["relay"].cert,
        tls_key=pki["relay"].key, tls_server_name="localhost")
    return relay_settings(tmp_path / "spool", [replace(destination, **dest)],
                          tls_certificate=pki["relay"].cert, tls_key=pki["relay"].key,
                          tls_ca_file=pki["ca"])


async def test_modality_to_pacs_over_dicom_tls_both_ways(
        tmp_path: Path, relay_factory, pki: dict[str, Any], tls_pacs: TLSStoreSCP) -> None:
    running = await relay_factory(_settings(tmp_path, pki, tls_pacs))
    files = await asyncio.to_thread(write_series, make_ct_series(3, rows=32, columns=32,
                                                                 seed=5), tmp_path / "src")
    sent = await asyncio.to_thread(tls_storescu, files, running.port, pki["modality"], pki["ca"])
    assert sent.returncode == 0, sent.stderr
    await wait_until(lambda: len(tls_pacs.files()) == 3, 60, "three files on the TLS PACS")
    assert running.relay.status()["tls"]["names"] == ["localhost", "127.0.0.1"]


async def test_what_is_not_tls_from_the_test_ca_is_refused_and_nothing_spooled(
        tmp_path: Path, relay_factory, pki: dict[str, Any], tls_pacs: TLSStoreSCP) -> None:
    running = await relay_factory(_settings(tmp_path, pki, tls_pacs))
    files = await asyncio.to_thread(write_series, make_ct_series(1, rows=32, columns=32,
                                                                 seed=6), tmp_path / "src")
    plain = await asyncio.to_thread(storescu, files, running.port, timeout=60)
    assert plain.returncode != 0
    stranger = await asyncio.to_thread(tls_storescu, files, running.port, pki["stranger"],
                                       pki["ca"])
    assert stranger.returncode != 0
    no_cert = await asyncio.to_thread(
        storescu, files, running.port, extra=("+tla", "+cf", str(pki["ca"])), timeout=60)
    assert no_cert.returncode != 0  # a client certificate is required
    assert not list((tmp_path / "spool").rglob("*.dcm"))


async def test_a_client_that_never_shakes_hands_does_not_hold_the_door(
        tmp_path: Path, relay_factory, pki: dict[str, Any], tls_pacs: TLSStoreSCP) -> None:
    running = await relay_factory(_settings(tmp_path, pki, tls_pacs))
    silent = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", running.port))
    try:
        files = await asyncio.to_thread(write_series, make_ct_series(1, rows=32, columns=32,
                                                                     seed=7), tmp_path / "src")
        sent = await asyncio.to_thread(tls_storescu, files, running.port, pki["modality"],
                                       pki["ca"])
        assert sent.returncode == 0, sent.stderr
    finally:
        silent.close()


async def test_a_pacs_with_the_wrong_name_gets_nothing_and_nothing_is_lost(
        tmp_path: Path, relay_factory, pki: dict[str, Any], tls_pacs: TLSStoreSCP) -> None:
    running = await relay_factory(_settings(tmp_path, pki, tls_pacs,
                                            tls_server_name="pacs.elsewhere.example"))
    files = await asyncio.to_thread(write_series, make_ct_series(2, rows=32, columns=32,
                                                                 seed=8), tmp_path / "src")
    sent = await asyncio.to_thread(tls_storescu, files, running.port, pki["modality"], pki["ca"])
    assert sent.returncode == 0, sent.stderr  # received and kept
    await asyncio.sleep(3)  # several forward attempts
    assert tls_pacs.files() == []
    snapshot = await asyncio.to_thread(running.relay.spool.snapshot, ["PACS"])
    assert snapshot["destinations"]["PACS"]["queue_depth"] == 2


async def test_sighup_reload_takes_a_renewed_certificate(
        tmp_path: Path, relay_factory, pki: dict[str, Any], tls_pacs: TLSStoreSCP) -> None:
    running = await relay_factory(_settings(tmp_path, pki, tls_pacs))
    before = running.relay.status()["tls"]
    renewed = write_pair(trustme.CA(), tmp_path / "renewed", "relay")  # another CA: visible
    pki["relay"].cert.write_bytes(renewed.cert.read_bytes())
    pki["relay"].key.write_bytes(renewed.key.read_bytes())
    await running.relay.reload_tls()
    after = running.relay.status()["tls"]
    assert after["issuer"] != before["issuer"]  # new associations get the renewed one
    pki["relay"].cert.write_text("not a certificate")
    await running.relay.reload_tls()  # refused: the renewed one stays
    assert running.relay.status()["tls"] == after
