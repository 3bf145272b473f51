"""WADO-RS retrieves (http/wado_rs.py, dicomweb/retrieve.py): instances, series and studies
compared with
Orthanc's own answers; stored parts sent from their files; files cut, deleted, abandoned."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from dicomcache.cache.instance import Instance
from dicomcache.cache.store import Store
from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.dicomweb import retrieve
from dicomcache.http import respond, wado_rs
from dicomcache.http.app import make_app
from dicomcache.http.keys import METRICS, STORE
from tests.conftest import Sample, SettingsFactory, eventually, metric_value
from tests.http.dicomweb_support import (
    ANY_SYNTAX,
    get_parts,
    orthanc_answer,
    series_path,
    split_multipart,
)


@pytest.fixture
def sendfiles(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each stored part went out by sendfile (True) or was read (False)."""
    used: list[bool] = []
    real = wado_rs.send_file_range

    async def spy(*args: Any) -> bool:
        used.append(await real(*args))
        return used[-1]

    monkeypatch.setattr(wado_rs, "send_file_range", spy)
    return used


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory) -> TestClient:
    """The app with blockbuster watching: nothing may block the event loop."""
    return await aiohttp_client(make_app(make_settings()))


# --- WADO-RS retrieve ---------------------------------------------------------------------

@pytest.mark.parametrize(("label", "accept"), [
    ("explicit", ANY_SYNTAX), ("rle", ANY_SYNTAX), ("j2k", ANY_SYNTAX),
    ("multiframe", ANY_SYNTAX), ("bigendian", ANY_SYNTAX),
    ("explicit", None),       # stored syntax = Orthanc's default: from the store
    ("implicit", None),       # Orthanc transcodes to Explicit VR LE: fetched transcoded
])
async def test_series_retrieve_identical_to_orthanc(
        client: TestClient, orthanc: OrthancProcess, samples: dict[str, list[Sample]],
        label: str, accept: str | None) -> None:
    s = samples[label][0]
    path = series_path(s)
    status, headers, direct = orthanc_answer(orthanc, path, {"Accept": accept} if accept else {})
    assert status == 200
    want = split_multipart(direct, headers["Content-Type"])
    assert len(want) == len(samples[label])
    for round_ in ("cold", "warm"):
        resp, got = await get_parts(client, path, accept)
        assert resp.headers["Content-Type"].startswith(
            'multipart/related; type="application/dicom"')
        assert [body for _, body in got] == [body for _, body in want], round_
        assert all(h["content-type"] == "application/dicom" for h, _ in got)
        if accept == ANY_SYNTAX and round_ == "warm":
            # Assembled from the store only: the length is known and exact.
            assert resp.headers["Content-Length"] == str(resp.content_length)
    if accept == ANY_SYNTAX:
        assert {body for _, body in got} == {x.data for x in samples[label]}


async def test_retrieve_sends_stored_parts_from_files_and_after_restart(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        ct_series: list[Sample], monkeypatch: pytest.MonkeyPatch, sendfiles: list[bool]) -> None:
    monkeypatch.setattr(respond, "CHUNK", 100_000)  # read in several chunks when not sent whole
    settings = make_settings()
    path = series_path(ct_series[0])
    client = await aiohttp_client(make_app(settings))
    _, cold = await get_parts(client, path, ANY_SYNTAX)
    await client.close()
    assert sendfiles == []  # cold parts are sent from memory
    # A new process on the same cache: entries are found in the index, not the hot map,
    # the answer is assembled locally with an exact length, every part by sendfile.
    client = await aiohttp_client(make_app(settings))
    resp, warm = await get_parts(client, path, ANY_SYNTAX)
    assert resp.headers["Content-Length"] == str(resp.content_length)
    assert sendfiles == [True] * len(ct_series)
    served = metric_value(client.app[METRICS], "dicomcache_served_bytes_total")
    assert served == sum(len(s.data) for s in ct_series)
    # One instance gone from the store: its length is unknown, the answer is chunked,
    # and the stored parts are read from their files in chunks.
    await asyncio.to_thread(client.app[STORE].sync.forget, ct_series[3].orthanc_id)
    sendfiles.clear()
    resp, mixed = await get_parts(client, path, ANY_SYNTAX)
    assert "Content-Length" not in resp.headers
    assert set(sendfiles) == {False} and len(sendfiles) >= len(ct_series) - 1
    assert [b for _, b in cold] == [b for _, b in warm] == [b for _, b in mixed] \
        == [s.data for s in ct_series]


async def stored(client: TestClient, path: str, sample: Sample) -> Instance:
    """Retrieve ``path`` through dicomcache, wait for its commits: ``sample``'s entry."""
    await get_parts(client, path, ANY_SYNTAX)
    await client.app[STORE].drain()
    entry = await client.app[STORE].get(sample.orthanc_id)
    assert entry is not None
    return entry


async def test_retrieve_of_a_stored_file_cut_on_disk_sends_the_right_bytes(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        ct_series: list[Sample], caplog: pytest.LogCaptureFixture) -> None:
    """A stored file shorter than its index says (disk trouble) is caught when opened:
    quarantined, fetched again, and the answer is complete and right."""
    settings = make_settings()
    client = await aiohttp_client(make_app(settings))
    path = series_path(ct_series[0])
    entry = await stored(client, path, ct_series[5])
    with entry.path.open("r+b") as f:
        f.truncate(entry.size // 2)
    resp, got = await get_parts(client, path, ANY_SYNTAX)
    assert resp.content_length is not None
    assert [b for _, b in got] == [s.data for s in ct_series]
    assert any(r.levelno == logging.WARNING and "quarantin" in r.getMessage()
               for r in caplog.records)
    assert list((settings.cache.directory / "quarantine").rglob("*"))


async def test_retrieve_of_a_file_cut_after_its_check_breaks_the_connection(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        ct_series: list[Sample], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Cut on disk between its check and its sending: never a complete multipart."""
    client = await aiohttp_client(make_app(make_settings()))
    path = series_path(ct_series[0])
    victim = await stored(client, path, ct_series[5])
    checked = Store.open_checked

    def open_then_cut(self: Store, instance: Instance) -> tuple[int, os.stat_result]:
        fd, st = checked(self, instance)
        if instance.orthanc_id == victim.orthanc_id:
            assert instance.path is not None
            os.truncate(instance.path, instance.size // 2)
        return fd, st
    monkeypatch.setattr(Store, "open_checked", open_then_cut)
    resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert resp.status == 200 and resp.content_length is not None
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert any(r.levelno == logging.WARNING and "shorter than its index" in r.getMessage()
               for r in caplog.records)


def open_files_under(directory: Path) -> list[str]:
    """This process's open files under ``directory`` (the test server runs in-process)."""
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(directory)):
                out.append(target)
    return out


async def test_retrieve_refetches_a_stored_file_deleted_on_disk(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        ct_series: list[Sample]) -> None:
    settings = make_settings()
    client = await aiohttp_client(make_app(settings))
    path = series_path(ct_series[0])
    entry = await stored(client, path, ct_series[4])
    entry.path.unlink()
    _, got = await get_parts(client, path, ANY_SYNTAX)  # opened in a batch: that one fails
    assert [b for _, b in got] == [s.data for s in ct_series]
    again = await client.app[STORE].get(ct_series[4].orthanc_id)
    assert again is not None and again.path.read_bytes() == ct_series[4].data
    assert open_files_under(settings.cache.directory / "objects") == []


async def test_aborted_warm_retrieve_closes_its_files(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        ct_series: list[Sample], caplog: pytest.LogCaptureFixture) -> None:
    """A viewer gone mid-answer: the stored files opened ahead (in batches) are all closed,
    and the log does not call that a problem."""
    caplog.set_level(logging.INFO, logger="dicomcache")
    settings = make_settings(dicomweb={"retrieve_concurrency": 2})
    client = await aiohttp_client(make_app(settings))
    path = series_path(ct_series[0])
    await get_parts(client, path, ANY_SYNTAX)
    await client.app[STORE].drain()
    for _ in range(3):
        resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
        assert resp.status == 200 and resp.content_length is not None
        await resp.content.readexactly(100_000)
        resp.close()  # the connection dropped, most parts unsent
    await eventually(lambda: not open_files_under(settings.cache.directory / "objects"),
                     timeout=5, interval=0.05, what="the stored files closed")
    assert open_files_under(settings.cache.directory / "objects") == []
    aborted = [r for r in caplog.records if "aborted after" in r.getMessage()]
    assert aborted and all(r.levelno == logging.INFO for r in aborted)


async def test_a_part_given_up_while_its_batch_opens_closes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"x" * 10)
    gate = asyncio.Event()
    files: list[BinaryIO] = []

    async def opening() -> list[retrieve.Opened]:
        await gate.wait()
        files.append(path.open("rb"))
        return [retrieve.Part(10, file=files[0])]

    batch = asyncio.ensure_future(opening())
    claim = asyncio.ensure_future(retrieve.claim(batch, 0))
    await asyncio.sleep(0)  # one loop pass: the claim starts waiting for its batch
    claim.cancel()  # the retrieve gave up (viewer gone, another part failed)
    with pytest.raises(asyncio.CancelledError):
        await claim
    gate.set()
    await batch
    await asyncio.sleep(0)  # one loop pass: the batch's done-callbacks run
    assert files[0].closed


async def test_single_instance_sent_from_its_file(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        samples: dict[str, list[Sample]], sendfiles: list[bool]) -> None:
    """A stored instance is framed around its file (sendfile), never read whole; HEAD
    announces the same length; a file cut on disk breaks the connection."""
    client = await aiohttp_client(make_app(make_settings()))
    s = samples["multiframe"][0]
    path = f"{series_path(s)}/instances/{s.sop}"
    _, direct = (await get_parts(client, path, ANY_SYNTAX))[1][0]
    assert direct == s.data
    await client.app[STORE].drain()
    sendfiles.clear()
    served = metric_value(client.app[METRICS], "dicomcache_served_bytes_total")
    resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
    body = await resp.read()
    assert sendfiles == [True]
    assert metric_value(client.app[METRICS],
                        "dicomcache_served_bytes_total") == served + len(s.data)
    assert int(resp.headers["Content-Length"]) == len(body)
    [(headers, data)] = split_multipart(body, resp.headers["Content-Type"])
    assert data == s.data and headers["content-length"] == str(len(s.data))
    boundary = resp.headers["Content-Type"].rsplit("boundary=", 1)[1]
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    head = await client.head(path, headers={"Accept": ANY_SYNTAX})
    assert head.status == 200 and await head.read() == b""
    assert head.headers["Content-Length"] == resp.headers["Content-Length"]
    entry = await client.app[STORE].get(s.orthanc_id)
    assert entry is not None
    with entry.path.open("r+b") as f:  # cut on disk: caught when opened, fetched again
        f.truncate(entry.size // 2)
    resp = await client.get(path, headers={"Accept": ANY_SYNTAX})
    [(_, data)] = split_multipart(await resp.read(), resp.headers["Content-Type"])
    assert data == s.data


async def test_study_retrieve_identical_to_orthanc(
        client: TestClient, orthanc: OrthancProcess, samples: dict[str, list[Sample]]) -> None:
    s = samples["rle"][0]
    path = f"/dicom-web/studies/{s.study}"
    _, headers, direct = orthanc_answer(orthanc, path, {"Accept": ANY_SYNTAX})
    want = [body for _, body in split_multipart(direct, headers["Content-Type"])]
    for _ in range(2):
        _, got = await get_parts(client, path, ANY_SYNTAX)
        assert [body for _, body in got] == want


async def test_retrieve_errors(client: TestClient, samples: dict[str, list[Sample]]) -> None:
    s = samples["explicit"][0]
    other = samples["rle"][0]
    resp = await client.get(f"/dicom-web/studies/{other.study}/series/{s.series}",
                            headers={"Accept": ANY_SYNTAX})
    assert resp.status == 404, await resp.text()
    resp = await client.get("/dicom-web/studies/1.2.3.999/series/1.2.3.998")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not found"
    for bad in ("1..2", "1.2.a", "9" * 65):
        resp = await client.get(f"/dicom-web/studies/{bad}/series/{s.series}")
        assert resp.status == 400, bad
    resp = await client.get(
        f"/dicom-web/studies/{s.study}/series/{s.series}/instances/1.2..3/frames/1")
    assert resp.status == 400


async def test_a_part_of_another_size_before_the_first_byte_is_sent_chunked(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess) -> None:
    """The first instance was replaced in Orthanc (other content, other size) and its
    stored file is gone: the length announced from the store cannot hold, and nothing
    is sent yet, so the answer goes out chunked with Orthanc's new bytes (not a 502)."""
    import copy

    from pydicom.uid import generate_uid

    from dicomcache.devtools.samples import encode, make_ct_series

    datasets = make_ct_series(3, rows=16, columns=16, seed=141, patient_id="PSIZE",
                              study_uid=generate_uid(), series_uid=generate_uid())
    oids = await asyncio.to_thread(orthanc.upload, [encode(d, d.file_meta.TransferSyntaxUID)
                                                    for d in datasets])
    client = await aiohttp_client(make_app(make_settings()))
    path = (f"/dicom-web/studies/{datasets[0].StudyInstanceUID}"
            f"/series/{datasets[0].SeriesInstanceUID}")
    await get_parts(client, path, ANY_SYNTAX)
    await client.app[STORE].drain()
    first = await client.app[STORE].get(oids[0])
    assert first is not None and first.path is not None
    bigger = copy.deepcopy(datasets[0])
    bigger.ImageComments = "X" * 200
    new_blob = encode(bigger, bigger.file_meta.TransferSyntaxUID)
    await asyncio.to_thread(orthanc.request, "DELETE", f"/instances/{oids[0]}")
    assert await asyncio.to_thread(orthanc.upload, [new_blob]) == [oids[0]]
    await asyncio.to_thread(first.path.unlink)
    resp, parts = await get_parts(client, path, ANY_SYNTAX)
    assert resp.status == 200 and "Content-Length" not in resp.headers
    assert new_blob in [b for _, b in parts]
