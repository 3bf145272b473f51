"""Hits by sendfile: HEAD, Range, conditional requests; serving with Orthanc gone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.http.app import make_app
from tests.conftest import Sample, SettingsFactory


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory) -> TestClient:
    return await aiohttp_client(make_app(make_settings()))


async def test_head_range_and_conditionals(client: TestClient, ct_series: list[Sample]) -> None:
    s = ct_series[1]
    url = f"/instances/{s.orthanc_id}/file"
    head = await client.head(url)  # a miss: fetched, verified, stored
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(s.data))
    assert await head.read() == b""
    etag = head.headers["ETag"]

    resp = await client.get(url, headers={"Range": "bytes=128-131"})
    assert resp.status == 206
    assert await resp.read() == b"DICM"
    assert resp.headers["Content-Range"] == f"bytes 128-131/{len(s.data)}"

    resp = await client.get(url, headers={"Range": f"bytes={len(s.data) - 10}-"})
    assert resp.status == 206 and await resp.read() == s.data[-10:]

    resp = await client.get(url, headers={"Range": f"bytes={len(s.data) + 5}-"})
    assert resp.status == 416

    resp = await client.get(url, headers={"If-None-Match": etag})
    assert resp.status == 304 and resp.headers["ETag"] == etag
    resp = await client.get(url, headers={"If-None-Match": '"0000", ' + etag})
    assert resp.status == 304
    resp = await client.get(url, headers={"If-None-Match": '"other"'})
    assert resp.status == 200 and await resp.read() == s.data
    assert resp.headers["ETag"] == etag  # the MD5, not aiohttp's mtime tag

    resp = await client.get(url, headers={"If-Match": '"other"'})
    assert resp.status == 412
    resp = await client.get(url, headers={"If-Match": etag})
    assert resp.status == 200 and await resp.read() == s.data


async def test_served_with_orthanc_stopped(aiohttp_client, make_settings: SettingsFactory,
                                           tmp_path: Path) -> None:
    own = OrthancProcess(tmp_path / "orthanc")
    await asyncio.to_thread(own.start)
    try:
        ds = make_ct_series(2, rows=64, columns=64, seed=11)
        blobs = [encode(d, d.file_meta.TransferSyntaxUID) for d in ds]
        ids = await asyncio.to_thread(own.upload, blobs)
        settings = make_settings(url=own.url, upstream={"username": own.username,
                                                        "password": own.password,
                                                        "retries": 1})
        client = await aiohttp_client(make_app(settings))
        wado = (f"/wado?requestType=WADO&studyUID={ds[0].StudyInstanceUID}"
                f"&seriesUID={ds[0].SeriesInstanceUID}&objectUID={ds[0].SOPInstanceUID}"
                "&contentType=application/dicom")
        assert await (await client.get(f"/instances/{ids[0]}/file")).read() == blobs[0]
    finally:
        await asyncio.to_thread(own.stop)
    # Orthanc is gone: what was fetched is still served, by every family.
    resp = await client.get(f"/instances/{ids[0]}/file")
    assert resp.status == 200 and await resp.read() == blobs[0]
    resp = await client.get(wado)
    assert resp.status == 200 and await resp.read() == blobs[0]
    # What was never fetched gives a clear 502, with the attempts made.
    resp = await client.get(f"/instances/{ids[1]}/file")
    assert resp.status == 502
    body = await resp.json()
    assert body["attempts"] == 2 and body["error"] == "upstream unavailable" and body["reason"]
