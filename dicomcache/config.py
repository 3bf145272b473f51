"""Configuration: one frozen :class:`Settings` built once from TOML.

Every component receives only its own section.  Each default is written once,
in its dataclass; the readers below take it from there (``d = XSettings()``).
:func:`load` collects *every* problem in a file (wrong type, bad value, unknown
key — usually a typo) and raises one :class:`ConfigError` that names each key,
so ``check-config`` can show them all at once.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import dicomcache.tls as tls
from dicomcache.errors import ConfigError

T = TypeVar("T")
N = TypeVar("N", int, float)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
#: Size units, compared case-insensitively: binary ones with an "i" (as ``df -h`` prints),
#: decimal ones without (as disks are sold).  A bare "G" is neither, so it is refused.
SIZE_UNITS = {"": 1, "b": 1,
              "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
              "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: 16 chars, no backslash

#: ``upstream.frames_transfer_syntax``: RLE, JPEG-LS and JPEG 2000 Lossless (config
#: imports no DICOM knowledge; tests/test_config.py checks these against dicom/syntaxes.py).
FRAMES_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80",
                            "1.2.840.10008.1.2.4.90")
STRATEGIES = ("universal", "conservative", "standard", "compression", "extended")
#: The registered DICOM port (PS3.8 §C.1), for a destination without ``remote_port``.
DEFAULT_DICOM_PORT = 104


def parse_size(text: str | int) -> int:
    """``"50GiB"`` → 50 × 2³⁰ bytes, ``"50GB"`` → 50 × 10⁹; a TOML integer is bytes.

    KiB, MiB, GiB, TiB are powers of 1024; kB, MB, GB, TB powers of 1000 (any case).
    A unit without "B" ("50G") is refused: it would be a guess between the two.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("must not be negative")
        return text
    if not isinstance(text, str):
        raise ValueError("must be a size such as \"50GiB\"")
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if m and unit in ("k", "m", "g", "t"):
        number = m.group(1)
        raise ValueError(f"{text!r} is ambiguous: write \"{number}{unit.upper()}iB\" (powers "
                         f"of 1024) or \"{number}{unit.upper()}B\" (powers of 1000)")
    if not m or unit not in SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size such as \"50GiB\" (units B, KiB, MiB, GiB, "
                         "TiB: powers of 1024; kB, MB, GB, TB: powers of 1000)")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def format_size(n: float) -> str:
    """Bytes for people, in binary units: ``1536`` → ``"1.5 KiB"`` (as ``df -h``; the
    status page, logs and every command print sizes this way)."""
    for unit in _BINARY_UNITS:
        if abs(n) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Serve the status page, status JSON and /metrics on this port of ``admin_host``
    #: instead of the viewer port (where they then answer 404).
    admin_port: int | None = None
    admin_host: str = "127.0.0.1"
    #: ``Host:`` names viewers may use (a port after them is ignored); another name is
    #: answered 421 (DNS rebinding).  Empty: the listen address, this machine's names,
    #: ``localhost`` and the loopback addresses.
    allowed_hosts: tuple[str, ...] = ()
    #: Seconds to let in-flight requests finish on SIGTERM before they are cancelled.
    shutdown_timeout: float = 10.0
    #: Seconds a viewer may leave one write of a relayed answer unread before the
    #: connection is closed (nginx's ``send_timeout``): a client that stops reading
    #: gives back what it holds (a read-through's connection to Orthanc).
    send_timeout: float = 60.0
    log_format: str = "plain"
    log_level: str = "INFO"
    #: HTTPS on ``port``: the certificate (chain: the server's first, then intermediates)
    #: and its unencrypted key, both PEM; re-read on SIGHUP.  ``None``: plain HTTP.
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    #: With TLS: a plain-HTTP port (on ``host``) answering every request with a 308 to the
    #: same path on ``https://…:port``, and nothing else.
    http_redirect_port: int | None = None
    #: Requests one client (address, or /64) may have in progress; more wait their turn
    #: (up to 8 times as many), beyond that ``429``.  0: no limit.
    max_requests_per_client: int = 32
    #: Requests per second one client may send on average (a token bucket), in bursts of
    #: up to ``client_burst``; beyond that ``429`` with ``Retry-After``.  0: no limit.
    client_rate: float = 300.0
    client_burst: int = 3000
    #: Connections one client (address, or /64) may hold open on the viewer port; beyond
    #: it its longest idle one is closed, or the new one if none is idle.  Trusted proxies
    #: (``[audit] trusted_proxies``) are exempt.  0: no limit.
    max_connections_per_client: int = 64


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    #: ``None`` means "no upstream configured": ``serve`` then starts a demo Orthanc.
    url: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    retries: int = 3
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    max_connections: int = 32
    #: Of ``max_connections``, how many the read-through (the Orthanc paths viewers
    #: choose, answered as Orthanc sends them) may hold at once; viewers' misses,
    #: metadata and searches keep the rest, whatever slow clients or slow resources do.
    #: Read as half of ``max_connections`` when not given.
    read_through_connections: int = 16
    #: Consecutive requests of dicomcache's own failing on every attempt because the
    #: link failed (timeout, reset, refused connection) that open the circuit breaker;
    #: 0 disables it.
    breaker_failures: int = 3
    #: While the circuit is open, ``GET /system`` is probed this often (seconds).
    breaker_probe_interval: float = 5.0
    #: Ask Orthanc for gzip: ``none``; ``json`` (dicomcache's own listings and lookups);
    #: ``all`` (instances too: ~2x fewer bytes on the link for ~45 ms of Orthanc CPU per
    #: 512 KiB; pays on links slower than Orthanc compresses); ``auto`` (JSON always,
    #: instances when the measured link is slower than gzip's break-even, see
    #: :mod:`dicomcache.upstream.link`).  Always verified after decompression; a
    #: viewer's ``Accept-Encoding`` never decides.
    compression: str = "auto"
    #: PEM bundle of the CA(s) an ``https://`` upstream's certificate must chain to
    #: (a hospital CA); ``None``: the system's CAs.  Verification is never off.
    ca_file: Path | None = None
    #: Bytes of one read-through answer kept in memory while its viewer reads slower
    #: than Orthanc sends (nginx's ``proxy_buffers``); beyond, a temp file.
    read_through_buffer: int = 256 << 10
    #: Temp-file bytes all read-through answers may hold together, in the cache
    #: directory's ``tmp/`` (nginx's ``proxy_max_temp_file_size``); when spent, a slow
    #: viewer holds its Orthanc connection as long as it reads.  0: never spill.
    read_through_temp: int = 1 << 30
    #: Opt-in: a viewer's cold frames (not stored yet) asked with ``transfer-syntax=*``
    #: are fetched from Orthanc in this lossless syntax (e.g. JPEG-LS Lossless
    #: ``1.2.840.10008.1.2.4.80``: ~3x fewer bytes than native); ``""``: off.  The
    #: stored original instance stays what is served for anything byte-exact.
    frames_transfer_syntax: str = ""
    #: Connections to Orthanc opened ahead when a viewer searches or opens a series
    #: (a cheap ``GET /system`` each, at most once a second), so the requests that
    #: follow (the other series' metadata, each frame's body and its MD5) do not each
    #: wait for a new connection; 0: off.  Orthanc closes an idle one after ~1 s.
    #: Read as at most ``max_connections - 1`` when not given.
    warm_connections: int = 6


@dataclass(frozen=True, slots=True)
class CacheSettings:
    directory: Path = Path("/var/cache/dicomcache")
    max_size: int = 50 << 30
    #: Seconds a full background re-verification of the store takes (0: none).
    scrub_period: float = 86400.0
    #: A stored series is served while Orthanc's list of its instances was read within
    #: twice this (seconds); series in use are confirmed again this often (0: never).
    confirm_interval: float = 1.0
    #: Seconds an entry is served without Orthanc confirming its MD5 again (while
    #: Orthanc can be asked; 0: never confirm).
    revalidate_after: float = 86400.0
    #: Instances larger than this are written to a temp file as they arrive (hashed on
    #: the way, verified from the file, committed by rename), never held whole in memory.
    stream_above: int = 32 << 20
    #: Bytes left free on the cache's file system (nginx's ``min_free``): below it the
    #: least recently used entries are evicted, or new bodies are served uncached
    #: (0: no guard, the cache writes until the disk is full).
    min_free: int = 2 << 30


@dataclass(frozen=True, slots=True)
class AccessSettings:
    #: ``"METHOD /path"`` rules (``*`` globs) opening endpoints that are closed by default.
    allow: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DestinationSettings:
    name: str
    remote_ae_title: str
    remote_host: str
    remote_port: int
    transfer_syntax_strategy: str = "conservative"
    #: Associations tried along the fallback sequence (standard → conservative → universal).
    max_association_retries: int = 3
    #: Lossy re-compression is only ever done for ``extended`` peers that allow it.
    allow_lossy_recompression: bool = False
    #: DICOM TLS (PS3.15 B.9-B.11, BCP 195) towards this peer, its certificate verified
    #: against ``tls_ca_file`` (else the system's CAs) for ``tls_server_name`` (else
    #: ``remote_host``); ``tls_certificate``/``tls_key``: ours, if the peer asks for one.
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None


@dataclass(frozen=True, slots=True)
class RelaySettings:
    enabled: bool = False
    ae_title: str = "DICOMCACHE"
    host: str = "127.0.0.1"
    port: int = 11112
    spool_directory: Path = Path("/var/lib/dicomcache/spool")
    allowed_calling_ae_titles: tuple[str, ...] = ()
    #: Addresses or CIDR networks allowed to connect (empty: any).
    allowed_hosts: tuple[str, ...] = ()
    #: Keep delivered instances this many seconds (0: delete once delivered everywhere).
    retention: float = 0.0
    retry_backoff_base: float = 2.0
    retry_backoff_max: float = 300.0
    max_pdu: int = 131072
    #: ACSE/DIMSE/network timeout (seconds) of inbound and outbound associations.
    timeout: float = 30.0
    #: Simultaneous inbound associations (more are rejected: "local limit exceeded").
    max_inbound_associations: int = 16
    #: Most instances sent in one outbound association (one study at a time).
    batch_size: int = 500
    #: A destination answering a transient failure status (0xA7xx…) for the same instance
    #: this many times gets it quarantined (peers such as Orthanc answer 0xA700 for data
    #: they will never store).  Connection failures never count.
    max_instance_retries: int = 20
    #: Install the relay's speed-ups for pynetdicom (``dicomcache.relay.accel``) when the
    #: relay starts; off: pynetdicom as published (same behaviour, slower).
    accelerate: bool = True
    destinations: tuple[DestinationSettings, ...] = ()
    #: DICOM TLS on the SCP (PS3.15 B.9-B.11): our certificate chain and key (PEM).
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    #: Modalities' certificates are verified against this CA bundle (PEM)…
    tls_ca_file: Path | None = None
    #: …and one is required (``False``: checked only when a modality presents one).
    tls_require_client_certificate: bool = True
    #: New C-STOREs are refused (0xA700) when fewer bytes than this would stay free on the
    #: spool's file system after them (0: only a full disk refuses).
    min_free: int = 1 << 30
    #: Simultaneous inbound associations from one address (more are rejected: "local
    #: limit exceeded"), so that one host cannot take every slot.
    max_associations_per_host: int = 8
    #: A forwarder keeps its association with a PACS open this many seconds after a
    #: batch, for the next one (0: released after every batch).
    forward_idle_release: float = 5.0


PREFETCH_MODES = ("off", "series", "study")
COMPRESSION = ("none", "json", "all", "auto")


@dataclass(frozen=True, slots=True)
class PrefetchSettings:
    #: What a viewer's first touch of a study fetches ahead: nothing, the rest of the
    #: series, or the series then the rest of the study.
    mode: str = "study"
    #: Upstream downloads prefetch may have in flight (a viewer's own downloads count
    #: against it too and never wait).
    parallel: int = 6
    #: Share of ``cache.max_size`` the studies being viewed (touched within
    #: ``active_seconds``) may fill before prefetch stops.
    max_fraction: float = 0.8
    #: How long a touched study counts as "being viewed".
    active_seconds: float = 3600.0
    #: Studies waiting for prefetch at most (older touches are dropped).
    max_queued: int = 32
    #: Distinct studies one principal (user, token subject) may start prefetching within
    #: ``principal_window`` seconds; touches past it are served but not prefetched.
    max_studies_per_principal: int = 20
    principal_window: float = 3600.0


@dataclass(frozen=True, slots=True)
class PrewarmRule:
    """A new stable study matching every given field is prefetched whole."""

    modality: str | None = None
    label: str | None = None
    tag: str | None = None
    value: str | None = None


@dataclass(frozen=True, slots=True)
class ChangesSettings:
    #: Follow Orthanc's ``/changes`` (replacements, invalidation hooks and pre-warming).
    enabled: bool = True
    poll_interval: float = 1.0
    #: Changes read per request.
    batch: int = 100
    #: Where the last change seen is kept across restarts (default: in ``cache.directory``).
    cursor_file: Path | None = None
    prewarm: tuple[PrewarmRule, ...] = ()


@dataclass(frozen=True, slots=True)
class DicomwebSettings:
    """DICOMweb caching policy (see docs/dicomweb.md)."""

    #: Seconds series/study metadata and instance lists stay fresh before revalidation.
    metadata_fresh: float = 10.0
    #: Seconds a QIDO-RS answer stays fresh (then asked again).
    qido_fresh: float = 5.0
    #: Seconds series/study rendered and thumbnail answers stay fresh.
    rendered_fresh: float = 60.0
    #: Longest a stale copy is served (marked ``Warning: 110``) while Orthanc is unreachable;
    #: 0 never serves stale copies.
    stale_if_error: float = 7 * 86400.0
    #: Memory bound for cached metadata, QIDO, rendered answers and instance lists.
    memory_size: int = 256 << 20
    #: Instances fetched ahead while a series/study retrieve streams.
    retrieve_concurrency: int = 8
    #: Base URL written into links (``http://viewer-host:8080``); empty: from the request.
    public_url: str | None = None


@dataclass(frozen=True, slots=True)
class CorsSettings:
    #: Origins (``https://ohif.example.org``) allowed to read answers; ``"*"`` any; empty none.
    allowed_origins: tuple[str, ...] = ()
    #: Seconds a browser may keep a preflight answer.
    max_age: int = 600
    #: Let pages send credentials in browser-managed form (cookies, the browser's own
    #: HTTP authentication prompt): ``Access-Control-Allow-Credentials: true``.  Never
    #: with ``"*"``.  An ``Authorization`` header set by the viewer (OIDC bearer tokens)
    #: does not need it.
    allow_credentials: bool = False


AUTH_MODES = ("none", "basic", "bearer")
#: JWS algorithms an access token may be signed with: public-key ones only.  ``none``
#: and the HMAC family (``HS*``) are never accepted: with a public JWKS, an HMAC
#: "signature" keyed by the public key is a forgery anyone can make.
TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                    "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Who may use the HTTP side (see docs/security.md)."""

    #: ``none`` (loopback only, unless ``allow_anonymous_network``), ``basic`` (the users
    #: file) or ``bearer`` (OIDC/OAuth2 JWT access tokens).
    mode: str = "none"
    #: Let ``mode = "none"`` listen on a non-loopback address (everyone on the network is
    #: an admin then; the status page says so).
    allow_anonymous_network: bool = False
    #: The ``realm`` of ``WWW-Authenticate`` challenges.
    realm: str = "dicomcache"
    #: ``basic``: one ``name:role:argon2id-hash`` line per user (``dicomcache users``).
    users_file: Path | None = None
    #: ``bearer``: the token issuer, exactly as tokens carry it in ``iss`` (a trailing
    #: slash counts), and the base of OIDC discovery.
    issuer: str | None = None
    #: ``bearer``: the audience (``aud``) tokens must be minted for.
    audience: str | None = None
    #: ``bearer``: where the signing keys are; ``None``: OIDC discovery from ``issuer``.
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    #: Seconds of clock skew tolerated for ``exp``/``nbf``/``iat``.
    leeway: float = 30.0
    #: Dotted path of the claim holding the roles (a list, or a space-separated string).
    roles_claim: str = "realm_access.roles"
    #: Claim values giving the viewer role (``"*"``: any token for the audience).
    viewer_roles: tuple[str, ...] = ()
    #: Claim values giving the admin role.
    admin_roles: tuple[str, ...] = ()
    #: The claim naming the principal (logs, audit, per-principal bounds).
    name_claim: str = "sub"
    #: Failed authentications from one address before it waits (1 s, doubling).
    max_failures: int = 10
    #: Longest wait (seconds) imposed on an address after repeated failures.
    max_delay: float = 300.0
    #: Per-study decisions by a web service speaking the Orthanc authorization
    #: plugin's protocol; ``None``: the role decides alone.
    authorization_url: str | None = None
    authorization_timeout: float = 5.0
    #: ``server-id`` sent to the authorization service.
    authorization_server_id: str | None = None


AUDIT_SYSLOG_SCHEMES = {"udp": 514, "tcp": 601, "tls": 6514}


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The audit trail of every access to patient data (see dicomcache.audit)."""

    #: JSON lines, appended by every dicomcache process of this host (flock), rotated by size.
    file: Path = Path("/var/log/dicomcache/audit.jsonl")
    #: Fail closed: patient data is refused (HTTP 503, DIMSE 0xA700, purges) while records
    #: cannot be written.  ``False``: served anyway, the failure said loudly.
    required: bool = True
    #: The current file is rotated before it would grow past this.
    max_file_size: int = 64 << 20
    #: Rotated files kept (the oldest deleted beyond); 0 keeps them all.
    keep: int = 0
    #: Records waiting in memory to be written, at most (more are dropped, and counted).
    max_queue: int = 10000
    #: Proxies (addresses or networks) whose ``X-Forwarded-For`` names the client.
    trusted_proxies: tuple[str, ...] = ()
    #: Also send DICOM audit messages (PS3.15 A.5) by syslog: ``udp://``, ``tcp://`` or
    #: ``tls://host[:port]``; ``None``: no syslog.
    syslog: str | None = None
    #: For ``tls://``: the CA bundle the collector's certificate is checked against (default:
    #: the system's), and our client certificate and key when the collector asks for one.
    syslog_ca_file: Path | None = None
    syslog_cert_file: Path | None = None
    syslog_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    cache: CacheSettings = CacheSettings()
    access: AccessSettings = AccessSettings()
    relay: RelaySettings = RelaySettings()
    prefetch: PrefetchSettings = PrefetchSettings()
    changes: ChangesSettings = ChangesSettings()
    dicomweb: DicomwebSettings = DicomwebSettings()
    cors: CorsSettings = CorsSettings()
    auth: AuthSettings = AuthSettings()
    audit: AuditSettings = AuditSettings()
    #: Where the file came from, for messages; ``None`` for built-in defaults.
    source: Path | None = None


class _Section:
    """Typed reads from one TOML table, recording problems instead of raising."""

    def __init__(self, data: Any, prefix: str, problems: list[tuple[str, str]]) -> None:
        self.prefix = prefix
        self.problems = problems
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.append((prefix, "must be a table"))
            data = {}
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def problem(self, name: str, message: str) -> None:
        self.problems.append((self.key(name), message))

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        # bool is an int in Python, but `port = true` is a typo, not port 1
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            self.problem(name, f"must be {names}, not {type(value).__name__} {value!r}")
            return default
        return value  # type: ignore[no-any-return]

    def port(self, name: str, default: int) -> int:
        value = self.get(name, int, default)
        if not 0 <= value <= 65535:
            self.problem(name, f"{value} is not a TCP port (0-65535)")
        return value

    def positive(self, name: str, default: float) -> float:
        value = self.get(name, float, default)
        if value <= 0:
            self.problem(name, f"must be > 0, not {value}")
        return value

    def at_least(self, name: str, default: N, minimum: N) -> N:
        """A number (of ``default``'s type) no smaller than ``minimum``."""
        value = self.get(name, type(default), default)
        if value < minimum:
            self.problem(name, f"must be at least {minimum}, not {value}")
            return default
        return value

    def size(self, name: str, default: int, minimum: int = 1 << 20) -> int:
        """A size such as ``"50GiB"`` (see :func:`parse_size`), at least ``minimum``."""
        raw = self.get(name, (str, int), default)
        try:
            value = parse_size(raw)
        except ValueError as exc:
            self.problem(name, str(exc))
            return default
        if value < minimum:
            self.problem(name, f"{raw!r} is too small: at least {format_size(minimum)}")
        return value

    def str_list(self, name: str) -> tuple[str, ...]:
        value = self.get(name, list, [])
        if not all(isinstance(v, str) for v in value):
            self.problem(name, "must be a list of strings")
            return ()
        return tuple(value)

    def finish(self) -> None:
        for extra in sorted(set(self.data) - self.used):
            self.problem(extra, "unknown key (a typo?)")


#: A DNS name, an IPv4 address or a bracketed IPv6 address (what a ``Host:`` names).
_HOST_NAME = re.compile(r"[a-z0-9*]([a-z0-9.\-]*[a-z0-9])?|\[[0-9a-f:.]+\]")


def _path(sec: _Section, name: str, base: Path) -> Path | None:
    value = sec.get(name, str, "")
    return base / value if value else None


def _tls_pair(sec: _Section, cert_key: str, key_key: str, base: Path,
              ) -> tuple[Path | None, Path | None]:
    """A certificate and key given together, checked (readable PEM, matching, valid now,
    accepted by OpenSSL); each problem named by the key of the file at fault."""
    cert, key = _path(sec, cert_key, base), _path(sec, key_key, base)
    if (cert is None) != (key is None):
        sec.problem(cert_key if cert is None else key_key,
                    f"{cert_key} and {key_key} go together")
        return None, None
    if cert is not None and key is not None:
        try:
            tls.check_pair(cert, key)
            tls.server_context(cert, key)  # what OpenSSL itself thinks (key size…)
        except tls.TLSFileError as exc:
            sec.problem(cert_key if exc.which == "certificate" else key_key, exc.message)
    return cert, key


def _ca_file(sec: _Section, name: str, base: Path) -> Path | None:
    path = _path(sec, name, base)
    if path is not None:
        try:
            tls.check_ca_file(path)
        except tls.TLSFileError as exc:
            sec.problem(name, exc.message)
    return path


def _server(sec: _Section, base: Path = Path(".")) -> ServerSettings:
    d = ServerSettings()
    if "metrics_port" in sec.data and "admin_port" not in sec.data:  # its earlier name
        sec.data["admin_port"] = sec.data.pop("metrics_port")
        sec.data.setdefault("admin_host", sec.data.get("host", d.host))
    admin_port = sec.get("admin_port", int, 0)  # 0: no port of its own
    hosts = tuple(h.strip().lower() for h in sec.str_list("allowed_hosts"))
    for host in hosts:
        if not _HOST_NAME.fullmatch(host):
            sec.problem("allowed_hosts", f"{host!r} is not a host name or address "
                                         "(no scheme, no port)")
    log_format = sec.get("log_format", str, d.log_format)
    if log_format not in ("plain", "json"):
        sec.problem("log_format", f"must be \"plain\" or \"json\", not {log_format!r}")
    log_level = sec.get("log_level", str, d.log_level).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        sec.problem("log_level", f"must be DEBUG, INFO, WARNING or ERROR, not {log_level!r}")
    port = sec.port("port", d.port)
    cert, key = _tls_pair(sec, "tls_certificate", "tls_key", base)
    redirect = sec.get("http_redirect_port", int, 0) or None
    if redirect is not None:
        redirect = sec.port("http_redirect_port", 0)
        if cert is None:
            sec.problem("http_redirect_port", "only with tls_certificate and tls_key (it "
                        "redirects to HTTPS)")
        elif redirect in (port, admin_port):
            sec.problem("http_redirect_port", f"{redirect} is already server.port or "
                        "server.admin_port")
    return ServerSettings(
        host=sec.get("host", str, d.host),
        port=port,
        admin_port=sec.port("admin_port", 0) if admin_port else None,
        admin_host=sec.get("admin_host", str, d.admin_host),
        allowed_hosts=hosts,
        shutdown_timeout=sec.positive("shutdown_timeout", d.shutdown_timeout),
        send_timeout=sec.positive("send_timeout", d.send_timeout),
        log_format=log_format,
        log_level=log_level,
        tls_certificate=cert,
        tls_key=key,
        http_redirect_port=redirect,
        max_requests_per_client=sec.at_least("max_requests_per_client",
                                             d.max_requests_per_client, 0),
        client_rate=sec.at_least("client_rate", d.client_rate, 0.0),
        client_burst=sec.at_least("client_burst", d.client_burst, 1),
        max_connections_per_client=sec.at_least("max_connections_per_client",
                                                d.max_connections_per_client, 0),
    )


def _upstream(sec: _Section, base: Path) -> UpstreamSettings:
    d = UpstreamSettings()
    url = sec.get("url", str, d.url) or None
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            sec.problem("url", f"{url!r} is not an http(s) URL such as \"http://orthanc:8042\"")
        elif parts.username or parts.password:
            sec.problem("url", "put credentials in username/password, not in the URL")
        url = url.rstrip("/")
    password = sec.get("password", str, d.password) or None
    password_file = sec.get("password_file", str, "")
    if password_file:
        if password is not None:
            sec.problem("password_file", "set password or password_file, not both")
        try:
            password = (base / password_file).read_text().strip()
        except OSError as exc:
            sec.problem("password_file", f"cannot read {password_file!r}: {exc.strerror}")
    username = sec.get("username", str, d.username) or None
    if (username is None) != (password is None):
        sec.problem("username", "username and password (or password_file) go together")
    retries = sec.get("retries", int, d.retries)
    if not 0 <= retries <= 20:
        sec.problem("retries", f"must be between 0 and 20, not {retries}")
    max_connections = sec.get("max_connections", int, d.max_connections)
    if max_connections < 2:
        sec.problem("max_connections", "must be at least 2 (one is kept for viewers' own "
                                       "requests, see read_through_connections)")
    read_through = sec.get("read_through_connections", int, max(1, max_connections // 2))
    if not 1 <= read_through < max(max_connections, 2):
        sec.problem("read_through_connections", f"must be at least 1 and below "
                    f"max_connections ({max_connections}): viewers' misses keep the rest")
    compression = sec.get("compression", str, d.compression)
    if compression not in COMPRESSION:
        sec.problem("compression", f"must be one of {', '.join(COMPRESSION)}, not {compression!r}")
    breaker_failures = sec.get("breaker_failures", int, d.breaker_failures)
    if not 0 <= breaker_failures <= 1000:
        sec.problem("breaker_failures", f"must be between 0 (off) and 1000, not {breaker_failures}")
    return UpstreamSettings(
        url=url,
        username=username,
        password=password,
        connect_timeout=sec.positive("connect_timeout", d.connect_timeout),
        read_timeout=sec.positive("read_timeout", d.read_timeout),
        retries=retries,
        backoff_base=sec.positive("backoff_base", d.backoff_base),
        backoff_max=sec.positive("backoff_max", d.backoff_max),
        max_connections=max_connections,
        read_through_connections=read_through,
        breaker_failures=breaker_failures,
        breaker_probe_interval=sec.positive("breaker_probe_interval", d.breaker_probe_interval),
        compression=compression,
        ca_file=_upstream_ca_file(sec, base, url),
        read_through_buffer=sec.size("read_through_buffer", d.read_through_buffer,
                                     minimum=1 << 16),
        read_through_temp=sec.size("read_through_temp", d.read_through_temp, minimum=0),
        frames_transfer_syntax=_frames_transfer_syntax(sec, d.frames_transfer_syntax),
        warm_connections=_warm_connections(sec, d.warm_connections, max_connections),
    )


def _warm_connections(sec: _Section, default: int, max_connections: int) -> int:
    """At least 0; fewer than ``max_connections`` (a viewer's own request needs one).
    Not given: the default, or fewer for a small pool."""
    value = sec.get("warm_connections", int, max(0, min(default, max_connections - 1)))
    if not 0 <= value < max_connections:
        sec.problem("warm_connections", f"must be between 0 (off) and max_connections - 1 "
                    f"({max_connections - 1}), not {value}")
    return value


def _frames_transfer_syntax(sec: _Section, default: str) -> str:
    """``""`` or a lossless syntax a frame can be sent in (a media type of its own)."""
    value = sec.get("frames_transfer_syntax", str, default)
    if value and value not in FRAMES_TRANSFER_SYNTAXES:
        sec.problem("frames_transfer_syntax", f"must be \"\" (off) or one of "
                    f"{', '.join(FRAMES_TRANSFER_SYNTAXES)} (lossless, with a frame media "
                    f"type), not {value!r}")
    return value


def _upstream_ca_file(sec: _Section, base: Path, url: str | None) -> Path | None:
    ca_file = _ca_file(sec, "ca_file", base)
    if ca_file is not None and url is not None and not url.startswith("https:"):
        sec.problem("ca_file", "only for an https:// upstream.url")
    return ca_file


def _cache(sec: _Section, base: Path) -> CacheSettings:
    d = CacheSettings()
    directory = Path(sec.get("directory", str, str(d.directory)))
    scrub = sec.get("scrub_period", float, d.scrub_period)
    if scrub < 0 or 0 < scrub < 60:
        sec.problem("scrub_period", f"must be 0 (off) or at least 60 seconds, not {scrub}")
    confirm = sec.get("confirm_interval", float, d.confirm_interval)
    if confirm < 0:
        sec.problem("confirm_interval", f"must be 0 (off) or positive, not {confirm}")
    revalidate = sec.get("revalidate_after", float, d.revalidate_after)
    if revalidate < 0:
        sec.problem("revalidate_after", f"must be 0 (off) or positive, not {revalidate}")
    return CacheSettings(directory=base / directory, max_size=sec.size("max_size", d.max_size),
                         scrub_period=scrub, confirm_interval=confirm,
                         revalidate_after=revalidate,
                         stream_above=sec.size("stream_above", d.stream_above),
                         min_free=sec.size("min_free", d.min_free, minimum=0))



def _access(sec: _Section) -> AccessSettings:
    rules: list[str] = []
    for rule in sec.str_list("allow"):
        method, _, path = rule.strip().partition(" ")
        if not method.isalpha() or not path.strip().startswith("/"):
            sec.problem("allow", f"{rule!r} is not \"METHOD /path\" (e.g. \"POST /tools/find\")")
            continue
        rules.append(f"{method.upper()} {path.strip()}")
    return AccessSettings(allow=tuple(rules))


def _destination(sec: _Section, base: Path = Path(".")) -> DestinationSettings | None:
    d = DestinationSettings("", "", "", DEFAULT_DICOM_PORT)  # the defaults of the optional keys
    name = sec.get("name", str, "")
    ae = sec.get("remote_ae_title", str, "")
    host = sec.get("remote_host", str, "")
    port = sec.port("remote_port", d.remote_port)
    strategy = sec.get("transfer_syntax_strategy", str, d.transfer_syntax_strategy)
    retries = sec.get("max_association_retries", int,
                      d.max_association_retries)
    lossy = sec.get("allow_lossy_recompression", bool,
                    d.allow_lossy_recompression)
    for key, value in (("name", name), ("remote_ae_title", ae), ("remote_host", host)):
        if not value:
            sec.problem(key, "is required")
    if name and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        sec.problem("name", f"{name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if ae and not _AE_RE.match(ae):
        sec.problem("remote_ae_title", f"{ae!r} is not an AE title (1-16 characters, no \\)")
    if port == 0:
        sec.problem("remote_port", "must be a port between 1 and 65535")
    if strategy not in STRATEGIES:
        sec.problem("transfer_syntax_strategy",
                    f"{strategy!r} is not one of {', '.join(STRATEGIES)}")
    if not 1 <= retries <= 10:
        sec.problem("max_association_retries", f"must be between 1 and 10, not {retries}")
    if lossy and strategy != "extended":
        sec.problem("allow_lossy_recompression",
                    "only allowed with transfer_syntax_strategy = \"extended\"")
    use_tls = sec.get("tls", bool, d.tls)
    ca_file = _ca_file(sec, "tls_ca_file", base)
    client_cert, client_key = _tls_pair(sec, "tls_certificate", "tls_key", base)
    server_name = sec.get("tls_server_name", str, "") or None
    if not use_tls:
        given = {"tls_ca_file": ca_file is not None, "tls_certificate": client_cert is not None,
                 "tls_server_name": server_name is not None}
        for key_name in (k for k, there in given.items() if there):
            sec.problem(key_name, "only with tls = true")
    sec.finish()
    if not (name and ae and host):
        return None
    return DestinationSettings(
        name=name, remote_ae_title=ae, remote_host=host, remote_port=port,
        transfer_syntax_strategy=strategy, max_association_retries=retries,
        allow_lossy_recompression=lossy, tls=use_tls, tls_ca_file=ca_file,
        tls_certificate=client_cert, tls_key=client_key, tls_server_name=server_name)


def _relay(sec: _Section, base: Path) -> RelaySettings:
    d = RelaySettings()
    ae = sec.get("ae_title", str, d.ae_title)
    if not _AE_RE.match(ae):
        sec.problem("ae_title", f"{ae!r} is not an AE title (1-16 characters, no \\)")
    callers = sec.str_list("allowed_calling_ae_titles")
    for title in callers:
        if not _AE_RE.match(title):
            sec.problem("allowed_calling_ae_titles", f"{title!r} is not an AE title")
    hosts = sec.str_list("allowed_hosts")
    for entry in hosts:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            sec.problem("allowed_hosts", f"{entry!r} is not an IP address or network "
                                         "(e.g. \"10.1.2.3\" or \"10.1.0.0/16\")")
    max_pdu = sec.get("max_pdu", int, d.max_pdu)
    if max_pdu != 0 and not 4096 <= max_pdu <= 1 << 24:
        sec.problem("max_pdu", "must be 0 (unlimited) or between 4096 and 16777216")
    raw_dests = sec.get("destinations", list, d.destinations)
    dests: list[DestinationSettings] = []
    for i, raw in enumerate(raw_dests):
        dsec = _Section(raw, f"{sec.prefix}.destinations[{i}]", sec.problems)
        dest = _destination(dsec, base)
        if dest is not None:
            dests.append(dest)
    names = [d.name for d in dests]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        sec.problem("destinations", f"destination name {dup!r} is used twice")
    retention = sec.get("retention", float, d.retention)
    if retention < 0:
        sec.problem("retention", "must not be negative")
    backoff_base = sec.positive("retry_backoff_base", d.retry_backoff_base)
    backoff_max = sec.positive("retry_backoff_max", d.retry_backoff_max)
    if backoff_max < backoff_base:
        sec.problem("retry_backoff_max", f"must be at least retry_backoff_base ({backoff_base})")
    inbound = sec.get("max_inbound_associations", int, d.max_inbound_associations)
    if not 1 <= inbound <= 1000:
        sec.problem("max_inbound_associations", f"must be between 1 and 1000, not {inbound}")
    batch = sec.get("batch_size", int, d.batch_size)
    if not 1 <= batch <= 100000:
        sec.problem("batch_size", f"must be between 1 and 100000, not {batch}")
    instance_retries = sec.get("max_instance_retries", int, d.max_instance_retries)
    if not 1 <= instance_retries <= 1000:
        sec.problem("max_instance_retries", f"must be between 1 and 1000, not {instance_retries}")
    return RelaySettings(
        enabled=sec.get("enabled", bool, d.enabled),
        ae_title=ae,
        host=sec.get("host", str, d.host),
        port=sec.port("port", d.port),
        spool_directory=base / sec.get("spool_directory", str, str(d.spool_directory)),
        allowed_calling_ae_titles=callers,
        allowed_hosts=hosts,
        retention=retention,
        retry_backoff_base=backoff_base,
        retry_backoff_max=backoff_max,
        max_pdu=max_pdu,
        timeout=sec.positive("timeout", d.timeout),
        max_inbound_associations=inbound,
        batch_size=batch,
        max_instance_retries=instance_retries,
        accelerate=sec.get("accelerate", bool, True),
        destinations=tuple(dests),
        **_relay_tls(sec, base),
        min_free=sec.size("min_free", d.min_free, minimum=0),
        max_associations_per_host=_per_host(sec, d.max_associations_per_host),
        forward_idle_release=_idle_release(sec, d.forward_idle_release),
    )


def _idle_release(sec: _Section, default: float) -> float:
    value = sec.get("forward_idle_release", float, default)
    if not 0 <= value <= 3600:
        sec.problem("forward_idle_release", f"must be between 0 and 3600 seconds, not {value}")
        return default
    return value


def _per_host(sec: _Section, default: int) -> int:
    value = sec.get("max_associations_per_host", int, default)
    if not 1 <= value <= 1000:
        sec.problem("max_associations_per_host", f"must be between 1 and 1000, not {value}")
    return value


def _relay_tls(sec: _Section, base: Path) -> dict[str, Any]:
    d = RelaySettings()
    cert, key = _tls_pair(sec, "tls_certificate", "tls_key", base)
    ca_file = _ca_file(sec, "tls_ca_file", base)
    explicit = "tls_require_client_certificate" in sec.data
    require = sec.get("tls_require_client_certificate", bool, d.tls_require_client_certificate)
    if ca_file is not None and cert is None:
        sec.problem("tls_ca_file", "only with tls_certificate and tls_key (TLS on the SCP)")
    if explicit and ca_file is None:
        sec.problem("tls_require_client_certificate",
                    "only with tls_ca_file (the CA that signs the modalities' certificates)")
    return {"tls_certificate": cert, "tls_key": key, "tls_ca_file": ca_file,
            "tls_require_client_certificate": require}


def _prefetch(sec: _Section) -> PrefetchSettings:
    d = PrefetchSettings()
    mode = sec.get("mode", str, d.mode)
    if mode not in PREFETCH_MODES:
        sec.problem("mode", f"must be one of {', '.join(PREFETCH_MODES)}, not {mode!r}")
    parallel = sec.get("parallel", int, d.parallel)
    if not 1 <= parallel <= 64:
        sec.problem("parallel", f"must be between 1 and 64, not {parallel}")
    max_fraction = sec.get("max_fraction", float, d.max_fraction)
    if not 0 < max_fraction <= 1:
        sec.problem("max_fraction", f"must be > 0 and <= 1, not {max_fraction}")
    max_queued = sec.get("max_queued", int, d.max_queued)
    if max_queued < 1:
        sec.problem("max_queued", "must be at least 1")
    per_principal = sec.get("max_studies_per_principal", int, d.max_studies_per_principal)
    if not 1 <= per_principal <= 10000:
        sec.problem("max_studies_per_principal",
                    f"must be between 1 and 10000, not {per_principal}")
    return PrefetchSettings(mode=mode, parallel=parallel, max_fraction=max_fraction,
                            active_seconds=sec.positive("active_seconds", d.active_seconds),
                            max_queued=max_queued, max_studies_per_principal=per_principal,
                            principal_window=sec.positive("principal_window", d.principal_window))


_RULE_KEYS = ("modality", "label", "tag", "value")


def _changes(sec: _Section, base: Path) -> ChangesSettings:
    d = ChangesSettings()
    batch = sec.get("batch", int, d.batch)
    if not 1 <= batch <= 10000:
        sec.problem("batch", f"must be between 1 and 10000, not {batch}")
    cursor = sec.get("cursor_file", str, d.cursor_file)
    rules: list[PrewarmRule] = []
    for i, raw in enumerate(sec.get("prewarm", list, d.prewarm)):
        rsec = _Section(raw, f"{sec.prefix}.prewarm[{i}]", sec.problems)
        fields = {k: rsec.get(k, str, "") or None for k in _RULE_KEYS}
        rsec.finish()
        if not any(fields.values()):
            rsec.problems.append((rsec.prefix, "needs at least one of modality, label, tag"))
        elif (fields["tag"] is None) != (fields["value"] is None):
            rsec.problem("tag", "tag and value go together (e.g. tag = \"InstitutionName\", "
                         "value = \"CLINIC A\")")
        else:
            rules.append(PrewarmRule(**fields))
    return ChangesSettings(
        enabled=sec.get("enabled", bool, d.enabled),
        poll_interval=sec.positive("poll_interval", d.poll_interval),
        batch=batch,
        cursor_file=base / cursor if cursor else None,
        prewarm=tuple(rules))


def _dicomweb(sec: _Section) -> DicomwebSettings:
    d = DicomwebSettings()
    stale = sec.get("stale_if_error", float, d.stale_if_error)
    if stale < 0:
        sec.problem("stale_if_error", "must not be negative (0: never serve stale copies)")
    memory = sec.size("memory_size", d.memory_size)
    concurrency = sec.get("retrieve_concurrency", int, d.retrieve_concurrency)
    if not 1 <= concurrency <= 64:
        sec.problem("retrieve_concurrency", f"must be between 1 and 64, not {concurrency}")
    public_url = sec.get("public_url", str, d.public_url) or None
    if public_url is not None:
        parts = urlsplit(public_url)
        if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query
                or parts.fragment or parts.username or not re.fullmatch(r"[\x21-\x7e]+", public_url)
                or '"' in public_url or "\\" in public_url):
            sec.problem("public_url", f"{public_url!r} is not an http(s) base URL such as "
                                      "\"https://dicomcache.clinic.example:8443\"")
        public_url = public_url.rstrip("/")
    return DicomwebSettings(
        metadata_fresh=sec.positive("metadata_fresh", d.metadata_fresh),
        qido_fresh=sec.positive("qido_fresh", d.qido_fresh),
        rendered_fresh=sec.positive("rendered_fresh", d.rendered_fresh),
        stale_if_error=stale,
        memory_size=memory,
        retrieve_concurrency=concurrency,
        public_url=public_url,
    )


def _cors(sec: _Section) -> CorsSettings:
    d = CorsSettings()
    origins = sec.str_list("allowed_origins")
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.hostname
                              or parts.path or parts.query or parts.fragment
                              or origin != origin.strip()):
            sec.problem("allowed_origins", f"{origin!r} is not an origin such as "
                                           "\"https://ohif.example.org\" (scheme, host, port; "
                                           "no path) or \"*\"")
    max_age = sec.get("max_age", int, d.max_age)
    if not 0 <= max_age <= 86400:
        sec.problem("max_age", f"must be between 0 and 86400, not {max_age}")
    credentials = sec.get("allow_credentials", bool, d.allow_credentials)
    if credentials and "*" in origins:
        sec.problem("allow_credentials", "cannot be true with \"*\" in allowed_origins: any "
                                         "web page could then read patient data with the "
                                         "user's credentials; list the viewers' origins")
    return CorsSettings(allowed_origins=tuple(o.rstrip("/") for o in origins), max_age=max_age,
                        allow_credentials=credentials)


def is_loopback_host(host: str) -> bool:
    """Whether ``server.host`` only reaches this machine (``localhost``, 127/8, ``::1``)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def exposure_problem(server: ServerSettings, auth: AuthSettings) -> str | None:
    """Why anonymous access on ``server.host`` (or the admin port's ``admin_host``) is
    refused, or ``None``."""
    if auth.mode != "none" or auth.allow_anonymous_network:
        return None
    hosts = [server.host] + ([server.admin_host] if server.admin_port is not None else [])
    exposed = [h for h in hosts if not is_loopback_host(h)]
    if not exposed:
        return None
    return (f"\"none\" lets anyone who reaches {exposed[0]!r} read patient data and act as "
            "admin: use \"basic\" or \"bearer\", bind server.host to 127.0.0.1, or set "
            "auth.allow_anonymous_network = true if a proxy in front authenticates")


def _secure_url(sec: _Section, name: str, url: str | None) -> str | None:
    """An https URL (http only towards this machine), or a problem."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment \
            or parts.username or parts.password:
        sec.problem(name, f"{url!r} is not an http(s) URL")
    elif parts.scheme == "http" and not is_loopback_host(parts.hostname):
        sec.problem(name, f"{url!r}: keys and decisions must come over https "
                          "(http only from this machine)")
    return url


_REALM_RE = re.compile(r"^[\x20-\x7e]{1,64}$")
_ROLE_CLAIM_RE = re.compile(r"^[A-Za-z0-9_:/.-]{1,128}$")


def _auth(sec: _Section, base: Path) -> AuthSettings:
    d = AuthSettings()
    mode = sec.get("mode", str, d.mode)
    if mode not in AUTH_MODES:
        sec.problem("mode", f"must be one of {', '.join(AUTH_MODES)}, not {mode!r}")
    realm = sec.get("realm", str, d.realm)
    if not _REALM_RE.match(realm) or '"' in realm or "\\" in realm:
        sec.problem("realm", "must be 1-64 printable ASCII characters without \" or \\")
    users = sec.get("users_file", str, "") or None
    issuer = _secure_url(sec, "issuer", sec.get("issuer", str, "") or None)
    audience = sec.get("audience", str, "") or None
    jwks_url = _secure_url(sec, "jwks_url", sec.get("jwks_url", str, "") or None)
    algorithms = sec.str_list("algorithms") if "algorithms" in sec.data else d.algorithms
    if not algorithms:
        sec.problem("algorithms", "must list at least one algorithm (e.g. [\"RS256\"])")
    for alg in algorithms:
        if alg not in TOKEN_ALGORITHMS:
            sec.problem("algorithms", f"{alg!r} is not accepted; use public-key algorithms "
                                      f"({', '.join(TOKEN_ALGORITHMS)}), never none or HS*")
    leeway = sec.get("leeway", float, d.leeway)
    if not 0 <= leeway <= 300:
        sec.problem("leeway", f"must be between 0 and 300 seconds, not {leeway}")
    roles_claim = sec.get("roles_claim", str, d.roles_claim)
    if not _ROLE_CLAIM_RE.match(roles_claim):
        sec.problem("roles_claim", f"{roles_claim!r} is not a claim path such as "
                                   "\"realm_access.roles\" or \"roles\"")
    name_claim = sec.get("name_claim", str, d.name_claim)
    if not _ROLE_CLAIM_RE.match(name_claim):
        sec.problem("name_claim", f"{name_claim!r} is not a claim name such as \"sub\"")
    viewer_roles = sec.str_list("viewer_roles")
    admin_roles = sec.str_list("admin_roles")
    if "*" in admin_roles:
        sec.problem("admin_roles", "\"*\" would make every token an admin: list the roles")
    max_failures = sec.get("max_failures", int, d.max_failures)
    if not 1 <= max_failures <= 1000:
        sec.problem("max_failures", f"must be between 1 and 1000, not {max_failures}")
    max_delay = sec.get("max_delay", float, d.max_delay)
    if not 1 <= max_delay <= 86400:
        sec.problem("max_delay", f"must be between 1 and 86400 seconds, not {max_delay}")
    # Bearer tokens are sent to it, as the Orthanc plugin does: https unless local.
    authz = _secure_url(sec, "authorization_url", sec.get("authorization_url", str, "") or None)
    authz_timeout = sec.get("authorization_timeout", float, d.authorization_timeout)
    if not 0 < authz_timeout <= 60:
        sec.problem("authorization_timeout", f"must be > 0 and at most 60, not {authz_timeout}")
    server_id = sec.get("authorization_server_id", str, "") or None
    if mode == "basic" and users is None:
        sec.problem("users_file", "is required with mode = \"basic\" "
                                  "(create it with `dicomcache users add NAME --config FILE`)")
    if mode != "basic" and users is not None:
        sec.problem("users_file", "is only used with mode = \"basic\"")
    if mode == "bearer":
        for key, value in (("issuer", issuer), ("audience", audience)):
            if value is None:
                sec.problem(key, "is required with mode = \"bearer\"")
        if not viewer_roles:
            sec.problem("viewer_roles", "is required with mode = \"bearer\": the role claim "
                                        "values that may view (\"*\": any token for the audience)")
    else:
        for key, value in (("issuer", issuer), ("audience", audience), ("jwks_url", jwks_url)):
            if value is not None:
                sec.problem(key, "is only used with mode = \"bearer\"")
    return AuthSettings(
        mode=mode,
        allow_anonymous_network=sec.get("allow_anonymous_network", bool,
                                        d.allow_anonymous_network),
        realm=realm, users_file=base / users if users else None,
        issuer=issuer, audience=audience, jwks_url=jwks_url,
        algorithms=tuple(algorithms), leeway=leeway, roles_claim=roles_claim,
        viewer_roles=viewer_roles, admin_roles=admin_roles, name_claim=name_claim,
        max_failures=max_failures, max_delay=max_delay, authorization_url=authz,
        authorization_timeout=authz_timeout, authorization_server_id=server_id)


def _audit(sec: _Section, base: Path) -> AuditSettings:
    d = AuditSettings()
    keep = sec.get("keep", int, d.keep)
    if not 0 <= keep <= 100000:
        sec.problem("keep", f"must be between 0 (keep all) and 100000, not {keep}")
    max_queue = sec.get("max_queue", int, d.max_queue)
    if not 100 <= max_queue <= 1000000:
        sec.problem("max_queue", f"must be between 100 and 1000000, not {max_queue}")
    proxies = sec.str_list("trusted_proxies")
    for entry in proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            sec.problem("trusted_proxies", f"{entry!r} is not an IP address or network "
                                           "(e.g. \"10.1.2.3\" or \"10.1.0.0/16\")")
    syslog = sec.get("syslog", str, "") or None
    if syslog is not None:
        parts = urlsplit(syslog)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if (parts.scheme not in AUDIT_SYSLOG_SCHEMES or not parts.hostname or not port_ok
                or parts.path not in ("", "/") or parts.query or parts.fragment
                or parts.username or parts.password):
            sec.problem("syslog", f"{syslog!r} is not a syslog collector such as "
                                  "\"udp://collector:514\", \"tcp://collector:601\" or "
                                  "\"tls://collector:6514\"")
    tls_syslog = syslog is not None and syslog.startswith("tls:")
    for key in ("syslog_ca_file", "syslog_cert_file", "syslog_key_file"):
        if key in sec.data and not tls_syslog:
            sec.get(key, str, "")  # read: named as misplaced, not as unknown
            sec.problem(key, "only used with syslog = \"tls://…\"")
    # Checked now, as every TLS file is (readable PEM, the key matching, valid now).
    ca_file = _ca_file(sec, "syslog_ca_file", base) if tls_syslog else None
    cert, key_file = _tls_pair(sec, "syslog_cert_file", "syslog_key_file", base) \
        if tls_syslog else (None, None)
    max_file_size = sec.size("max_file_size", d.max_file_size)
    if max_file_size < 64 << 10:
        sec.problem("max_file_size", f"must be at least 64KiB, not {format_size(max_file_size)}")
    return AuditSettings(
        file=base / sec.get("file", str, str(d.file)),
        required=sec.get("required", bool, d.required),
        max_file_size=max_file_size,
        keep=keep,
        max_queue=max_queue,
        trusted_proxies=proxies,
        syslog=syslog,
        syslog_ca_file=ca_file,
        syslog_cert_file=cert,
        syslog_key_file=key_file,
    )


def from_dict(data: dict[str, Any], *, base: Path = Path("."),
              source: Path | None = None) -> Settings:
    """Build :class:`Settings` from parsed TOML; relative paths are taken from ``base``."""
    problems: list[tuple[str, str]] = []
    top = _Section(data, "", problems)
    secs = {name: _Section(top.get(name, dict, {}), name, problems)
            for name in ("server", "upstream", "cache", "access", "relay", "prefetch",
                         "changes", "dicomweb", "cors", "auth", "audit")}
    settings = Settings(
        server=_server(secs["server"], base),
        upstream=_upstream(secs["upstream"], base),
        cache=_cache(secs["cache"], base),
        access=_access(secs["access"]),
        relay=_relay(secs["relay"], base),
        prefetch=_prefetch(secs["prefetch"]),
        changes=_changes(secs["changes"], base),
        dicomweb=_dicomweb(secs["dicomweb"]),
        cors=_cors(secs["cors"]),
        auth=_auth(secs["auth"], base),
        audit=_audit(secs["audit"], base),
        source=source,
    )
    exposure = exposure_problem(settings.server, settings.auth)
    if exposure is not None:
        problems.append(("auth.mode", exposure))
    for sec in (*secs.values(), top):
        sec.finish()
    if problems:
        raise ConfigError(problems)
    return settings


def load(path: str | Path) -> Settings:
    """Read and validate a TOML file; raises :class:`ConfigError` naming every bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([("(file)", f"cannot read {path}: {exc.strerror}")]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("(syntax)", f"{path}: {exc}")]) from exc
    return from_dict(data, base=path.resolve().parent, source=path)
