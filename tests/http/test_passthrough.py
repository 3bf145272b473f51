"""Read-through of Orthanc's other resources, closed endpoints, malformed identifiers."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.http.app import make_app
from dicomcache.http.keys import CLIENT
from dicomcache.http.passthrough import READ_THROUGH
from tests.conftest import Sample, SettingsFactory, eventually
from tests.http.test_instances import orthanc_get


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory) -> TestClient:
    return await aiohttp_client(make_app(make_settings()))


async def test_json_resources_equal_orthanc(client: TestClient, orthanc: OrthancProcess,
                                            samples: dict[str, list[Sample]]) -> None:
    s = samples["explicit"][0]
    study = await asyncio.to_thread(orthanc.json, "GET", f"/instances/{s.orthanc_id}/study")
    study_id = study["ID"]
    series = await asyncio.to_thread(orthanc.json, "GET", f"/instances/{s.orthanc_id}/series")
    for path in (f"/studies/{study_id}", f"/studies/{study_id}/series",
                 f"/instances/{s.orthanc_id}/series", f"/series/{series['ID']}/ordered-slices",
                 f"/instances/{s.orthanc_id}/tags", f"/instances/{s.orthanc_id}/simplified-tags",
                 f"/studies/{study_id}/instances?expand", f"/series/{series['ID']}/shared-tags"):
        # (DICOMweb QIDO is cached with its links rewritten: tests/routes/test_dicomweb.py)
        headers, direct = orthanc_get(orthanc, path)
        resp = await client.get(path)
        assert resp.status == 200, path
        assert resp.headers["Content-Type"] == headers["Content-Type"], path
        assert json.loads(await resp.read()) == json.loads(direct), path


async def test_upstream_status_kept(client: TestClient) -> None:
    resp = await client.get("/studies/00000000-00000000-00000000-00000000-00000000")
    assert resp.status == 404


async def test_head_works_although_orthanc_refuses_head(
        client: TestClient, samples: dict[str, list[Sample]]) -> None:
    resp = await client.head(f"/instances/{samples['explicit'][0].orthanc_id}/tags")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert await resp.read() == b""


async def test_viewer_credentials_not_forwarded_and_ours_not_echoed(
        client: TestClient, orthanc: OrthancProcess) -> None:
    oid = "00000000-00000000-00000000-00000000-00000000"
    resp = await client.get(f"/studies/{oid}", headers={"Authorization": "Basic bm9ib2R5Om5vcGU="})
    assert resp.status == 404  # our credentials were used, not the viewer's bogus ones
    resp = await client.get("/dicom-web/studies?PatientID=NOBODY",
                            headers={"Authorization": "Basic bm9ib2R5Om5vcGU="})
    assert resp.status == 200  # our credentials were used, not the viewer's bogus ones
    body = await resp.text()
    assert orthanc.password not in body
    assert "WWW-Authenticate" not in resp.headers


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/instances"),
    ("DELETE", "/studies/00000000-00000000-00000000-00000000-00000000"),
    ("PUT", "/tools/log-level"),
    ("POST", "/tools/execute-script"),
    ("GET", "/tools/reset"),
    ("POST", "/tools/shutdown"),
    ("GET", "/modalities"),
    ("GET", "/modalities/PACS"),
    ("GET", "/peers"),
    ("GET", "/jobs"),
    ("GET", "/jobs/1234"),
    ("POST", "/dicom-web/studies"),
    ("POST", "/instances/6cfb666e-352be4d5-bdc7fd9c-7167db56-1d1e9061/file"),
    # Reads a viewer does not need: listings of everyone, the PACS's setup, ZIP builders,
    # Orthanc's own web apps, the change feed, the DICOMweb plugin's server table.
    ("GET", "/patients"), ("GET", "/patients?expand"), ("GET", "/studies"),
    ("GET", "/series"), ("GET", "/instances"), ("GET", "/system"), ("GET", "/statistics"),
    ("GET", "/plugins"), ("GET", "/changes"), ("GET", "/exports"), ("GET", "/tools/find"),
    ("GET", "/tools/lookup"), ("GET", "/app/explorer.html"), ("GET", "/app/libs/jquery.js"),
    ("GET", "/ui/app/"), ("GET", "/studies/6cfb666e-352be4d5-bdc7fd9c-7167db56-1d1e9061/archive"),
    ("GET", "/studies/6cfb666e-352be4d5-bdc7fd9c-7167db56-1d1e9061/media"),
    ("GET", "/patients/6cfb666e-352be4d5-bdc7fd9c-7167db56-1d1e9061/archive"),
    ("GET", "/series/6cfb666e-352be4d5-bdc7fd9c-7167db56-1d1e9061/archive"),
    ("GET", "/instances/6cfb666e-352be4d5-bdc7fd9c-7167db56-1d1e9061/attachments"),
    ("GET", "/dicom-web/servers"), ("GET", "/dicom-web/info"),
    ("GET", "/tools/generate-uid"),
])
async def test_closed_by_default(client: TestClient, method: str, path: str) -> None:
    resp = await client.request(method, path, data=b"x")
    assert resp.status == 403
    body = await resp.json()
    assert body["error"] == "forbidden" and body["reason"]


async def test_allow_list_opens_an_endpoint(aiohttp_client, make_settings: SettingsFactory,
                                            samples: dict[str, list[Sample]]) -> None:
    client = await aiohttp_client(make_app(make_settings(access={"allow": ["POST /tools/find",
                                                                           "GET /jobs"]})))
    query = {"Level": "Study", "Query": {"PatientID": "PEXPLICIT"}}
    resp = await client.post("/tools/find", json=query)
    assert resp.status == 200
    assert len(await resp.json()) == 1
    assert (await client.get("/jobs")).status == 200
    assert (await client.get("/jobs/x")).status == 403


@pytest.mark.parametrize("path", [
    "/instances/not-an-id/file",
    "/instances/6cfb666e-352be4d5-bdc7fd9c-7167db56-1d1e906X/file",
    "/instances/6CFB666E-352BE4D5-BDC7FD9C-7167DB56-1D1E9061/file",
    "/wado?requestType=WADO&objectUID=1.2.abc&contentType=application/dicom",
    "/wado?requestType=WADO&objectUID=1.2..3&contentType=application/dicom",
    "/wado?requestType=WADO&objectUID=" + "1." * 40 + "1&contentType=application/dicom",
    "/wado?requestType=WADO&contentType=application/dicom",
    "/wado?requestType=NOPE&objectUID=1.2.3",
    "/dicom-web/studies/1.2.3/series/1.2.x/instances/1.2.3",
    "/dicom-web/studies/1.2.3/series/1.2.3/instances/" + "9" * 65,
    "/studies/..%2F..%2Fetc/passwd",
    "/instances%2f..%2fsystem",
    "/studies/%2e%2e/system",
    "/studies/a%5cb",
    "/studies/a%00b",
])
async def test_malformed_identifiers_and_paths_are_400(client: TestClient, path: str) -> None:
    # Sent exactly as written (no client-side normalisation of dots or escapes).
    resp = await client.session.get(client.make_url("").with_path(path.split("?")[0], encoded=True)
                                    .with_query(path.split("?")[1] if "?" in path else ""))
    assert resp.status == 400, (path, await resp.text())
    body = await resp.json()
    assert body["error"] == "bad request" and body["reason"]


async def test_streams_large_bodies(aiohttp_client, make_settings: SettingsFactory,
                                    ct_series: list[Sample]) -> None:
    """A study archive (length-less, streamed by Orthanc), opened by ``[access] allow``,
    passes through whole."""
    import io
    import zipfile

    client = await aiohttp_client(make_app(make_settings(
        access={"allow": ["GET /studies/*/archive"]})))
    s = ct_series[0]
    study_id = (await (await client.get(f"/instances/{s.orthanc_id}/study")).json())["ID"]
    resp = await client.get(f"/studies/{study_id}/archive")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/zip"
    buf = io.BytesIO()
    async for chunk in resp.content.iter_chunked(1 << 16):
        buf.write(chunk)
    with zipfile.ZipFile(buf) as archive:
        members = [archive.read(name) for name in archive.namelist()]
    assert sorted(members) == sorted(x.data for x in ct_series)


def test_the_allow_list_is_the_one_documented_for_operators() -> None:
    """docs/security.md's table is what a security officer reviews: each entry of
    READ_THROUGH has its row there (by its purpose)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    for _pattern, purpose in READ_THROUGH:
        assert f"| {purpose} |" in doc, purpose


async def test_slow_resources_never_take_the_connections_viewers_need(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    """40 read-throughs of resources Orthanc is slow to send (a stalled link, a slow
    rendering) hold what the read-through may hold, never the whole pool: a viewer's
    cold miss meanwhile is served at its normal speed."""
    slow, cold = ct_series[2], ct_series[3]
    wan.set_profile(LinkProfile(stall=1.0, stall_seconds=8.0,
                                fault_paths=re.escape(slow.orthanc_id) + "/tags$"))
    # The slow ones come from other clients than the viewer (named by a trusted proxy):
    # one client's own requests beyond server.max_requests_per_client wait their turn.
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"read_timeout": 30},
        audit={"trusted_proxies": ["127.0.0.1"]})))

    async def read_slowly(i: int) -> None:
        async with client.get(f"/instances/{slow.orthanc_id}/tags",
                              headers={"X-Forwarded-For": f"10.9.0.{i}"}) as resp:
            await resp.read()

    stuck = [asyncio.create_task(read_slowly(i)) for i in range(40)]
    await eventually(lambda: wan.faults["stall"] >= 16, what="16 stalled read-throughs")
    async with asyncio.timeout(5):  # normally ~0.1 s; before: queued behind the stalls
        resp = await client.get(f"/instances/{cold.orthanc_id}/file",
                                headers={"X-Forwarded-For": "10.9.1.1"})
        assert resp.status == 200 and await resp.read() == cold.data
    assert client.app[CLIENT].read_through_slots.locked()  # the read-through is at its share
    for task in stuck:
        task.cancel()
    await asyncio.gather(*stuck, return_exceptions=True)


async def test_a_viewer_that_stops_reading_gives_its_connection_back(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        caplog: pytest.LogCaptureFixture) -> None:
    """nginx's send_timeout: a client that reads nothing of a relayed answer for
    server.send_timeout seconds is cut off, and its read-through slot is free again."""
    # 32 MiB of pixels: more than the socket buffers between us and the viewer hold.
    (big,) = make_ct_series(1, rows=4096, columns=4096, seed=77, patient_id="PSLOW")
    (oid,) = await asyncio.to_thread(orthanc.upload,
                                     [encode(big, big.file_meta.TransferSyntaxUID)])
    client = await aiohttp_client(make_app(make_settings(
        server={"send_timeout": 1},
        # No temp file: the answer waits for the viewer (see the next test otherwise).
        upstream={"max_connections": 2, "read_through_connections": 1,
                  "read_through_temp": 0})))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing, holds little
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", client.server.port))
        await asyncio.get_running_loop().sock_sendall(
            sock, f"GET /instances/{oid}/frames/0/raw HTTP/1.1\r\n"
                  "Host: 127.0.0.1\r\n\r\n".encode())
        slots = client.app[CLIENT].read_through_slots
        await eventually(slots.locked, what="the read-through holding its one slot")
        await eventually(lambda: "read nothing for 1 s" in caplog.text, timeout=20,
                         what="the stalled viewer cut off")
        await eventually(lambda: not slots.locked(), what="its slot given back")
    finally:
        sock.close()


async def test_a_slow_viewer_is_served_from_the_buffer_after_orthanc_is_free(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        tmp_path: Path) -> None:
    """Before: a read-through held its Orthanc connection (and one of Orthanc's HTTP
    threads) for as long as its viewer took to read.  Now Orthanc's answer is read at
    the link's speed into memory and a temp file, the connection goes back to the
    pool, and the viewer still gets every byte, in order, at its own pace."""
    (big,) = make_ct_series(1, rows=4096, columns=4096, seed=78, patient_id="PSLOW2")
    (oid,) = await asyncio.to_thread(orthanc.upload,
                                     [encode(big, big.file_meta.TransferSyntaxUID)])
    expected = await asyncio.to_thread(orthanc.request, "GET", f"/instances/{oid}/frames/0/raw")
    client = await aiohttp_client(make_app(make_settings(
        server={"send_timeout": 60},
        upstream={"max_connections": 2, "read_through_connections": 1})))
    slots = client.app[CLIENT].read_through_slots
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", client.server.port))
        await loop.sock_sendall(sock, f"GET /instances/{oid}/frames/0/raw HTTP/1.1\r\n"
                                "Host: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await asyncio.sleep(0.2)
        # The viewer has read nothing, yet the one read-through slot is free: another
        # read-through is answered now, not after this viewer's 32 MiB.
        await eventually(lambda: not slots.locked(), what="the slot free while unread")
        async with asyncio.timeout(10):
            resp = await client.get(f"/instances/{oid}/tags")
            assert resp.status == 200
        assert list((tmp_path / "cache" / "tmp").iterdir()) == []  # unlinked temp file
        received = bytearray()
        async with asyncio.timeout(60):
            while chunk := await loop.sock_recv(sock, 1 << 16):
                received += chunk
    finally:
        sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    assert body == expected


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2:]
