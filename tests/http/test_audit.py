"""The audit middleware against a real Orthanc: one record per access, with who, what and
the bytes really sent; denied requests recorded; prefetch downloads attributed; and with
``[audit] required`` a full disk (a real, tiny tmpfs) refuses patient data with 503."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from dicomcache.audit.query import read_records
from dicomcache.http import auth
from dicomcache.http.app import make_app
from dicomcache.http.keys import AUDIT, METRICS, PREFETCHER, PRINCIPAL
from dicomcache.http.middleware import Handler
from dicomcache.principal import VIEWER, Principal
from tests.conftest import (
    Sample,
    SettingsFactory,
    eventually,
    fill_filesystem,
    metric_value,
    tmpfs,
)
from tests.http.auth_support import basic, write_users

SECRET = "s3cr3t-token-never-in-the-trail"


@web.middleware
async def fake_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Where auth.guard will sit (just after the audit middleware): a request with
    ``Authorization: Bearer <name>`` acts for ``name``; without one: 401."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return web.json_response({"error": "unauthorized"}, status=401)
    request[PRINCIPAL] = Principal(header[7:], VIEWER, "bearer", token=SECRET)
    request[auth.AUTHORIZED] = True  # what the real guard marks after every check
    return await handler(request)


def with_guard(app: web.Application) -> web.Application:
    """The stand-in in auth.guard's place (tokens named by the test, no identity
    provider); test_the_real_guard_names_the_user_in_the_trail uses the real one."""
    at = list(app.middlewares).index(auth.guard)
    app.middlewares[at] = fake_guard  # type: ignore[index]
    return app


async def records(client: TestClient, at_least: int = 0) -> list[dict[str, Any]]:
    """The records written so far (waiting for ``at_least``: a record is made once the
    answer is sent, so just after the client has it)."""
    trail = client.app[AUDIT]

    async def written() -> tuple[list[dict[str, Any]]] | None:
        assert await asyncio.to_thread(trail.flush, 10.0)
        found = await asyncio.to_thread(lambda: list(read_records([trail.settings.file])))
        return (found,) if len(found) >= at_least else None
    found: tuple[list[dict[str, Any]]] = await eventually(written, what=f"{at_least} records")
    return found[0]


def by_path(recs: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    return [r for r in recs if r.get("path") == path]


async def test_instance_miss_and_hit_recorded_with_uids_patient_and_bytes(
        aiohttp_client: Any, make_settings: SettingsFactory,
        samples: dict[str, list[Sample]]) -> None:
    client = await aiohttp_client(make_app(make_settings()))
    s = samples["explicit"][0]
    path = f"/instances/{s.orthanc_id}/file"
    for _ in ("miss", "hit"):
        resp = await client.get(path)
        assert resp.status == 200 and await resp.read() == s.data
    resp = await client.get(path, headers={"Range": "bytes=10-109"})
    assert resp.status == 206 and len(await resp.read()) == 100
    recs = by_path(await records(client, 3), path)
    assert len(recs) == 3
    for rec, size in zip(recs, [len(s.data), len(s.data), 100], strict=True):
        assert rec["action"] == "retrieve" and rec["outcome"] == "success"
        assert rec["bytes"] == size
        assert rec["patient_id"] == "PEXPLICIT"
        assert (rec["study_uid"], rec["series_uid"], rec["sop_uid"]) == (s.study, s.series, s.sop)
        assert rec["orthanc_id"] == s.orthanc_id and rec["level"] == "instance"
        assert rec["principal"] == "anonymous" and rec["auth"] == "none"
        assert rec["client"] == "127.0.0.1" and rec["source"] == "serve"
    assert recs[0]["status"] == 200 and recs[2]["status"] == 206
    await eventually(lambda: metric_value(client.app[METRICS], "dicomcache_audit_records_total",
                                          sink="file") >= 3, what="the records counted")


async def test_wado_uri_and_study_metadata_name_the_patient(
        aiohttp_client: Any, make_settings: SettingsFactory,
        samples: dict[str, list[Sample]]) -> None:
    client = await aiohttp_client(make_app(make_settings()))
    s = samples["implicit"][1]
    resp = await client.get("/wado", params={
        "requestType": "WADO", "studyUID": s.study, "seriesUID": s.series,
        "objectUID": s.sop, "contentType": "application/dicom"})
    assert resp.status == 200 and await resp.read() == s.data
    meta = f"/dicom-web/studies/{s.study}/metadata"
    resp = await client.get(meta, headers={"Accept-Encoding": "identity"})
    assert resp.status == 200
    body = await resp.read()
    recs = await records(client, 2)
    (wado,) = by_path(recs, "/wado")
    assert wado["bytes"] == len(s.data) and wado["patient_id"] == "PIMPLICIT"
    assert wado["sop_uid"] == s.sop
    (md,) = by_path(recs, meta)
    # The study's patient comes from the store's index (the instance cached just before).
    assert md["study_uid"] == s.study and md["patient_id"] == "PIMPLICIT"
    assert md["action"] == "retrieve" and md["bytes"] == len(body)


async def test_denied_requests_and_principals_recorded_without_credentials(
        aiohttp_client: Any, make_settings: SettingsFactory,
        samples: dict[str, list[Sample]]) -> None:
    client = await aiohttp_client(with_guard(make_app(make_settings())))
    s = samples["rle"][0]
    path = f"/instances/{s.orthanc_id}/file"
    refused = await client.get(path)
    assert refused.status == 401
    refusal = await refused.read()
    resp = await client.get(path, headers={"Authorization": "Bearer alice"})
    assert resp.status == 200 and await resp.read() == s.data
    # Listing every patient is not read through (403): a denied query.
    listing = await client.get("/patients", params={"access_token": SECRET, "expand": ""},
                               headers={"Authorization": "Bearer alice"})
    assert listing.status == 403
    qido = await client.get("/dicom-web/studies", params={"PatientID": "PRLE"},
                            headers={"Authorization": "Bearer alice"})
    assert qido.status < 500
    recs = await records(client, 4)
    unauth, ok = by_path(recs, path)
    assert unauth["outcome"] == "denied" and unauth["status"] == 401
    assert unauth["principal"] == "anonymous" and unauth["auth"] == "none"
    assert unauth["bytes"] == len(refusal) and unauth["orthanc_id"] == s.orthanc_id
    assert ok["principal"] == "alice" and ok["auth"] == "bearer" and ok["role"] == "viewer"
    assert ok["patient_id"] == "PRLE" and ok["bytes"] == len(s.data)
    (denied,) = by_path(recs, "/patients")
    assert denied["action"] == "query" and denied["outcome"] == "denied"
    assert "access_token=[redacted]" in denied["query"]
    (search,) = by_path(recs, "/dicom-web/studies")
    assert search["action"] == "query" and search["query"] == "PatientID=PRLE"
    text = await asyncio.to_thread(client.app[AUDIT].settings.file.read_text)
    assert SECRET not in text and "Bearer" not in text


async def test_status_and_metrics_are_not_audited(
        aiohttp_client: Any, make_settings: SettingsFactory) -> None:
    client = await aiohttp_client(make_app(make_settings()))
    for path in ("/healthz", "/metrics", "/status.json"):
        assert (await client.get(path)).status == 200
    assert [r["path"] for r in await records(client)] == []


async def test_prefetch_downloads_attributed_to_the_toucher(
        aiohttp_client: Any, make_settings: SettingsFactory, ct_series: list[Sample]) -> None:
    settings = make_settings(prefetch={"mode": "series", "parallel": 2})
    client = await aiohttp_client(with_guard(make_app(settings)))
    first = ct_series[0]
    resp = await client.get(f"/instances/{first.orthanc_id}/file",
                            headers={"Authorization": "Bearer bob"})
    assert resp.status == 200
    await resp.read()
    assert await client.app[PREFETCHER].idle(30)
    recs = [r for r in await records(client, len(ct_series)) if r["action"] == "prefetch"]
    assert sorted(r["sop_uid"] for r in recs) == sorted(s.sop for s in ct_series[1:])
    for rec in recs:
        assert rec["principal"] == "bob" and rec["client"] == "127.0.0.1"
        assert rec["patient_id"] == "PBIG" and rec["outcome"] == "success"
        assert rec["bytes"] == len(next(s.data for s in ct_series if s.sop == rec["sop_uid"]))


async def test_a_series_first_image_fetched_ahead_is_the_viewers_prefetch(
        aiohttp_client: Any, make_settings: SettingsFactory, ct_series: list[Sample]) -> None:
    """A cold series metadata starts the download of its middle slice before the viewer
    asks for it: an access to patient data on that viewer's behalf, recorded as such."""
    settings = make_settings(prefetch={"mode": "series"})
    client = await aiohttp_client(with_guard(make_app(settings)))
    first = ct_series[0]
    middle = ct_series[len(ct_series) // 2]  # numbered in this order
    resp = await client.get(f"/dicom-web/studies/{first.study}/series/{first.series}/metadata",
                            headers={"Authorization": "Bearer bob",
                                     "Accept": "application/dicom+json"})
    assert resp.status == 200
    await resp.read()

    async def fetched_ahead() -> list[dict[str, Any]] | None:
        recs = [r for r in await records(client) if r["action"] == "prefetch"]
        return recs or None
    (rec,) = await eventually(fetched_ahead, what="the middle slice's prefetch record")
    assert rec["sop_uid"] == middle.sop and rec["orthanc_id"] == middle.orthanc_id
    assert rec["principal"] == "bob" and rec["client"] == "127.0.0.1"
    assert rec["patient_id"] == "PBIG" and rec["outcome"] == "success"
    assert rec["bytes"] == len(middle.data)


# --- a full disk ---------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs."""
    with tmpfs(tmp_path / "small", "size=1m,mode=0700") as where:
        yield where


async def test_full_disk_with_required_refuses_patient_data_then_recovers(
        aiohttp_client: Any, make_settings: SettingsFactory, small_fs: Path,
        samples: dict[str, list[Sample]]) -> None:
    settings = make_settings(audit={"file": str(small_fs / "audit.jsonl"), "required": True})
    client = await aiohttp_client(make_app(settings))
    s = samples["jpegls"][0]
    path = f"/instances/{s.orthanc_id}/file"
    assert (await client.get(path)).status == 200
    await records(client, 1)  # durable before the disk fills
    filler = await asyncio.to_thread(fill_filesystem, small_fs)

    async def refused() -> bool:
        resp = await client.get(path)
        await resp.read()
        return resp.status == 503
    await eventually(refused, timeout=10, what="a 503 once the audit file cannot be written")
    resp = await client.get(path)
    assert resp.status == 503 and resp.headers["Retry-After"]
    assert "audit" in (await resp.json())["error"]
    trail = client.app[AUDIT]
    metrics = client.app[METRICS]
    assert metric_value(metrics, "dicomcache_audit_write_errors_total", cause="disk_full") >= 1
    assert metric_value(metrics, "dicomcache_audit_refused_total", side="http") >= 1
    assert metric_value(metrics, "dicomcache_audit_up") == 0
    status = await (await client.get("/status.json")).json()
    assert status["audit"]["state"] == "failing" and "disk_full" in status["audit"]["error"]
    page = await (await client.get("/")).text()
    assert "Audit trail" in page and "failing" in page
    # Space again: what waited in memory (the refusals too) is written, access resumes.
    await asyncio.to_thread(filler.unlink)
    await eventually(lambda: trail.healthy, timeout=10, what="the audit file written again")
    before = len(await records(client))
    assert (await client.get(path)).status == 200
    recs = by_path(await records(client, before + 1), path)
    outcomes = [r["outcome"] for r in recs]
    assert outcomes[0] == "success" and outcomes[-1] == "success"
    assert "refused" in outcomes
    assert all(r["status"] == 503 for r in recs if r["outcome"] == "refused")
    assert len({r["id"] for r in recs}) == len(recs)  # nothing written twice
    assert trail.dropped == 0


async def test_full_disk_without_required_still_serves(
        aiohttp_client: Any, make_settings: SettingsFactory, small_fs: Path,
        samples: dict[str, list[Sample]]) -> None:
    settings = make_settings(audit={"file": str(small_fs / "audit.jsonl"), "required": False})
    client = await aiohttp_client(make_app(settings))
    s = samples["j2k"][0]
    path = f"/instances/{s.orthanc_id}/file"
    assert (await client.get(path)).status == 200
    await records(client, 1)
    await asyncio.to_thread(fill_filesystem, small_fs)
    trail = client.app[AUDIT]

    async def failing() -> bool:
        # (Records fill what is left of the file's last page first.)
        resp = await client.get(path)
        assert resp.status == 200 and await resp.read() == s.data
        return not trail.healthy
    await eventually(failing, timeout=10, what="the failure noticed")
    resp = await client.get(path)
    assert resp.status == 200 and await resp.read() == s.data


async def test_the_real_guard_names_the_user_in_the_trail(
        aiohttp_client: Any, make_settings: SettingsFactory, tmp_path: Path,
        samples: dict[str, list[Sample]]) -> None:
    """With mode = "basic": who the users file says, and a wrong password as denied."""
    users = await asyncio.to_thread(write_users, tmp_path / "users",
                                    {"vera": ("viewer", "vera-password-1")})
    client = await aiohttp_client(make_app(make_settings(
        auth={"mode": "basic", "users_file": str(users)})))
    s = samples["explicit"][1]
    path = f"/instances/{s.orthanc_id}/file"
    ok = await client.get(path, headers=basic("vera", "vera-password-1"))
    assert ok.status == 200 and await ok.read() == s.data
    wrong = await client.get(path, headers=basic("vera", "guess-guess"))
    assert wrong.status == 401
    recs = await records(client, 2)
    served, refused = by_path(recs, path)
    assert served["principal"] == "vera" and served["auth"] == "basic"
    assert served["patient_id"] == "PEXPLICIT" and served["bytes"] == len(s.data)
    assert refused["outcome"] == "denied" and refused["status"] == 401
    text = await asyncio.to_thread(client.app[AUDIT].settings.file.read_text)
    assert "vera-password-1" not in text and "guess-guess" not in text


def test_client_address_is_worked_out_once_per_request(tmp_path: Path) -> None:
    """The trusted proxies are parsed when the app is made, and a request's client is
    worked out by the first middleware that asks: the second asker (the limits, then
    the audit record) gets the same answer even if the list changed in between."""
    from aiohttp.test_utils import make_mocked_request

    from dicomcache.config import from_dict
    from dicomcache.http.audit import TRUSTED_PROXIES, TrustedProxies, client_address

    app = make_app(from_dict({"upstream": {"url": "http://127.0.0.1:1"},
                              "cache": {"directory": str(tmp_path)},
                              "audit": {"trusted_proxies": ["127.0.0.0/8"]}}))
    assert app[TRUSTED_PROXIES].networks and app[TRUSTED_PROXIES].trusts("127.0.0.9")
    class Peer(asyncio.Transport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("127.0.0.1", 40000) if name == "peername" else default

    request = make_mocked_request("GET", "/wado", headers={"X-Forwarded-For": "10.9.8.7"},
                                  app=app, transport=Peer())
    assert request.remote == "127.0.0.1"
    assert client_address(request) == ("10.9.8.7", "127.0.0.1")
    app[TRUSTED_PROXIES] = TrustedProxies()  # (a frozen app would refuse; this one is not)
    assert client_address(request) == ("10.9.8.7", "127.0.0.1")
