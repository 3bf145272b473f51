"""The right patient's image, every time (issue: patient safety), against a real Orthanc.

One SOP Instance UID stored twice in Orthanc under two Patient IDs (a merge, a CD
import, a re-send after a demographic fix) is two Orthanc instances; every API
family must answer what Orthanc answers for each, in any order, online and with
Orthanc unreachable.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydicom.uid import generate_uid
from yarl import URL

from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.devtools.wanem import WanEmulator
from dicomcache.dicom.uids import orthanc_instance_id
from dicomcache.http.app import make_app
from dicomcache.http.keys import METRICS, STORE
from tests.conftest import SettingsFactory, metric_value
from tests.http.dicomweb_support import orthanc_answer

ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclasses.dataclass(frozen=True)
class Twin:
    """One instance as Orthanc holds it."""

    oid: str
    patient: str
    study: str
    series: str
    sop: str
    data: bytes


async def twins(orthanc: OrthancProcess, seed: int, *, same_study: bool = True
                ) -> tuple[Twin, Twin]:
    """The same image uploaded under patients PA and PB (same SOP Instance UID)."""
    [ds] = make_ct_series(1, rows=16, columns=16, seed=seed, patient_id=f"PA{seed}",
                          study_uid=generate_uid(), series_uid=generate_uid())
    other = copy.deepcopy(ds)
    other.PatientID, other.PatientName = f"PB{seed}", "OTHER^PATIENT"
    if not same_study:
        other.StudyInstanceUID, other.SeriesInstanceUID = generate_uid(), generate_uid()
    out = []
    for d in (ds, other):
        blob = encode(d, d.file_meta.TransferSyntaxUID)
        [oid] = await asyncio.to_thread(orthanc.upload, [blob])
        out.append(Twin(oid, str(d.PatientID), str(d.StudyInstanceUID),
                        str(d.SeriesInstanceUID), str(d.SOPInstanceUID), blob))
    assert out[0].oid != out[1].oid and out[0].sop == out[1].sop
    return out[0], out[1]


def wado(t: Twin, *, parents: bool = True) -> str:
    where = f"&studyUID={t.study}&seriesUID={t.series}" if parents else ""
    return f"/wado?requestType=WADO{where}&objectUID={t.sop}&contentType=application/dicom"


def dicomweb(t: Twin) -> str:
    return f"/dicom-web/studies/{t.study}/series/{t.series}/instances/{t.sop}"


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory,  # type: ignore[no-untyped-def]
                 wan: WanEmulator) -> TestClient:
    return await aiohttp_client(make_app(make_settings(url=f"http://127.0.0.1:{wan.port}",
                                                       upstream={"retries": 1})))


def test_orthanc_ids_are_the_hash_of_the_four_identifiers() -> None:
    """What the store keys by is what Orthanc keys by (checked against Orthanc below)."""
    assert orthanc_instance_id("PA", "1.2", "1.2.3", "1.2.3.4") == \
        "-".join(hashlib.sha1(b"PA|1.2|1.2.3|1.2.3.4").hexdigest()[i:i + 8]
                 for i in range(0, 40, 8))


@pytest.mark.parametrize("order", ["ab", "ba"])
async def test_two_patients_one_sop_uid_each_gets_its_own_body(
        client: TestClient, orthanc: OrthancProcess, wan: WanEmulator, order: str) -> None:
    a, b = await twins(orthanc, seed=11 if order == "ab" else 12)
    assert orthanc_instance_id(a.patient, a.study, a.series, a.sop) == a.oid
    first, second = (a, b) if order == "ab" else (b, a)
    for t in (first, second, first, second):
        resp = await client.get(f"/instances/{t.oid}/file")
        assert resp.status == 200 and await resp.read() == t.data, t.patient
    # The same UIDs name two instances: Orthanc answers 404 by UIDs, and so does dicomcache.
    for path, headers in ((wado(a), {}), (wado(a, parents=False), {}),
                          (dicomweb(a), {"Accept": ANY}), (dicomweb(a) + "/metadata", {}),
                          (dicomweb(a) + "/frames/1", {}),
                          (f"/dicom-web/studies/{a.study}/series/{a.series}", {"Accept": ANY})):
        assert orthanc_answer(orthanc, path, headers)[0] == 404, path
        resp = await client.get(path, headers=headers)
        assert resp.status == 404, (path, resp.status, await resp.text())
    # Offline: the same answers from the store.
    wan.set_down(True)
    for t in (second, first):
        resp = await client.get(f"/instances/{t.oid}/file")
        assert resp.status == 200 and await resp.read() == t.data, t.patient
    for path in (wado(a), wado(a, parents=False)):
        assert (await client.get(path)).status == 404


async def test_a_uid_request_is_resolved_as_orthanc_resolves_it(
        client: TestClient, orthanc: OrthancProcess, wan: WanEmulator) -> None:
    """Twins in two studies: each study's URLs give its own instance (Orthanc: 200),
    the SOP Instance UID alone is ambiguous (Orthanc: 404)."""
    a, b = await twins(orthanc, seed=13, same_study=False)
    for t in (a, b):
        resp = await client.get(wado(t))
        assert resp.status == 200 and await resp.read() == t.data
        resp = await client.get(dicomweb(t), headers={"Accept": ANY})
        assert resp.status == 200 and t.data in await resp.read()
        resp = await client.get(f"/dicom-web/studies/{t.study}/series/{t.series}",
                                headers={"Accept": ANY})
        assert resp.status == 200 and t.data in await resp.read()
    assert orthanc_answer(orthanc, wado(a, parents=False))[0] == 404
    assert (await client.get(wado(a, parents=False))).status == 404
    wan.set_down(True)  # known answers stand in while Orthanc is away
    for t in (b, a):
        resp = await client.get(wado(t))
        assert resp.status == 200 and await resp.read() == t.data


@pytest.fixture
async def lying_upstream(orthanc: OrthancProcess) -> AsyncIterator[tuple[int, dict[str, str]]]:
    """Orthanc behind a proxy that answers one instance's ``/file`` with another's body
    (an intermediary that mixed them up) and has no MD5s (StoreMD5ForAttachments off)."""
    import aiohttp

    swaps: dict[str, str] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.endswith("/attachments/dicom/md5"):
            return web.Response(status=404, text="no md5")
        for asked, given in swaps.items():  # bodies mixed up; tags and the rest true
            if path == f"/instances/{asked}/file":
                path = f"/instances/{given}/file"
        async with aiohttp.ClientSession() as session, session.request(
                request.method, orthanc.url + path, params=request.query,
                data=await request.read(),
                headers={"Authorization": orthanc.auth_header}) as resp:
            return web.Response(status=resp.status, body=await resp.read(),
                                content_type=resp.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield port, swaps
    await runner.cleanup()


async def test_another_instances_body_is_never_accepted(
        aiohttp_client, make_settings: SettingsFactory,  # type: ignore[no-untyped-def]
        orthanc: OrthancProcess, lying_upstream: tuple[int, dict[str, str]]) -> None:
    port, swaps = lying_upstream
    a, b = await twins(orthanc, seed=14)
    [ds] = make_ct_series(1, rows=16, columns=16, seed=15, patient_id="PC")
    c_blob = encode(ds, ds.file_meta.TransferSyntaxUID)
    [c] = await asyncio.to_thread(orthanc.upload, [c_blob])
    swaps[a.oid] = b.oid  # the same image of another patient
    swaps[c] = b.oid      # another image altogether
    client = await aiohttp_client(make_app(make_settings(url=f"http://127.0.0.1:{port}",
                                                         upstream={"retries": 1})))
    for oid in (a.oid, c):
        resp = await client.get(f"/instances/{oid}/file")
        body = await resp.json()
        assert resp.status == 502 and "asked for instance" in body["reason"], body
    assert metric_value(client.app[METRICS], "dicomcache_integrity_failures_total",
                        cause="identity_mismatch") >= 4  # two attempts each
    resp = await client.get(f"/instances/{b.oid}/file")  # the real one is fine
    assert resp.status == 200 and await resp.read() == b.data
    swaps.clear()
    resp = await client.get(f"/instances/{a.oid}/file")  # nothing wrong was kept
    assert resp.status == 200 and await resp.read() == a.data


@pytest.mark.parametrize(("charset", "patient"), [
    ("ISO_IR 100", "PÉREZ^1"), ("ISO_IR 192", "患者-1"), ("ISO 2022 IR 87", "患者1")])
async def test_a_patient_id_in_another_character_set_is_its_own_identity(
        client: TestClient, orthanc: OrthancProcess, wan: WanEmulator,
        charset: str, patient: str) -> None:
    """Orthanc hashes the Patient ID decoded by the data set's character set: so does
    dicomcache, and the instance is served without asking Orthanc for its tags."""
    [ds] = make_ct_series(1, rows=16, columns=16, seed=18, patient_id="X")
    ds.SpecificCharacterSet = charset
    ds.PatientID = patient
    blob = encode(ds, ds.file_meta.TransferSyntaxUID)
    [oid] = await asyncio.to_thread(orthanc.upload, [blob])
    assert oid == orthanc_instance_id(patient, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                      ds.SOPInstanceUID)
    resp = await client.get(f"/instances/{oid}/file")
    assert resp.status == 200 and await resp.read() == blob
    assert not any(t.endswith("/tags?short") for t in wan.targets)


async def test_a_bit_flipped_on_disk_is_never_served(
        client: TestClient, orthanc: OrthancProcess, tmp_path: Path) -> None:
    [ds] = make_ct_series(1, rows=32, columns=32, seed=16, patient_id="PROT")
    blob = encode(ds, ds.file_meta.TransferSyntaxUID)
    [oid] = await asyncio.to_thread(orthanc.upload, [blob])
    assert await (await client.get(f"/instances/{oid}/file")).read() == blob  # cold: stored
    [stored] = [p for p in (tmp_path / "cache" / "objects").rglob("*.dcm")]
    rotten = bytearray(stored.read_bytes())
    rotten[-100] ^= 0x01  # one bit, in the pixels: still parses
    stored.write_bytes(bytes(rotten))
    for _ in range(2):
        resp = await client.get(f"/instances/{oid}/file")
        assert resp.status == 200 and await resp.read() == blob
        assert resp.headers["ETag"] == f'"{hashlib.md5(blob).hexdigest()}"'
    assert list((tmp_path / "cache" / "quarantine").glob("*.dcm"))
    assert client.app[STORE].sync.bad_found == 1


async def test_a_file_quarantined_by_dicomcache_verify_is_no_longer_served(
        client: TestClient, orthanc: OrthancProcess, wan: WanEmulator, tmp_path: Path) -> None:
    """The CLI and the daemon agree: what ``dicomcache verify`` quarantines while the daemon
    runs (its file open, its entry in memory) is fetched again, never served."""
    from dicomcache.cli.main import main

    [ds] = make_ct_series(1, rows=32, columns=32, seed=17, patient_id="PCLI")
    blob = encode(ds, ds.file_meta.TransferSyntaxUID)
    [oid] = await asyncio.to_thread(orthanc.upload, [blob])
    path = f"/instances/{oid}/file"
    for _ in range(2):  # cold, then a hit: the file is open in the daemon
        assert await (await client.get(path)).read() == blob
    [stored] = [p for p in (tmp_path / "cache" / "objects").rglob("*.dcm")]
    rotten = bytearray(stored.read_bytes())
    rotten[-100] ^= 0x01
    stored.write_bytes(bytes(rotten))
    config = tmp_path / "verify.toml"
    config.write_text(f'[upstream]\nurl = "{orthanc.url}"\n'
                      f'[cache]\ndirectory = "{tmp_path / "cache"}"\n')
    code = await asyncio.to_thread(main, ["verify", "--config", str(config), "--no-progress"])
    assert code == 1  # it found the bad file
    before = wan.requests[path]
    for _ in range(2):
        resp = await client.get(path)
        assert resp.status == 200 and await resp.read() == blob
    assert wan.requests[path] == before + 1  # fetched again once, then a hit again


# --- data is never a path ------------------------------------------------------------------

HOSTILE_UIDS = ["../../../escaped/x", "/somewhere/z", "1.2\\..\\..\\w", "1.2.3/../../y"]


async def upload_hostile(orthanc: OrthancProcess, sop: str, seed: int) -> tuple[str, bytes]:
    """An instance whose SOP Instance UID is a path, stored in Orthanc as it is."""
    from pydicom import config

    [ds] = make_ct_series(1, rows=16, columns=16, seed=seed, patient_id="PPATH")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        blob = encode(ds, ds.file_meta.TransferSyntaxUID)
    finally:
        config.settings.writing_validation_mode = mode
    [oid] = await asyncio.to_thread(orthanc.upload, [blob])
    return oid, blob


def tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


async def test_uids_that_are_paths_never_name_a_file(
        client: TestClient, orthanc: OrthancProcess, tmp_path: Path) -> None:
    before = tree(tmp_path)
    for i, sop in enumerate(HOSTILE_UIDS):
        oid, blob = await upload_hostile(orthanc, sop, seed=20 + i)
        for _ in range(2):  # a miss, then a hit: what Orthanc holds, verified
            resp = await client.get(f"/instances/{oid}/file")
            assert resp.status == 200 and await resp.read() == blob
        # As a URL's UID it is refused before anything is asked or written.
        for path in (f"/wado?requestType=WADO&objectUID={sop}&contentType=application/dicom",
                     f"/dicom-web/studies/1.2/series/1.2.3/instances/{sop}"):
            resp = await client.get(path)
            assert resp.status in (400, 404), (path, resp.status)
    cache = tmp_path / "cache"
    new = {p for p in tree(tmp_path) - before if not p.is_relative_to(cache)}
    assert not new, new  # nothing outside cache.directory
    assert not await asyncio.to_thread(os.path.exists, "/somewhere")
    for p in (cache / "objects").rglob("*"):
        assert p.is_dir() or (len(p.stem) == 32 and p.suffix == ".dcm"), p


# --- one spelling per path --------------------------------------------------------------------

@pytest.mark.parametrize("spelling", [
    "//instances/{oid}/file", "/instances//{oid}/file", "/instances/{oid}/file/",
    "//wado?requestType=WADO&objectUID={sop}&contentType=application/dicom",
    "//dicom-web/studies/{study}/series/{series}/instances/{sop}/metadata",
    "//modalities", "//peers/x/system", "//jobs", "/tools/reset/", "//tools/execute-script",
])
async def test_every_spelling_of_a_path_goes_where_the_canonical_one_goes(
        client: TestClient, orthanc: OrthancProcess, spelling: str) -> None:
    [ds] = make_ct_series(1, rows=16, columns=16, seed=30, patient_id="PSLASH")
    blob = encode(ds, ds.file_meta.TransferSyntaxUID)
    [oid] = await asyncio.to_thread(orthanc.upload, [blob])
    path = spelling.format(oid=oid, sop=ds.SOPInstanceUID, study=ds.StudyInstanceUID,
                           series=ds.SeriesInstanceUID)
    def url(p: str) -> URL:  # as sent, not normalised by the client
        return URL(f"http://{client.host}:{client.port}{p}", encoded=True)

    resp = await client.session.get(url(path), allow_redirects=False)
    assert resp.status == 308, (path, resp.status)
    location = resp.headers["Location"]
    assert "//" not in location and not location.split("?")[0].endswith("/")
    followed = await client.session.get(url(path))  # the canonical answer, and only it
    direct = await client.session.get(url(location))
    assert followed.status == direct.status
    assert await followed.read() == await direct.read()
    if "/file" in path or "wado" in path:
        assert followed.status == 200 and await followed.read() == blob
    if any(closed in path for closed in ("modalities", "peers", "jobs", "tools/")):
        assert followed.status == 403


async def test_an_empty_suffix_range_is_not_satisfiable(client: TestClient,
                                                         orthanc: OrthancProcess) -> None:
    [ds] = make_ct_series(1, rows=16, columns=16, seed=31, patient_id="PRANGE")
    blob = encode(ds, ds.file_meta.TransferSyntaxUID)
    [oid] = await asyncio.to_thread(orthanc.upload, [blob])
    for _ in range(2):  # from memory (the miss), then from the file
        resp = await client.get(f"/instances/{oid}/file", headers={"Range": "bytes=-0"})
        assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{len(blob)}"
    resp = await client.get(f"/instances/{oid}/file", headers={"Range": "bytes=-4"})
    assert resp.status == 206 and await resp.read() == blob[-4:]
