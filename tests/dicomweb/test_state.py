"""dicomcache.dicomweb.state over the link: what cold metadata costs in bytes."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest

from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.dicom import multipart
from dicomcache.dicomweb import answers, state
from dicomcache.http.app import make_app
from dicomcache.http.keys import DICOMWEB
from tests.conftest import Sample, SettingsFactory, eventually
from tests.http.test_instances import orthanc_get


@pytest.mark.parametrize("compression", ["none", "json"])
async def test_cold_series_metadata_travels_gzipped_and_is_served_as_orthanc_answers(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        orthanc: OrthancProcess, ct_series: list[Sample], compression: str) -> None:
    s = ct_series[0]
    path = f"/dicom-web/studies/{s.study}/series/{s.series}/metadata"
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"compression": compression})))
    wan.reset_stats()
    resp = await client.get(path, headers={"Accept": "application/dicom+json",
                                           "Accept-Encoding": "identity"})
    assert resp.status == 200
    ours = await resp.json(content_type=None)
    on_link = wan.stats.bytes_down  # the lookups (small) and the metadata
    _, body = await asyncio.to_thread(orthanc_get, orthanc, path, "application/dicom+json")
    direct = json.loads(body)
    # The same answer (links aside), whatever crossed the link.
    strip = [{k: v for k, v in item.items() if k != "7FE00010"} for item in direct]
    assert [{k: v for k, v in item.items() if k != "7FE00010"} for item in ours] == strip
    # Orthanc's metadata is relinked in its text (no walk): the same answer as walked.
    fast = answers.relinked_bulk_data(body)
    assert fast is not None and json.loads(fast) == json.loads(answers.normalise_json(body))
    plain = len(body)
    if compression == "json":
        assert on_link < plain / 4, (on_link, plain)
        print(f"cold series metadata: {on_link} bytes on the link, {plain} as JSON")
    else:
        assert on_link > plain, (on_link, plain)


def kinds(wan: WanEmulator) -> list[str]:
    """The requests that crossed the link, by kind (the health probe left out)."""
    return ["lookup" if t == "/tools/lookup" else "find" if t == "/tools/find"
            else "series" if t.startswith("/series/")
            else "metadata" if t.endswith("/metadata") else t for t in wan.targets
            if t != "/system"]


async def test_cold_series_metadata_is_one_request_confirmed_in_the_background(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    """A cold series metadata is the metadata alone: one round trip, as straight to
    Orthanc (it was four: two lookups, the instance list, then the metadata).  Halfway
    through its freshness it is confirmed in the background: the series found (its
    instance list, one request), then the metadata again, kept with that list as its
    validator (read before it).  Later revalidations only read the list."""
    s = ct_series[1]
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", dicomweb={"metadata_fresh": 0.4})))
    dw = client.app[DICOMWEB]
    path = f"/dicom-web/studies/{s.study}/series/{s.series}/metadata"
    wan.reset_stats()
    resp = await client.get(path)
    assert resp.status == 200
    first = await resp.read()
    assert kinds(wan) == ["metadata"]
    assert len(dw.confirmations) == 1
    await eventually(lambda: not dw.confirmations, what="confirmed in the background")
    assert kinds(wan) == ["metadata", "find", "metadata"]
    for _ in range(2):
        await asyncio.sleep(0.45)  # time passing: past metadata_fresh
        wan.reset_stats()
        resp = await client.get(path)
        assert resp.status == 200 and await resp.read() == first
        assert kinds(wan) == ["series"]
        assert not dw.confirmations


async def test_cold_metadata_of_a_series_not_in_the_study_is_a_404(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample], samples: dict[str, list[Sample]]) -> None:
    """Orthanc's own answer, now that no listing checks it first."""
    a, b = ct_series[0], samples["explicit"][0]
    assert a.study != b.study
    client = await aiohttp_client(make_app(make_settings(url=f"http://127.0.0.1:{wan.port}")))
    resp = await client.get(f"/dicom-web/studies/{a.study}/series/{b.series}/metadata")
    assert resp.status == 404


async def test_frames_after_cold_metadata_need_no_lookup(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    """OHIF asks for a series' metadata, then for its slices' frames.  The metadata names
    every instance (its Orthanc ID is the hash of its identifiers), so a cold frame is the
    instance's download alone: no ``/tools/find`` round trip before it."""
    s = ct_series[5]
    client = await aiohttp_client(make_app(make_settings(  # (nothing fetched ahead)
        url=f"http://127.0.0.1:{wan.port}", prefetch={"mode": "off"})))
    resp = await client.get(f"/dicom-web/studies/{s.study}/series/{s.series}/metadata",
                            headers={"Accept": "application/dicom+json"})
    assert resp.status == 200
    wan.reset_stats()
    resp = await client.get(
        f"/dicom-web/studies/{s.study}/series/{s.series}/instances/{s.sop}/frames/1",
        headers={"Accept": "multipart/related; type=application/octet-stream; "
                           "transfer-syntax=*"})
    assert resp.status == 200
    assert s.data.endswith(multipart.split(await resp.read(), resp.headers["Content-Type"])[0]
                           .body)
    assert sorted(t for t in wan.targets if t != "/system") == [
        f"/instances/{s.orthanc_id}/attachments/dicom/md5", f"/instances/{s.orthanc_id}/file"]


def files(wan: WanEmulator) -> list[str]:
    """The instance bodies that crossed the link."""
    return [t for t in wan.targets if t.endswith("/file")]


FRAME = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}


async def test_a_cold_series_metadata_fetches_its_middle_slices_ahead(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    """OHIF opens a series at its middle slice (the first image, or its thumbnail) as
    soon as it has read the metadata: that download starts as the metadata comes from
    Orthanc, and the viewer's frame request joins it.  Only that: the study's prefetch
    still waits for the first image."""
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", prefetch={"mode": "series"})))
    s = ct_series[0]  # 12 slices, numbered in this order: the middle one is the 7th
    middle = {f"/instances/{ct_series[6].orthanc_id}/file"}
    wan.reset_stats()
    resp = await client.get(f"/dicom-web/studies/{s.study}/series/{s.series}/metadata",
                            headers={"Accept": "application/dicom+json"})
    assert resp.status == 200
    await eventually(lambda: set(files(wan)) >= middle, what="the middle slices fetched")
    assert sorted(files(wan)) == sorted(middle)
    viewed = ct_series[6]
    resp = await client.get(f"/dicom-web/studies/{s.study}/series/{s.series}/instances/"
                            f"{viewed.sop}/frames/1", headers=FRAME)
    assert resp.status == 200
    assert viewed.data.endswith(
        multipart.split(await resp.read(), resp.headers["Content-Type"])[0].body)
    assert wan.requests[f"/instances/{viewed.orthanc_id}/file"] == 1


@pytest.mark.parametrize("case", ["prefetch off", "study metadata"])
async def test_nothing_is_fetched_ahead_otherwise(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample], case: str) -> None:
    """With ``prefetch.mode = "off"`` nothing is downloaded before it is asked for; a
    study's metadata names no series' first image (and a study's prefetch waits for one)."""
    s = ct_series[0]
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}",
        prefetch={"mode": "off" if case == "prefetch off" else "series"})))
    path = {"prefetch off": f"/dicom-web/studies/{s.study}/series/{s.series}/metadata",
            "study metadata": f"/dicom-web/studies/{s.study}/metadata"}[case]
    wan.reset_stats()
    resp = await client.get(path, headers={"Accept": "application/dicom+json"})
    assert resp.status == 200
    await asyncio.sleep(0.5)
    assert files(wan) == []


async def test_confirmations_ahead_of_time_are_bounded(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        samples: dict[str, list[Sample]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each costs Orthanc another metadata answer: a burst of cold requests cannot queue
    more than MAX_CONFIRMATIONS; the others are revalidated when next asked for."""
    monkeypatch.setattr(state, "MAX_CONFIRMATIONS", 2)
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", dicomweb={"metadata_fresh": 600})))
    for series in list(samples.values())[:4]:
        s = series[0]
        resp = await client.get(f"/dicom-web/studies/{s.study}/series/{s.series}/metadata")
        assert resp.status == 200
    assert len(client.app[DICOMWEB].confirmations) == 2


@pytest.mark.parametrize("accept_encoding", ["gzip, deflate", "identity", "gzip;q=0"])
async def test_a_cold_answer_is_byte_for_byte_the_warm_one(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample], accept_encoding: str) -> None:
    """A cold metadata or search is rendered for its viewer with the download (one step
    after Orthanc's last byte); the warm answer is the same bytes and ETag, gzipped
    exactly when the viewer takes gzip, and a viewer on another host name gets its own
    links."""
    s = ct_series[2]
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}",
        server={"allowed_hosts": ["127.0.0.1", "viewer.example"]})))
    gzipped = accept_encoding.startswith("gzip,")
    for path in (f"/dicom-web/studies/{s.study}/series/{s.series}/metadata",
                 f"/dicom-web/studies/{s.study}/series?includefield=0008103E"):
        answers_ = []
        for _ in range(2):  # cold, then warm
            wan.reset_stats()
            resp = await client.get(path, auto_decompress=False, headers={
                "Accept": "application/dicom+json", "Accept-Encoding": accept_encoding})
            assert resp.status == 200
            answers_.append((await resp.read(), resp.headers["ETag"],
                             resp.headers.get("Content-Encoding")))
            assert resp.headers["Vary"] == "Accept-Encoding"
        assert wan.targets == []  # the second was warm
        (cold, cold_tag, encoding), warm = answers_
        assert (cold, cold_tag, encoding) == warm
        text = gzip.decompress(cold) if encoding == "gzip" else cold
        assert encoding == ("gzip" if gzipped and len(text) >= answers.GZIP_MIN else None)
        base = f"http://127.0.0.1:{client.port}/dicom-web"
        assert json.loads(text) and (base.encode() in text or "metadata" not in path)
        other = await client.get(path, headers={"Accept": "application/dicom+json",
                                                "Accept-Encoding": accept_encoding,
                                                "Host": "viewer.example:8443"})
        relinked = await other.read()
        assert other.status == 200 and other.headers["ETag"] != cold_tag
        assert relinked == text.replace(base.encode(), b"http://viewer.example:8443/dicom-web")


@pytest.mark.parametrize("fault", ["truncate_lying", "corrupt"])
async def test_a_cold_metadata_cut_or_damaged_is_a_502_never_cached(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample], fault: str) -> None:
    """Orthanc's gzipped metadata cut short (re-framed so that its length looks right:
    the gzip stream ends early) or with bytes changed is never passed on, rendered or
    kept: a 502 once the retries are spent, nothing cached, in memory or on disk; the
    next request downloads it whole."""
    s = ct_series[3]
    path = f"/dicom-web/studies/{s.study}/series/{s.series}/metadata"
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}",
        upstream={"retries": 1, "backoff_base": 0.01, "breaker_failures": 0})))
    dw = client.app[DICOMWEB]
    wan.set_profile(LinkProfile(**{fault: 1.0}, fault_paths=r"/metadata$", seed=3))
    resp = await client.get(path, headers={"Accept": "application/dicom+json"})
    assert resp.status == 502
    assert wan.faults[fault] == 2  # the first try and its retry, both damaged
    await dw.cache.flush()
    assert dw.cache.peek(f"json:{path}") is None
    assert dw.disk is not None and not dw.disk.path(f"json:{path}", s.study).exists()
    wan.set_profile(LinkProfile())
    resp = await client.get(path, headers={"Accept": "application/dicom+json"})
    assert resp.status == 200 and len(await resp.json(content_type=None)) == len(ct_series)
