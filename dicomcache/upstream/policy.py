"""Pure decisions about talking to Orthanc: how long to back off, what a failure means.

Table-tested in ``tests/upstream/test_policy.py``; the client and the breaker
only carry them out.
"""

from __future__ import annotations

from dicomcache.errors import Cause


def backoff_delay(attempt: int, base: float, cap: float, u: float,
                  retry_after: float | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    Exponential (``base``, doubling, at most ``cap``) with *equal jitter*: half
    of the step is kept, the other half is random (``u`` in [0, 1)), so retries
    of many clinics spread out yet never come back at once.  A ``Retry-After``
    from Orthanc raises the delay to it, up to ``cap``.
    """
    step = min(cap, base * 2.0 ** (attempt - 1))
    delay = step / 2 + u * step / 2
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def link_down(cause: Cause, status: int | None = None) -> bool:
    """Whether a failure says Orthanc is unreachable, not that one resource is bad.

    A 500 for one resource (e.g. a transcoding Orthanc cannot do) or a corrupt
    body says nothing about the link; timeouts, resets, refused connections,
    gateway errors and refused credentials do.
    """
    return cause in (Cause.TIMEOUT, Cause.RESET, Cause.CONNECT, Cause.AUTH) or (
        cause is Cause.HTTP_5XX and status in (502, 503, 504))


def status_error_cause(status: int) -> Cause | None:
    """The cause of a non-2xx answer that is Orthanc's or the link's fault (retried or
    final), or ``None`` when it says the resource itself is missing or refused (4xx)."""
    if status == 429:
        return Cause.HTTP_429
    if status >= 500:
        return Cause.HTTP_5XX
    if status in (401, 403):
        return Cause.AUTH
    return None


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds form only; a date is ignored)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
