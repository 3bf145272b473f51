"""dicomcache.upstream.client and redirects: none is followed, no credential leaks anywhere.

A real local HTTP server plays an upstream that answers with redirect loops or
with redirects to another origin (a second server that records whatever
reaches it).  Whatever the viewer asks, dicomcache's password and the base64 of
``user:password`` appear in no answer (body or header), on no status page, in
no readiness answer, in no metric and in no log line.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from dicomcache.config import UpstreamSettings
from dicomcache.errors import Cause, UpstreamError
from dicomcache.http.app import make_app
from dicomcache.metrics import Metrics
from dicomcache.upstream.client import OrthancClient
from tests.conftest import SettingsFactory

USER = "dicomcache"
PASSWORD = "S3cret-Pa55word"
SECRETS = (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
INSTANCE = "079d74f5-e5b0bb07-ae470350-6c9ad2ab-ee1995b1"


@dataclass
class Redirector:
    """The upstream (``port``) and the other origin it may send requests to (``other``)."""

    port: int
    other: int
    #: "loop" (to the same path), "away" (to the other origin), "relative" (same origin,
    #: another path), "prefixless" (same host and port, another path, absolute URL).
    mode: str = "loop"
    #: Headers of every request that reached the other origin.
    stolen: list[dict[str, str]] = field(default_factory=list)
    #: Requests the upstream received.
    seen: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _site(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, int(port)


@pytest.fixture
async def redirector() -> AsyncIterator[Redirector]:
    state = Redirector(0, 0)

    async def elsewhere(request: web.Request) -> web.Response:
        state.stolen.append(dict(request.headers))
        return web.Response(text="{}", content_type="application/json")

    async def upstream(request: web.Request) -> web.Response:
        state.seen += 1
        await request.read()
        if state.mode == "away":
            target = f"http://127.0.0.1:{state.other}/collect{request.path_qs}"
        elif state.mode == "relative":
            target = "/app/explorer.html"
        elif state.mode == "absolute":
            target = f"{state.url}/app/explorer.html?x=1"
        else:
            target = request.path_qs
        return web.Response(status=307 if request.method != "GET" else 302,
                            headers={"Location": target})

    other_app = web.Application()
    other_app.router.add_route("*", "/{tail:.*}", elsewhere)
    up_app = web.Application()
    up_app.router.add_route("*", "/{tail:.*}", upstream)
    other_runner, state.other = await _site(other_app)
    up_runner, state.port = await _site(up_app)
    yield state
    await up_runner.cleanup()
    await other_runner.cleanup()


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


@pytest.mark.parametrize("mode", ["loop", "away", "relative", "absolute"])
async def test_no_redirect_is_followed_and_the_error_names_no_credential(
        redirector: Redirector, mode: str) -> None:
    redirector.mode = mode
    client = OrthancClient(UpstreamSettings(url=redirector.url, username=USER,
                                            password=PASSWORD, retries=2,
                                            backoff_base=0.01, backoff_max=0.02), Metrics())
    try:
        with pytest.raises(UpstreamError) as failed:
            await client.get_json("/tools/lookup", method="POST", body=b"1.2.3")
    finally:
        await client.close()
    err = failed.value
    assert err.cause is Cause.REDIRECT and err.status in (302, 307)
    assert "redirect" in err.reason and "follows no redirect" in err.reason
    # Final: a redirect is the upstream's configuration, another attempt changes nothing.
    assert err.attempts == 1 and redirector.seen == 1
    assert redirector.stolen == []
    assert leaks(repr(err)) == [] and leaks(str(err)) == []


async def test_a_redirect_location_is_described_without_userinfo_or_query(
        redirector: Redirector) -> None:
    redirector.mode = "absolute"
    client = OrthancClient(UpstreamSettings(url=redirector.url, retries=0), Metrics())
    try:
        with pytest.raises(UpstreamError) as failed:
            await client.get("/system", kind="probe")
    finally:
        await client.close()
    assert f"{redirector.url}/app/explorer.html" in failed.value.reason
    assert "x=1" not in failed.value.reason


@pytest.fixture
async def viewer(aiohttp_client, make_settings: SettingsFactory,
                 redirector: Redirector) -> TestClient:
    # /patients and /app are off the read-through allow-list by default: opened here, as
    # an operator may, to see what a redirect from them does.
    settings = make_settings(url=redirector.url,
                             upstream={"username": USER, "password": PASSWORD},
                             access={"allow": ["GET /patients", "GET /app"]})
    return await aiohttp_client(make_app(settings))


@pytest.mark.parametrize("mode", ["loop", "away"])
async def test_a_redirecting_upstream_leaks_no_credential_to_viewers_status_or_logs(
        viewer: TestClient, redirector: Redirector, mode: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    redirector.mode = mode
    seen: list[str] = []

    async def ask(path: str) -> int:
        resp = await viewer.get(path, allow_redirects=False)
        body = await resp.text()
        seen.append(f"{resp.status} {dict(resp.headers)} {body}")
        return resp.status

    # A miss (an instance download), DICOMweb, a read-through, then everything
    # that shows the upstream's state.
    assert await ask(f"/instances/{INSTANCE}/file") == 502
    assert "follows no redirect" in seen[-1]
    assert await ask("/dicom-web/studies?PatientID=X") == 502
    assert await ask("/readyz") == 503
    assert "redirect" in seen[-1]
    for path in ("/status.json", "/", "/metrics"):
        assert await ask(path) == 200
    # The read-through passes a redirect within Orthanc on (as a path of ours), never one
    # leaving it.
    assert await ask("/patients") == (502 if mode == "away" else 302)
    text = "\n".join(seen) + "\n" + caplog.text
    assert leaks(text) == []
    assert redirector.stolen == []


async def test_a_same_origin_redirect_is_passed_to_the_viewer_as_a_path_of_ours(
        viewer: TestClient, redirector: Redirector) -> None:
    """Orthanc's own redirects (``/app`` → ``/app/explorer.html``) reach the viewer as a
    path on dicomcache, so the next request passes the access policy again."""
    for mode in ("relative", "absolute"):
        redirector.mode = mode
        resp = await viewer.get("/app", allow_redirects=False)
        assert resp.status == 302
        assert resp.headers["Location"] == ("/app/explorer.html" if mode == "relative"
                                            else "/app/explorer.html?x=1")
