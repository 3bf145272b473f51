"""HTTPS on the viewer port, the HTTP→HTTPS redirect and SIGHUP reloads, as a hospital
runs them: ``dicomcache serve`` as a process, certificates from a test CA, real clients
(curl, Python's ssl, headless Chromium)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dicomcache.devtools.orthanc import OrthancProcess, free_ports, loopback_env
from dicomcache.http.listeners import https_location
from tests.conftest import Sample, eventually_sync, serve_config, start_dicomcache, stop_process
from tests.tls_support import Pair, write_ca, write_pair

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.blocking_allowed(reason="synchronous tests of a daemon process")


@pytest.mark.parametrize(("host", "path", "port", "expected"), [
    ("localhost:8081", "/healthz", 8443, "https://localhost:8443/healthz"),
    ("clinic-box", "/wado?requestType=WADO&a=1", 443, "https://clinic-box/wado?requestType=WADO&a=1"),
    ("[::1]:80", "/", 8443, "https://[::1]:8443/"),
    ("CLINIC.example:80", "/x", 8443, "https://clinic.example:8443/x"),
])
def test_https_location(host: str, path: str, port: int, expected: str) -> None:
    assert https_location(host, path, port) == expected


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    redirect_port: int
    ca: Path
    pair: Pair
    log: Path

    def url(self, path: str, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{path}"

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                              text=True, errors="replace", timeout=30, env=loopback_env(),
                              check=False)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def daemon(tmp_path: Path, orthanc: OrthancProcess) -> Iterator[Daemon]:
    ca = trustme.CA()
    pair = write_pair(ca, tmp_path / "tls", "viewer")
    port, redirect_port = free_ports(2)
    cfg = serve_config(tmp_path / "c.toml", port, orthanc.url, orthanc, prefetch=None,
                       server={"tls_certificate": str(pair.cert), "tls_key": str(pair.key),
                               "http_redirect_port": redirect_port})
    log = tmp_path / "serve.log"
    proc = start_dicomcache(["serve", "--config", str(cfg)], log, port, redirect_port,
                            env=loopback_env())
    try:
        yield Daemon(proc, port, redirect_port, write_ca(ca, tmp_path / "ca.crt"), pair, log)
    finally:
        stop_process(proc)
    assert proc.returncode == 0


def test_curl_reads_an_instance_over_verified_https(
        daemon: Daemon, samples: dict[str, list[Sample]], tmp_path: Path) -> None:
    sample = samples["explicit"][0]
    body = tmp_path / "body.dcm"
    got = daemon.curl("--cacert", str(daemon.ca), "-o", str(body), "-w", "%{http_code}",
                      daemon.url(f"/instances/{sample.orthanc_id}/file"))
    assert got.returncode == 0, got.stderr
    assert got.stdout == "200" and body.read_bytes() == sample.data
    # Untrusted (no CA given), another name, an old protocol, plain HTTP: all refused.
    assert daemon.curl(daemon.url("/healthz")).returncode == 60
    wrong = daemon.curl("--cacert", str(daemon.ca), "--resolve",
                        f"pacs.elsewhere.example:{daemon.port}:127.0.0.1",
                        daemon.url("/healthz", host="pacs.elsewhere.example"))
    assert wrong.returncode == 60 and "pacs.elsewhere.example" in wrong.stderr
    old = daemon.curl("--cacert", str(daemon.ca), "--tlsv1.0", "--tls-max", "1.1",
                      daemon.url("/healthz"))
    assert old.returncode != 0
    clear = daemon.curl(f"http://localhost:{daemon.port}/healthz")
    assert clear.returncode != 0 or "400" in clear.stdout


def test_the_redirect_port_sends_viewers_to_https_and_serves_nothing(daemon: Daemon) -> None:
    got = daemon.curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                      f"http://localhost:{daemon.redirect_port}/wado?requestType=WADO&x=1")
    assert got.stdout == f"308 https://localhost:{daemon.port}/wado?requestType=WADO&x=1"
    rebinding = daemon.curl("-o", "/dev/null", "-w", "%{http_code}", "-H",
                            "Host: attacker.example",
                            f"http://127.0.0.1:{daemon.redirect_port}/healthz")
    assert rebinding.stdout == "421"
    followed = daemon.curl("-L", "--cacert", str(daemon.ca), "-o", "/dev/null", "-w",
                           "%{http_code}", f"http://localhost:{daemon.redirect_port}/healthz")
    assert followed.stdout == "200"


def _client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _peer_certificate(daemon: Daemon) -> x509.Certificate:
    conn = http.client.HTTPSConnection("localhost", daemon.port, timeout=10,
                                       context=_client_context(daemon.ca))
    try:
        conn.connect()
        der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    finally:
        conn.close()
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_sighup_takes_a_renewed_certificate_without_dropping_connections(
        daemon: Daemon, tmp_path: Path) -> None:
    first = _peer_certificate(daemon)
    kept = http.client.HTTPSConnection("localhost", daemon.port, timeout=10,
                                       context=_client_context(daemon.ca))
    kept.request("GET", "/healthz")
    assert kept.getresponse().read() and True
    # The certificate is renewed in place (what certbot or the hospital's PKI does).
    renewing_ca = trustme.CA()
    renewed = write_pair(renewing_ca, tmp_path / "renewed", "viewer")
    new_ca = write_ca(renewing_ca, tmp_path / "renewed" / "ca.crt")
    daemon.pair.cert.write_bytes(renewed.cert.read_bytes())
    daemon.pair.key.write_bytes(renewed.key.read_bytes())
    daemon.proc.send_signal(signal.SIGHUP)
    eventually_sync(lambda: "certificate reloaded" in daemon.log_text(), timeout=20,
                    what="the reload")
    kept.request("GET", "/healthz")  # the connection made before the reload goes on
    assert kept.getresponse().status == 200
    kept.close()
    # New handshakes get the new certificate (it no longer verifies with the old CA).
    with pytest.raises(ssl.SSLCertVerificationError):
        _peer_certificate(daemon)
    second = _peer_certificate(Daemon(daemon.proc, daemon.port, 0, new_ca, renewed,
                                      daemon.log))
    assert second.serial_number != first.serial_number
    # A broken file is refused; the renewed certificate stays in use.
    daemon.pair.cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
    daemon.proc.send_signal(signal.SIGHUP)
    eventually_sync(lambda: "NOT reloaded" in daemon.log_text(), timeout=20,
                    what="the refused reload")
    third = _peer_certificate(Daemon(daemon.proc, daemon.port, 0, new_ca, renewed, daemon.log))
    assert third.serial_number == second.serial_number
    assert daemon.proc.poll() is None


def _spki_pin(cert: Path) -> str:
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_chromium_opens_the_status_page_over_https(daemon: Daemon) -> None:
    # Chromium trusts the test certificate by its key (its own CA store is not ours to
    # change); the handshake itself is Chromium's, against our TLS policy.
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage",
         f"--ignore-certificate-errors-spki-list={_spki_pin(daemon.pair.cert)}",
         "--dump-dom", daemon.url("/")],
        capture_output=True, text=True, timeout=90, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "<h1>dicomcache</h1>" in out.stdout
    assert 'id="tls-expiry"' in out.stdout  # the status page shows the certificate


def test_metrics_carry_no_created_series(daemon: Daemon) -> None:
    """One ``*_created`` series per counter child doubled what Prometheus stores."""
    got = daemon.curl("--cacert", str(daemon.ca), daemon.url("/metrics"))
    assert got.returncode == 0 and "dicomcache_" in got.stdout
    assert "_created" not in got.stdout
