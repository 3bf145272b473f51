"""dicomcache.http.middleware on the wire: request targets that are not paths."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.errors import (
    Cause,
    IntegrityError,
    NotFoundUpstream,
    UpstreamError,
    UpstreamUnavailable,
)
from dicomcache.http.app import make_app
from dicomcache.http.keys import DICOMWEB, METRICS
from dicomcache.http.middleware import failure_reason
from tests.conftest import Sample, SettingsFactory, eventually, metric_value


async def raw_request(port: int, target: str) -> str:
    """One request with exactly this request target (clients normalise theirs)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 "Connection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data.decode("latin-1")


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:{port}/instances/{id}/file",
    "http://attacker.example/instances/{id}/file",
    "https://127.0.0.1/patients",
])
async def test_an_absolute_form_target_is_a_400_not_a_redirect_or_a_500(
        aiohttp_client, make_settings: SettingsFactory, samples: dict[str, list[Sample]],
        target: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client = await aiohttp_client(make_app(make_settings()))
    port = client.server.port
    answer = await raw_request(port, target.format(port=port,
                                                   id=samples["explicit"][0].orthanc_id))
    assert answer.startswith("HTTP/1.1 400 ")
    assert "absolute-form" in answer and "Location" not in answer
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("fault", ["reset", "close_early"])
async def test_an_answer_cut_after_its_headers_is_one_log_line_not_a_traceback(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        samples: dict[str, list[Sample]], fault: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Orthanc's answer stops mid-body on a read-through: the viewer sees a broken
    connection (never a complete-looking short body), the log says so once."""
    caplog.set_level(logging.INFO)
    sample = samples["explicit"][1]
    wan.set_profile(LinkProfile(**{fault: 1.0}, fault_paths=r"/tags$"))
    client = await aiohttp_client(make_app(make_settings(url=f"http://127.0.0.1:{wan.port}")))
    for _ in range(3):
        resp = await client.get(f"/instances/{sample.orthanc_id}/tags")
        assert resp.status == 200  # the headers had gone out
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert wan.faults[fault] >= 3
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text
    cuts = [r for r in caplog.records if "aborted" in r.getMessage()]
    assert len(cuts) == 3 and all(r.levelname == "WARNING" for r in cuts)
    # Counted as failed requests (the viewer got no complete answer), not as successes.
    assert metric_value(client.app[METRICS], "dicomcache_http_failed_requests_total",
                        family="passthrough", reason="cut") == 3


async def test_x_cache_says_hit_miss_stale_or_pass(
        aiohttp_client, make_settings: SettingsFactory, orthanc,
        samples: dict[str, list[Sample]]) -> None:
    """What an operator checks with curl -I, as nginx's $upstream_cache_status."""
    client = await aiohttp_client(make_app(make_settings()))
    s = samples["explicit"][2]
    file = f"/instances/{s.orthanc_id}/file"
    wado = (f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
            f"&objectUID={s.sop}&contentType=application/dicom")
    got = [(await client.get(p)).headers.get("X-Cache") for p in (file, file, wado)]
    assert got == ["MISS", "HIT", "HIT"]
    tags = await client.get(f"/instances/{s.orthanc_id}/tags")  # read through
    assert tags.status == 200 and tags.headers["X-Cache"] == "PASS"
    assert "X-Cache" not in (await client.get("/healthz")).headers


async def test_x_cache_stale_while_orthanc_is_away(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        samples: dict[str, list[Sample]]) -> None:
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", dicomweb={"metadata_fresh": 0.05},
        upstream={"retries": 0, "breaker_failures": 0})))
    s = samples["explicit"][0]
    meta = f"/dicom-web/studies/{s.study}/series/{s.series}/metadata"
    first = await client.get(meta)
    assert first.status == 200 and first.headers["X-Cache"] == "MISS"
    # A first answer is confirmed in the background halfway through its freshness (fresh
    # again from then): once that is done, time passes beyond metadata_fresh.
    dw = client.app[DICOMWEB]
    await eventually(lambda: not dw.confirmations, what="the first answer confirmed")
    await asyncio.sleep(0.1)
    wan.set_down(True)
    stale = await client.get(meta)
    assert stale.status == 200 and stale.headers["X-Cache"] == "STALE"
    assert "Warning" in stale.headers


@pytest.mark.parametrize(("status", "outcome", "exc", "reason"), [
    (200, "hit", None, None),
    (200, "miss", None, None),
    (200, "passthrough", None, None),
    (304, "hit", None, None),
    (404, "error", NotFoundUpstream(404, "no such instance"), None),  # not a failure
    (400, "error", None, None),
    (401, None, None, None),
    (200, "aborted", None, None),   # the viewer went away: routine
    (200, "cut", None, "cut"),      # the answer was broken off: the viewer has nothing
    (502, "error", UpstreamError(Cause.RESET, "reset"), "upstream"),
    (504, "error", UpstreamError(Cause.TIMEOUT, "timeout"), "upstream"),
    (502, "error", UpstreamError(Cause.MD5_MISMATCH, "md5"), "corrupt"),
    (502, "error", IntegrityError(Cause.SHORT_BODY, "short"), "corrupt"),
    (503, "unavailable", UpstreamUnavailable(Cause.CIRCUIT_OPEN, "open", attempts=0),
     "unavailable"),
    (500, "passthrough", None, "upstream"),  # Orthanc's own 500, passed on
    (503, "passthrough", None, "upstream"),
    (503, "hit", None, "other"),    # e.g. the audit trail cannot be written
    (500, "error", None, "other"),  # an exception nobody handled
])
def test_failure_reason(status: int, outcome: str | None, exc: BaseException | None,
                        reason: str | None) -> None:
    assert failure_reason(status, outcome, exc) == reason
