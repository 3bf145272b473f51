"""dicomcache.tls: the policy, checked files, and a listener's certificate reloaded while
connections stay up."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from datetime import UTC
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from dicomcache import tls
from dicomcache.tls import ServerTLS, TLSFileError, check_ca_file, check_pair, expiry
from tests.tls_support import Pair, write_ca, write_pair

NOW = dt.datetime(2030, 6, 1, tzinfo=UTC)
DAY = dt.timedelta(days=1)


@pytest.mark.parametrize("not_before, not_after, state", [
    (NOW - DAY, NOW + 90 * DAY, "valid"),
    (NOW - DAY, NOW + 15 * DAY, "valid"),
    (NOW - DAY, NOW + 14 * DAY, "expires_soon"),
    (NOW - DAY, NOW + dt.timedelta(seconds=1), "expires_soon"),
    (NOW - DAY, NOW, "expired"),
    (NOW - 90 * DAY, NOW - DAY, "expired"),
    (NOW + DAY, NOW + 90 * DAY, "not_yet_valid"),
])
def test_expiry(not_before: dt.datetime, not_after: dt.datetime, state: str) -> None:
    assert expiry(not_before, not_after, NOW) == state


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_a_good_pair_is_described(ca: trustme.CA, tmp_path: Path) -> None:
    pair = write_pair(ca, tmp_path, "good", "cache.clinic.example", "127.0.0.1")
    info = check_pair(pair.cert, pair.key)
    assert info.names == ("cache.clinic.example", "127.0.0.1")
    assert "cache.clinic.example" in info.summary()


def _self_signed_rsa(tmp_path: Path, bits: int) -> Pair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    now = dt.datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - DAY).not_valid_after(now + 30 * DAY)
            .sign(key, hashes.SHA256()))
    pair = Pair(tmp_path / "weak.crt", tmp_path / "weak.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pair


def test_bad_files_are_refused_naming_the_file_at_fault(ca: trustme.CA, tmp_path: Path) -> None:
    good = write_pair(ca, tmp_path, "good")
    other = write_pair(ca, tmp_path, "other")
    expired = write_pair(ca, tmp_path, "expired", not_before=NOW.replace(year=2020),
                         not_after=NOW.replace(year=2021))
    future = write_pair(ca, tmp_path, "future", not_before=dt.datetime.now(UTC) + 10 * DAY)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    der = tmp_path / "cert.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(good.cert.read_text().split("-----END")[0]
                                             + "-----END CERTIFICATE-----\n"))
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(good.key.read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    # The chain in the wrong order: the CA's certificate first.
    reordered = tmp_path / "reordered.crt"
    reordered.write_bytes(ca.cert_pem.bytes() + good.cert.read_bytes())
    cases = [
        (tmp_path / "missing.crt", good.key, "certificate", "cannot read"),
        (good.cert, tmp_path / "missing.key", "key", "cannot read"),
        (garbage, good.key, "certificate", "no PEM certificate"),
        (der, good.key, "certificate", "no PEM certificate"),
        (good.cert, garbage, "key", "no PEM private key"),
        (good.cert, good.cert, "key", "no PEM private key"),
        (good.cert, encrypted, "key", "encrypted with a passphrase"),
        (good.cert, other.key, "key", "does not belong to the certificate"),
        (reordered, good.key, "certificate", "must come first"),
        (expired.cert, expired.key, "certificate", "expired on 2021-06-01"),
        (future.cert, future.key, "certificate", "is not valid before"),
    ]
    for cert, key_path, which, message in cases:
        with pytest.raises(TLSFileError) as refused:
            check_pair(cert, key_path)
        assert (refused.value.which, message in refused.value.message) == (which, True), \
            (cert.name, key_path.name, refused.value)


def test_openssl_refuses_what_its_security_level_forbids(tmp_path: Path) -> None:
    weak = _self_signed_rsa(tmp_path, 1024)
    check_pair(weak.cert, weak.key)  # a sound pair…
    with pytest.raises(TLSFileError, match=r"OpenSSL refuses .* key too small"):
        tls.server_context(weak.cert, weak.key)  # …that OpenSSL will not serve


def test_ca_files(ca: trustme.CA, tmp_path: Path) -> None:
    assert check_ca_file(write_ca(ca, tmp_path / "ca.pem")) == 1
    (tmp_path / "empty.pem").write_text("")
    for path in (tmp_path / "empty.pem", tmp_path / "missing.pem"):
        with pytest.raises(TLSFileError) as refused:
            check_ca_file(path)
        assert refused.value.which == "ca_file"


def test_contexts_are_pythons_defaults_but_for_ciphers_and_key_logging(
        ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinned: a Python upgrade changing its defaults shows here, not in production."""
    monkeypatch.setenv("SSLKEYLOGFILE", str(tmp_path / "keys.log"))
    pair = write_pair(ca, tmp_path, "srv")
    ours = [tls.server_context(pair.cert, pair.key), tls.client_context()]
    theirs = [ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
              ssl.create_default_context(ssl.Purpose.SERVER_AUTH)]
    for mine, python in zip(ours, theirs, strict=True):
        assert mine.protocol == python.protocol
        assert mine.verify_mode == python.verify_mode
        assert mine.check_hostname == python.check_hostname
        assert mine.minimum_version == python.minimum_version == ssl.TLSVersion.TLSv1_2
        assert mine.options & python.options == python.options  # everything Python sets…
        assert mine.options & ssl.OP_NO_COMPRESSION and mine.options & ssl.OP_NO_RENEGOTIATION
        assert python.keylog_filename == str(tmp_path / "keys.log")
        assert mine.keylog_filename is None
        names = {c["name"] for c in mine.get_ciphers()}
        assert names <= {c["name"] for c in python.get_ciphers()}  # …less the CBC suites
        tls12 = {c["name"] for c in mine.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 and all("GCM" in n or "CHACHA20" in n for n in tls12), tls12
        assert all(n.startswith(("ECDHE-", "DHE-")) for n in tls12)
    assert ours[1].verify_mode == ssl.CERT_REQUIRED and ours[1].check_hostname


# --- reloading while connections stay up --------------------------------------------------
@pytest.fixture
async def listener(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[tuple[ServerTLS, int]]:
    first = write_pair(ca, tmp_path, "first", "first.example", "127.0.0.1")
    holder = await asyncio.to_thread(ServerTLS, first.cert, first.key, name="test")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=holder.context)
    yield holder, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def _connect(ca: trustme.CA, port: int) -> tuple[asyncio.StreamReader,
                                                        asyncio.StreamWriter, str]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    cert = writer.get_extra_info("peercert")
    return reader, writer, str(dict(cert["subjectAltName"])["DNS"])


async def test_reload_serves_new_connections_the_new_pair_and_keeps_the_old_ones(
        ca: trustme.CA, tmp_path: Path, listener: tuple[ServerTLS, int],
        caplog: pytest.LogCaptureFixture) -> None:
    holder, port = listener
    old_reader, old_writer, name = await _connect(ca, port)
    assert name == "first.example"
    # Renewed in place (as certbot does), then reloaded.
    second = write_pair(ca, tmp_path, "second", "second.example", "127.0.0.1")
    for src, dst in ((second.cert, holder.cert), (second.key, holder.key)):
        dst.write_bytes(src.read_bytes())
    assert await asyncio.to_thread(holder.reload) is True
    _, new_writer, name = await _connect(ca, port)
    assert name == "second.example"
    new_writer.close()
    # The connection made before the reload goes on.
    old_writer.write(b"still here\n")
    assert await asyncio.wait_for(old_reader.readline(), 5) == b"still here\n"
    old_writer.close()

    # A broken pair (a key from elsewhere) is not taken: the second one stays.
    holder.key.write_bytes(write_pair(ca, tmp_path, "third").key.read_bytes())
    assert await asyncio.to_thread(holder.reload) is False
    assert "NOT reloaded, the previous one stays in use" in caplog.text
    assert "does not belong to the certificate" in caplog.text
    _, writer, name = await _connect(ca, port)
    assert name == "second.example"
    writer.close()
    holder.cert.unlink()
    assert await asyncio.to_thread(holder.reload) is False
    _, writer, name = await _connect(ca, port)
    assert name == "second.example"
    writer.close()


async def test_a_certificate_about_to_expire_is_warned_about(
        ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    soon = write_pair(ca, tmp_path, "soon", not_after=dt.datetime.now(UTC) + 3 * DAY)
    await asyncio.to_thread(ServerTLS, soon.cert, soon.key, name="https")
    assert "expires on" in caplog.text and "renew it" in caplog.text
