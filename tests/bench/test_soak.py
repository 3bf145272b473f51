"""``bench/soak.py --short`` (45 s): viewers, prefetch, 5 % faults and a restart, in CI.

The soak's own verdict is the assertion: no viewer got a wrong body, at most 1 %
of answers failed outside the restart, descriptors did not grow after it.  The
figures (RSS, descriptors, link bytes per viewer byte) are printed for the log.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dicomcache.devtools.orthanc import loopback_env

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_holds_up() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--short"],
                         capture_output=True, text=True, cwd=ROOT, env=loopback_env(),
                         stdin=subprocess.DEVNULL, timeout=300, check=False)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "wrong bodies 0" in out.stdout
    assert "refused while restarting" in out.stdout
