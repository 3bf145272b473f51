"""The spool's file system full at start-up or while the relay runs: the
relay starts, refuses new C-STOREs with 0xA700, loses nothing it acknowledged, delivers
what it holds, and takes C-STOREs again by itself once there is room.

Real peers: DCMTK storescu (the modality) and storescp (the PACS), the relay with its
forwarder child process, a real tmpfs as the spool's file system.  What reaches the PACS
is counted by a hash of each data set's content."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.relay.spool import RESERVE_NAME, Spool, info_from_bytes
from tests.conftest import fill_filesystem
from tests.relay.conftest import (
    content_hash,
    needs_dcmtk,
    received,
    relay_settings,
    sample,
    storescu,
    wait_until,
)

pytestmark = [
    needs_dcmtk,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _spooled_before(spool_dir: Path, files: list[Path], *, keep_reserve: bool) -> None:
    """A spool holding ``files`` for PACS, as a previous run of the relay left it."""
    spool = Spool(spool_dir, ["PACS"])
    spool.open()
    try:
        for f in files:
            data = f.read_bytes()
            spool.put(data, info_from_bytes(data), "MODALITY")
    finally:
        spool.close()
    if not keep_reserve:  # a spool written before the reserve existed
        (spool_dir / RESERVE_NAME).unlink(missing_ok=True)


async def test_starts_on_a_full_disk_refuses_then_resumes_by_itself(
        tmp_path: Path, small_fs: Path, storescp, relay_factory) -> None:
    pacs = storescp("all")
    series = write_series(make_ct_series(6, rows=64, columns=64, seed=171), tmp_path / "mod")
    spooled, late = series[:5], series[5]
    spool_dir = small_fs / "spool"
    await asyncio.to_thread(_spooled_before, spool_dir, spooled, keep_reserve=False)
    filler = await asyncio.to_thread(fill_filesystem, small_fs)

    # Before: Relay.start raised "disk I/O error" from the spool's recovery.
    r = await relay_factory(relay_settings(spool_dir, [pacs.destination("PACS")], min_free=0))
    await wait_until(lambda: r.relay.status().get("intake", {}).get("accepting") is False, 20,
                     "the intake status")
    assert "cannot be opened" in r.relay.status()["intake"]["refusing"]
    refused = await asyncio.to_thread(storescu, [late], r.port)
    assert refused.returncode != 0  # storescu: the C-STORE failed (the relay said 0xA700)
    assert sample(r.metrics, "dicomcache_relay_refused_total", reason="spool_unavailable") == 1
    assert sample(r.metrics, "dicomcache_relay_received_total", status="0xA700") == 1

    await asyncio.to_thread(filler.unlink)  # an operator makes room; nothing else is done
    await wait_until(lambda: r.relay.status()["intake"].get("accepting") is True, 30,
                     "C-STOREs taken again")
    sent = await asyncio.to_thread(storescu, [late], r.port)  # the modality sends it again
    assert sent.returncode == 0, sent.stderr
    want = Counter(content_hash(f.read_bytes()) for f in series)
    await wait_until(lambda: received(pacs.directory) == want, 60,
                     "every instance at the PACS exactly once")


async def test_the_reserve_lets_the_forwarder_drain_a_full_disk(
        tmp_path: Path, small_fs: Path, storescp, relay_factory) -> None:
    pacs = storescp("all")
    series = write_series(make_ct_series(6, rows=64, columns=64, seed=172), tmp_path / "mod")
    spooled, late = series[:5], series[5]
    spool_dir = small_fs / "spool"
    await asyncio.to_thread(_spooled_before, spool_dir, spooled, keep_reserve=True)
    assert (spool_dir / RESERVE_NAME).stat().st_size > 0
    filler = await asyncio.to_thread(fill_filesystem, small_fs)

    r = await relay_factory(relay_settings(spool_dir, [pacs.destination("PACS")], min_free=0))
    # The disk stays full: what the spool holds is delivered anyway (and leaves the spool).
    want_spooled = Counter(content_hash(f.read_bytes()) for f in spooled)
    await wait_until(lambda: received(pacs.directory) == want_spooled, 60,
                     "the spooled instances at the PACS while the disk is full")
    await wait_until(lambda: not list((spool_dir / "objects").iterdir()), 20,
                     "delivered files deleted")
    refused = await asyncio.to_thread(storescu, [late], r.port)
    assert refused.returncode != 0  # storescu: the C-STORE failed (the relay said 0xA700)
    assert sample(r.metrics, "dicomcache_relay_refused_total", reason="disk_full") == 1
    assert not r.relay.status()["intake"]["accepting"]

    await asyncio.to_thread(filler.unlink)
    await wait_until(lambda: r.relay.status()["intake"].get("accepting") is True, 30,
                     "C-STOREs taken again")
    assert (spool_dir / RESERVE_NAME).exists()  # set aside again
    sent = await asyncio.to_thread(storescu, [late], r.port)
    assert sent.returncode == 0, sent.stderr
    want = Counter(content_hash(f.read_bytes()) for f in series)
    await wait_until(lambda: received(pacs.directory) == want, 60,
                     "every instance at the PACS exactly once")

