"""The spool on tmp_path: durable writes, file modes, recorded outcomes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom import syntaxes
from dicomcache.durable import FILE_MODE
from dicomcache.relay.outcome import DELIVERED, QUARANTINED, RETRY, Outcome
from dicomcache.relay.spool import InstanceInfo, Spool, Superseded, info_from_bytes


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


def test_a_study_backs_off_by_its_consecutive_failures(tmp_path: Path) -> None:
    now = [1000.0]
    spool = Spool(tmp_path / "spool", ["PACS"], clock=lambda: now[0])
    spool.open()
    try:
        data = encode(make_ct_series(1, rows=16, columns=16)[0], syntaxes.EXPLICIT_LE)
        info = info_from_bytes(data)
        spool.put(data, info)
        asked: list[int] = []

        def delay_for(failures: int) -> float:
            asked.append(failures)
            return 10.0 * failures

        assert spool.back_off_study("PACS", info.study_uid, delay_for) == 10.0
        assert spool.next_batch("PACS", 10) == []  # backing off
        assert spool.next_due("PACS") == 1010.0
        assert spool.back_off_study("PACS", info.study_uid, delay_for) == 20.0
        assert asked == [1, 2]
        spool.clear_study_backoff("PACS", info.study_uid)
        assert len(spool.next_batch("PACS", 10)) == 1
        spool.back_off_study("PACS", info.study_uid, delay_for)
        assert asked == [1, 2, 1]  # cleared: counting starts again
    finally:
        spool.close()


def test_a_file_the_relay_did_not_write_is_never_forwarded(tmp_path: Path) -> None:
    """A file in the spool's objects/ under a name the relay never gives (a crafted name,
    something else writing there) is not re-queued to the PACS at start: quarantined."""
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    [ds] = make_ct_series(1, rows=16, columns=16, seed=40)
    blob = encode(ds, syntaxes.EXPLICIT_LE)
    for name in ("x.dcm", "1.2.840.113619.dcm", "..dcm"):
        (spool.objects / name).write_bytes(blob)
    spool.close()
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    try:
        assert spool.next_batch("PACS", 10) == []
        assert list(spool.objects.iterdir()) == []
        assert len(list(spool.quarantine_dir.glob("*.dcm"))) == 3
    finally:
        spool.close()


def test_purge_delivered_removes_only_what_was_delivered(tmp_path: Path) -> None:
    """An operator's purge of a study leaves no delivered copy in the spool (kept for
    ``retention``), and never touches what still waits for a destination."""
    from dicomcache.relay.outcome import DELIVERED

    spool = Spool(tmp_path / "spool", ["PACS"], retention=3600.0)
    spool.open()
    try:
        datasets = [*make_ct_series(2, rows=16, columns=16, seed=71),
                    *make_ct_series(1, rows=16, columns=16, seed=72)]
        blobs = [encode(ds, syntaxes.EXPLICIT_LE) for ds in datasets]
        keys = [spool.put(b, info_from_bytes(b), "MODALITY") for b in blobs]
        spool.record("PACS", [Outcome(keys[0], DELIVERED, 0, "")])  # one of study A done
        study_a, study_b = str(datasets[0].StudyInstanceUID), str(datasets[2].StudyInstanceUID)
        files = sorted(spool.objects.iterdir())
        assert len(files) == 3  # the delivered one kept for retention
        assert spool.purge_delivered([study_b]) == 0  # nothing of B delivered
        assert spool.purge_delivered([study_a]) == 1
        left = {p.read_bytes() for p in spool.objects.iterdir()}
        assert left == {blobs[1], blobs[2]}  # the waiting ones stay
    finally:
        spool.close()


def _two_versions(study_uid: str | None = None) -> tuple[bytes, bytes]:
    """An instance as first sent, and its corrected re-send (same SOP Instance UID)."""
    ds = make_ct_series(1, rows=16, columns=16, seed=3)[0]
    first = encode(ds, syntaxes.EXPLICIT_LE)
    ds.PatientName = "Corrected^Name"
    ds.PixelData = bytes(reversed(ds.PixelData))
    if study_uid is not None:
        ds.StudyInstanceUID = study_uid
    return first, encode(ds, syntaxes.EXPLICIT_LE)


def test_a_corrected_resend_supersedes_the_copy_still_waiting(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", ["PACS", "ARCHIVE"])
    told: list[Superseded] = []
    spool.on_superseded = told.extend
    spool.open()
    try:
        first, corrected = _two_versions(study_uid="1.2.826.0.1.3680043.10.1234.99")
        old = spool.put(first, info_from_bytes(first), "MODALITY")
        new = spool.put(corrected, info_from_bytes(corrected), "MODALITY")
        for dest in ("PACS", "ARCHIVE"):
            [item] = spool.next_batch(dest, 10)  # the corrected copy only, in another study
            assert item.instance_id == new and item.path.read_bytes() == corrected
            spool.release(dest)
        assert {(t.destination, t.sop_instance) for t in told} == {
            (d, info_from_bytes(first).sop_instance) for d in ("PACS", "ARCHIVE")}
        snap = spool.snapshot()
        for dest in ("PACS", "ARCHIVE"):
            assert snap["destinations"][dest]["queue_depth"] == 1
            [note] = snap["destinations"][dest]["recent_errors"]
            assert note["message"].startswith("superseded: a newer copy of ")
        [(name,)] = spool.db.execute("SELECT name FROM instances WHERE id=?", (old,))
        assert (spool.objects / name).exists()
        spool.finish_superseded("PACS")
        spool.finish_superseded("ARCHIVE")
        assert not (spool.objects / name).exists()  # nothing waits for it any more
        assert spool.db.execute("SELECT 1 FROM instances WHERE id=?", (old,)).fetchone() is None
    finally:
        spool.close()


@pytest.mark.parametrize("outcome", [DELIVERED, RETRY, QUARANTINED])
def test_a_copy_in_flight_goes_before_the_newer_one_and_never_again(tmp_path: Path,
                                                                     outcome: str) -> None:
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    try:
        first, corrected = _two_versions()
        old = spool.put(first, info_from_bytes(first))
        [item] = spool.next_batch("PACS", 10)  # being sent…
        new = spool.put(corrected, info_from_bytes(corrected))  # …when the correction comes
        assert spool.next_batch("PACS", 10)[0].instance_id == new
        spool.release("PACS", [new])
        spool.finish_superseded("PACS")
        assert item.path.exists()  # still held by the batch in flight
        spool.record("PACS", [Outcome(old, outcome, 0xA700 if outcome != DELIVERED else 0,
                                      "peer said so")])
        spool.finish_superseded("PACS")
        assert not item.path.exists()
        assert not list(spool.quarantine_dir.iterdir())  # a newer copy replaces it
        [nxt] = spool.next_batch("PACS", 10)  # the newer copy, after it
        assert nxt.instance_id == new
    finally:
        spool.close()


def test_two_copies_found_at_start_up_send_only_the_newer(tmp_path: Path) -> None:
    """A destination added since (or files re-queued after a crash) never gets an older
    copy after a newer one."""
    first, corrected = _two_versions()
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    spool.put(first, info_from_bytes(first))
    spool.put(corrected, info_from_bytes(corrected))
    spool.close()
    spool = Spool(tmp_path / "spool", ["PACS", "NEW"])
    spool.open()
    try:
        for dest in ("PACS", "NEW"):
            [item] = spool.next_batch(dest, 10)
            assert item.path.read_bytes() == corrected
    finally:
        spool.close()


def test_an_instance_accepted_with_problems_is_recorded_with_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    try:
        info = InstanceInfo("1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4",
                            "1.2.840.10008.1.2.1", problems=("tags out of order", "short"))
        spool.put(b"data", info, "MODALITY")
        spool.quarantine_received(b"junk", "unparseable", 0xC000, "MODALITY", "1.2.3.5")
        snap = spool.snapshot(["PACS"])
    finally:
        spool.close()
    (warning,) = snap["recent_receive_warnings"]
    assert warning["sop_instance_uid"] == "1.2.3.4" and warning["status"] == "0x0000"
    assert warning["message"] == "accepted as received despite: tags out of order; short"
    assert [e["sop_instance_uid"] for e in snap["recent_receive_errors"]] == ["1.2.3.5"]
