"""systemd/dicomcache.service: valid for systemd, hardened, and agreeing with the config."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicomcache.config import AuditSettings, CacheSettings, RelaySettings

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "dicomcache.service"
ANALYZE = shutil.which("systemd-analyze")
INSTALLED = "/opt/dicomcache/.venv/bin/dicomcache"
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                   "(Debian package systemd)")


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def local_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's ``dicomcache`` (verify checks it)."""
    here = Path(sys.executable).parent / "dicomcache"
    assert here.exists(), here
    unit = tmp_path / "dicomcache.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(here)))
    return unit


def test_unit_is_hardened() -> None:
    d = directives()
    one = {k: v[-1] for k, v in d.items()}
    assert one["User"] == one["Group"] == "dicomcache"  # a dedicated system user
    assert one["CacheDirectory"] == "dicomcache" and one["StateDirectory"] == "dicomcache"
    assert one["ProtectSystem"] == "strict" and one["ProtectHome"] == "yes"
    assert one["PrivateTmp"] == "yes" and one["NoNewPrivileges"] == "yes"
    assert one["CapabilityBoundingSet"] == "" and one["AmbientCapabilities"] == ""
    assert one["Restart"] == "on-failure"
    assert one["RestartPreventExitStatus"] == "2"  # a configuration problem: no restart loop
    # reload = SIGHUP: certificates and the users file re-read, nothing else.
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["ExecStart"] == [f"{INSTALLED} serve --config /etc/dicomcache/config.toml"]
    assert d["ExecStartPre"][0].startswith(f"{INSTALLED} check-config --config ")
    # Where the unit lets it write is where the defaults put the cache and the spool.
    assert CacheSettings().directory == Path("/var/cache") / one["CacheDirectory"]
    assert Path("/var/lib") / one["StateDirectory"] in RelaySettings().spool_directory.parents
    # The audit trail: the default and the example config's file, in LogsDirectory= (0700).
    assert AuditSettings().file.parent == Path("/var/log") / one["LogsDirectory"]
    assert one["LogsDirectoryMode"] == "0700"
    # Patient data (cache, spool) for the service alone: systemd sets these modes at
    # every start, so the default 0755 would undo the package's 0700.
    assert one["CacheDirectoryMode"] == one["StateDirectoryMode"] == "0700"


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    assert ANALYZE is not None
    unit = local_copy(tmp_path)
    proc = subprocess.run([ANALYZE, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=120, check=False)
    # verify exits 0 on directives it ignores; it names them on stderr: none allowed.
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if unit.name in line or "dicomcache" in line]
    assert proc.returncode == 0 and complaints == [], proc.stdout + proc.stderr


@needs_analyze
def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt value is reported."""
    assert ANALYZE is not None
    unit = local_copy(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt"))
    proc = subprocess.run([ANALYZE, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert "ProtectSystem" in proc.stderr or "protect system" in proc.stderr.lower()


@needs_analyze
def test_security_exposure_is_low(tmp_path: Path) -> None:
    assert ANALYZE is not None
    unit = local_copy(tmp_path)
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=120, check=False)
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("this systemd-analyze has no offline security check (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    assert float(m.group(1)) <= 2.0, proc.stdout[-3000:]
