"""The OHIF data source documented in docs/dicomweb.md, replayed against dicomcache.

No OHIF or browser runs in this suite, so the requests OHIF 3.13 makes with the
documented configuration are replayed: its searches, the series metadata and the
frames, with the ``Accept`` headers its DICOMweb client builds (the frame's with or
without quotes, from ``omitQuotationForMultipartRequest``), from another origin.
Each must be one a browser sends without a CORS preflight (the Fetch standard's
CORS-safelisted request headers) and be answered with that origin allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from dicomcache.dicom import multipart
from dicomcache.http.app import make_app
from tests.conftest import Sample, SettingsFactory

DOC = Path(__file__).resolve().parents[2] / "docs" / "dicomweb.md"
ORIGIN = "https://ohif.clinic.example"

#: Bytes that make a request header need a preflight (Fetch: CORS-unsafe request-header byte).
_UNSAFE = set(b'"():<>?@[\\]{}\x7f') | (set(range(0x20)) - {0x09})


def safelisted(name: str, value: str) -> bool:
    """Whether a script may send this header cross-origin without a preflight (Fetch,
    "CORS-safelisted request-header"; only the names OHIF's requests carry)."""
    raw = value.encode("latin-1")
    if len(raw) > 128:
        return False
    if name.lower() == "accept":
        return not any(b in _UNSAFE for b in raw)
    return False  # Authorization and every other name OHIF could add need one


def documented_config() -> dict[str, object]:
    """The ``configuration`` of the data source in docs/dicomweb.md's OHIF block."""
    text = DOC.read_text()
    section = text[text.index("## OHIF"):]
    block = section[section.index("```js"):section.index("```", section.index("```js") + 5)]
    body = block[block.index("configuration: {"):]
    config: dict[str, object] = {}
    for key, value in re.findall(r"^\s*(\w+): ([^,\n]+),", body, re.MULTILINE):
        config[key] = {"true": True, "false": False}.get(value, value.strip("'"))
    return config


def frame_accept(config: dict[str, object]) -> str:
    """The ``Accept`` of OHIF's frame requests (dicomweb-client's, as OHIF configures it)."""
    if config.get("omitQuotationForMultipartRequest") is True:
        return "multipart/related; type=application/octet-stream; transfer-syntax=*"
    return 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def test_the_documented_settings() -> None:
    config = documented_config()
    assert config["omitQuotationForMultipartRequest"] is True
    assert config["imageRendering"] == config["thumbnailRendering"] == "wadors"
    assert config["qidoSupportsIncludeField"] is False
    assert config["dicomUploadEnabled"] is False
    for root in ("qidoRoot", "wadoRoot"):
        assert urlsplit(str(config[root])).path == "/dicom-web"
    assert urlsplit(str(config["wadoUriRoot"])).path == "/wado"
    # Why the setting matters: OHIF's default quotes make every frame need a preflight.
    assert safelisted("Accept", frame_accept(config))
    assert not safelisted("Accept", frame_accept({}))
    assert not safelisted("Authorization", "Bearer x")


@pytest.mark.parametrize("accept_frames", ["documented", "quoted"])
async def test_ohif_requests_from_another_origin_need_no_preflight(
        aiohttp_client, make_settings: SettingsFactory, ct_series: list[Sample],
        accept_frames: str) -> None:
    """OHIF's open sequence with the documented settings: every request is sent as a
    browser would send it cross-origin without asking first, and every answer lets
    that origin read it.  (The quoted ``Accept`` is served too, after its preflight.)"""
    config = documented_config()
    client = await aiohttp_client(make_app(make_settings(cors={"allowed_origins": [ORIGIN]})))
    s = ct_series[len(ct_series) // 2]
    root = urlsplit(str(config["wadoRoot"])).path
    json_accept = "application/dicom+json"
    frame = frame_accept(config if accept_frames == "documented" else {})
    requests = [
        (f"{root}/studies?StudyInstanceUID={s.study}", json_accept),
        (f"{root}/studies/{s.study}/series", json_accept),
        (f"{root}/studies/{s.study}/series/{s.series}/metadata", json_accept),
        (f"{root}/studies/{s.study}/series/{s.series}/instances/{s.sop}/frames/1", frame),
    ]
    for path, accept in requests:
        assert safelisted("Accept", accept) is (accept_frames == "documented" or
                                                accept == json_accept), accept
        if not safelisted("Accept", accept):  # the browser asks first; dicomcache agrees
            resp = await client.options(path, headers={
                "Origin": ORIGIN, "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "accept"})
            assert resp.status == 204
        resp = await client.get(path, headers={"Origin": ORIGIN, "Accept": accept})
        assert resp.status == 200, (path, await resp.text())
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        body = await resp.read()
        if path.endswith("/frames/1"):
            (part,) = multipart.split(body, resp.headers["Content-Type"])
            assert s.data.endswith(part.body)
