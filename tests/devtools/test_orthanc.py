"""dicomcache.devtools.orthanc: the Orthanc the tests and the demo start."""

from __future__ import annotations

import stat

from dicomcache.devtools.orthanc import OrthancProcess


def test_its_configuration_holding_the_password_is_private(orthanc: OrthancProcess) -> None:
    cfg = orthanc.workdir / "orthanc.json"
    assert orthanc.password in cfg.read_text()
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
