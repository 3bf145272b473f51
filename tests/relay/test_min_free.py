"""``relay.min_free``: new C-STOREs refused (0xA700) before the spool's file system is
full; the sender sees the failure, nothing acknowledged is lost (counted at a real
storescp by content), and `relay status` / the status page say so."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from dicomcache.config import DestinationSettings
from dicomcache.devtools.orthanc import free_port
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.relay.spool import Spool
from tests.relay.conftest import (
    content_hash,
    needs_dcmtk,
    received,
    relay_settings,
    sample,
    storescu,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@needs_dcmtk
@pytest.mark.slow
async def test_min_free_refuses_before_the_disk_is_full(
        tmp_path: Path, small_fs: Path, storescp, relay_factory) -> None:
    """``relay.min_free``: instances past it are refused (the modality sees a failure),
    the disk never fills, and nothing acknowledged is lost."""
    pacs_port = free_port()  # the PACS is down at first: the spool grows
    dest = DestinationSettings(name="PACS", remote_ae_title="PACS", remote_host="127.0.0.1",
                               remote_port=pacs_port)
    spool_dir = small_fs / "spool"
    r = await relay_factory(relay_settings(spool_dir, [dest], min_free=5 << 20))
    free_at_start = await asyncio.to_thread(r.relay.spool.free_bytes)
    assert free_at_start is not None and free_at_start > (6 << 20)
    files = write_series(make_ct_series(6, rows=512, columns=512, seed=173), tmp_path / "mod")
    acked: list[Path] = []
    refused: list[Path] = []
    for f in files:  # one association per file: which ones the modality saw fail
        res = await asyncio.to_thread(storescu, [f], r.port)
        (acked if res.returncode == 0 else refused).append(f)
    assert acked and refused, (acked, refused)
    assert acked == files[:len(acked)]  # refused from the first that would pass min_free on
    assert sample(r.metrics, "dicomcache_relay_refused_total", reason="min_free") == len(refused)
    free_now = await asyncio.to_thread(r.relay.spool.free_bytes)
    assert free_now is not None and free_now >= 5 << 20
    await wait_until(lambda: r.relay.status().get("intake", {}).get("accepting") is False, 20,
                     "the status page says C-STOREs are refused")
    assert "relay.min_free is 5.0 MiB" in r.relay.status()["intake"]["refusing"]

    pacs = storescp("all", port=pacs_port)
    want = Counter(content_hash(f.read_bytes()) for f in acked)
    await wait_until(lambda: received(pacs.directory) == want, 60,
                     "every acknowledged instance at the PACS exactly once")
    await wait_until(lambda: r.relay.status()["intake"].get("accepting") is True, 30,
                     "C-STOREs taken again once delivered files left the spool")
    for f in refused:  # the modality sends them again
        res = await asyncio.to_thread(storescu, [f], r.port)
        assert res.returncode == 0, res.stderr
    want = Counter(content_hash(f.read_bytes()) for f in files)
    await wait_until(lambda: received(pacs.directory) == want, 60,
                     "every instance at the PACS exactly once")


def test_relay_status_says_when_c_stores_are_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    spool.close()
    cfg = tmp_path / "c.toml"
    base = textwrap.dedent(f"""
        [upstream]
        url = "http://127.0.0.1:9"
        [cache]
        directory = "{tmp_path / 'cache'}"
        [relay]
        enabled = true
        spool_directory = "{tmp_path / 'spool'}"
        """)

    def status(min_free: str) -> str:
        cfg.write_text(base + f'min_free = "{min_free}"\n')
        done = subprocess.run([sys.executable, "-m", "dicomcache", "relay", "status",
                               "--config", str(cfg)], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "intake            taking C-STOREs" in status("1MB")
    refusing = status("1000TiB")
    assert "intake            REFUSING new C-STOREs (0xA700): " in refusing
    assert "relay.min_free is 1000.0 TiB" in refusing


async def test_status_page_says_when_c_stores_are_refused(
        aiohttp_client, make_settings, tmp_path: Path) -> None:
    from dicomcache.cli.serve import build_app
    from tests.conftest import eventually

    settings = make_settings(relay={"enabled": True, "port": free_port(), "min_free": "1000TiB",
                                    "spool_directory": str(tmp_path / "spool")})
    client = await aiohttp_client(build_app(settings))

    async def intake() -> dict:
        data = await (await client.get("/status.json")).json()
        return data["relay"].get("intake") or {}

    got = await eventually(intake, interval=0.1, what="the relay's intake in /status.json")
    assert got["accepting"] is False and got["min_free"] == 1000 << 40
    assert "relay.min_free is 1000.0 TiB" in got["refusing"]
    page = await (await client.get("/")).text()
    assert 'id="relay-intake"><span class="badge down">REFUSING</span>' in page
    assert "new C-STOREs answered 0xA700" in page
