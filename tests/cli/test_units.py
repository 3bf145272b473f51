"""Every command prints sizes in binary units (KiB, MiB, GiB: powers of 1024, as ``df -h``
and the status page), never decimal "MB" figures beside binary ones."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from dicomcache.cli.main import main
from dicomcache.cli.prefetch import summary
from dicomcache.cli.relay import _print_status
from dicomcache.prefetch.scheduler import Tally

#: A decimal unit, or a size printed without its unit's "i".
DECIMAL = re.compile(r"\d (kB|KB|MB|GB|TB)\b")


def _relay_snapshot(spooled_bytes: int, queue_bytes: int) -> dict[str, object]:
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
            "recent_errors": []}},
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


@pytest.mark.parametrize(("nbytes", "elapsed", "size", "rate"), [
    (300 << 20, 10.0, "300.0 MiB in 10.0 s", "(30.0 MiB/s)"),
    (10**9, 2.0, "953.7 MiB in 2.0 s", "(476.8 MiB/s)"),
    (0, 0.0, "0 B in 0.0 s", "(0 B/s)"),
])
def test_prefetch_summary_prints_binary_units(nbytes: int, elapsed: float, size: str,
                                              rate: str) -> None:
    line = summary(2, Tally(total=4, fetched=3, present=1, bytes=nbytes), elapsed)
    assert line.startswith("prefetch: 2 studies, 4 instances: 3 fetched, 1 already cached")
    assert f"{size} {rate}" in line
    assert not DECIMAL.search(line)


@pytest.mark.parametrize(("configured", "printed"), [
    ('"2GiB"', "max 2.0 GiB"), ('"2GB"', "max 1.9 GiB"), ('"500MiB"', "max 500.0 MiB"),
    ("1073741824", "max 1.0 GiB"),
])
def test_check_config_prints_the_cache_bound_in_binary_units(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], configured: str,
        printed: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[upstream]\nurl = "http://pacs:8042"\n'
                   f'[cache]\ndirectory = "x"\nmax_size = {configured}\n')
    assert main(["check-config", "--config", str(cfg)]) == 0
    assert printed in capsys.readouterr().out
