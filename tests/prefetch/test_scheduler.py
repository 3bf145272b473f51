"""Prefetch through the WAN emulator in front of the real Orthanc.

A first touch fetches the rest of the series (then the study), later requests
are hits (counted at the emulator), a viewer's request overtakes prefetch, and
prefetch stops before the studies being viewed outgrow the cache bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.http.app import make_app
from dicomcache.http.keys import METRICS, PREFETCHER, STORE
from tests.conftest import Sample, SettingsFactory, eventually, metric_value


@pytest.fixture
async def wan(orthanc: OrthancProcess) -> AsyncIterator[WanEmulator]:
    async with WanEmulator("127.0.0.1", orthanc.http_port, LinkProfile(latency_ms=2)) as emulator:
        yield emulator


def file_requests(wan: WanEmulator, items: list[Sample]) -> list[int]:
    return [wan.requests[f"/instances/{s.orthanc_id}/file"] for s in items]


async def prefetching_client(aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
                             **prefetch: object) -> TestClient:
    settings = make_settings(url=f"http://127.0.0.1:{wan.port}",
                             prefetch={"mode": "series", "parallel": 3, **prefetch})
    return await aiohttp_client(make_app(settings))


@pytest.fixture(scope="module")
def two_series(orthanc: OrthancProcess) -> list[list[Sample]]:
    """One study, two small series of 4 slices."""
    study = generate_uid()
    out = []
    for i in range(2):
        datasets = make_ct_series(4, rows=64, columns=64, study_uid=study, seed=200 + i,
                                  patient_id="PPREFETCH")
        blobs = [encode(ds, ExplicitVRLittleEndian) for ds in datasets]
        ids = orthanc.upload(blobs)
        out.append([Sample(oid, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                           str(ds.SeriesInstanceUID), ExplicitVRLittleEndian, blob)
                    for oid, ds, blob in zip(ids, datasets, blobs, strict=True)])
    return out


async def test_first_touch_prefetches_the_series_later_requests_are_hits(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    client = await prefetching_client(aiohttp_client, make_settings, wan)
    first = ct_series[4]
    resp = await client.get(f"/instances/{first.orthanc_id}/file")
    assert resp.status == 200 and await resp.read() == first.data
    assert await client.app[PREFETCHER].idle(30)
    assert file_requests(wan, ct_series) == [1] * len(ct_series)
    before = sum(wan.requests.values())
    for s in ct_series:  # every slice, in every family, without the link
        resp = await client.get(f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
                                f"&objectUID={s.sop}&contentType=application/dicom")
        assert resp.status == 200 and await resp.read() == s.data
    assert sum(wan.requests.values()) == before
    metrics = client.app[METRICS]
    fetched = metric_value(metrics, "dicomcache_prefetch_instances_total", outcome="fetched")
    assert fetched == len(ct_series) - 1
    # A second touch of the same study does not list it again.
    assert wan.requests["/tools/lookup"] == 1


async def test_study_mode_fetches_the_other_series_after_the_touched_one(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        two_series: list[list[Sample]]) -> None:
    client = await prefetching_client(aiohttp_client, make_settings, wan, mode="study",
                                      parallel=1)
    a, b = two_series
    s = b[1]
    resp = await client.get(f"/dicom-web/studies/{s.study}/series/{s.series}/instances/{s.sop}",
                            headers={"Accept": 'multipart/related; type="application/dicom"; '
                                               'transfer-syntax=*'})
    assert resp.status == 200
    assert await client.app[PREFETCHER].idle(30)
    assert file_requests(wan, a + b) == [1] * 8
    order = [t for t in wan.targets if t.endswith("/file")]
    ids = [t.split("/")[2] for t in order]
    # The touched slice, then the rest of its series from there outwards (next, previous,
    # then the one after the next), then the other series.
    assert ids == [b[1].orthanc_id, b[2].orthanc_id, b[0].orthanc_id, b[3].orthanc_id,
                   *(x.orthanc_id for x in a)]


async def test_series_mode_each_touched_series_once(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        two_series: list[list[Sample]]) -> None:
    client = await prefetching_client(aiohttp_client, make_settings, wan)
    a, b = two_series
    # Study metadata names no series: nothing is queued in series mode.
    resp = await client.get(f"/dicom-web/studies/{a[0].study}/metadata")
    assert resp.status == 200
    assert await client.app[PREFETCHER].idle(10)
    assert sum(file_requests(wan, a + b)) == 0
    for series in (a, b):
        s = series[0]
        resp = await client.get(f"/wado?requestType=WADO&studyUID={s.study}&seriesUID="
                                f"{s.series}&objectUID={s.sop}&contentType=application/dicom")
        assert resp.status == 200
        assert await client.app[PREFETCHER].idle(30)
    assert file_requests(wan, a + b) == [1] * 8


async def test_viewer_request_overtakes_prefetch(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    # 40 Mbit/s: one 512 KiB slice takes ~0.1 s; prefetch runs one download at a time.
    client = await prefetching_client(aiohttp_client, make_settings, wan, parallel=1)
    wan.set_profile(LinkProfile(latency_ms=5, bandwidth_mbit=40))
    assert (await client.get(f"/instances/{ct_series[0].orthanc_id}/file")).status == 200
    prefetcher = client.app[PREFETCHER]
    # Wait until prefetch is under way, then ask for the slice it would fetch last.
    last = ct_series[-1]
    await eventually(lambda: wan.requests[f"/instances/{ct_series[2].orthanc_id}/file"],
                     what="prefetch under way")
    resp = await client.get(f"/instances/{last.orthanc_id}/file")
    assert resp.status == 200 and await resp.read() == last.data
    fetched_when_viewer_done = sum(file_requests(wan, ct_series[1:-1]))
    assert fetched_when_viewer_done < len(ct_series) - 2, "the viewer waited for prefetch"
    assert await prefetcher.idle(30)
    assert file_requests(wan, ct_series) == [1] * len(ct_series)  # nothing fetched twice


async def test_prefetch_stops_near_the_cache_bound_and_evicts_nothing(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    settings = make_settings(url=f"http://127.0.0.1:{wan.port}",
                             cache={"max_size": "4MiB"},
                             prefetch={"mode": "series", "parallel": 2, "max_fraction": 0.5})
    client = await aiohttp_client(make_app(settings))
    assert (await client.get(f"/instances/{ct_series[0].orthanc_id}/file")).status == 200
    assert await client.app[PREFETCHER].idle(30)
    await client.app[STORE].drain()  # the touched one's disk copy follows its answer
    stats = await client.app[STORE].stats()
    assert stats["evictions"] == 0
    assert 1 < stats["entries"] <= 4  # 2 MB of 512 KiB slices: the touched one and ≤ 3 more
    assert metric_value(client.app[METRICS], "dicomcache_prefetch_instances_total",
                        outcome="budget") > 0
    # The slice being viewed is still there.
    before = sum(wan.requests.values())
    assert (await client.get(f"/instances/{ct_series[0].orthanc_id}/file")).status == 200
    assert sum(wan.requests.values()) == before


async def test_prefetch_off_fetches_nothing_ahead(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    client = await aiohttp_client(make_app(make_settings(url=f"http://127.0.0.1:{wan.port}")))
    assert (await client.get(f"/instances/{ct_series[3].orthanc_id}/file")).status == 200
    assert await client.app[PREFETCHER].idle(5)
    assert sum(file_requests(wan, ct_series)) == 1


# --- the CLI ---------------------------------------------------------------------------
async def test_a_degraded_cache_prefetches_nothing(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator, tmp_path,  # type: ignore[no-untyped-def]
        ct_series: list[Sample]) -> None:
    """It could keep none of it: every download would cross the WAN for nothing."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "index.sqlite").write_bytes(b"not a database" * 100)
    client = await prefetching_client(aiohttp_client, make_settings, wan)
    first = ct_series[2]
    resp = await client.get(f"/wado?requestType=WADO&studyUID={first.study}"
                            f"&seriesUID={first.series}&objectUID={first.sop}"
                            "&contentType=application/dicom")
    assert resp.status == 200 and await resp.read() == first.data
    assert await client.app[PREFETCHER].idle(30)
    assert sum(file_requests(wan, ct_series)) == 1  # the viewer's own, nothing ahead


async def test_cli_prefetch_by_patient_then_everything_is_cached(
        make_settings: SettingsFactory, wan: WanEmulator, ct_series: list[Sample]) -> None:
    import io

    from dicomcache.cache.store import Store
    from dicomcache.cli.prefetch import prefetch

    settings = make_settings(url=f"http://127.0.0.1:{wan.port}")
    out, err = io.StringIO(), io.StringIO()
    code = await prefetch(settings, studies=[], patients=["PBIG"], accessions=[], parallel=4,
                          out=out, err=err)
    assert code == 0, out.getvalue()
    assert "12 instances: 12 fetched, 0 already cached, 0 failed" in out.getvalue()
    assert "12/12 instances" in err.getvalue() and "ETA" in err.getvalue()
    assert file_requests(wan, ct_series) == [1] * 12
    def stored() -> bool:
        store = Store(settings.cache.directory, settings.cache.max_size)
        try:
            return all(store.get(s.orthanc_id) is not None for s in ct_series)
        finally:
            store.close()
    assert await asyncio.to_thread(stored)
    # Again, by StudyInstanceUID: nothing to fetch.
    out = io.StringIO()
    code = await prefetch(settings, studies=[ct_series[0].study], patients=[], accessions=[],
                          parallel=4, out=out, err=None)
    assert code == 0 and "0 fetched, 12 already cached" in out.getvalue()
    assert file_requests(wan, ct_series) == [1] * 12


async def test_cli_prefetch_reports_failures_with_exit_1(
        make_settings: SettingsFactory, wan: WanEmulator, ct_series: list[Sample]) -> None:
    import io

    from dicomcache.cli.prefetch import prefetch

    settings = make_settings(url=f"http://127.0.0.1:{wan.port}",
                             upstream={"retries": 1, "breaker_failures": 0})
    wan.set_profile(LinkProfile(corrupt=1.0, fault_paths=f"{ct_series[3].orthanc_id}/file$"))
    out = io.StringIO()
    code = await prefetch(settings, studies=[], patients=["PBIG", "NOBODY"], accessions=[],
                          parallel=4, out=out, err=None)
    assert code == 1
    text = out.getvalue()
    assert "11 fetched" in text and "1 failed" in text
    assert "PatientID NOBODY: no study in Orthanc" in text
    assert ct_series[3].orthanc_id in text


def test_cli_prefetch_needs_an_identifier(capsys: pytest.CaptureFixture[str]) -> None:
    from dicomcache.cli.main import main

    assert main(["prefetch"]) == 2
    assert "--study" in capsys.readouterr().err


@pytest.mark.parametrize(("data", "key"), [
    ({"prefetch": {"mode": "always"}}, "prefetch.mode"),
    ({"prefetch": {"parallel": 0}}, "prefetch.parallel"),
    ({"prefetch": {"max_fraction": 1.5}}, "prefetch.max_fraction"),
    ({"prefetch": {"paralel": 2}}, "prefetch.paralel"),
    ({"upstream": {"compression": "br"}}, "upstream.compression"),
    ({"upstream": {"breaker_failures": -1}}, "upstream.breaker_failures"),
    ({"changes": {"prewarm": [{}]}}, "changes.prewarm[0]"),
    ({"changes": {"prewarm": [{"tag": "InstitutionName"}]}}, "changes.prewarm[0].tag"),
    ({"changes": {"prewarm": [{"modality": "CT", "modalty": "MR"}]}}, "changes.prewarm[0].modalty"),
    ({"changes": {"poll_interval": 0}}, "changes.poll_interval"),
])
def test_config_problems_name_their_key(data: dict[str, object], key: str) -> None:
    from dicomcache.config import from_dict
    from dicomcache.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert key in [k for k, _ in info.value.problems]


async def test_a_search_alone_starts_no_download_metadata_does(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        two_series: list[list[Sample]]) -> None:
    """OHIF's open sequence: QIDO studies, QIDO series of the study, then the series
    metadata.  The searches leave the link to the viewer; the metadata starts the
    prefetch (issue 16: a study download raced the first image)."""
    client = await prefetching_client(aiohttp_client, make_settings, wan, mode="study")
    client.app[PREFETCHER].open_hold = 0.2  # no image is asked for: start after that
    a, b = two_series
    qido = {"Accept": "application/dicom+json"}
    for path in (f"/dicom-web/studies?StudyInstanceUID={a[0].study}",
                 f"/dicom-web/studies/{a[0].study}/series",
                 f"/dicom-web/studies/{a[0].study}/series/{a[0].series}/instances"):
        resp = await client.get(path, headers=qido)
        assert resp.status == 200, path
    assert await client.app[PREFETCHER].idle(10)
    assert sum(file_requests(wan, a + b)) == 0
    resp = await client.get(f"/dicom-web/studies/{a[0].study}/series/{a[0].series}/metadata",
                            headers=qido)
    assert resp.status == 200
    assert await client.app[PREFETCHER].idle(30)
    assert file_requests(wan, a + b) == [1] * 8


async def test_an_opened_study_waits_for_the_first_image_then_goes_outwards_from_it(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        two_series: list[list[Sample]]) -> None:
    """OHIF asks for the series metadata, then for a slice's frame.  The metadata lists
    the study, but its downloads wait for that first image (they took the link from it):
    then they go from that slice outwards, then to the other series.  Only the series'
    middle slice, where OHIF opens it, is fetched at once (tests/dicomweb/test_state.py)."""
    client = await prefetching_client(aiohttp_client, make_settings, wan, mode="study",
                                      parallel=1)
    prefetcher = client.app[PREFETCHER]
    prefetcher.open_hold = 60.0  # the image, not the time, starts the downloads here
    a, b = two_series
    resp = await client.get(f"/dicom-web/studies/{b[0].study}/series/{b[0].series}/metadata",
                            headers={"Accept": "application/dicom+json"})
    assert resp.status == 200
    await eventually(lambda: prefetcher.current is not None and prefetcher.current.places,
                     what="the study listed")
    await asyncio.sleep(0.5)  # downloads would be under way by now
    s = b[2]  # the middle of four
    assert [t for t in wan.targets if t.endswith("/file")] == [
        f"/instances/{s.orthanc_id}/file"]
    assert len(prefetcher.current.items) == 8
    resp = await client.get(
        f"/dicom-web/studies/{s.study}/series/{s.series}/instances/{s.sop}/frames/1",
        headers={"Accept": "multipart/related; type=application/octet-stream; "
                           "transfer-syntax=*"})
    assert resp.status == 200
    assert await prefetcher.idle(30)
    ids = [t.split("/")[2] for t in wan.targets if t.endswith("/file")]
    assert ids == [b[2].orthanc_id, b[3].orthanc_id, b[1].orthanc_id, b[0].orthanc_id,
                   *(x.orthanc_id for x in a)]
