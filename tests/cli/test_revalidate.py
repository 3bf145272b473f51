"""``dicomcache revalidate`` against a real Orthanc: what Orthanc deleted or holds other
content for is purged; bodies are never downloaded to find out."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomcache.cache.store import Store
from dicomcache.cli.main import main
from dicomcache.config import load
from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import encode, make_ct_series


def test_revalidate_purges_what_orthanc_deleted_or_changed(
        tmp_path: Path, orthanc: OrthancProcess, capsys: pytest.CaptureFixture[str]) -> None:
    datasets = make_ct_series(3, rows=16, columns=16, seed=91, patient_id="PREVAL",
                              study_uid=generate_uid(), series_uid=generate_uid())
    oids = orthanc.upload([encode(d, d.file_meta.TransferSyntaxUID) for d in datasets])
    cfg = tmp_path / "dicomcache.toml"
    cfg.write_text(f'[upstream]\nurl = "{orthanc.url}"\nusername = "{orthanc.username}"\n'
                   f'password = "{orthanc.password}"\n'
                   f'[cache]\ndirectory = "{tmp_path / "cache"}"\n')
    study = str(datasets[0].StudyInstanceUID)
    assert main(["prefetch", "--config", str(cfg), "--study", study, "--no-progress"]) == 0
    orthanc.request("DELETE", f"/instances/{oids[0]}")
    rescan = copy.deepcopy(datasets[1])
    rescan.ImageComments = "RE-SCANNED"
    orthanc.request("DELETE", f"/instances/{oids[1]}")
    assert orthanc.upload([encode(rescan, rescan.file_meta.TransferSyntaxUID)]) == [oids[1]]
    capsys.readouterr()
    code = main(["revalidate", "--config", str(cfg), "--study", study])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "revalidated 3 instance(s) in 1 series: 1 as in Orthanc, 1 deleted there, " \
           "1 changed there" in out
    store = Store(load(cfg).cache.directory, 1 << 30)
    try:
        assert [e.orthanc_id for e in store.entries()] == [oids[2]]
    finally:
        store.close()
    # Orthanc unreachable: said, exit status 1, nothing purged.
    cfg.write_text(cfg.read_text().replace(orthanc.url, "http://127.0.0.1:9"))
    assert main(["revalidate", "--config", str(cfg), "--all"]) == 1
    assert "could not be asked" in capsys.readouterr().out
