"""What ``dicomcache relay status`` prints (pure: a spool snapshot in, text out)."""

from __future__ import annotations

import io
from typing import Any

import pytest

from dicomcache.cli.relay import _print_status
from tests.cli.test_units import DECIMAL


def _relay_snapshot(spooled_bytes: int = 0, queue_bytes: int = 0,
                    **destination: Any) -> dict[str, Any]:
    return {
        "spool_directory": "/var/lib/dicomcache/spool", "spooled_instances": 3,
        "spooled_bytes": spooled_bytes, "quarantine_files": 0, "time": 1000.0,
        "recent_receive_errors": [],
        "destinations": {"PACS": {
            "configured": True, "queue_depth": 3, "queue_bytes": queue_bytes,
            "oldest_received": 990.0, "oldest_age_seconds": 10.0, "quarantined": 0,
            "configured_strategy": "conservative", "learned_strategy": None,
            "learned_syntaxes": {}, "backing_off_until": None, "consecutive_failures": 0,
            "last_success": None, "last_error": None, "last_error_time": None,
            "recent_errors": [], **destination}},
    }


@pytest.mark.parametrize(("size", "printed"), [
    (3 << 20, "3.0 MiB"), (1_500_000, "1.4 MiB"), (512, "512 B"), (5 << 30, "5.0 GiB"),
])
def test_relay_status_prints_binary_units(size: int, printed: str) -> None:
    out = io.StringIO()
    _print_status(_relay_snapshot(size, size), out)
    text = out.getvalue()
    assert f"{printed} not yet delivered everywhere" in text
    assert f"queue depth       3 ({printed})" in text
    assert not DECIMAL.search(text)


@pytest.mark.parametrize(("last_success", "last_error_time", "recovered"), [
    (990.0, 960.0, True),    # delivered since the error: past
    (950.0, 960.0, False),   # failing since the last delivery: current
    (None, 960.0, False),    # never delivered
])
def test_an_error_before_the_last_delivery_is_shown_as_past(
        last_success: float | None, last_error_time: float, recovered: bool) -> None:
    out = io.StringIO()
    _print_status(_relay_snapshot(last_success=last_success, last_error="refused",
                                  last_error_time=last_error_time), out)
    line = next(x for x in out.getvalue().splitlines() if "last error" in x)
    assert line.endswith("refused (recovered: delivered since)" if recovered else "refused")


def test_relay_status_lists_instances_accepted_with_problems() -> None:
    snap = _relay_snapshot()
    snap["recent_receive_warnings"] = [{
        "time": 990.0, "sop_instance_uid": "1.2.3.4", "status": "0x0000",
        "message": "accepted as received despite: tags out of order"}]
    out = io.StringIO()
    _print_status(snap, out)
    text = out.getvalue()
    assert "accepted with problems (stored and forwarded as received)" in text
    assert "1.2.3.4 accepted as received despite: tags out of order" in text


def test_relay_status_lists_what_was_learned_per_class_and_syntax() -> None:
    """Learned strategies are kept per (SOP class, source syntax) and re-probed: the
    operator sees each one, by name, with when the configured strategy is tried again."""
    out = io.StringIO()
    _print_status(_relay_snapshot(learned_by_class=[{
        "sop_class": "1.2.840.10008.5.1.4.1.1.2", "transfer_syntax": "1.2.840.10008.1.2.1",
        "strategy": "conservative", "since": 990.0, "batches": 3}]), out)
    line = next(x for x in out.getvalue().splitlines() if "learned for" in x)
    assert "CT Image Storage in Explicit VR Little Endian: conservative since" in line
    assert "3 batches" in line and "after 1 h or 20 batches" in line
