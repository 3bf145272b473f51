"""Host and origin hygiene: a ``Host:`` that does not name this service (DNS rebinding)
is refused before anything else; CORS never pairs ``*`` with credentials."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.config import ConfigError, ServerSettings, from_dict
from dicomcache.http.app import make_app
from dicomcache.http.middleware import host_allowed, host_names, host_of
from tests.conftest import Sample, SettingsFactory


@pytest.mark.parametrize(("header", "name"), [
    ("Clinic-Box:8080", "clinic-box"), ("10.1.2.3", "10.1.2.3"), ("[::1]:8080", "[::1]"),
    ("[fe80::1]", "[fe80::1]"), ("dicomcache.clinic.example.", "dicomcache.clinic.example."),
])
def test_host_of(header: str, name: str) -> None:
    assert host_of(header) == name


def test_host_names_default_and_configured() -> None:
    default = host_names(ServerSettings(host="0.0.0.0"), None, ["clinic-box", "10.1.2.3"])
    assert {"localhost", "127.0.0.1", "[::1]", "clinic-box", "10.1.2.3"} <= default
    assert "0.0.0.0" not in default
    bound = host_names(ServerSettings(host="10.9.9.9"), "https://pacs.example:8443", [])
    assert {"10.9.9.9", "pacs.example"} <= bound
    configured = host_names(ServerSettings(allowed_hosts=("viewer.clinic.example",)), None,
                            ["clinic-box"])
    assert configured == {"viewer.clinic.example"}  # only what the operator listed


@pytest.mark.parametrize(("header", "allowed"), [
    ("clinic-box:8080", True), ("CLINIC-BOX", True), ("evil.example", False),
    ("clinic-box.evil.example", False), ("", False), (None, False),
    ("a.clinic.example", True), ("clinic.example", False),
])
def test_host_allowed(header: str | None, allowed: bool) -> None:
    names = frozenset({"clinic-box", "*.clinic.example"})
    assert host_allowed(header, names) is allowed


async def test_a_rebound_host_is_refused_on_every_route(
        aiohttp_client, make_settings: SettingsFactory, samples: dict[str, list[Sample]]) -> None:
    s = samples["explicit"][0]
    client: TestClient = await aiohttp_client(make_app(make_settings()))
    paths = [f"/instances/{s.orthanc_id}/file", f"/dicom-web/studies/{s.study}/metadata",
             "/dicom-web/studies", "/", "/metrics", "/readyz",
             f"/instances/{s.orthanc_id}/tags"]
    for path in paths:
        resp = await client.get(path, headers={"Host": "attacker.example"})
        assert resp.status == 421, path
        assert "server.allowed_hosts" in (await resp.json())["reason"]
        preflight = await client.options(path, headers={
            "Host": "attacker.example", "Origin": "http://attacker.example",
            "Access-Control-Request-Method": "GET"})
        assert preflight.status == 421, path
        assert (await client.get(path)).status in (200, 503), path  # its own name works
    assert (await client.get("/healthz", headers={"Host": "10.200.0.1"})).status == 200
    resp = await client.get("/", headers={"Host": "a b"})
    assert resp.status == 400


def test_cors_any_origin_with_credentials_is_refused() -> None:
    with pytest.raises(ConfigError, match="allow_credentials"):
        from_dict({"cors": {"allowed_origins": ["*"], "allow_credentials": True}})
    with pytest.raises(ConfigError, match="allowed_hosts"):
        from_dict({"server": {"allowed_hosts": ["https://x.example"]}})


async def test_cors_credentials_only_for_listed_origins(
        aiohttp_client, make_settings: SettingsFactory, samples: dict[str, list[Sample]]) -> None:
    s = samples["explicit"][0]
    origin = "https://ohif.clinic.example"
    client = await aiohttp_client(make_app(make_settings(
        cors={"allowed_origins": [origin], "allow_credentials": True})))
    path = f"/instances/{s.orthanc_id}/file"
    preflight = await client.options(path, headers={
        "Origin": origin, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    resp = await client.get(path, headers={"Origin": origin})
    assert resp.headers["Access-Control-Allow-Origin"] == origin
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    other = await client.get(path, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
