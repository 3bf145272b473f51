"""What Orthanc changes, corrects or deletes, the DICOMweb answer cache and browsers follow.

Against the session's real Orthanc, through the WAN emulator (to count what is asked
and to take Orthanc away): a change event makes answers stale once, then they are
fresh again; a removal drops every answer derived from the study, in memory and on
disk, so none stands in while Orthanc is away; instance answers are revalidated (a
deleted instance is a 404); browsers are told to revalidate every use.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from pydicom.uid import ExplicitVRLittleEndian

from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.devtools.wanem import WanEmulator
from dicomcache.http.app import make_app
from dicomcache.http.keys import DICOMWEB, SETTINGS, STUDY_CHANGED
from dicomcache.upstream.changes import StudyEvent
from tests.conftest import Sample, SettingsFactory, eventually
from tests.http.dicomweb_support import ANY_SYNTAX, series_path, split_multipart

#: What browsers are told for everything named by a UID or an Orthanc ID.
REVALIDATE = "private, no-cache"
DOWN = (502, 503, 504)


@dataclass(frozen=True)
class Study:
    """A small study of our own in the session's Orthanc (tests here delete from it)."""

    study: str
    series: str
    sops: list[str]
    ids: list[str]
    patient_name: str

    @property
    def series_path(self) -> str:
        return f"/dicom-web/studies/{self.study}/series/{self.series}"

    def instance_path(self, i: int) -> str:
        return f"{self.series_path}/instances/{self.sops[i]}"


async def upload_study(orthanc: OrthancProcess, n: int, seed: int, name: str) -> Study:
    datasets = make_ct_series(n, rows=16, columns=16, seed=seed, patient_id=f"PCOH{seed}",
                              patient_name=name)
    ids = await asyncio.to_thread(
        orthanc.upload, [encode(ds, ExplicitVRLittleEndian) for ds in datasets])
    first = datasets[0]
    return Study(str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                 [str(ds.SOPInstanceUID) for ds in datasets], ids, name)


async def delete_in_orthanc(orthanc: OrthancProcess, *instance_ids: str) -> None:
    for oid in instance_ids:
        await asyncio.to_thread(orthanc.request, "DELETE", f"/instances/{oid}")


async def notify(client: TestClient, event: StudyEvent) -> None:
    """What the change feed, a revalidation or a purge tells the application."""
    for hook in client.app[STUDY_CHANGED]:
        await hook(event)


def disk_copies(client: TestClient) -> Path:
    return client.app[SETTINGS].cache.directory / "dicomweb"


def files_mentioning(directory: Path, needle: str) -> list[Path]:
    """The files under ``directory`` whose bytes contain ``needle`` (a privacy check)."""
    return [p for p in directory.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator) -> TestClient:
    """dicomcache through the emulator, answers fresh for long: only events expire them."""
    return await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}",
        dicomweb={"metadata_fresh": 600, "qido_fresh": 600, "rendered_fresh": 600},
        upstream={"breaker_failures": 0, "retries": 1})))


# --- a change event: stale once, then fresh again -------------------------------------------

async def test_metadata_is_fresh_again_after_a_change_event(
        client: TestClient, wan: WanEmulator, orthanc: OrthancProcess) -> None:
    st = await upload_study(orthanc, 2, seed=1301, name="COHERENCE^FRESH")
    path = st.series_path + "/metadata"
    assert (await client.get(path)).status == 200
    await notify(client, StudyEvent(st.study))
    asked = wan.requests.total()
    resp = await client.get(path)  # revalidated once, against the instance list
    assert resp.status == 200 and "Warning" not in resp.headers
    assert wan.requests.total() > asked
    asked = wan.requests.total()
    for _ in range(3):  # then fresh for metadata_fresh again: Orthanc is not asked
        assert (await client.get(path)).status == 200
    assert wan.requests.total() == asked, wan.targets[-5:]

    # An expired copy still stands in while Orthanc is unreachable (stale-if-error).
    await notify(client, StudyEvent(st.study))
    wan.set_down(True)
    resp = await client.get(path)
    assert resp.status == 200 and resp.headers["Warning"].startswith("110 ")


# --- a removal: dropped everywhere, never a stale copy ---------------------------------------

async def test_removed_study_is_dropped_in_memory_and_on_disk(
        client: TestClient, wan: WanEmulator, orthanc: OrthancProcess,
        samples: dict[str, list[Sample]]) -> None:
    st = await upload_study(orthanc, 2, seed=1302, name="COHERENCE^REMOVED")
    answers = [f"/dicom-web/studies/{st.study}/metadata", st.series_path + "/metadata",
               st.instance_path(0) + "/metadata", st.instance_path(0) + "/rendered",
               st.series_path + "/rendered", f"/dicom-web/studies/{st.study}/series",
               "/dicom-web/studies?PatientID=PCOH1302"]
    other = series_path(samples["explicit"][0]) + "/metadata"
    for path in [*answers, other]:
        resp = await client.get(path)
        assert resp.status == 200, (path, await resp.text())
    assert files_mentioning(disk_copies(client), st.patient_name)  # (what is checked below)

    await delete_in_orthanc(orthanc, *st.ids)
    await notify(client, StudyEvent(st.study, removed=True))
    # No copy of its metadata (names, UIDs) stays on disk.
    assert files_mentioning(disk_copies(client), st.patient_name) == []
    assert files_mentioning(disk_copies(client), st.study) == []

    wan.set_down(True)
    for path in answers:  # never served again, not even as a stale copy
        assert (await client.get(path)).status in DOWN, path
    resp = await client.get(other)  # another study's answers are kept, still fresh
    assert resp.status == 200 and "Warning" not in resp.headers

    wan.set_down(False)
    for path in answers[:5]:
        assert (await client.get(path)).status == 404, path
    assert await (await client.get(answers[-1])).json(content_type=None) == []


async def test_removal_of_every_study_drops_every_answer(
        client: TestClient, wan: WanEmulator, samples: dict[str, list[Sample]]) -> None:
    s = samples["explicit"][0]
    paths = [series_path(s) + "/metadata", f"{series_path(s)}/instances/{s.sop}/metadata",
             "/dicom-web/studies?PatientID=PEXPLICIT"]
    for path in paths:
        assert (await client.get(path)).status == 200
    await notify(client, StudyEvent(None))  # every study changed: stale, still standing in
    wan.set_down(True)
    for path in paths:
        resp = await client.get(path)
        assert resp.status == 200 and resp.headers["Warning"].startswith("110 "), path
    await notify(client, StudyEvent(None, removed=True))  # every study: nothing stands in
    for path in paths:
        assert (await client.get(path)).status in DOWN, path
    assert [p for p in disk_copies(client).rglob("*") if p.is_file()] == []


async def test_removal_during_a_download_is_not_cached(
        client: TestClient, wan: WanEmulator, orthanc: OrthancProcess) -> None:
    """An answer Orthanc gave before the removal, arriving after it, is not kept."""
    from dicomcache.devtools.wanem import LinkProfile

    st = await upload_study(orthanc, 1, seed=1303, name="COHERENCE^INFLIGHT")
    path = st.instance_path(0) + "/metadata"
    wan.set_profile(LinkProfile(latency_ms=100))  # a load of several round trips
    pending = asyncio.ensure_future(client.get(path))
    # (its first request: a lookup for the instance list, or the metadata itself)
    await eventually(lambda: wan.requests["/tools/lookup"] + wan.requests[path] > 0,
                     what="the load under way")
    await notify(client, StudyEvent(st.study, removed=True))
    assert (await pending).status == 200  # asked before the removal: answered
    wan.set_profile(LinkProfile())
    wan.set_down(True)
    assert (await client.get(path)).status in DOWN
    assert files_mentioning(disk_copies(client), st.patient_name) == []


# --- instance answers are revalidated --------------------------------------------------------

async def test_instance_answers_are_revalidated_and_a_deleted_one_is_gone(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        orthanc: OrthancProcess) -> None:
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}",
        dicomweb={"metadata_fresh": 0.3, "rendered_fresh": 0.3})))
    st = await upload_study(orthanc, 2, seed=1304, name="COHERENCE^INSTANCE")
    kept, deleted = st.instance_path(0), st.instance_path(1)
    for path in (kept + "/metadata", kept + "/rendered", deleted + "/metadata",
                 deleted + "/rendered"):
        assert (await client.get(path)).status == 200, path
    # First metadata answers are confirmed (given a validator) in the background.
    await eventually(lambda: not client.app[DICOMWEB].confirmations, what="confirmed")
    await asyncio.sleep(0.35)  # time passing: past metadata_fresh and rendered_fresh
    wan.reset_stats()
    for path in (kept + "/metadata", kept + "/rendered"):
        assert (await client.get(path)).status == 200, path
    # Unchanged: confirmed against the series' instance list, not downloaded again.
    assert wan.requests[kept + "/metadata"] == wan.requests[kept + "/rendered"] == 0
    assert wan.requests.total() > 0

    await delete_in_orthanc(orthanc, st.ids[1])
    await asyncio.sleep(0.35)  # time passing: past metadata_fresh again
    for path in (deleted + "/metadata", deleted + "/rendered"):
        assert (await client.get(path)).status == 404, path  # as Orthanc answers
    assert (await client.get(kept + "/metadata")).status == 200


# --- browsers revalidate every use -----------------------------------------------------------

async def test_browsers_revalidate_and_get_304s(
        aiohttp_client, make_settings: SettingsFactory,
        samples: dict[str, list[Sample]]) -> None:
    client = await aiohttp_client(make_app(make_settings()))
    s = samples["multiframe"][0]
    inst = f"{series_path(s)}/instances/{s.sop}"
    routes: list[tuple[str, dict[str, str]]] = [
        (f"/instances/{s.orthanc_id}/file", {}),
        (f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}&objectUID={s.sop}"
         "&contentType=application/dicom", {}),
        (inst, {"Accept": ANY_SYNTAX}),
        (inst + "/frames/1,3", {}),
        (inst + "/frames/2", {"Accept": 'multipart/related; type="application/octet-stream"; '
                                        "transfer-syntax=*"}),
        (inst + "/bulk/7fe00010", {}),
        (inst + "/metadata", {}),
        (inst + "/rendered", {}),
        (inst + "/frames/1/rendered", {}),
        (series_path(s) + "/metadata", {}),
        (f"/dicom-web/studies/{s.study}/metadata", {"Accept-Encoding": "gzip"}),
        (series_path(s) + "/rendered", {}),
        ("/dicom-web/studies?PatientID=PMULTIFRAME", {}),
    ]
    for path, headers in routes:
        first = await client.get(path, headers=headers)
        body = await first.read()
        assert first.status == 200, (path, body[:200])
        assert first.headers["Cache-Control"] == REVALIDATE, path
        etag = first.headers["ETag"]
        assert etag.startswith('"') and etag.endswith('"'), path  # a strong validator
        again = await client.get(path, headers=headers)  # same tag, same content
        assert again.headers["ETag"] == etag, path
        if path == inst:  # (a fresh random boundary each time: the part is compared)
            assert split_multipart(await again.read(), again.headers["Content-Type"]) == \
                split_multipart(body, first.headers["Content-Type"])
        else:
            assert await again.read() == body, path
            assert again.headers["Content-Type"] == first.headers["Content-Type"], path
        for tags in (etag, f'"other", {etag}', f"W/{etag}"):
            resp = await client.get(path, headers={**headers, "If-None-Match": tags})
            assert resp.status == 304, (path, tags)
            assert await resp.read() == b""
            assert resp.headers["Cache-Control"] == REVALIDATE, path
            assert resp.headers["ETag"] == etag, path
        resp = await client.get(path, headers={**headers, "If-None-Match": '"other"'})
        assert resp.status == 200 and resp.headers["ETag"] == etag, path
