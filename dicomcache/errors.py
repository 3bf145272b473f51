"""The few exception types dicomcache raises on purpose, and :class:`Cause`.

Each exception mixes in a built-in so generic handlers still catch it
(``except TimeoutError`` catches an :class:`UpstreamTimeout`).  Failure
reasons are one enum, :class:`Cause`: logs, metric labels, the viewer's 502
body and the status page all use its values, so they cannot disagree.
"""

from __future__ import annotations

import enum


class Cause(enum.StrEnum):
    """Why getting a usable answer from Orthanc failed (a metric label value)."""

    # The link: another attempt may work, and enough of them open the breaker.
    TIMEOUT = "timeout"
    RESET = "reset"
    CONNECT = "connect"
    # Orthanc answered, but not with what was asked.
    HTTP_5XX = "http_5xx"
    HTTP_429 = "http_429"
    AUTH = "auth"
    #: Orthanc answered with a redirect: dicomcache follows none (credentials never go
    #: anywhere but ``upstream.url``); the configured URL is not the one that answers.
    REDIRECT = "redirect"
    #: The TLS handshake failed: an untrusted or mismatched certificate, or no TLS there.
    TLS = "tls"
    ENCODING = "encoding"
    BAD_JSON = "bad_json"
    # The body failed verification (see dicomcache.dicom.verify).
    SHORT_BODY = "short_body"
    LENGTH_MISMATCH = "length_mismatch"
    MD5_MISMATCH = "md5_mismatch"
    PARSE_FAILURE = "parse_failure"
    #: A sound body, but of another instance than the one asked for.
    IDENTITY_MISMATCH = "identity_mismatch"
    # dicomcache's own state.
    STALE = "stale"
    CIRCUIT_OPEN = "circuit_open"
    READ_ERROR = "read_error"

    @property
    def integrity(self) -> bool:
        """A body that arrived but failed verification (a buffer overrun prevented)."""
        return self in INTEGRITY_CAUSES

    @property
    def final(self) -> bool:
        """Another attempt cannot fix it (refused credentials, a redirect, an untrusted
        certificate: each is the configuration's to fix)."""
        return self in (Cause.AUTH, Cause.REDIRECT, Cause.TLS)


INTEGRITY_CAUSES = frozenset({Cause.SHORT_BODY, Cause.LENGTH_MISMATCH, Cause.MD5_MISMATCH,
                              Cause.PARSE_FAILURE, Cause.IDENTITY_MISMATCH})


class DicomcacheError(Exception):
    """Base of every error raised on purpose by dicomcache."""


class ConfigError(DicomcacheError, ValueError):
    """The configuration is invalid; ``problems`` lists every ``(key, message)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in self.problems))


class IntegrityError(DicomcacheError, ValueError):
    """A DICOM body failed verification.

    ``cause`` is one of the integrity causes of :class:`Cause` (or
    ``READ_ERROR`` for a stored file that cannot be read); ``reason`` is for
    people.
    """

    def __init__(self, cause: Cause, reason: str) -> None:
        self.cause = Cause(cause)
        self.reason = reason
        super().__init__(f"{self.cause}: {reason}")


class UpstreamError(DicomcacheError, ConnectionError):
    """Orthanc could not give a usable answer.

    ``attempts`` counts the requests made before giving up; ``status`` is the
    upstream HTTP status if one was received; ``retry_after`` is how long
    Orthanc (``Retry-After``) or the breaker asked to wait, in seconds.
    """

    def __init__(self, cause: Cause, reason: str, *, attempts: int = 1,
                 status: int | None = None, retry_after: float | None = None) -> None:
        self.cause = Cause(cause)
        self.reason = reason
        self.attempts = attempts
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"{self.cause}: {reason}")


class UpstreamTimeout(UpstreamError, TimeoutError):
    """Orthanc did not answer within the configured timeouts."""


class UpstreamUnavailable(UpstreamError):
    """Dicomcache is not even trying: the link is known down (circuit open)."""


class NotFoundUpstream(DicomcacheError, LookupError):
    """Orthanc answered 404 (or another 4xx): the resource does not exist; never retried."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")


class BadStoredFile(DicomcacheError, FileNotFoundError):
    """A stored file is not the bytes its entry recorded (bit rot, a hand edit): it was
    quarantined, and the instance must be fetched again, as if it had vanished."""


class StoreFull(DicomcacheError, OSError):
    """The cache directory's disk is full; nothing was committed."""


class StoreTrouble(enum.StrEnum):
    """Why the cache is degraded (serving verified bodies without caching them); the
    ``cause`` label of ``dicomcache_cache_degraded``."""

    #: The file system of ``cache.directory`` is full (ENOSPC, or the user's quota).
    DISK_FULL = "disk_full"
    #: Free space is below ``cache.min_free`` and evicting cannot restore it.
    MIN_FREE = "min_free"
    #: The directory cannot be written: a read-only file system, or permission denied.
    READ_ONLY = "read_only"
    #: The directory does not exist and cannot be created.
    MISSING = "missing"
    #: The index database (``index.sqlite``) cannot be used: not a database, damaged,
    #: or written by another version.
    INDEX_UNUSABLE = "index_unusable"
    #: The disk reports I/O errors (or does not answer).
    IO_ERROR = "io_error"


class StoreUnavailable(DicomcacheError, OSError):
    """The cache is degraded (``trouble``): nothing was written, the body is served
    uncached."""

    def __init__(self, trouble: StoreTrouble, detail: str) -> None:
        self.trouble = StoreTrouble(trouble)
        self.detail = detail
        super().__init__(f"cache degraded: {self.trouble}: {detail}")
