"""dicomcache.upstream.policy: where a redirect of Orthanc's points, and how it is shown."""

from __future__ import annotations

import pytest

from dicomcache.errors import Cause
from dicomcache.upstream.policy import (
    describe_location,
    link_down,
    status_error_cause,
    viewer_location,
)

BASE = "http://orthanc:8042"
REQ = "http://orthanc:8042/app"


@pytest.mark.parametrize("base, request_url, location, expected", [
    # Within Orthanc: relative, absolute-path and absolute forms, query kept.
    (BASE, REQ, "/app/explorer.html", "/app/explorer.html"),
    (BASE, REQ, "explorer.html", "/explorer.html"),
    (BASE, "http://orthanc:8042/app/", "explorer.html", "/app/explorer.html"),
    (BASE, REQ, "http://orthanc:8042/app/explorer.html?a=1&b=%2F", "/app/explorer.html?a=1&b=/"),
    (BASE, REQ, "//orthanc:8042/x", "/x"),
    # Under a path prefix: mapped to our root; outside the prefix: leaves Orthanc.
    ("https://pacs/orthanc", "https://pacs/orthanc/app", "/orthanc/app/x.html", "/app/x.html"),
    ("https://pacs/orthanc", "https://pacs/orthanc/app", "/orthanc", "/"),
    ("https://pacs/orthanc", "https://pacs/orthanc/app", "/orthancx/app", None),
    ("https://pacs/orthanc", "https://pacs/orthanc/app", "/other", None),
    # Another scheme, host or port: never.
    (BASE, REQ, "https://orthanc:8042/app/explorer.html", None),
    (BASE, REQ, "http://evil:8042/app", None),
    (BASE, REQ, "http://orthanc:8043/app", None),
    (BASE, REQ, "//evil/app", None),
    ("https://pacs", "https://pacs/x", "http://pacs/x", None),
    # Credentials in the target: never passed on.
    (BASE, REQ, "http://user:pw@orthanc:8042/app", None),
    # Not a URL.
    (BASE, REQ, "http://[::1", None),
])
def test_viewer_location(base: str, request_url: str, location: str,
                         expected: str | None) -> None:
    assert viewer_location(base, request_url, location) == expected


@pytest.mark.parametrize("location, expected", [
    ("/a/b?password=x#frag", "http://orthanc:8042/a/b"),
    ("http://user:secret@evil:99/p?token=1", "http://evil:99/p"),
    ("http://[::1", "an unparseable Location"),
    ("/" + "x" * 300, "http://orthanc:8042/" + "x" * 99 + "…"),
])
def test_describe_location_shows_no_credentials_or_query(location: str, expected: str) -> None:
    assert describe_location(REQ, location) == expected


@pytest.mark.parametrize("cause, status, down", [
    (Cause.TIMEOUT, None, True), (Cause.CONNECT, None, True), (Cause.AUTH, 401, True),
    (Cause.TLS, None, True), (Cause.REDIRECT, 302, False), (Cause.HTTP_5XX, 500, False),
    (Cause.HTTP_5XX, 503, True), (Cause.MD5_MISMATCH, None, False),
])
def test_link_down(cause: Cause, status: int | None, down: bool) -> None:
    assert link_down(cause, status) is down


@pytest.mark.parametrize("status, cause", [
    (429, Cause.HTTP_429), (500, Cause.HTTP_5XX), (401, Cause.AUTH), (403, Cause.AUTH),
    (404, None), (400, None),
])
def test_status_error_cause(status: int, cause: Cause | None) -> None:
    assert status_error_cause(status) is cause


def test_redirect_and_tls_failures_are_final() -> None:
    assert Cause.REDIRECT.final and Cause.TLS.final and Cause.AUTH.final
    assert not Cause.TIMEOUT.final
