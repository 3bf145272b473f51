"""The few exception types dicomcache raises on purpose.

Each mixes in a built-in so generic handlers still catch it
(``except TimeoutError`` catches an :class:`UpstreamTimeout`).
"""

from __future__ import annotations


class DicomcacheError(Exception):
    """Base of every error raised on purpose by dicomcache."""


class ConfigError(DicomcacheError, ValueError):
    """The configuration is invalid; ``problems`` lists every ``(key, message)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in self.problems))


class IntegrityError(DicomcacheError, ValueError):
    """A DICOM body failed verification.

    ``cause`` is a short machine-readable label (``short_body``,
    ``length_mismatch``, ``md5_mismatch``, ``parse_failure``) used in logs,
    metrics and the viewer's 502 body; ``reason`` is for people.
    """

    def __init__(self, cause: str, reason: str) -> None:
        self.cause = cause
        self.reason = reason
        super().__init__(f"{cause}: {reason}")


class UpstreamError(DicomcacheError, ConnectionError):
    """Orthanc could not give a usable answer.

    ``cause`` labels why (``timeout``, ``reset``, ``connect``, ``http_5xx``,
    ``http_429``, or an :class:`IntegrityError` cause); ``attempts`` counts the
    requests made before giving up; ``status`` is the upstream HTTP status if
    one was received.
    """

    def __init__(
        self, cause: str, reason: str, *, attempts: int = 1, status: int | None = None
    ) -> None:
        self.cause = cause
        self.reason = reason
        self.attempts = attempts
        self.status = status
        super().__init__(f"{cause}: {reason}")


class UpstreamTimeout(UpstreamError, TimeoutError):
    """Orthanc did not answer within the configured timeouts."""


class UpstreamUnavailable(UpstreamError):
    """Dicomcache is not even trying: the link is known down (circuit open)."""


class NotFoundUpstream(DicomcacheError, LookupError):
    """Orthanc answered 404 (or 4xx): the resource does not exist; never retried."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")


class StoreFull(DicomcacheError, OSError):
    """The cache directory's disk is full; nothing was committed."""


class ForwardError(DicomcacheError, RuntimeError):
    """The relay could not deliver an instance to a destination."""
