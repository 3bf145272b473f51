"""No secret ever leaves: whatever the link to Orthanc does (every fault the fault
injector knows, a wrong password, an Orthanc that is gone), the Orthanc account's
password and its ``Authorization`` value appear in no answer to a viewer (body or
header), no status page or status JSON, no ``/readyz``, no metric and no log line."""

from __future__ import annotations

import base64
import logging

import pytest

from dicomcache.devtools.orthanc import OrthancProcess, free_port
from dicomcache.devtools.wanem import FAULT_KINDS, LinkProfile, WanEmulator
from dicomcache.http.app import make_app
from tests.conftest import Sample, SettingsFactory


def _secrets(user: str, password: str) -> tuple[str, ...]:
    return (password, base64.b64encode(f"{user}:{password}".encode()).decode())


async def _everything(client, samples: dict[str, list[Sample]]) -> list[str]:  # type: ignore[no-untyped-def]
    s = samples["explicit"][0]
    paths = [f"/instances/{s.orthanc_id}/file",
             f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
             f"&objectUID={s.sop}&contentType=application/dicom",
             f"/dicom-web/studies/{s.study}/series/{s.series}/metadata",
             "/dicom-web/studies?PatientID=PEXPLICIT",
             f"/dicom-web/studies/{s.study}/series/{s.series}/instances/{s.sop}/frames/1",
             f"/series/{samples['explicit'][0].orthanc_id}",  # a read-through
             "/readyz", "/status.json", "/", "/metrics"]
    seen = []
    for path in paths:
        resp = await client.get(path, allow_redirects=False)
        body = await resp.read()
        seen.append(f"{path} {resp.status} {dict(resp.headers)} "
                    f"{body.decode('latin-1')}")
    return seen


@pytest.mark.parametrize("fault", FAULT_KINDS)
async def test_no_fault_of_the_link_shows_the_orthanc_credentials(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        orthanc: OrthancProcess, samples: dict[str, list[Sample]], fault: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wan.set_profile(LinkProfile(**{fault: 1.0}, stall_seconds=0.5, stall_close=True))
    settings = make_settings(url=f"http://127.0.0.1:{wan.port}",
                             upstream={"retries": 1, "read_timeout": 1})
    client = await aiohttp_client(make_app(settings))
    seen = await _everything(client, samples)
    text = "\n".join(seen) + caplog.text
    assert any(" 50" in line for line in seen)  # the fault did reach the viewer
    assert [x for x in _secrets(orthanc.username, orthanc.password) if x in text] == []


async def test_a_wrong_password_or_a_vanished_orthanc_shows_no_credential(
        aiohttp_client, make_settings: SettingsFactory, orthanc: OrthancProcess,
        samples: dict[str, list[Sample]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Not-The-Pa55word-but-Secret-Too"
    for url in (orthanc.url, f"http://127.0.0.1:{free_port()}"):
        settings = make_settings(url=url, upstream={"password": wrong, "retries": 0})
        client = await aiohttp_client(make_app(settings))
        seen = await _everything(client, samples)
        await client.close()
        text = "\n".join(seen) + caplog.text
        assert any(" 50" in line or " 401" in line for line in seen)
        assert [x for x in _secrets(orthanc.username, wrong) if x in text] == []
