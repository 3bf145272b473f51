"""An ``https://`` upstream: a local TLS reverse proxy (test CA) in front of the real
Orthanc.  Verified with ``upstream.ca_file``; refused without it, for another host
name, and when it redirects elsewhere."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestClient

from dicomcache.config import UpstreamSettings
from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.errors import Cause, UpstreamError
from dicomcache.http.app import make_app
from dicomcache.metrics import Metrics
from dicomcache.upstream.client import OrthancClient
from tests.conftest import Sample, SettingsFactory
from tests.tls_support import write_ca, write_pair


@dataclass
class TlsProxy:
    port: int
    ca_file: Path
    #: "proxy" (pass to Orthanc) or "away" (redirect to another origin).
    mode: str = "proxy"

    def url(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}"


@pytest.fixture
async def tls_proxy(orthanc: OrthancProcess, tmp_path: Path) -> AsyncIterator[TlsProxy]:
    """HTTPS on 127.0.0.1 with a certificate for ``localhost`` only, proxying to Orthanc."""
    ca = trustme.CA()
    pair = write_pair(ca, tmp_path, "proxy", "localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pair.cert, pair.key)
    state = TlsProxy(0, write_ca(ca, tmp_path / "ca.pem"))
    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        if state.mode == "away":
            raise web.HTTPTemporaryRedirect("http://127.0.0.1:9/elsewhere")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding")}
        async with session.request(request.method, orthanc.url + request.raw_path,
                                   headers=headers, data=await request.read()) as up:
            body = await up.read()
            out = web.Response(status=up.status, body=body)
            for name in ("Content-Type", "Content-Encoding"):
                if name in up.headers:
                    out.headers[name] = up.headers[name]
            return out

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    state.port = int(runner.addresses[0][1])
    yield state
    await runner.cleanup()
    await session.close()


def _settings(url: str, orthanc: OrthancProcess, ca_file: Path | None) -> UpstreamSettings:
    return UpstreamSettings(url=url, username=orthanc.username, password=orthanc.password,
                            ca_file=ca_file, retries=2, backoff_base=0.01, backoff_max=0.02,
                            connect_timeout=5)


async def test_https_upstream_verified_with_the_hospital_ca(
        tls_proxy: TlsProxy, orthanc: OrthancProcess, ct_series: list[Sample]) -> None:
    client = await OrthancClient.create(_settings(tls_proxy.url(), orthanc, tls_proxy.ca_file),
                                        Metrics())
    try:
        sample = ct_series[0]
        assert await client.instance_md5(sample.orthanc_id) == hashlib.md5(
            sample.data).hexdigest()
    finally:
        await client.close()


@pytest.mark.parametrize("host, ca, message", [
    ("localhost", False, "unable to get local issuer certificate"),  # not a system CA
    ("127.0.0.1", True, "IP address mismatch"),  # a name the certificate lacks
])
async def test_https_upstream_refused_when_not_verified(
        tls_proxy: TlsProxy, orthanc: OrthancProcess, host: str, ca: bool,
        message: str) -> None:
    settings = _settings(tls_proxy.url(host), orthanc, tls_proxy.ca_file if ca else None)
    client = await OrthancClient.create(settings, Metrics())
    try:
        with pytest.raises(UpstreamError) as refused:
            await client.get_json("/system")
    finally:
        await client.close()
    err = refused.value
    assert err.cause is Cause.TLS and err.attempts == 1  # final: retrying changes nothing
    assert "is not trusted" in err.reason and "upstream.ca_file" in err.reason
    assert message in err.reason, err.reason


async def test_https_upstream_redirecting_elsewhere_is_refused(
        tls_proxy: TlsProxy, orthanc: OrthancProcess) -> None:
    tls_proxy.mode = "away"
    client = await OrthancClient.create(_settings(tls_proxy.url(), orthanc, tls_proxy.ca_file),
                                        Metrics())
    try:
        with pytest.raises(UpstreamError) as refused:
            await client.get_json("/system")
    finally:
        await client.close()
    assert refused.value.cause is Cause.REDIRECT
    assert "http://127.0.0.1:9/elsewhere" in refused.value.reason


async def test_viewer_gets_a_clear_502_for_an_untrusted_upstream(
        aiohttp_client, make_settings: SettingsFactory, tls_proxy: TlsProxy,
        ct_series: list[Sample]) -> None:
    viewer: TestClient = await aiohttp_client(make_app(make_settings(url=tls_proxy.url())))
    resp = await viewer.get(f"/instances/{ct_series[0].orthanc_id}/file")
    body = await resp.json()
    assert resp.status == 502 and "is not trusted" in body["reason"], body
    settings = await asyncio.to_thread(  # reads the CA file
        make_settings, url=tls_proxy.url(), upstream={"ca_file": str(tls_proxy.ca_file)})
    trusted: TestClient = await aiohttp_client(make_app(settings))
    resp = await trusted.get(f"/instances/{ct_series[0].orthanc_id}/file")
    assert resp.status == 200 and await resp.read() == ct_series[0].data
