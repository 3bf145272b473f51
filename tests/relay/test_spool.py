"""The spool on tmp_path: durable writes, file modes, recorded outcomes."""

from __future__ import annotations

import stat
from pathlib import Path

from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom import syntaxes
from dicomcache.durable import FILE_MODE
from dicomcache.relay.outcome import QUARANTINED, Outcome
from dicomcache.relay.spool import Spool, info_from_bytes


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_spooled_and_quarantined_files_hold_patient_data_with_file_mode(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    try:
        data = encode(make_ct_series(1, rows=16, columns=16)[0], syntaxes.EXPLICIT_LE)
        key = spool.put(data, info_from_bytes(data), "MODALITY")
        [item] = spool.next_batch("PACS", 10)
        assert item.path.read_bytes() == data
        assert _mode(item.path) == FILE_MODE
        assert not list(spool.incoming.iterdir())  # the temp file was renamed
        rejected = spool.quarantine_received(b"junk", "unparseable", 0xC000, "MODALITY")
        assert rejected is not None and _mode(rejected) == FILE_MODE
        spool.record("PACS", [Outcome(key, QUARANTINED, 0xA900, "refused")])
        kept = sorted(spool.quarantine_dir.iterdir())
        assert len(kept) == 4  # two data sets, two reasons
        assert all(_mode(p) == FILE_MODE for p in kept)
    finally:
        spool.close()
