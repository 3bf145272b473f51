"""The forwarder process (relay/worker.py): started, restarted, stopped with the relay."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from dicomcache.config import DestinationSettings
from dicomcache.devtools.orthanc import free_port
from dicomcache.devtools.samples import make_ct_series, write_series
from tests.relay.conftest import (
    CountingSCP,
    needs_dcmtk,
    queue_depth,
    relay_settings,
    storescu,
    wait_until,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@needs_dcmtk
async def test_forwarder_process_is_restarted_after_a_crash(
        tmp_path: Path, relay_factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomcache.relay")
    scp = CountingSCP()
    try:
        r = await relay_factory(relay_settings(tmp_path / "spool", [scp.destination()]))
        assert r.relay.worker is not None
        first = r.relay.worker.pid
        assert first is not None and first != os.getpid()
        os.kill(first, signal.SIGKILL)  # our own child, by its PID
        await wait_until(lambda: r.relay.worker.pid not in (None, first), 30,
                         "a new forwarder process")
        assert "exited unexpectedly" in caplog.text
        files = write_series(make_ct_series(3, rows=16, columns=16, seed=8), tmp_path / "m")
        res = await asyncio.to_thread(storescu, files, r.port)
        assert res.returncode == 0, res.stderr
        await wait_until(lambda: len(scp.stored) == 3, 30, "delivery by the new process")
        await wait_until(lambda: queue_depth(r.relay, "COUNT") == 0, 10, "empty queue")
    finally:
        scp.stop()


async def test_relay_stop_ends_its_forwarder_process(tmp_path: Path, accelerate: bool) -> None:
    from dicomcache.metrics import Metrics
    from dicomcache.relay.service import Relay

    scp = CountingSCP()
    try:
        relay = Relay(relay_settings(tmp_path / "spool", [scp.destination()],
                                     accelerate=accelerate), Metrics())
        await relay.start()
        worker = relay.worker
        assert worker is not None and worker.pid is not None
        pid = worker.pid
        await relay.stop(5.0)
        assert worker.pid is None
        assert await asyncio.to_thread(_gone, pid)
    finally:
        scp.stop()


def _gone(pid: int) -> bool:
    """No such process, or a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_forwarder_process_that_cannot_start_fails_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from dicomcache.metrics import Metrics
    from dicomcache.relay.worker import ForwarderProcess

    dest = DestinationSettings(name="X", remote_ae_title="X", remote_host="127.0.0.1",
                               remote_port=free_port())
    worker = ForwarderProcess(relay_settings(tmp_path / "spool", [dest]), Metrics())
    monkeypatch.setattr(sys, "executable", "/bin/false")  # exits at once: never ready
    with pytest.raises(RuntimeError, match="did not start"):
        worker.start(timeout=20)
    assert worker.wait(5)
    assert worker.pid is None
