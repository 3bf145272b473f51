"""Health, readiness, the status page (in a real headless Chromium) and the metrics port."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

import dicomcache.relay.service  # noqa: F401 - imported here, not lazily on the loop
from dicomcache.cli.serve import build_app
from dicomcache.devtools.orthanc import OrthancProcess, free_port
from dicomcache.devtools.wanem import LinkProfile, WanEmulator
from dicomcache.http import status
from dicomcache.http.app import make_app
from dicomcache.http.keys import METRICS, RELAY, STORE
from dicomcache.http.status import render
from tests.conftest import Sample, SettingsFactory, eventually, metric_value, serve_config

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator) -> TestClient:
    return await aiohttp_client(make_app(make_settings(url=f"http://127.0.0.1:{wan.port}")))


async def test_healthz(client: TestClient) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_readyz_follows_the_upstream(client: TestClient, wan: WanEmulator,
                                           caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="dicomcache.upstream.client")
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200, body
    assert body["ready"] is True
    assert body["store"]["ok"] is True and body["store"]["free_bytes"] > 0
    assert body["upstream"]["state"] == "up"
    assert metric_value(client.app[METRICS], "dicomcache_upstream_up") == 1

    # Without traffic the state is re-probed once it is PROBE_EVERY old: make that short.
    monkeypatch.setattr(status, "PROBE_EVERY", 0.3)
    wan.set_down(True)
    answers: list[int] = []
    bodies: list[dict[str, Any]] = []

    async def down_three_times() -> bool:
        resp = await client.get("/readyz")
        answers.append(resp.status)
        bodies.append(await resp.json())
        return len(answers) > 3 and answers[-3:] == [503] * 3

    await eventually(down_three_times, timeout=10, interval=0.25, what="/readyz 503 three times")
    body = bodies[-1]
    assert answers[-3:] == [503] * 3, answers
    assert body["ready"] is False and body["upstream"]["state"] == "down"
    assert "GET /system" in body["upstream"]["detail"]
    assert metric_value(client.app[METRICS], "dicomcache_upstream_up") == 0

    wan.set_down(False)

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await eventually(ready, timeout=10, interval=0.25, what="/readyz 200 again")
    assert (await client.get("/readyz")).status == 200
    changes = [r.getMessage() for r in caplog.records if r.name == "dicomcache.upstream.client"]
    # One line per change, however many probes and readiness checks saw it.
    assert len([m for m in changes if "DOWN" in m]) == 1, changes
    assert len([m for m in changes if "UP again" in m]) == 1, changes


async def test_readyz_stays_ready_and_says_when_the_store_cannot_write(
        client: TestClient) -> None:
    """It still serves (verified, uncached): ready, with the cache degraded and why; the
    periodic re-check (run here at once) notices, and notices the repair."""
    store = client.app[STORE].sync
    tmp_dir = store.tmp_dir
    shutil.rmtree(tmp_dir)
    tmp_dir.write_text("not a directory")  # the store's temp writes now fail
    try:
        await asyncio.to_thread(store.recheck)
        resp = await client.get("/readyz")
        body = await resp.json()
        assert resp.status == 200 and body["ready"] is True
        assert body["store"]["ok"] is False and body["store"]["degraded"] == "missing"
        assert body["store"]["status"].startswith("cache degraded: missing: ")
        assert "Not a directory" in body["store"]["detail"]
        assert body["upstream"]["state"] == "up"
    finally:
        tmp_dir.unlink()
        tmp_dir.mkdir()
    await asyncio.to_thread(store.recheck)
    body = await (await client.get("/readyz")).json()
    assert body["store"]["ok"] is True and body["store"]["status"] == "caching"


async def test_request_failures_mark_the_upstream_down_once(
        client: TestClient, wan: WanEmulator, ct_series: list[Sample],
        caplog: pytest.LogCaptureFixture) -> None:
    """Real traffic, not only probes, moves the state; 404s and corrupt bodies do not."""
    caplog.set_level(logging.INFO, logger="dicomcache.upstream.client")
    await client.get("/readyz")
    s = ct_series[0]
    assert (await client.get("/instances/ffffffff-ffffffff-ffffffff-ffffffff-ffffffff/file")
            ).status == 404
    wan.set_profile(LinkProfile(corrupt=1.0, fault_paths=r"/file$"))
    assert (await client.get(f"/instances/{s.orthanc_id}/file")).status == 502
    assert client.app[METRICS].upstream_state is True
    wan.set_profile(LinkProfile(status_503=1.0, fault_paths=r"/file$"))
    for _ in range(2):
        assert (await client.get(f"/instances/{s.orthanc_id}/file")).status == 502
    assert client.app[METRICS].upstream_state is False
    wan.set_profile(LinkProfile())
    assert (await client.get(f"/instances/{s.orthanc_id}/file")).status == 200
    assert client.app[METRICS].upstream_state is True
    messages = [r.getMessage() for r in caplog.records if r.name == "dicomcache.upstream.client"]
    assert [m.split(" is ")[1].split(":")[0] for m in messages
            if "DOWN" in m or "UP again" in m] == ["DOWN", "UP again"]
    down = next(r for r in caplog.records if "DOWN" in r.getMessage())
    assert down.levelname == "ERROR" and "503" in down.getMessage()


async def test_status_page_is_plain_html(client: TestClient) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    page = await resp.text()
    for section in ("upstream", "cache", "integrity", "relay"):
        assert f'id="{section}"' in page
    # No build step, no external assets: nothing is loaded from anywhere.
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|url\(|@import", page, re.I)
    assert 'id="relay-state" class="badge disabled">DISABLED' in page
    data = await (await client.get("/status.json")).json()
    assert data["relay"] == {"enabled": False}
    assert data["cache"]["hit_ratio"] is None


def test_render_escapes_and_shows_learned_strategies() -> None:
    snap = {
        "version": "x", "time": 1000.0, "started": 900.0,
        "upstream": {"url": "http://o:8042", "state": "down", "since": 990.0, "checked": 995.0,
                     "detail": "<b>boom</b>", "failures": {"timeout": 3}, "retries": 2,
                     "fetched_bytes": 0},
        "cache": {"entries": 1, "size_bytes": 95, "max_bytes": 100, "evictions": 0,
                  "pinned_studies": 0, "hits": 3, "misses": 1, "hit_ratio": 0.75,
                  "by_family": {"orthanc": {"hits": 3, "misses": 1}}, "served_bytes": 10,
                  "write_failures": 4, "last_write_failure": {
                      "time": 998.0, "instance": "x", "reason": "cache disk full: <full>"},
                  "coalesced": 0, "prefetch_queue": 0,
                  "coherence": {"confirm_interval": 1.0, "revalidate_after": 86400.0,
                                "active_series": 2, "confirmed_series": 2,
                                "unconfirmed_since": 990.0,
                                "unconfirmed_reason": "connect: <refused>",
                                "purged": {"deleted_upstream": 3, "replaced": 0,
                                           "operator": 0},
                                "unconfirmed_served": 7, "feed_gaps": 1}},
        "integrity": {"total": {}, "recent": []},
        "relay": {"enabled": True, "ae_title": "DICOMCACHE", "listening": "127.0.0.1:11112",
                  "forwarders": {"pacs": {"busy": True}},
                  "destinations": {"pacs": {
                      "queue_depth": 7, "oldest_age_seconds": 42.0,
                      "configured_strategy": "standard", "learned_strategy": "conservative",
                      "learned_syntaxes": {"1.2.840.10008.5.1.4.1.1.2": ["1.2.840.10008.1.2"]},
                      "quarantined": 1, "last_success": 950.0, "last_error": "refused",
                      "last_error_time": 960.0}}},
    }
    page = render(snap)
    assert "&lt;b&gt;boom&lt;/b&gt;" in page and "<b>boom</b>" not in page
    assert "75.0%" in page and 'class="crit"' in page  # 95 % full
    assert "conservative" in page and "Implicit VR Little Endian" in page
    assert "CT Image Storage" in page and "(sending)" in page
    assert "4 instances since start, served uncached" in page
    assert "cache disk full: &lt;full&gt;" in page
    assert "UNCONFIRMED" in page and "connect: &lt;refused&gt;" in page
    assert "deleted_upstream 3" in page and "1 change-feed gap" in page


@pytest.mark.parametrize("key", ["admin_port", "metrics_port"])  # metrics_port: earlier name
async def test_status_and_metrics_on_the_admin_port(
        aiohttp_client, make_settings: SettingsFactory, key: str) -> None:
    port = free_port()
    client = await aiohttp_client(make_app(make_settings(server={key: port})))
    for path in ("/metrics", "/", "/status.json"):
        resp = await client.get(path)
        assert resp.status == 404, path  # not read through to Orthanc either
        assert "admin port" in (await resp.json())["reason"]
    assert (await client.get("/healthz")).status == 200  # load balancers still see it

    def scrape(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()

    status, text = await asyncio.to_thread(scrape, "/metrics")
    assert status == 200 and "dicomcache_cache_hits_total" in text
    status, text = await asyncio.to_thread(scrape, "/readyz")
    assert status == 200 and '"ready": true' in text
    status, text = await asyncio.to_thread(scrape, "/")
    assert status == 200 and "<h1>dicomcache</h1>" in text
    status, text = await asyncio.to_thread(scrape, "/status.json")
    assert status == 200 and '"cache"' in text
    await client.close()
    with pytest.raises(OSError):  # the site stops with the app
        await asyncio.to_thread(scrape, "/healthz")


async def _chromium(*args: str, timeout: float = 90.0) -> bytes:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(apt-get install chromium); the page is still tested as HTML above")
async def test_status_page_in_headless_chromium(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        ct_series: list[Sample], tmp_path: Path) -> None:
    settings = make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"compression": "json"},  # MD5 named
        relay={"enabled": True, "port": free_port(), "spool_directory": str(tmp_path / "spool"),
               "destinations": [{"name": "pacs", "remote_ae_title": "PACS",
                                 "remote_host": "127.0.0.1", "remote_port": free_port(),
                                 "transfer_syntax_strategy": "standard"}]})
    client = await aiohttp_client(build_app(settings))  # the daemon's app: relay wired in
    good, bad = ct_series[1], ct_series[3]
    for _ in range(3):  # one miss, two hits
        assert (await client.get(f"/instances/{good.orthanc_id}/file")).status == 200
    wan.set_profile(LinkProfile(truncate_lying=1.0, fault_paths=re.escape(bad.orthanc_id)
                                + "/file$"))
    assert (await client.get(f"/instances/{bad.orthanc_id}/file")).status == 502
    wan.set_profile(LinkProfile())
    # What the relay learned about a peer is shown as soon as its state is refreshed.
    relay = client.app[RELAY]
    await asyncio.to_thread(
        relay.spool.update_destination,  # type: ignore[attr-defined]
        "pacs", configured_strategy="standard", learned_strategy="conservative",
        learned_syntaxes={"1.2.840.10008.5.1.4.1.1.2": ["1.2.840.10008.1.2"]})

    async def learned_shown() -> bool:
        data = await (await client.get("/status.json")).json()
        return bool(data["relay"]["destinations"]["pacs"]["learned_strategy"])

    await eventually(learned_shown, interval=0.1, what="the learned strategy in /status.json")

    url = f"http://127.0.0.1:{client.port}/"
    dom = (await _chromium(f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url)
           ).decode()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status.png"
    shot.unlink(missing_ok=True)
    await _chromium(f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}",
                    "--window-size=1200,900", "--hide-scrollbars", url)

    assert "<title>dicomcache status</title>" in dom
    assert re.search(r'id="upstream-state" class="badge up">UP<', dom)
    assert re.search(r'id="hit-ratio">66.7%<', dom)  # 2 hits of 3
    assert "md5_mismatch" in dom and f"instance {bad.orthanc_id}" in dom
    assert 'id="relay-state" class="badge up">RUNNING<' in dom
    assert "pacs" in dom and "conservative" in dom and "Implicit VR Little Endian" in dom
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_json_log_lines_from_a_running_daemon(
        tmp_path: Path, orthanc: OrthancProcess, wan: WanEmulator,
        ct_series: list[Sample]) -> None:
    """``server.log_format = "json"``: one JSON object per line, one line per event."""
    port = free_port()
    # Prefetch off (serve_config's default): no background traffic racing the faults below;
    # the change feed as the daemon has it.  Compression "json": bodies as stored, so a
    # corrupted one fails its MD5.
    cfg = serve_config(tmp_path / "dicomcache.toml", port, f"http://127.0.0.1:{wan.port}",
                       orthanc, changes=None, server={"log_format": "json"},
                       upstream={"compression": "json", "retries": 1, "backoff_base": 0.01,
                                 "backoff_max": 0.02, "connect_timeout": 2,
                                 "read_timeout": 5},
                       cache={"max_size": "1GiB"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dicomcache", "serve", "--config", str(cfg),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async def get(path: str) -> int:
                async with http.get(base + path) as resp:
                    await resp.read()
                    return resp.status

            async def ready() -> bool:
                try:
                    return await get("/readyz") == 200
                except aiohttp.ClientError:  # not listening yet
                    return False

            await eventually(ready, timeout=20, interval=0.1, what="the daemon ready")
            good, bad, later = ct_series[0], ct_series[2], ct_series[4]
            assert await get(f"/instances/{good.orthanc_id}/file") == 200
            wan.set_profile(LinkProfile(corrupt=1.0,
                                        fault_paths=re.escape(bad.orthanc_id) + "/file$"))
            assert await get(f"/instances/{bad.orthanc_id}/file") == 502
            wan.set_profile(LinkProfile())
            wan.set_down(True)
            assert await get(f"/instances/{later.orthanc_id}/file") in (502, 503)
            wan.set_down(False)

            async def served() -> bool:
                return await get(f"/instances/{later.orthanc_id}/file") == 200

            # the circuit breaker may hold misses back for a moment
            await eventually(served, timeout=20, interval=0.2, what="the miss served again")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-3000:]
    records = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    messages = [r["message"] for r in records]

    def having(*words: str) -> list[dict[str, str]]:
        return [r for r in records if all(w in r["message"] for w in words)]

    assert having("listening on", base)  # the start-up summary
    assert having("is reachable")
    integrity = having("integrity check failed", bad.orthanc_id, "md5_mismatch")
    assert len(integrity) == 2 and integrity[0]["level"] == "WARNING"  # 1 + 1 retry
    down, up = having(" is DOWN"), having(" is UP again")
    assert len(down) == 1 and down[0]["level"] == "ERROR", messages
    assert len(up) == 1, messages
    assert messages[-1] == "dicomcache stopped"


# --- honest numbers ----------------------------------------------------------------------
JSON = {"Accept": "application/dicom+json"}


async def test_hit_ratio_counts_instance_requests_only_and_failures_apart(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        samples: dict[str, list[Sample]]) -> None:
    """A search or a metadata request is no instance miss; failed requests are counted
    and shown (a page saying "83 %" while viewers' requests fail would mislead)."""
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"retries": 0, "breaker_failures": 2})))
    s, t = samples["explicit"][0], samples["explicit"][1]
    for _ in range(2):  # a miss, then a hit
        assert (await client.get(f"/instances/{s.orthanc_id}/file")).status == 200
    for path in (f"/dicom-web/studies?StudyInstanceUID={s.study}",
                 f"/dicom-web/studies/{s.study}/series/{s.series}/metadata"):
        for _ in range(2):  # from Orthanc, then from memory
            assert (await client.get(path, headers=JSON)).status == 200
    wan.set_down(True)
    failed = [(await client.get(f"/instances/{t.orthanc_id}/file")).status for _ in range(4)]
    assert all(code in (502, 503, 504) for code in failed), failed
    assert 503 in failed  # the breaker opened: failing fast is a failure too

    data = await (await client.get("/status.json")).json()
    cache = data["cache"]
    assert (cache["hits"], cache["misses"], cache["hit_ratio"]) == (1, 1, 0.5)
    assert cache["by_family"]["dicomweb"] == {"hits": 0, "misses": 0}
    assert cache["answers"] == {"hit": 2, "miss": 2, "stale": 0}
    requests = data["requests"]
    assert requests["failed"] == 4
    assert requests["failed_by_reason"] == {
        "upstream": failed.count(502) + failed.count(504), "unavailable": failed.count(503)}
    m = client.app[METRICS]
    assert metric_value(m, "dicomcache_cache_misses_total", family="dicomweb") == 0
    assert metric_value(m, "dicomcache_http_failed_requests_total", family="orthanc",
                        reason="unavailable") == failed.count(503)

    page = await (await client.get("/")).text()
    assert re.search(r'id="hit-ratio">50.0%</span> of instance requests \(1 hit, 1 miss', page)
    assert re.search(r'id="failed-requests" class="bad">4</span> since start', page)
    assert "metadata and searches" in page and "2 from memory, 2 from Orthanc" in page


async def test_a_recovered_upstream_error_is_shown_as_past(
        aiohttp_client, make_settings: SettingsFactory, wan: WanEmulator,
        samples: dict[str, list[Sample]]) -> None:
    client = await aiohttp_client(make_app(make_settings(
        url=f"http://127.0.0.1:{wan.port}", upstream={"retries": 0, "breaker_failures": 0})))
    s, t = samples["explicit"][2], samples["explicit"][0]
    wan.set_down(True)
    assert (await client.get(f"/instances/{s.orthanc_id}/file")).status == 502
    page = await (await client.get("/")).text()
    assert 'class="badge down">DOWN' in page
    assert re.search(r'<dt>last error</dt><dd class="bad">[^<]*GET /instances/', page)

    wan.set_down(False)
    assert (await client.get(f"/instances/{t.orthanc_id}/file")).status == 200
    data = await (await client.get("/status.json")).json()
    upstream = data["upstream"]
    assert upstream["state"] == "up" and upstream["detail"] == ""
    assert "GET /instances/" in upstream["last_error"]["detail"]
    assert upstream["last_error"]["time"] <= upstream["since"]
    page = await (await client.get("/")).text()
    section = re.search(r'<section id="upstream">.*?</section>', page)
    assert section is not None
    assert re.search(r'<dt>last error</dt><dd id="upstream-last-error" class="muted">'
                     r'<span[^>]*>\d+ s ago</span>, recovered since <span[^>]*>\d+ s ago'
                     r'</span>: [^<]*GET /instances/', section.group(0)), section.group(0)
    assert 'class="bad"' not in section.group(0)


def _relay_snap(last_success: float | None, last_error_time: float) -> dict[str, Any]:
    return {"enabled": True, "ae_title": "DICOMCACHE", "listening": "127.0.0.1:11112",
            "forwarders": {}, "destinations": {"pacs": {
                "queue_depth": 0, "oldest_age_seconds": None, "configured_strategy": "standard",
                "learned_strategy": None, "learned_syntaxes": {}, "quarantined": 0,
                "last_success": last_success, "last_error": "refused",
                "last_error_time": last_error_time}}}


@pytest.mark.parametrize(("last_success", "last_error_time", "recovered"), [
    (990.0, 960.0, True),    # delivered since the error: past
    (950.0, 960.0, False),   # failing since the last delivery: current
    (None, 960.0, False),    # never delivered
])
def test_a_relay_destination_error_before_its_last_delivery_is_shown_as_past(
        last_success: float | None, last_error_time: float, recovered: bool) -> None:
    html_ = status._render_relay(_relay_snap(last_success, last_error_time), 1000.0)
    if recovered:
        assert '<span class="muted">refused</span>' in html_ and "recovered" in html_
        assert 'class="bad"' not in html_
    else:
        assert '<span class="bad">refused</span>' in html_ and "recovered" not in html_
