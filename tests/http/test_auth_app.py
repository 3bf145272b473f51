"""Authentication and authorization through the app, with a real Orthanc behind: a users
file (basic), the route matrix (anonymous / viewer / admin / denied study) with an
authorization service on 127.0.0.1, CORS preflights, prefetch bounds, the warning."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.http import auth
from dicomcache.http.app import make_app
from dicomcache.http.keys import PREFETCHER, STORE
from tests.conftest import Sample, SettingsFactory, eventually
from tests.http.auth_support import AuthzService, basic, write_users

PASSWORDS = {"vera": ("viewer", "vera-password-1"), "ada": ("admin", "ada-password-1")}
VERA = basic("vera", "vera-password-1")
ADA = basic("ada", "ada-password-1")


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_users(tmp_path_factory.mktemp("users") / "users", PASSWORDS)


@pytest.fixture
async def service() -> AsyncIterator[AuthzService]:
    svc = AuthzService(restricted={"vera"})
    await svc.start()
    yield svc
    await svc.stop()


def basic_auth(users_file: Path, **over: Any) -> dict[str, Any]:
    return {"mode": "basic", "users_file": str(users_file), **over}


@pytest.fixture
async def client(aiohttp_client: Any, make_settings: SettingsFactory,
                 users_file: Path) -> TestClient:
    return await aiohttp_client(make_app(make_settings(auth=basic_auth(users_file))))


def file_path(sample: Sample) -> str:
    return f"/instances/{sample.orthanc_id}/file"


# --- basic, end to end ---------------------------------------------------------------------

async def test_basic_users(client: TestClient, samples: dict[str, list[Sample]],
                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sample = samples["explicit"][0]
    resp = await client.get(file_path(sample), headers=VERA)
    assert resp.status == 200 and await resp.read() == sample.data
    assert (await client.get("/status.json", headers=VERA)).status == 403
    assert (await client.get("/status.json", headers=ADA)).status == 200

    refused = [({}, "credentials are required"),
               (basic("vera", "wrong-password"), "invalid user name or password"),
               (basic("nobody", "vera-password-1"), "invalid user name or password"),
               (basic("vera-password-1", ""), "invalid user name or password"),
               ({"Authorization": "Basic !!!not-base64"}, "malformed"),
               ({"Authorization": "Basic " + "A" * 6000}, "malformed"),
               ({"Authorization": "Basic dmVyYQ=="}, "malformed"),  # "vera", no colon
               ({"Authorization": "Basic \u00e9\u00e9"}, "malformed"),
               ({"Authorization": "Digest username=vera"}, "credentials are required"),
               ({"Authorization": "Basic"}, "credentials are required")]
    for headers, reason in refused:
        resp = await client.get(file_path(sample), headers=headers)
        assert resp.status == 401, headers
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="dicomcache", charset="UTF-8"'
        assert reason in (await resp.json())["reason"]
    # No password, and no name typed into the password field, reaches the log.
    for secret in ("vera-password-1", "wrong-password", "nobody", "ada-password-1"):
        assert secret not in caplog.text


async def test_a_study_load_costs_one_password_check(client: TestClient,
                                                     samples: dict[str, list[Sample]]) -> None:
    paths = [file_path(s) for s in samples["explicit"]] * 10
    answers = await asyncio.gather(*(client.get(p, headers=VERA) for p in paths))
    assert [a.status for a in answers] == [200] * len(paths)
    assert client.app[auth.AUTH].argon2_runs == 1


async def test_repeated_failures_back_off(aiohttp_client: Any, make_settings: SettingsFactory,
                                          users_file: Path,
                                          samples: dict[str, list[Sample]]) -> None:
    settings = make_settings(auth=basic_auth(users_file, max_failures=3, max_delay=60))
    client = await aiohttp_client(make_app(settings))
    path = file_path(samples["explicit"][0])
    statuses = [(await client.get(path, headers=basic("vera", f"guess-{i}"))).status
                for i in range(3)]
    assert statuses == [401, 401, 401]
    resp = await client.get(path, headers=basic("vera", "guess-3"))
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    # Even the right password waits now (that is what makes guessing slow) ...
    assert (await client.get(path, headers=VERA)).status == 429
    runs = client.app[auth.AUTH].argon2_runs
    # ... and parallel guesses during the wait cost no password check.
    answers = await asyncio.gather(*(client.get(path, headers=basic("vera", f"p-{i}"))
                                     for i in range(20)))
    assert {a.status for a in answers} == {429}
    assert client.app[auth.AUTH].argon2_runs == runs


async def test_users_file_changes_apply_without_restart(
        aiohttp_client: Any, make_settings: SettingsFactory, tmp_path: Path,
        samples: dict[str, list[Sample]]) -> None:
    path = await asyncio.to_thread(write_users, tmp_path / "users", {"vera": PASSWORDS["vera"]})
    client = await aiohttp_client(make_app(make_settings(auth=basic_auth(path))))
    target = file_path(samples["explicit"][0])
    assert (await client.get(target, headers=VERA)).status == 200
    await asyncio.to_thread(write_users, path, {"ada": PASSWORDS["ada"]})

    async def vera_refused() -> bool:
        return (await client.get(target, headers=VERA)).status == 401
    await eventually(vera_refused, timeout=10, interval=0.2, what="vera removed")
    assert (await client.get(target, headers=ADA)).status == 200


# --- the matrix ----------------------------------------------------------------------------

FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"
OK, FILTERED = 200, "filtered"
# family: (path template, Accept, role); {st} {se} {sop} {oid} {study_oid}
ROUTES: dict[str, tuple[str, str | None, str | None]] = {
    "healthz": ("/healthz", None, None),
    "readyz": ("/readyz", None, None),
    "status-page": ("/", None, "admin"),
    "status-json": ("/status.json", None, "admin"),
    "metrics": ("/metrics", None, "admin"),
    "admin-read-through": ("/system", None, "admin"),
    "orthanc-file": ("/instances/{oid}/file", None, "viewer"),
    "orthanc-tags": ("/instances/{oid}/simplified-tags", None, "viewer"),
    "orthanc-study": ("/studies/{study_oid}", None, "viewer"),
    "wado-uri": ("/wado?requestType=WADO&studyUID={st}&seriesUID={se}&objectUID={sop}"
                 "&contentType=application/dicom", None, "viewer"),
    "wado-uri-rendered": ("/wado?requestType=WADO&studyUID={st}&seriesUID={se}"
                          "&objectUID={sop}&contentType=image/jpeg", None, "viewer"),
    "wado-rs-instance": ("/dicom-web/studies/{st}/series/{se}/instances/{sop}",
                         'multipart/related; type="application/dicom"', "viewer"),
    "metadata": ("/dicom-web/studies/{st}/series/{se}/metadata", "application/dicom+json",
                 "viewer"),
    "frames": ("/dicom-web/studies/{st}/series/{se}/instances/{sop}/frames/1", FRAMES,
               "viewer"),
    "rendered": ("/dicom-web/studies/{st}/series/{se}/instances/{sop}/rendered",
                 "image/jpeg", "viewer"),
    "qido-study-series": ("/dicom-web/studies/{st}/series", "application/dicom+json",
                          "viewer"),
    "qido-studies": ("/dicom-web/studies?StudyInstanceUID={st}", "application/dicom+json",
                     "search"),
    "qido-series": ("/dicom-web/series?StudyInstanceUID={st}", "application/dicom+json",
                    "search"),
}


def study_oid(orthanc: OrthancProcess, sample: Sample) -> str:
    return str(json.loads(orthanc.request("GET", f"/instances/{sample.orthanc_id}/study"))["ID"])


def fill(template: str, sample: Sample, orthanc: OrthancProcess) -> str:
    return template.format(st=sample.study, se=sample.series, sop=sample.sop,
                           oid=sample.orthanc_id,
                           study_oid=study_oid(orthanc, sample) if "{study_oid}" in template
                           else "")


@pytest.mark.parametrize("family", sorted(ROUTES))
async def test_route_matrix(family: str, aiohttp_client: Any, make_settings: SettingsFactory,
                            users_file: Path, service: AuthzService,
                            samples: dict[str, list[Sample]], orthanc: OrthancProcess) -> None:
    """anonymous / viewer / admin / viewer on a study the service denies them."""
    granted, denied = samples["explicit"][0], samples["implicit"][0]
    service.denied = {denied.study}
    settings = make_settings(auth=basic_auth(users_file, authorization_url=service.url),
                             access={"allow": ["GET /system"]})
    client = await aiohttp_client(make_app(settings))
    template, accept, role = ROUTES[family]
    headers = {"Accept": accept} if accept else {}

    async def get(sample: Sample, who: dict[str, str]) -> tuple[int, bytes]:
        resp = await client.get(fill(template, sample, orthanc), headers={**headers, **who})
        return resp.status, await resp.read()

    anonymous, viewer, admin, on_denied = (await get(granted, {}), await get(granted, VERA),
                                           await get(granted, ADA), await get(denied, VERA))
    if role is None:
        assert {anonymous[0], viewer[0], admin[0]} == {200}
        return
    assert anonymous[0] == 401
    assert admin[0] == 200, admin
    if role == "admin":
        assert viewer[0] == 403 and on_denied[0] == 403
        assert "needs the admin role" in json.loads(viewer[1])["reason"]
        return
    assert viewer[0] == 200, viewer
    if role == "search":  # filtered: the denied study is simply not found
        assert [r["0020000D"]["Value"] for r in json.loads(viewer[1])] \
            and all(r["0020000D"]["Value"] == [granted.study] for r in json.loads(viewer[1]))
        assert on_denied == (200, b"[]")
        assert json.loads((await get(denied, ADA))[1])  # not restricted: the admin sees it
        return
    assert on_denied[0] == 403, on_denied
    assert json.loads(on_denied[1])["reason"] == \
        f"access to study {denied.study} is not granted to vera"
    assert (await get(denied, ADA))[0] == 200


async def test_search_of_every_study_lists_the_granted_ones(
        aiohttp_client: Any, make_settings: SettingsFactory, users_file: Path,
        service: AuthzService, samples: dict[str, list[Sample]]) -> None:
    denied = {samples["implicit"][0].study, samples["rle"][0].study}
    service.denied = denied
    settings = make_settings(auth=basic_auth(users_file, authorization_url=service.url))
    client = await aiohttp_client(make_app(settings))
    json_accept = {"Accept": "application/dicom+json"}
    every = await (await client.get("/dicom-web/studies", headers={**json_accept, **ADA})).json()
    mine = await (await client.get("/dicom-web/studies", headers={**json_accept, **VERA})).json()
    studies = {r["0020000D"]["Value"][0] for r in every}
    assert denied <= studies
    assert {r["0020000D"]["Value"][0] for r in mine} == studies - denied
    asked = len(service.asked)
    # Decisions are kept (validity 60 s): the same search asks nothing again, and a
    # conditional request gets a 304 for the filtered answer.
    resp = await client.get("/dicom-web/studies", headers={**json_accept, **VERA})
    assert len(service.asked) == asked
    again = await client.get("/dicom-web/studies", headers={
        **json_accept, **VERA, "If-None-Match": resp.headers["ETag"],
        "Accept-Encoding": "gzip"})
    assert again.status == 304
    # Anything but JSON cannot be filtered: refused, never passed on whole.
    xml = await client.get("/dicom-web/studies", headers={
        **VERA, "Accept": 'multipart/related; type="application/dicom+xml"'})
    assert xml.status == 406


async def test_mixed_uids_do_not_cross_a_denied_study(
        aiohttp_client: Any, make_settings: SettingsFactory, users_file: Path,
        service: AuthzService, samples: dict[str, list[Sample]]) -> None:
    """A granted study's UID with a denied study's instance: the hierarchy is checked
    (by the store's lookup, or by Orthanc on a read-through), so nothing leaks."""
    granted, denied = samples["explicit"][0], samples["implicit"][0]
    service.denied = {denied.study}
    settings = make_settings(auth=basic_auth(users_file, authorization_url=service.url))
    client = await aiohttp_client(make_app(settings))
    paths = [
        f"/wado?requestType=WADO&studyUID={granted.study}&objectUID={denied.sop}"
        "&contentType=application/dicom",
        f"/wado?requestType=WADO&studyUID={granted.study}&objectUID={denied.sop}"
        "&contentType=image/jpeg",
        f"/dicom-web/studies/{granted.study}/series/{denied.series}/instances/{denied.sop}",
        f"/dicom-web/studies/{granted.study}/series/{denied.series}/metadata",
        f"/dicom-web/studies/{granted.study}/series/{denied.series}/instances/{denied.sop}"
        "/frames/1",
    ]
    for path in paths:
        resp = await client.get(path, headers={**VERA, "Accept": "*/*"})
        body = await resp.read()
        assert resp.status >= 400, (path, resp.status)
        assert denied.data not in body


async def test_authorization_service_down_refuses(
        aiohttp_client: Any, make_settings: SettingsFactory, users_file: Path,
        service: AuthzService, samples: dict[str, list[Sample]]) -> None:
    settings = make_settings(auth=basic_auth(users_file, authorization_url=service.url))
    client = await aiohttp_client(make_app(settings))
    service.broken = True
    resp = await client.get(file_path(samples["explicit"][0]), headers=VERA)
    assert resp.status == 503 and resp.headers["Retry-After"]
    assert "127.0.0.1" not in await resp.text()
    resp = await client.get("/dicom-web/studies", headers={**VERA,
                                                           "Accept": "application/json"})
    assert resp.status == 503  # a search is refused whole, not shown unfiltered


# --- CORS, status page, prefetch ---------------------------------------------------------

async def test_cors_preflight_needs_no_credentials(aiohttp_client: Any,
                                                   make_settings: SettingsFactory,
                                                   users_file: Path) -> None:
    settings = make_settings(auth=basic_auth(users_file),
                             cors={"allowed_origins": ["https://ohif.example"]})
    client = await aiohttp_client(make_app(settings))
    resp = await client.options("/dicom-web/studies", headers={
        "Origin": "https://ohif.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, accept"})
    assert resp.status == 204
    assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    # The 401 itself carries CORS headers, so the viewer can read it.
    resp = await client.get("/dicom-web/studies", headers={"Origin": "https://ohif.example"})
    assert resp.status == 401
    assert resp.headers["Access-Control-Allow-Origin"] == "https://ohif.example"


@pytest.mark.parametrize(("host", "allow", "warned"), [
    ("127.0.0.1", False, False),
    ("0.0.0.0", True, True),
])
async def test_status_page_warns_of_anonymous_network_access(
        aiohttp_client: Any, make_settings: SettingsFactory, host: str, allow: bool,
        warned: bool) -> None:
    settings = make_settings(server={"host": host},
                             auth={"mode": "none", "allow_anonymous_network": allow})
    client = await aiohttp_client(make_app(settings))
    page = await (await client.get("/")).text()
    assert ('id="auth-warning"' in page) is warned
    status = await (await client.get("/status.json")).json()
    assert status["auth"]["anonymous_network"] is warned


async def test_prefetch_only_after_authorization_and_bounded_per_principal(
        aiohttp_client: Any, make_settings: SettingsFactory, users_file: Path,
        service: AuthzService, samples: dict[str, list[Sample]]) -> None:
    first, denied, second = samples["explicit"], samples["implicit"], samples["rle"]
    service.denied = {denied[0].study}
    settings = make_settings(
        auth=basic_auth(users_file, authorization_url=service.url),
        prefetch={"mode": "study", "max_studies_per_principal": 1})
    client = await aiohttp_client(make_app(settings))
    store = client.app[STORE].sync
    prefetcher = client.app[PREFETCHER]

    def stored(series: list[Sample]) -> int:
        return sum(store.peek(s.orthanc_id) is not None for s in series)

    # Refused requests (401, 403) touch nothing.
    assert (await client.get(file_path(denied[0]))).status == 401
    assert (await client.get(file_path(denied[0]), headers=VERA)).status == 403
    # A granted one prefetches its study (the other two instances).
    assert (await client.get(file_path(first[0]), headers=VERA)).status == 200
    await eventually(lambda: stored(first) == 3, what="study prefetched")
    # The principal's budget (one study) is spent: the next study is served, not prefetched.
    assert (await client.get(file_path(second[0]), headers=VERA)).status == 200
    assert await prefetcher.idle(10)
    await client.app[STORE].drain()  # its disk copy follows its answer
    assert stored(second) == 1
    assert stored(denied) == 0
    # Nor does its series metadata start the download of its first image (the middle
    # slice a cold series metadata fetches ahead for a viewer within budget).
    resp = await client.get(f"/dicom-web/studies/{second[0].study}/series/"
                            f"{second[0].series}/metadata",
                            headers={**VERA, "Accept": "application/dicom+json"})
    assert resp.status == 200
    await asyncio.sleep(0.5)
    await client.app[STORE].drain()
    assert stored(second) == 1
    # Another principal has a budget of their own.
    assert (await client.get(file_path(second[1]), headers=ADA)).status == 200
    await eventually(lambda: stored(second) == 3, what="second study prefetched for ada")


async def test_parallel_guesses_wait_for_the_back_off_too(
        aiohttp_client: Any, make_settings: SettingsFactory, users_file: Path,
        samples: dict[str, list[Sample]]) -> None:
    """Guesses sent at once queue for the password check; once the address is in
    back-off, the queued ones are answered 429 without being checked."""
    settings = make_settings(auth=basic_auth(users_file, max_failures=3, max_delay=60))
    client = await aiohttp_client(make_app(settings))
    path = file_path(samples["explicit"][0])
    answers = await asyncio.gather(*(client.get(path, headers=basic("vera", f"guess-{i}"))
                                     for i in range(24)))
    assert sorted({a.status for a in answers}) == [401, 429]
    assert client.app[auth.AUTH].argon2_runs <= 3 + auth.ARGON2_PARALLEL


async def test_the_principal_is_known_around_the_guard(
        aiohttp_client: Any, make_settings: SettingsFactory, users_file: Path,
        samples: dict[str, list[Sample]]) -> None:
    """What runs just before the guard (the audit trail) reads request[PRINCIPAL] after
    the answer, refused requests included."""
    from aiohttp import web

    from dicomcache.http.keys import PRINCIPAL

    seen: list[tuple[str, int]] = []

    @web.middleware
    async def audit_like(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        seen.append((request[PRINCIPAL].name, response.status))
        return response

    app = make_app(make_settings(auth=basic_auth(users_file)))
    app.middlewares.insert(app.middlewares.index(auth.guard), audit_like)
    client = await aiohttp_client(app)
    path = file_path(samples["explicit"][0])
    await client.get(path)
    await client.get(path, headers=basic("vera", "wrong-password"))
    await client.get(path, headers=VERA)
    await client.get("/status.json", headers=VERA)
    await client.get("/healthz")
    assert seen == [("unauthenticated", 401), ("unauthenticated", 401), ("vera", 200),
                    ("vera", 403), ("unauthenticated", 200)]


async def test_an_unreachable_service_is_not_described_to_clients(
        aiohttp_client: Any, make_settings: SettingsFactory, users_file: Path,
        service: AuthzService, samples: dict[str, list[Sample]]) -> None:
    settings = make_settings(auth=basic_auth(users_file, authorization_url=service.url))
    client = await aiohttp_client(make_app(settings))
    await service.stop()
    resp = await client.get(file_path(samples["explicit"][0]), headers=VERA)
    assert resp.status == 503
    text = await resp.text()
    assert "127.0.0.1" not in text and str(service.port) not in text


async def test_the_admin_port_checks_the_same_way(aiohttp_client: Any,
                                                  make_settings: SettingsFactory,
                                                  users_file: Path) -> None:
    import aiohttp

    from dicomcache.devtools.orthanc import free_port

    port = free_port()
    settings = make_settings(server={"admin_port": port}, auth=basic_auth(users_file))
    client = await aiohttp_client(make_app(settings))
    assert (await client.get("/status.json", headers=ADA)).status == 404  # not here
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for path, who, status in [("/healthz", {}, 200), ("/metrics", {}, 401),
                                  ("/metrics", VERA, 403), ("/metrics", ADA, 200),
                                  ("/status.json", VERA, 403), ("/", ADA, 200)]:
            async with session.get(base + path, headers=who) as resp:
                assert resp.status == status, (path, who)
