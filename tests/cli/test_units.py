"""Every command prints sizes in binary units (KiB, MiB, GiB: powers of 1024, as ``df -h``
and the status page), never decimal "MB" figures beside binary ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dicomcache.cli.main import main
from dicomcache.cli.prefetch import summary
from dicomcache.prefetch.scheduler import Tally

#: A decimal unit, or a size printed without its unit's "i".
DECIMAL = re.compile(r"\d (kB|KB|MB|GB|TB)\b")


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
