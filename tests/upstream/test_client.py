"""dicomcache.upstream.client: credentials, timeouts, defensive JSON, lookups."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from dicomcache.config import UpstreamSettings
from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.errors import Cause, IntegrityError, NotFoundUpstream, UpstreamError
from dicomcache.http.app import make_app
from dicomcache.metrics import Metrics
from dicomcache.upstream.client import OrthancClient, check_shape, parse_md5
from tests.conftest import Sample, SettingsFactory, eventually


def settings(url: str, orthanc: OrthancProcess, **kw: float) -> UpstreamSettings:
    return UpstreamSettings(url=url, username=orthanc.username, password=orthanc.password,
                            **kw)  # type: ignore[arg-type]


@dataclasses.dataclass
class SilentServer:
    port: int
    #: Connections accepted so far (appended by the accepting thread).
    accepted: list[socket.socket]


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    """A loopback port that accepts connections and never answers."""
    srv = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except TimeoutError:
                continue
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield SilentServer(srv.getsockname()[1], accepted)
    stop.set()
    t.join()
    for s in accepted:
        s.close()
    srv.close()


async def test_requests_carry_our_credentials_and_survive_orthancs_keep_alive_close(
        orthanc: OrthancProcess, ct_series: list[Sample]) -> None:
    client = OrthancClient(settings(orthanc.url + "/", orthanc), Metrics())
    try:
        md5s = [await client.instance_md5(s.orthanc_id) for s in ct_series[:3]]
        # Time passing: Orthanc closes a keep-alive connection idle for 1 s…
        await asyncio.sleep(1.5)
        md5s.append(await client.instance_md5(ct_series[3].orthanc_id))  # …and we reconnect
        assert md5s == [hashlib.md5(s.data).hexdigest() for s in ct_series[:4]]
    finally:
        await client.close()


async def test_requests_without_credentials_are_refused_as_auth(orthanc: OrthancProcess) -> None:
    client = OrthancClient(UpstreamSettings(url=orthanc.url), Metrics())
    try:
        with pytest.raises(UpstreamError) as refused:
            await client.get("/system", kind="probe")
        assert refused.value.cause is Cause.AUTH and refused.value.status == 401
    finally:
        await client.close()


async def test_a_silent_server_is_a_timeout_and_a_cancel_ends_the_wait_at_once(
        orthanc: OrthancProcess, silent_server: SilentServer) -> None:
    client = OrthancClient(settings(f"http://127.0.0.1:{silent_server.port}", orthanc,
                                    read_timeout=0.5), Metrics())
    try:
        with pytest.raises(UpstreamError) as late:
            await client.get("/system", kind="probe")
        assert late.value.cause is Cause.TIMEOUT
        client.settings = settings(f"http://127.0.0.1:{silent_server.port}", orthanc,
                                   read_timeout=30.0)
        connections = len(silent_server.accepted)
        started = time.monotonic()
        blocked = asyncio.ensure_future(client.get("/system", kind="probe"))
        await eventually(lambda: len(silent_server.accepted) > connections,
                         what="the request's connection accepted")
        assert not blocked.done()  # waiting for an answer that never comes
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert time.monotonic() - started < 5  # not the 30 s read timeout
    finally:
        await client.close()


def test_parse_md5_rejects_a_damaged_answer() -> None:
    assert parse_md5(b'"0123456789ABCDEF0123456789abcdef"\n', "x") == \
        "0123456789abcdef0123456789abcdef"
    with pytest.raises(IntegrityError):
        parse_md5(b"0123456789abcdef0123456789abcde", "x")


async def test_a_cut_or_malformed_json_answer_is_bad_json_and_retried(
        orthanc: OrthancProcess, ct_series: list[Sample], wan: WanEmulator) -> None:
    client = OrthancClient(settings(f"http://127.0.0.1:{wan.port}", orthanc, retries=2,
                                    backoff_base=0.01, backoff_max=0.02), Metrics())
    try:
        wan.set_profile(LinkProfile(truncate_lying=1.0, fault_paths=r"^/instances/[^/]+$"))
        with pytest.raises(UpstreamError) as cut:
            await client.get_json(f"/instances/{ct_series[0].orthanc_id}")
        assert cut.value.cause is Cause.BAD_JSON and cut.value.attempts == 3
        wan.set_profile(LinkProfile())
        info = await client.get_json(f"/instances/{ct_series[0].orthanc_id}")
        assert info["ID"] == ct_series[0].orthanc_id
        assert await client.lookup(ct_series[0].sop, "Instance") == ct_series[0].orthanc_id
        with pytest.raises(NotFoundUpstream):
            await client.lookup("1.2.3.4.5.6.7.8.9", "Instance")
    finally:
        await client.close()


@pytest.mark.parametrize("doc, expect, of, good", [
    ({"ID": "x"}, dict, object, True), ([], dict, object, False), ("x", dict, object, False),
    ([{"ID": "x"}], list, dict, True), ([{"ID": "x"}, "y"], list, dict, False),
    ({"ID": "x"}, list, dict, False), (["a", "b"], list, str, True), ([1], list, str, False),
    (None, object, object, True),
])
def test_check_shape(doc: object, expect: type, of: type, good: bool) -> None:
    """What a caller indexes is what it asked for, or a BAD_JSON failure (never a 500)."""
    if good:
        assert check_shape(doc, expect, of, "GET /x") is doc
    else:
        with pytest.raises(UpstreamError) as bad:
            check_shape(doc, expect, of, "GET /x")
        assert bad.value.cause is Cause.BAD_JSON


@pytest.mark.parametrize("path", [r"^/tools/find$", r"^/tools/lookup$",
                                  r"^/studies/[^/]+/series$"])
async def test_a_cut_listing_is_a_json_502_for_the_viewer_never_a_500(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        samples: dict[str, list[Sample]], path: str) -> None:
    s = samples["jpeg-ls"][0] if "jpeg-ls" in samples else samples["explicit"][2]
    wan.set_profile(LinkProfile(truncate_lying=1.0, fault_paths=path,
                                fault_methods=frozenset({"GET", "POST"})))
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"retries": 1})))
    # Retrieves list the series (found) or the study (looked up, then its series).
    for url in (f"/dicom-web/studies/{s.study}/series/{s.series}",
                f"/dicom-web/studies/{s.study}"):
        resp = await client.get(url, headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        if resp.status == 200:  # this path was not needed for this answer
            continue
        assert resp.status == 502, await resp.text()
        body = await resp.json()
        assert "cut or malformed" in body["reason"]
    assert wan.faults["truncate_lying"] >= 1
