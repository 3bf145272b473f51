"""Pure decisions about talking to Orthanc: how long to back off, what a failure means.

Table-tested in ``tests/upstream/test_policy.py``; the client and the breaker
only carry them out.
"""

from __future__ import annotations

from yarl import URL

from dicomcache.errors import Cause

#: The statuses that send a client elsewhere (304 Not Modified is an answer, not a redirect).
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


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
    return cause in (Cause.TIMEOUT, Cause.RESET, Cause.CONNECT, Cause.AUTH, Cause.TLS) or (
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


def resolve_location(request_url: str, location: str) -> URL | None:
    """The absolute URL a ``Location`` header names (relative to the request's URL), or
    ``None`` when it is not a URL at all."""
    try:
        target = URL(request_url).join(URL(location.strip()))
    except ValueError:
        return None
    return target if target.is_absolute() and target.host else None


def viewer_location(base: str, request_url: str, location: str) -> str | None:
    """Where a redirect of Orthanc's points, as a path (and query) on dicomcache.

    ``base`` is ``upstream.url``.  ``None`` when the target leaves it: another
    scheme, host or port, a path outside ``base``'s path, or credentials in the
    URL.  The viewer then asks dicomcache for that path, so the access policy
    sees the new request as it sees any other; dicomcache itself never follows.
    """
    target = resolve_location(request_url, location)
    origin = URL(base)
    if (target is None or target.user is not None or target.password is not None
            or target.scheme != origin.scheme or target.host != origin.host
            or target.port != origin.port):
        return None
    prefix = origin.raw_path.rstrip("/")
    path = target.raw_path
    if prefix and not (path == prefix or path.startswith(prefix + "/")):
        return None
    path = path[len(prefix):] or "/"
    return path + (f"?{target.raw_query_string}" if target.raw_query_string else "")


def describe_location(request_url: str, location: str, limit: int = 120) -> str:
    """A redirect target fit for logs and answers: scheme, host, port and path only (no
    credentials, query or fragment, whatever the upstream put there), shortened."""
    target = resolve_location(request_url, location)
    if target is None:
        return "an unparseable Location"
    shown = str(target.with_user(None).with_query(None).with_fragment(None))
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
