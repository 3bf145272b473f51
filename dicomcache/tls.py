"""TLS for every connection dicomcache accepts or makes: one policy, checked files, reloads.

* **One policy** (:func:`harden`): TLS 1.2 at least; for TLS 1.2, only suites with
  forward secrecy and an AEAD cipher (:data:`CIPHERS`); no compression (CRIME);
  no renegotiation.  TLS 1.3's suites are OpenSSL's (all AEAD).
* **Contexts start where** ``ssl.create_default_context`` **starts**: a server
  context is ``SSLContext(PROTOCOL_TLS_SERVER)``, which is what
  ``create_default_context(Purpose.CLIENT_AUTH)`` builds; a client context is
  ``SSLContext(PROTOCOL_TLS_CLIENT)`` with the system's CAs (or a CA file), which
  is what ``create_default_context(Purpose.SERVER_AUTH)`` builds: certificates
  verified, host names checked.  Two differences, on purpose: the cipher list
  (above; Python's own keeps CBC suites) and no ``SSLKEYLOGFILE`` (an
  environment variable must not make the daemon write the session keys of
  patient data to disk).  ``tests/test_tls.py`` pins both equivalences.
* **Files are checked before use** (:func:`load_pair`): readable, PEM, the key
  belongs to the first certificate of the chain, not expired, accepted by
  OpenSSL.  Each failure is a :class:`TLSFileError` naming which file, so the
  configuration can name the key.
* **Reloads** (:class:`ServerTLS`): the listener keeps one context for ever and
  hands each new handshake to the context loaded last (in its SNI callback,
  which OpenSSL calls for every ClientHello, with or without a server name);
  established connections keep theirs.  A new pair that does not load leaves
  the old one in place.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIN_VERSION = ssl.TLSVersion.TLSv1_2
#: TLS 1.2 suites: ephemeral key exchange and AEAD only (BCP 195 / RFC 9325 §4.2, the
#: DICOM "BCP 195" profiles of PS3.15 B.9-B.11).  Python's default list also allows
#: CBC-mode suites (the padding-oracle family: Lucky 13 and its successors); every
#: browser and every TLS 1.2 stack of this decade offers GCM or ChaCha20.  The result is
#: Python's own list less its CBC suites (pinned by tests/test_tls.py).
CIPHERS = "@SECLEVEL=2:ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!eNULL:!aDSS"
#: A certificate expiring within this is warned about (logs, ``check-config``).
EXPIRES_SOON = timedelta(days=14)


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be used; ``which`` says which file
    (``"certificate"``, ``"key"`` or ``"ca_file"``)."""

    def __init__(self, which: str, message: str) -> None:
        self.which = which
        self.message = message
        super().__init__(f"{which}: {message}")


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What a person checks about a certificate."""

    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    #: Subject alternative names (DNS names and IP addresses).
    names: tuple[str, ...]

    def summary(self, now: datetime | None = None) -> str:
        now = now or datetime.now(UTC)
        days = (self.not_after - now).total_seconds() / 86400
        names = ", ".join(self.names) or "no subject alternative names"
        return (f"{self.subject} ({names}), issued by {self.issuer}, valid until "
                f"{self.not_after:%Y-%m-%d %H:%M} UTC ({days:.0f} days)")


def expiry(not_before: datetime, not_after: datetime, now: datetime) -> str:
    """``"not_yet_valid"``, ``"expired"``, ``"expires_soon"`` (:data:`EXPIRES_SOON`) or
    ``"valid"``: what a certificate's validity means at ``now``."""
    if now < not_before:
        return "not_yet_valid"
    if now >= not_after:
        return "expired"
    if not_after - now <= EXPIRES_SOON:
        return "expires_soon"
    return "valid"


# --- reading and checking files ----------------------------------------------------------
def _read(path: Path, which: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSFileError(which, f"cannot read {str(path)!r}: {exc.strerror}") from exc
    if len(data) > 1 << 20:
        raise TLSFileError(which, f"{str(path)!r} is larger than 1 MiB: not a PEM file")
    return data


def _certificates(data: bytes, path: Path, which: str) -> list[Any]:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TLSFileError(which, f"{str(path)!r} holds no PEM certificate "
                           "(\"-----BEGIN CERTIFICATE-----\"; DER or PKCS#12 files must be "
                           "converted with openssl)") from exc
    return certs


def _names(cert: Any) -> tuple[str, ...]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return (*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)))


def _info(cert: Any) -> CertificateInfo:
    return CertificateInfo(cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(),
                           cert.not_valid_before_utc, cert.not_valid_after_utc, _names(cert))


def _public(key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[no-any-return]


def check_pair(cert_path: Path, key_path: Path, now: datetime | None = None) -> CertificateInfo:
    """The certificate (chain) and key files, checked: readable PEM, the key belongs to
    the first certificate, valid now.  :class:`TLSFileError` otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    certs = _certificates(_read(cert_path, "certificate"), cert_path, "certificate")
    key_data = _read(key_path, "key")
    try:
        key = load_pem_private_key(key_data, password=None)
    except TypeError as exc:  # encrypted
        raise TLSFileError("key", f"{str(key_path)!r} is encrypted with a passphrase, which "
                           "a daemon cannot type: store it unencrypted, readable by the "
                           "service only (mode 0600 or 0640)") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSFileError("key", f"{str(key_path)!r} holds no PEM private key "
                           "(\"-----BEGIN PRIVATE KEY-----\")") from exc
    mine = _public(key.public_key())
    if _public(certs[0].public_key()) != mine:
        others = [i for i, c in enumerate(certs[1:], 2) if _public(c.public_key()) == mine]
        if others:
            raise TLSFileError("certificate", f"the key belongs to certificate #{others[0]} of "
                               f"{str(cert_path)!r}: the server's own certificate must come "
                               "first, then the intermediates")
        raise TLSFileError("key", f"{str(key_path)!r} does not belong to the certificate in "
                           f"{str(cert_path)!r}")
    info = _info(certs[0])
    state = expiry(info.not_before, info.not_after, now or datetime.now(UTC))
    if state == "expired":
        raise TLSFileError("certificate", f"{str(cert_path)!r} expired on "
                           f"{info.not_after:%Y-%m-%d %H:%M} UTC")
    if state == "not_yet_valid":
        raise TLSFileError("certificate", f"{str(cert_path)!r} is not valid before "
                           f"{info.not_before:%Y-%m-%d %H:%M} UTC (check the clock)")
    return info


def check_ca_file(path: Path) -> int:
    """How many certificates a CA bundle holds (at least one), or :class:`TLSFileError`."""
    return len(_certificates(_read(path, "ca_file"), path, "ca_file"))


# --- contexts ------------------------------------------------------------------------------
def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """The one policy (module docstring) on a new context."""
    ctx.minimum_version = MIN_VERSION
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.keylog_filename = None  # type: ignore[assignment]  # (typeshed: str only)
    return ctx


def _openssl(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).lower().replace("_", " ")


def server_context(cert: Path, key: Path, *, client_ca: Path | None = None,
                   require_client_cert: bool = True,
                   cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    """A listener's context with this pair (files checked by :func:`check_pair` first).

    ``client_ca``: clients' certificates are verified against it; required unless
    ``require_client_cert`` is false (then checked when one is presented).
    """
    ctx = harden(cls(ssl.PROTOCOL_TLS_SERVER))
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TLSFileError("certificate", f"OpenSSL refuses {str(cert)!r} with its key: "
                           f"{_openssl(exc)}") from exc
    if client_ca is not None:
        check_ca_file(client_ca)
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise TLSFileError("ca_file", f"OpenSSL refuses {str(client_ca)!r}: "
                               f"{_openssl(exc)}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(ca_file: Path | None = None, cert: Path | None = None,
                   key: Path | None = None) -> ssl.SSLContext:
    """A verifying client context: the system's CAs, or only ``ca_file``'s; with a client
    certificate when ``cert`` and ``key`` are given."""
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED, check_hostname
    if ca_file is not None:
        check_ca_file(ca_file)
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as exc:
            raise TLSFileError("ca_file", f"OpenSSL refuses {str(ca_file)!r}: "
                               f"{_openssl(exc)}") from exc
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None and key is not None:
        check_pair(cert, key)
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise TLSFileError("certificate", f"OpenSSL refuses {str(cert)!r} with its key: "
                               f"{_openssl(exc)}") from exc
    return ctx


class DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose ``wrap_socket`` does not shake hands.

    A threaded server (pynetdicom's) wraps each accepted socket in its accepting
    thread; a handshake there would let one silent client stop every other from
    being accepted.  Here the socket is only wrapped, with ``handshake_timeout``
    set on it, and the handshake happens in the connection's own thread (its
    first read, or an explicit ``do_handshake()``).
    """

    handshake_timeout: float = 30.0

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        sock.settimeout(self.handshake_timeout)
        return super().wrap_socket(sock, server_side=server_side,
                                   do_handshake_on_connect=False,
                                   suppress_ragged_eofs=suppress_ragged_eofs,
                                   server_hostname=server_hostname, session=session)


class ServerTLS:
    """A listener's certificate, reloadable while it runs (module docstring).

    :attr:`context` is what the listener is given, once.  :meth:`reload` reads
    the files again (blocking: call it in a thread) and, when the new pair
    checks out, makes new handshakes use it.
    """

    def __init__(self, cert: Path, key: Path, *, name: str, client_ca: Path | None = None,
                 require_client_cert: bool = True,
                 cls: type[ssl.SSLContext] = ssl.SSLContext) -> None:
        self.cert, self.key, self.name = cert, key, name
        self.client_ca, self.require_client_cert, self.cls = client_ca, require_client_cert, cls
        self._lock = threading.Lock()
        self.info, self._current = self._load()
        # The context handed to the listener: same policy and pair; it never serves a
        # handshake itself, the SNI callback moves each one to the current context.
        self.context = self._build()
        self.context.sni_callback = self._select
        log.info("TLS %s certificate: %s", name, self.info.summary())
        self._warn_if_expiring()

    def _build(self) -> ssl.SSLContext:
        return server_context(self.cert, self.key, client_ca=self.client_ca,
                              require_client_cert=self.require_client_cert, cls=self.cls)

    def _load(self) -> tuple[CertificateInfo, ssl.SSLContext]:
        info = check_pair(self.cert, self.key)
        return info, self._build()

    def _select(self, conn: Any, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        conn.context = self._current  # one reference read: atomic

    def _warn_if_expiring(self) -> None:
        if expiry(self.info.not_before, self.info.not_after, datetime.now(UTC)) == "expires_soon":
            log.warning("TLS %s certificate %s expires on %s UTC: renew it (then SIGHUP)",
                        self.name, self.cert, f"{self.info.not_after:%Y-%m-%d %H:%M}")

    def reload(self) -> bool:
        """Load the files again; True when new handshakes now use them.  A pair that
        does not load is logged and the one loaded before stays."""
        with self._lock:
            try:
                info, ctx = self._load()
            except TLSFileError as exc:
                log.error("TLS %s certificate NOT reloaded, the previous one stays in use "
                          "(valid until %s UTC): %s", self.name,
                          f"{self.info.not_after:%Y-%m-%d %H:%M}", exc)
                return False
            self.info, self._current = info, ctx
        log.info("TLS %s certificate reloaded: %s", self.name, info.summary())
        self._warn_if_expiring()
        return True

    def status(self) -> dict[str, Any]:
        i = self.info
        return {"certificate": str(self.cert), "subject": i.subject, "names": list(i.names),
                "issuer": i.issuer, "not_after": i.not_after.timestamp()}
