"""Metrics of what a C-STORE's status does not show: an instance accepted with problems
(acknowledged 0x0000, so counted in received_total{status="0x0000"} too) and an older
copy superseded by a newer one before it was sent. Real storescu, a destination down."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dicomcache.config import DestinationSettings
from dicomcache.devtools.orthanc import free_port
from dicomcache.devtools.samples import make_ct_series, write_series
from tests.relay.conftest import needs_dcmtk, relay_settings, sample, storescu, wait_until

pytestmark = [
    needs_dcmtk,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


async def test_accepted_with_problems_and_superseded_are_counted(tmp_path: Path,
                                                                 relay_factory) -> None:
    down = DestinationSettings(name="DOWN", remote_ae_title="PACS", remote_host="127.0.0.1",
                               remote_port=free_port())  # nothing listens: copies wait
    r = await relay_factory(relay_settings(tmp_path / "spool", [down]))
    [ds] = make_ct_series(1, rows=16, columns=16, seed=5)
    [first] = write_series([ds], tmp_path / "first")
    res = await asyncio.to_thread(storescu, [first], r.port)
    assert res.returncode == 0, res.stderr
    assert sample(r.metrics, "dicomcache_relay_received_with_problems_total") == 0
    # A corrected re-send of the same SOP Instance, this time a CT without Pixel Data
    # (stored as received with a warning, as storescp and Orthanc do).
    del ds.PixelData
    ds.PatientName = "CORRECTED^NAME"
    [second] = write_series([ds], tmp_path / "second")
    res = await asyncio.to_thread(storescu, [second], r.port)
    assert res.returncode == 0, res.stderr
    assert sample(r.metrics, "dicomcache_relay_received_total", status="0x0000") == 2
    assert sample(r.metrics, "dicomcache_relay_received_with_problems_total") == 1
    await wait_until(lambda: sample(r.metrics, "dicomcache_relay_superseded_total",
                                    destination="DOWN") == 1, 10, "the superseded copy counted")
