"""Large instances are streamed to a temp file while hashed, never held whole in memory.

Through the fault injector in front of the real Orthanc, with ``cache.stream_above``
at its minimum (1 MiB) and instances of several MiB: every body a viewer gets is
byte-identical, every fault is caught (MD5, length, cut stream), and nothing is
left in ``tmp/``.
"""

from __future__ import annotations

import asyncio
import gzip
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.cache import fetch
from dicomcache.cache.receive import held_in_memory
from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.dicom import syntaxes
from dicomcache.errors import IntegrityError
from dicomcache.http.app import make_app
from dicomcache.http.keys import METRICS
from tests.conftest import SettingsFactory, metric_value, tmpfs
from tests.http.dicomweb_support import ANY_SYNTAX, get_parts

FAULTS = ["truncate_lying", "truncate", "reset", "corrupt"]


@pytest.fixture(scope="module")
def big(orthanc: OrthancProcess) -> Iterator[tuple[str, bytes]]:
    """A 24 MiB Enhanced CT (12 frames of 1024²) in the session Orthanc."""
    (ds,) = make_ct_series(1, rows=1024, columns=1024, frames=12, seed=2424,
                           patient_id="PBIG")
    blob = encode(ds, syntaxes.EXPLICIT_LE)
    (oid,) = orthanc.upload([blob])
    yield oid, blob
    orthanc.request("DELETE", f"/instances/{oid}")


@pytest.fixture(scope="module")
def large_series(orthanc: OrthancProcess) -> Iterator[tuple[str, list[bytes]]]:
    """A series of two 6 MiB Enhanced CTs: its DICOMweb path and their bodies."""
    datasets = make_ct_series(2, rows=1024, columns=1024, frames=3, seed=2426,
                              patient_id="PSERIES")
    blobs = [encode(ds, syntaxes.EXPLICIT_LE) for ds in datasets]
    ids = orthanc.upload(blobs)
    ds = datasets[0]
    yield f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}", blobs
    for oid in ids:
        orthanc.request("DELETE", f"/instances/{oid}")


@pytest.fixture(scope="module")
def large(orthanc: OrthancProcess) -> Iterator[tuple[str, bytes]]:
    """A 6 MiB Enhanced CT (3 frames of 1024²): streamed above a 1 MiB threshold."""
    (ds,) = make_ct_series(1, rows=1024, columns=1024, frames=3, seed=2425,
                           patient_id="PLARGE")
    blob = encode(ds, syntaxes.EXPLICIT_LE)
    (oid,) = orthanc.upload([blob])
    yield oid, blob
    orthanc.request("DELETE", f"/instances/{oid}")


def tmp_files(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "cache" / "tmp").iterdir())


async def peak_of_one_miss(client: TestClient, oid: str) -> tuple[int, bytes, str]:
    """Python's allocation peak while one instance is asked and read whole (the
    viewer's own copy included), the body, and its ``X-Cache``."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        resp = await client.get(f"/instances/{oid}/file")
        assert resp.status == 200
        received = bytearray()
        async for chunk in resp.content.iter_chunked(1 << 16):
            received += chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, bytes(received), resp.headers["X-Cache"]


async def test_a_large_instance_is_never_held_whole(
        aiohttp_client, make_settings: SettingsFactory, big: tuple[str, bytes],
        tmp_path: Path) -> None:
    """Before: the 24 MiB body was read whole into memory, verified and written from
    there (Python's allocation peak above 24 MiB for one miss; 8 concurrent 500 MB
    multi-frames were 4 GB).  Now the peak stays a few MiB."""
    oid, blob = big
    client: TestClient = await aiohttp_client(make_app(make_settings(
        cache={"stream_above": "1MiB"})))
    peak, body, cache_status = await peak_of_one_miss(client, oid)
    assert body == blob
    # The viewer's own copy is allocated as it arrives: 24 MiB of it, plus what
    # dicomcache held.  Whole-body handling would add another 24 MiB at least.
    assert peak < len(blob) + (8 << 20), f"peak {peak >> 20} MiB"
    assert cache_status == "MISS"
    again = await client.get(f"/instances/{oid}/file")
    assert again.headers["X-Cache"] == "HIT" and await again.read() == blob
    assert tmp_files(tmp_path) == []


@pytest.mark.parametrize("compression", ["json", "all"])
@pytest.mark.parametrize("fault", FAULTS)
async def test_a_faulty_link_never_stores_or_serves_a_bad_large_body(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        large: tuple[str, bytes], tmp_path: Path, fault: str, compression: str) -> None:
    """As stored (``json``) or gzipped by Orthanc (``all``, and ``auto`` on a slow link)."""
    oid, blob = large
    client: TestClient = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", cache={"stream_above": "1MiB"},
        upstream={"compression": compression})))
    wan.set_profile(LinkProfile(**{fault: 1.0}, fault_paths=r"/file$", seed=3))
    resp = await client.get(f"/instances/{oid}/file")
    assert resp.status == 502, fault
    assert (await resp.json())["attempts"] == 4
    if fault in ("truncate_lying", "corrupt"):
        # A plain body fails its MD5; a gzipped one already fails to inflate (or its CRC).
        metrics = client.app[METRICS]
        failed = sum(metric_value(metrics, "dicomcache_integrity_failures_total", cause=c)
                     for c in ("md5_mismatch", "short_body"))
        assert failed == 4
        if compression == "json":
            assert metric_value(metrics, "dicomcache_integrity_failures_total",
                                cause="md5_mismatch") == 4
    assert tmp_files(tmp_path) == []  # each failed attempt's temp file removed
    wan.set_profile(LinkProfile())
    resp = await client.get(f"/instances/{oid}/file")
    assert resp.status == 200 and await resp.read() == blob


async def test_gzip_from_orthanc_is_inflated_on_the_way(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        large: tuple[str, bytes], tmp_path: Path) -> None:
    """``compression = "all"``: Orthanc gzips on the fly (no Content-Length), the
    stream is inflated and hashed as it arrives; Orthanc's MD5 is of the original."""
    oid, blob = large
    client: TestClient = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}",
        upstream={"compression": "all"}, cache={"stream_above": "1MiB"})))
    resp = await client.get(f"/instances/{oid}/file")
    assert resp.status == 200 and await resp.read() == blob
    assert wan.stats.bytes_down < len(blob)  # it did travel compressed
    assert tmp_files(tmp_path) == []


async def test_a_body_the_cache_cannot_take_is_still_served(
        aiohttp_client, make_settings: SettingsFactory, large: tuple[str, bytes],
        tmp_path: Path) -> None:
    """A 6 MiB instance and a 4 MiB cache: the verified file is not kept, the viewer
    gets it all the same."""
    oid, blob = large
    client: TestClient = await aiohttp_client(make_app(make_settings(
        cache={"stream_above": "1MiB", "max_size": "4MiB"})))
    for _ in range(2):
        resp = await client.get(f"/instances/{oid}/file")
        assert resp.status == 200 and await resp.read() == blob
        assert resp.headers["X-Cache"] == "MISS"
    await asyncio.sleep(0)
    assert tmp_files(tmp_path) == []
    assert not list((tmp_path / "cache" / "objects").rglob("*.dcm"))


async def test_a_series_retrieve_of_large_instances_fetches_them_one_by_one(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        large_series: tuple[str, list[bytes]], tmp_path: Path) -> None:
    """A cold series retrieve reads Orthanc's multipart stream part by part in memory;
    a part above ``stream_above`` ends the stream and the instances are fetched one by
    one, each streamed to a temp file (before: parts up to 1 GiB held whole)."""
    path, blobs = large_series
    client: TestClient = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", cache={"stream_above": "1MiB"})))
    _resp, parts = await get_parts(client, path, ANY_SYNTAX)
    assert sorted(body for _, body in parts) == sorted(blobs)
    one_by_one = [p for p in wan.requests if p.endswith("/file")]
    assert len(one_by_one) == 2, dict(wan.requests)
    assert tmp_files(tmp_path) == []
    assert len(list((tmp_path / "cache" / "objects").rglob("*.dcm"))) == 2


async def test_a_disk_that_fills_while_a_large_body_streams_in(
        aiohttp_client, make_settings: SettingsFactory, large: tuple[str, bytes],
        tmp_path: Path) -> None:
    """The cache's file system fills while the body is written to tmp/: the store is
    degraded, the body is fetched again in memory and served, verified, uncached."""
    oid, blob = large
    with tmpfs(tmp_path / "small", "size=3m") as small:
        client: TestClient = await aiohttp_client(make_app(make_settings(
            cache={"directory": str(small / "cache"), "stream_above": "1MiB",
                   "min_free": 0})))
        resp = await client.get(f"/instances/{oid}/file")
        assert resp.status == 200 and await resp.read() == blob
        assert resp.headers["X-Cache"] == "MISS"
        status = (await (await client.get("/readyz")).json())["store"]
        assert status["degraded"] == "disk_full", status
        assert list((small / "cache" / "tmp").iterdir()) == []
        await client.close()


@pytest.mark.parametrize("encoding, length, expected", [
    ("identity", 1000, None),              # small and known: read whole
    ("identity", 8 << 20, None),           # exactly the threshold
    ("identity", (8 << 20) + 1, 0),        # known large: to the file from the first byte
    ("identity", None, 4 << 20),           # no Content-Length: held up to HOLD_UNKNOWN
    ("gzip", 1000, 4 << 20),               # compressed: decoded size unknown
    ("gzip", None, 4 << 20),
    ("gzip", (8 << 20) + 1, 0),            # compressed and large even so
    ("deflate", None, 4 << 20),
])
def test_how_a_body_is_received(encoding: str, length: int | None,
                                expected: int | None) -> None:
    assert held_in_memory(encoding, length, 8 << 20) == expected
    assert held_in_memory(encoding, length, 1 << 20) in (None, 0, 1 << 20)




@pytest.mark.parametrize("compression", ["json", "all"])
async def test_a_large_body_is_not_held_up_to_the_threshold_first(
        aiohttp_client, make_settings: SettingsFactory, big: tuple[str, bytes],
        tmp_path: Path, compression: str) -> None:
    """Before: a body above ``stream_above`` was first gathered in memory up to the
    threshold (32 MiB by default), then copied once more on its way to the temp
    file: 64 MiB per concurrent big miss, 465 MiB RSS with eight 500 MB ones.  Now a
    body known to be large goes to the file from its first byte, and one of unknown
    decoded size (gzip) is held up to 4 MiB."""
    oid, blob = big
    client: TestClient = await aiohttp_client(make_app(make_settings(
        upstream={"compression": compression}, cache={"stream_above": "16MiB"})))
    peak, body, _ = await peak_of_one_miss(client, oid)
    assert body == blob
    assert peak < len(blob) + (8 << 20), f"peak {peak >> 20} MiB over a {len(blob) >> 20} MiB body"
    assert tmp_files(tmp_path) == []


def test_a_compressed_body_read_whole_is_inflated_within_bounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only when the cache cannot take files is a gzip body read whole; an upstream's
    small gzip that inflates beyond the bound is an integrity failure, not an
    allocation of whatever it claims."""
    monkeypatch.setattr(fetch, "MAX_INFLATED", 1 << 20)
    bomb = gzip.compress(bytes(4 << 20))
    with pytest.raises(IntegrityError, match=r"inflates beyond 1\.0 MiB"):
        fetch._inflate_whole(bomb, "gzip")
    with pytest.raises(IntegrityError, match="cut short"):
        fetch._inflate_whole(gzip.compress(bytes(1000))[:-20], "gzip")
    assert fetch._inflate_whole(gzip.compress(b"DICM" * 10), "gzip").data == b"DICM" * 10
