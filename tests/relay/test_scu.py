"""The C-STORE SCU against real peers, with and without relay/accel/."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.relay.outcome import DELIVERED
from dicomcache.relay.scu import SendItem, StoreSCU
from tests.relay.conftest import needs_dcmtk

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@needs_dcmtk
def test_a_peer_that_stops_reading_fails_the_send_instead_of_hanging(
        tmp_path: Path, storescp: Callable[..., Any], accelerate: bool) -> None:
    """pynetdicom leaves a requestor's socket without a timeout: a PACS that stops
    reading mid-instance must cost the network timeout, not hold the forwarder."""
    pacs = storescp("all")
    assert pacs.proc is not None
    series = make_ct_series(2, rows=4096, columns=4096, seed=7)  # 32 MiB each: more than
    files = write_series(series, tmp_path / "src")              # loopback's buffers hold
    items = [SendItem(i, f, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                      str(ds.file_meta.TransferSyntaxUID))
             for i, (f, ds) in enumerate(zip(files, series, strict=True))]

    def freeze_after_first(result: Any) -> None:
        os.kill(pacs.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]

    scu = StoreSCU("RELAY", pacs.destination("P"), timeout=2.0)
    started = time.monotonic()
    try:
        report = scu.send(items, on_result=freeze_after_first)
    finally:
        os.kill(pacs.proc.pid, signal.SIGCONT)
    assert time.monotonic() - started < 30
    assert [r.outcome for r in report.results] == [DELIVERED, "retry"]
