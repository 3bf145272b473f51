"""``dicomcache relay drain`` before an upgrade: a real daemon (``serve`` or ``relay run``)
receiving from DCMTK storescu, a real storescp as the PACS, the command as an operator
runs it; what arrived is counted at the PACS by SOP Instance UID."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicomcache.devtools.orthanc import OrthancProcess, free_ports
from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.relay import drain
from dicomcache.relay.spool import Spool
from tests.relay.conftest import (
    StoreSCP,
    daemon_config,
    needs_dcmtk,
    pending,
    received,
    run_dicomcache,
    sop_uid,
    sop_uids,
    spool_row,
    start_dicomcache,
    stop_process,
    storescu,
    wait_until_sync,
)


def dcmtk(test: Callable[..., None]) -> Callable[..., None]:
    """A slow test driving DCMTK and dicomcache processes (blocking on purpose)."""
    for mark in (needs_dcmtk, pytest.mark.slow,
                 pytest.mark.blocking_allowed(reason="a synchronous test driving processes")):
        test = mark(test)
    return test


# --- the report (pure) -------------------------------------------------------------------
def _dest(depth: int = 0, quarantined: int = 0, **kw: Any) -> dict[str, Any]:
    return {"configured": True, "queue_depth": depth, "quarantined": quarantined,
            "backing_off_until": None, "last_error": None, "last_error_time": None,
            "last_success": None, **kw}


def _snap(time: float = 1000.0, **dests: dict[str, Any]) -> dict[str, Any]:
    return {"time": time, "destinations": dests}


@pytest.mark.parametrize(("before", "after", "arrived", "want"), [
    # everything delivered, two more arrived from associations open at the start
    (_snap(PACS=_dest(5)), _snap(PACS=_dest(0)), 2,
     [drain.DestinationReport("PACS", True, 5, 7, 0, 0, None)]),
    # one quarantined during the drain, one still backing off
    (_snap(PACS=_dest(5, quarantined=1)),
     _snap(PACS=_dest(1, quarantined=2, backing_off_until=1060.0, last_error="refused",
                      last_error_time=990.0)), 0,
     [drain.DestinationReport("PACS", True, 5, 3, 1, 1,
                              "backing off until 1970-01-01 00:17:40Z after: refused")]),
    # the last attempt failed and no back-off is pending (it ended at the deadline)
    (_snap(PACS=_dest(2)), _snap(PACS=_dest(2, last_error="connection refused",
                                            last_error_time=999.0, last_success=10.0)), 0,
     [drain.DestinationReport("PACS", True, 2, 0, 0, 2,
                              "last attempt failed: connection refused")]),
    # an error older than the last delivery is history, not why they wait
    (_snap(PACS=_dest(2)), _snap(PACS=_dest(1, last_error="old", last_error_time=5.0,
                                            last_success=10.0)), 0,
     [drain.DestinationReport("PACS", True, 2, 1, 0, 1, "not sent yet")]),
    # a destination no longer configured: what arrived is not queued for it
    (_snap(PACS=_dest(0), OLD=_dest(3, configured=False)),
     _snap(PACS=_dest(0), OLD=_dest(3, configured=False)), 4,
     [drain.DestinationReport("PACS", True, 0, 4, 0, 0, None),
      drain.DestinationReport(
          "OLD", False, 3, 0, 0, 3, "not configured: configure it again, or move what "
          "waits with `dicomcache relay reroute --from OLD --to NAME`")]),
    # an unconfigured destination with nothing left is not listed
    (_snap(PACS=_dest(0), OLD=_dest(0, configured=False)),
     _snap(PACS=_dest(0), OLD=_dest(0, configured=False)), 0,
     [drain.DestinationReport("PACS", True, 0, 0, 0, 0, None)]),
])
def test_report(before: dict[str, Any], after: dict[str, Any], arrived: int,
                want: list[drain.DestinationReport]) -> None:
    rows = drain.report(before, after, arrived)
    assert rows == want
    assert drain.exit_status(rows) == (1 if any(r.waiting for r in want) else 0)


def test_format_rows() -> None:
    rows = [drain.DestinationReport("PACS", True, 5, 5, 0, 0, None),
            drain.DestinationReport("ARCHIVE", True, 2, 0, 1, 1, "not sent yet")]
    assert drain.format_rows(rows) == [
        "PACS     delivered 5, quarantined 0, still waiting 0",
        "ARCHIVE  delivered 0, quarantined 1, still waiting 1: not sent yet"]


# --- the lock ---------------------------------------------------------------------------------
@pytest.mark.blocking_allowed(reason="flock on a temp file")
def test_a_running_relay_s_lock_keeps_a_drain_from_delivering_beside_it(tmp_path: Path
                                                                        ) -> None:
    running = drain.lock_running(tmp_path)
    try:
        assert drain.try_lock(tmp_path, exclusive=True) is None
        other = drain.try_lock(tmp_path, exclusive=False)  # two relays: allowed, as before
        assert other is not None
        drain.unlock(other)
    finally:
        drain.unlock(running)
    alone = drain.try_lock(tmp_path, exclusive=True)
    assert alone is not None
    assert drain.try_lock(tmp_path, exclusive=False) is None
    drain.unlock(alone)


# --- with real processes ------------------------------------------------------------------------
def _config(tmp_path: Path, relay_port: int, pacs_port: int,
            serve: tuple[int, OrthancProcess] | None = None) -> Path:
    return daemon_config(tmp_path, relay_port, pacs_port, name="dicomcache.toml",
                         backoff=(1, 2), serve=serve)


def _meta(spool: Path, key: str) -> dict[str, Any] | None:
    row = spool_row(spool, "SELECT value FROM meta WHERE key=?", key)
    return None if row is None else dict(json.loads(row[0]))


def _failed_once(spool: Path) -> bool:
    row = spool_row(spool, "SELECT failures FROM destinations WHERE name='PACS'")
    return row is not None and row[0] >= 1


def _rejected_transient(sent: subprocess.CompletedProcess[str]) -> bool:
    text = (sent.stdout + sent.stderr).lower()
    return sent.returncode != 0 and "transient" in text and "congestion" in text


@dcmtk
def test_drain_of_the_running_service_while_the_pacs_is_down_then_up(
        tmp_path: Path, orthanc: OrthancProcess, storescp: Callable[..., StoreSCP],
        processes: list[subprocess.Popen[bytes]]) -> None:
    """What the systemd unit runs: ``dicomcache serve`` with the relay on."""
    daemon = "serve"
    http_port, relay_port, pacs_port = free_ports(3)
    config = _config(tmp_path, relay_port, pacs_port, serve=(http_port, orthanc))
    spool = tmp_path / "spool"
    files = write_series(make_ct_series(6, rows=64, columns=64, seed=1801), tmp_path / "ct")
    late = write_series(make_ct_series(1, rows=64, columns=64, seed=1802), tmp_path / "late")
    processes.append(start_dicomcache([daemon, "--config", str(config)],
                                      tmp_path / "serve.log", relay_port))
    sent = storescu(files, relay_port)
    assert sent.returncode == 0, sent.stderr
    wait_until_sync(lambda: _failed_once(spool), 60, "the PACS found down")

    draining = start_dicomcache(["relay", "drain", "--config", str(config), "--timeout", "300"],
                                tmp_path / "drain.out")
    processes.append(draining)
    wait_until_sync(lambda: _meta(spool, drain.ANSWER) is not None, 60,
                    "the running relay answering the drain")
    refused = storescu(late, relay_port)
    assert _rejected_transient(refused), refused.stdout + refused.stderr
    assert draining.poll() is None  # it waits for the PACS

    pacs = storescp("all", port=pacs_port)  # the PACS is back
    assert draining.wait(timeout=240) == 0, (tmp_path / "drain.out").read_text()
    report = (tmp_path / "drain.out").read_text()
    assert "PACS  delivered 6, quarantined 0, still waiting 0" in report
    assert "Spool drained" in report
    # Nothing lost, nothing extra: every acknowledged instance at the PACS, the refused
    # one not (its modality keeps it and retries).
    assert set(received(pacs.directory, by=sop_uid)) == sop_uids(files)
    assert pending(spool) == 0
    # Until the service stops, modalities are still told to come back later.
    again = storescu(late, relay_port)
    assert _rejected_transient(again), again.stdout + again.stderr
    status = run_dicomcache("relay", "status", "--config", str(config))
    assert "draining" in status.stdout and status.returncode == 0, status.stdout

    # The upgrade: stop, start (the new version) — it takes associations again.
    stop_process(processes[0])
    assert processes[0].returncode == 0
    processes.append(start_dicomcache([daemon, "--config", str(config)],
                                      tmp_path / "serve.log", relay_port))
    taken = storescu(late, relay_port)
    assert taken.returncode == 0, taken.stdout + taken.stderr
    wait_until_sync(lambda: set(received(pacs.directory, by=sop_uid))
                    == sop_uids(files) | sop_uids(late),
                    60, "the instance sent after the upgrade at the PACS")



@dcmtk
def test_drain_timeout_reports_what_is_left_and_takes_associations_again(
        tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    relay_port, pacs_port = free_ports(2)  # nothing ever listens on pacs_port
    config = _config(tmp_path, relay_port, pacs_port)
    spool = tmp_path / "spool"
    files = write_series(make_ct_series(3, rows=64, columns=64, seed=1803), tmp_path / "ct")
    late = write_series(make_ct_series(1, rows=64, columns=64, seed=1804), tmp_path / "late")
    processes.append(start_dicomcache(["relay", "run", "--config", str(config)],
                                      tmp_path / "relay.log", relay_port))
    assert storescu(files, relay_port).returncode == 0

    done = run_dicomcache("relay", "drain", "--config", str(config), "--timeout", "8", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["relay"] == "running" and result["still_waiting"] == 3
    (pacs,) = result["destinations"]
    assert pacs["name"] == "PACS" and pacs["waiting"] == 3 and pacs["delivered"] == 0
    assert "Connection refused" in pacs["why"] or "connect" in pacs["why"].lower(), pacs
    assert pending(spool) == 3  # nothing dropped

    text = run_dicomcache("relay", "drain", "--config", str(config), "--timeout", "3")
    assert text.returncode == 1
    assert "NOT DRAINED: 3 instance(s) still wait" in text.stdout
    assert "The relay takes associations again" in text.stdout
    assert "What to do" in text.stdout
    # Stopped from outside (a script's `timeout`): withdrawn as well.
    last = (_meta(spool, drain.ANSWER) or {}).get("id")
    stopped = start_dicomcache(["relay", "drain", "--config", str(config)],
                               tmp_path / "drain.out")
    processes.append(stopped)
    wait_until_sync(lambda: (_meta(spool, drain.ANSWER) or {}).get("id") not in (None, last),
                    60, "the relay answering the new drain")
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=60) == 1
    assert "NOT DRAINED: 3 instance(s) still wait, interrupted" in \
        (tmp_path / "drain.out").read_text()
    assert _meta(spool, drain.REQUEST) is None
    # The relay takes associations again (it reads the withdrawn request within 2 s).
    wait_until_sync(lambda: storescu(late, relay_port).returncode == 0, 30,
                    "the relay taking associations after the failed drain")
    assert pending(spool) == 4



@dcmtk
def test_drain_with_the_service_stopped(tmp_path: Path, storescp: Callable[..., StoreSCP],
                                        processes: list[subprocess.Popen[bytes]]) -> None:
    relay_port, pacs_port = free_ports(2)
    config = _config(tmp_path, relay_port, pacs_port)
    spool = tmp_path / "spool"
    files = write_series(make_ct_series(4, rows=64, columns=64, seed=1805), tmp_path / "ct")
    relay = start_dicomcache(["relay", "run", "--config", str(config)],
                             tmp_path / "relay.log", relay_port)
    processes.append(relay)
    assert storescu(files, relay_port).returncode == 0
    stop_process(relay)  # systemctl stop dicomcache
    assert relay.returncode == 0 and pending(spool) == 4

    pacs = storescp("all", port=pacs_port)
    done = run_dicomcache("relay", "drain", "--config", str(config), "--timeout", "120")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "The relay was stopped" in done.stdout
    assert "PACS  delivered 4, quarantined 0, still waiting 0" in done.stdout
    assert Counter(received(pacs.directory, by=sop_uid)) == \
        Counter(dict.fromkeys(sop_uids(files), 1))
    assert pending(spool) == 0
    assert run_dicomcache("relay", "status", "--config", str(config)).returncode == 0
    # Every instance sent is in the audit trail, as the relay's own forwarding is.
    audit = (tmp_path / "audit" / "audit.jsonl").read_text()
    assert all(uid in audit for uid in sop_uids(files))



@dcmtk
def test_service_stopped_during_the_drain(tmp_path: Path, storescp: Callable[..., StoreSCP],
                                          processes: list[subprocess.Popen[bytes]]) -> None:
    """``systemctl stop`` while the drain waits: the command delivers the rest itself."""
    relay_port, pacs_port = free_ports(2)
    config = _config(tmp_path, relay_port, pacs_port)
    spool = tmp_path / "spool"
    files = write_series(make_ct_series(3, rows=64, columns=64, seed=1807), tmp_path / "ct")
    relay = start_dicomcache(["relay", "run", "--config", str(config)],
                             tmp_path / "relay.log", relay_port)
    processes.append(relay)
    assert storescu(files, relay_port).returncode == 0
    draining = start_dicomcache(["relay", "drain", "--config", str(config), "--timeout", "300"],
                                tmp_path / "drain.out")
    processes.append(draining)
    wait_until_sync(lambda: _meta(spool, drain.ANSWER) is not None, 60,
                    "the running relay answering the drain")
    stop_process(relay)
    assert relay.returncode == 0
    pacs = storescp("all", port=pacs_port)
    assert draining.wait(timeout=240) == 0, (tmp_path / "drain.out").read_text()
    report = (tmp_path / "drain.out").read_text()
    assert "The relay was stopped during the drain" in report
    assert "PACS  delivered 3, quarantined 0, still waiting 0" in report
    assert set(received(pacs.directory, by=sop_uid)) == sop_uids(files)
    assert pending(spool) == 0


@dcmtk
def test_cancel_takes_associations_again(tmp_path: Path,
                                         processes: list[subprocess.Popen[bytes]]) -> None:
    relay_port, pacs_port = free_ports(2)
    config = _config(tmp_path, relay_port, pacs_port)
    files = write_series(make_ct_series(1, rows=64, columns=64, seed=1806), tmp_path / "ct")
    processes.append(start_dicomcache(["relay", "run", "--config", str(config)],
                                      tmp_path / "relay.log", relay_port))
    done = run_dicomcache("relay", "drain", "--config", str(config), "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr  # nothing waited
    assert _rejected_transient(storescu(files, relay_port))
    cancelled = run_dicomcache("relay", "drain", "--cancel", "--config", str(config))
    assert cancelled.returncode == 0 and "drain cancelled" in cancelled.stdout
    wait_until_sync(lambda: storescu(files, relay_port).returncode == 0, 30,
                    "the relay taking associations after --cancel")



# --- refusals ------------------------------------------------------------------------------
@pytest.mark.blocking_allowed(reason="a synchronous test driving the command")
def test_an_older_relay_on_the_port_without_the_lock_is_not_drained_beside(tmp_path: Path
                                                                         ) -> None:
    """The first upgrade to a version with ``drain``: the old relay holds no lock, but
    listens; delivering beside it would send twice and refuse nothing."""
    (relay_port, pacs_port) = free_ports(2)
    config = _config(tmp_path, relay_port, pacs_port)
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    spool.close()
    with socket.create_server(("127.0.0.1", relay_port)):
        done = run_dicomcache("relay", "drain", "--config", str(config), "--timeout", "5")
    assert done.returncode == 2
    assert "a dicomcache older than this one runs" in done.stderr
    assert "systemctl stop dicomcache" in done.stderr


@pytest.mark.blocking_allowed(reason="a synchronous test driving the command")
@pytest.mark.parametrize("timeout", ["0", "-1", "90000", "nan"])
def test_bad_timeout(tmp_path: Path, timeout: str) -> None:
    config = _config(tmp_path, *free_ports(2))
    done = run_dicomcache("relay", "drain", "--config", str(config), "--timeout", timeout)
    assert done.returncode == 2
    assert "--timeout" in done.stderr


@pytest.mark.blocking_allowed(reason="a synchronous test driving the command")
def test_no_spool_is_nothing_to_drain(tmp_path: Path) -> None:
    config = _config(tmp_path, *free_ports(2))
    done = run_dicomcache("relay", "drain", "--config", str(config))
    assert done.returncode == 0 and "nothing to drain" in done.stdout


@pytest.mark.blocking_allowed(reason="a synchronous test driving the command")
def test_a_relay_that_does_not_answer_is_left_taking_associations(tmp_path: Path) -> None:
    """A process holds the relay's lock but never reads the request (wedged): the
    command gives up, exit 2, and withdraws its request."""
    config = _config(tmp_path, *free_ports(2))
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    spool.close()
    held = drain.lock_running(tmp_path / "spool")
    try:
        done = run_dicomcache("relay", "drain", "--config", str(config), "--timeout", "2")
    finally:
        drain.unlock(held)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "did not answer the drain request" in done.stderr
    assert _meta(tmp_path / "spool", drain.REQUEST) is None
