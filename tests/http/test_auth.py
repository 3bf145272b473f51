"""Table tests of the pure decisions of http/auth.py: which route needs which role,
whom failures count against, the back-off, the challenges."""

from __future__ import annotations

import pytest

from dicomcache.config import AuthSettings
from dicomcache.http.auth import Backoff, challenge, client_key, required_role
from dicomcache.principal import ADMIN, VIEWER

OID = "079d74f5-e5b0bb07-ae470350-6c9ad2ab-ee1995b1"
ST = "/dicom-web/studies/{study}"
SE = ST + "/series/{series}"
INST = SE + "/instances/{sop}"
TAIL = "/{tail}"


@pytest.mark.parametrize(("method", "path", "route", "role"), [
    # open: load balancers and health checks
    ("GET", "/healthz", "/healthz", None),
    ("HEAD", "/readyz", "/readyz", None),
    ("POST", "/healthz", "/healthz", ADMIN),  # only reads are open
    # admin: the status page, status JSON, metrics
    ("GET", "/", "/", ADMIN),
    ("GET", "/status.json", "/status.json", ADMIN),
    ("GET", "/metrics", "/metrics", ADMIN),
    # viewer: instances, WADO-URI, every DICOMweb route
    ("GET", f"/instances/{OID}/file", "/instances/{id}/file", VIEWER),
    ("HEAD", f"/instances/{OID}/file", "/instances/{id}/file", VIEWER),
    ("GET", "/wado", "/wado", VIEWER),
    ("GET", "/dicom-web/studies", "/dicom-web/studies", VIEWER),
    ("GET", "/dicom-web/series", "/dicom-web/series", VIEWER),
    ("GET", "/dicom-web/studies/1.2/series", ST + "/series", VIEWER),
    ("GET", "/dicom-web/studies/1.2", ST, VIEWER),
    ("GET", "/dicom-web/studies/1.2/series/1.3/metadata", SE + "/metadata", VIEWER),
    ("GET", "/dicom-web/studies/1.2/series/1.3/instances/1.4/frames/1",
     INST + "/frames/{frames}", VIEWER),
    ("GET", "/dicom-web/studies/1.2/series/1.3/instances/1.4/rendered",
     INST + "/rendered", VIEWER),
    ("GET", "/dicom-web/studies/1.2/thumbnail", ST + "/thumbnail", VIEWER),
    # read-through: the viewer allow-list is viewer data ...
    ("GET", f"/studies/{OID}", TAIL, VIEWER),
    ("GET", f"/instances/{OID}/tags", TAIL, VIEWER),
    ("GET", f"/series/{OID}/instances", TAIL, VIEWER),
    ("GET", f"/patients/{OID}/studies", TAIL, VIEWER),
    ("GET", "/dicom-web/studies/1.2/series/1.3/instances/1.4/bulk/7FE00010", TAIL, VIEWER),
    # ... anything else it reaches is admin's (even when [access] allow opens it)
    ("GET", "/system", TAIL, ADMIN),
    ("GET", "/changes", TAIL, ADMIN),
    ("GET", "/patients", TAIL, ADMIN),
    ("GET", "/studies", TAIL, ADMIN),
    ("GET", "/dicom-web/servers", TAIL, ADMIN),
    ("GET", f"/studies/{OID}/archive", TAIL, ADMIN),
    ("GET", "/app/explorer.html", TAIL, ADMIN),
    ("GET", "/tools/find", TAIL, ADMIN),
    # every write is admin's, whatever the route
    ("POST", "/tools/find", TAIL, ADMIN),
    ("DELETE", f"/instances/{OID}", TAIL, ADMIN),
    ("PUT", "/dicom-web/studies", TAIL, ADMIN),
    ("OPTIONS", "/dicom-web/studies", TAIL, ADMIN),  # not a CORS preflight: not a read
    # no route matched: deny by default
    ("GET", "/anything", None, ADMIN),
    ("GET", "/new-route", "/new-route", ADMIN),
])
def test_required_role(method: str, path: str, route: str | None, role: str | None) -> None:
    assert required_role(method, path, route) == role


@pytest.mark.parametrize(("remote", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),  # the same host through a dual stack socket
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),  # one host commonly holds a /64
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
    (None, "local"),
    ("", "local"),
    ("not-an-address" * 10, ("not-an-address" * 10)[:64]),
])
def test_client_key(remote: str | None, key: str) -> None:
    assert client_key(remote) == key


def test_backoff_waits_double_after_the_free_failures() -> None:
    backoff = Backoff(free=3, max_delay=10)
    t = 1000.0
    assert [backoff.failed("a", t), backoff.failed("a", t)] == [0, 0]
    assert backoff.wait("a", t) == 0
    # The third failure uses the last free try: from then on each failure waits longer.
    waits = [backoff.failed("a", t) for _ in range(6)]
    assert waits == [1, 2, 4, 8, 10, 10]
    assert backoff.wait("a", t + 3) == 7
    assert backoff.wait("b", t) == 0  # another client is not affected


def test_backoff_forgets_a_quiet_client() -> None:
    backoff = Backoff(free=1, max_delay=300, forget_after=900)
    backoff.failed("a", 0)
    assert backoff.wait("a", 0.5) == pytest.approx(0.5)
    assert backoff.wait("a", 2000) == 0
    assert len(backoff) == 0
    assert backoff.failed("a", 2000) == 1  # counted afresh


def test_backoff_table_is_bounded() -> None:
    """An attacker's many addresses bound the memory, not the table."""
    backoff = Backoff(free=1, max_delay=60, capacity=100)
    for i in range(10_000):
        backoff.failed(f"10.0.{i // 256}.{i % 256}", 5.0)
    assert len(backoff) == 100
    assert backoff.wait("10.0.39.15", 5.0) > 0  # the most recent are remembered
    assert backoff.wait("10.0.0.0", 5.0) == 0


@pytest.mark.parametrize(("mode", "error", "description", "value"), [
    ("basic", None, None, 'Basic realm="dicomcache", charset="UTF-8"'),
    ("bearer", None, None, 'Bearer realm="dicomcache"'),
    ("bearer", "invalid_token", "the token has expired",
     'Bearer realm="dicomcache", error="invalid_token", '
     'error_description="the token has expired"'),
    # nothing from a token reaches the header unescaped
    ("bearer", "invalid_token", 'a "quoted"\r\nX-Injected: 1',
     'Bearer realm="dicomcache", error="invalid_token", '
     'error_description="a quotedX-Injected: 1"'),
])
def test_challenge(mode: str, error: str | None, description: str | None, value: str) -> None:
    assert challenge(AuthSettings(mode=mode), error, description) == value
