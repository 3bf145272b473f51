"""The admin CLI on a populated store: stats, pin/unpin, purge, verify (with a rotted file)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path

import pytest
from aiohttp import web

from dicomcache.cache.instance import Instance
from dicomcache.cache.store import Store
from dicomcache.cli.admin import parse_duration
from dicomcache.cli.main import main
from dicomcache.config import load
from dicomcache.devtools.orthanc import OrthancProcess, free_port
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.devtools.wanem import WanEmulator
from dicomcache.dicom.verify import parse_dicom
from dicomcache.http.app import make_app
from tests.conftest import Sample


def commit(store: Store, blob: bytes) -> Instance:
    """Commit ``blob``: its entry (what it would be, if evicted at once)."""
    body = Instance.verified(parse_dicom(blob), hashlib.md5(blob).hexdigest(), blob)
    return store.commit(store.write_temp(blob), body) or body


def study(n: int, seed: int, rows: int = 128) -> list[bytes]:
    return [encode(ds, ds.file_meta.TransferSyntaxUID)
            for ds in make_ct_series(n, rows=rows, columns=512, seed=seed)]


def write_config(tmp_path: Path, *, port: int | None = None, max_size: str = "1GiB",
                 upstream: str = "http://127.0.0.1:9", extra: str = "") -> Path:
    cfg = tmp_path / "dicomcache.toml"
    cfg.write_text(f"""
[server]
port = {port or free_port()}
[upstream]
url = "{upstream}"
{extra}
[cache]
directory = "{tmp_path / 'cache'}"
max_size = "{max_size}"
[audit]
file = "{tmp_path / 'audit' / 'audit.jsonl'}"
[prefetch]
mode = "off"
""")
    return cfg


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def populated(tmp_path: Path) -> tuple[Path, list[Instance], list[Instance]]:
    """A config and its store holding two studies (4 and 3 instances)."""
    cfg = write_config(tmp_path)
    store = Store(load(cfg).cache.directory, 1 << 30)
    a = [commit(store, b) for b in study(4, seed=11)]
    b = [commit(store, b) for b in study(3, seed=12)]
    store.close()
    assert len({e.study_uid for e in a}) == 1 and a[0].study_uid != b[0].study_uid
    return cfg, a, b


def test_parse_duration() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("12h") == 43200 and parse_duration("1.5m") == 90
    assert parse_duration("2w") == 14 * 86400 and parse_duration("10s") == 10
    for bad in ("30", "d", "-1d", "3y"):
        with pytest.raises(Exception, match="not a duration"):
            parse_duration(bad)


def test_stats(populated: tuple[Path, list[Instance], list[Instance]],
               capsys: pytest.CaptureFixture[str]) -> None:
    cfg, a, b = populated
    code, out, _ = run(capsys, "stats", "--config", str(cfg), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["entries"] == 7 and data["studies"] == 2
    assert data["hit_ratio"] is None and data["daemon"] is None  # no daemon running
    top = data["top_studies"]
    assert [t["study_uid"] for t in top] == [a[0].study_uid, b[0].study_uid]
    assert top[0]["instances"] == 4 and top[0]["size_bytes"] == sum(e.size for e in a)
    code, out, _ = run(capsys, "stats", "--config", str(cfg))
    assert code == 0
    assert "7 instance(s) in 2 study(ies)" in out
    assert "hit ratio   n/a" in out and a[0].study_uid in out


def test_pin_unpin_and_purge(populated: tuple[Path, list[Instance], list[Instance]],
                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg, a, b = populated
    uid = a[0].study_uid
    assert uid is not None
    code, out, _ = run(capsys, "pin", uid, "--config", str(cfg))
    assert code == 0 and out.startswith("pinned: study") and "4 instance(s)" in out
    code, out, _ = run(capsys, "pin", uid, "--config", str(cfg))
    assert out.startswith("already pinned")
    assert json.loads(run(capsys, "stats", "-c", str(cfg), "--json")[1])["pinned_studies"] == [uid]
    code, _, err = run_exit(capsys, "pin", "1.2.x", "--config", str(cfg))
    assert code == 2 and "not a DICOM UID" in err

    code, out, _ = run(capsys, "purge", "--older-than", "1d", "--config", str(cfg))
    assert code == 0 and out.startswith("purged 0 instance(s)")  # everything is fresh
    code, out, _ = run(capsys, "purge", "--all", "--dry-run", "--config", str(cfg))
    assert out.startswith("would purge 3 instance(s)") and "4 instance(s) of pinned" in out
    code, out, err = run(capsys, "purge", "--all", "--progress", "--config", str(cfg))
    assert code == 0 and out.startswith("purged 3 instance(s)")
    assert "purge [" in err and "100%" in err
    assert all(not e.path.exists() for e in b) and all(e.path.exists() for e in a)

    code, out, _ = run(capsys, "unpin", uid, "--config", str(cfg))
    assert out.startswith("unpinned")
    code, out, _ = run(capsys, "unpin", uid, "--config", str(cfg))
    assert out.startswith("was not pinned")
    code, out, _ = run(capsys, "purge", "--study", uid, "--config", str(cfg))
    assert out.startswith("purged 4 instance(s)")
    store = Store(load(cfg).cache.directory, 1 << 30)
    assert store.stats()["entries"] == 0 and list(store.entries()) == []
    store.close()


def run_exit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Like run() for argument errors, which argparse reports by exiting."""
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_verify_quarantines_a_bit_flipped_entry(
        populated: tuple[Path, list[Instance], list[Instance]],
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg, a, b = populated
    code, out, err = run(capsys, "verify", "--config", str(cfg), "--progress")
    assert code == 0, out
    assert "verified 7 instance(s)" in out and "7 intact, 0 quarantined" in out
    assert "verify [" in err and "7/7" in err

    # A disk can rot: flip one bit in the middle of a stored file (pixel data).
    rotten = b[1]
    data = bytearray(rotten.path.read_bytes())
    data[len(data) // 2] ^= 0x10
    rotten.path.write_bytes(bytes(data))
    # And lose another file altogether.
    a[2].path.unlink()

    code, out, err = run(capsys, "verify", "--config", str(cfg), "--no-progress")
    assert code == 1
    assert err == ""  # no progress bar asked for
    assert f"BAD md5_mismatch {rotten.sop_uid} (study {rotten.study_uid})" in out
    assert f"MISSING {a[2].sop_uid}" in out
    assert "5 intact, 1 quarantined (md5_mismatch 1), 1 missing" in out
    quarantined = Path(load(cfg).cache.directory) / "quarantine" / rotten.path.name
    assert quarantined.read_bytes() == bytes(data)  # kept for inspection, not deleted
    note = json.loads(quarantined.with_suffix(".json").read_text())
    assert note["cause"] == "md5_mismatch" and note["sop_uid"] == rotten.sop_uid
    assert note["md5"] in note["reason"]

    store = Store(load(cfg).cache.directory, 1 << 30)
    assert store.get(rotten.orthanc_id) is None and store.get(a[2].orthanc_id) is None
    assert store.stats()["entries"] == 5
    store.close()
    code, out, _ = run(capsys, "verify", "--config", str(cfg))
    assert code == 0 and "5 intact, 0 quarantined, 0 missing" in out
    assert "quarantine  1 file(s)" in run(capsys, "stats", "--config", str(cfg))[1]


def test_admin_without_a_cache_or_with_a_bad_config(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    code, _, err = run(capsys, "stats", "--config", str(cfg))
    assert code == 1 and "no cache at" in err
    assert not (tmp_path / "cache").exists()  # looking does not create one
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache]\nmax_sise = 1\n")
    code, _, err = run(capsys, "verify", "--config", str(bad))
    assert code == 2 and "cache.max_sise" in err


def test_pinned_studies_are_skipped_by_eviction(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    # 256 KiB instances, so the sqlite file is small beside them
    blobs_a, blobs_b = study(3, seed=21, rows=256), study(6, seed=22, rows=256)
    size = len(blobs_a[0])
    store = Store(tmp_path, 5 * size + (256 << 10))  # ~5 instances plus the sqlite file
    pinned = [commit(store, blob) for blob in blobs_a]
    # Pinned through another Store on the same directory, as the CLI does next to a daemon.
    other = Store(tmp_path, 5 * size + (256 << 10))
    assert other.pin(pinned[0].study_uid or "")
    other.close()
    assert store.pinned().keys() == {pinned[0].study_uid}
    time.sleep(0.01)  # time passing: what is committed next is used later than the pinned
    others = []
    for blob in blobs_b:
        others.append(commit(store, blob))
        time.sleep(0.01)  # time passing, distinct access times: LRU order is the commit order
    # The pinned study (the least recently used) stays; the oldest unpinned went, one by one.
    assert all(store.get(e.orthanc_id) is not None for e in pinned)
    present = [store.get(e.orthanc_id) is not None for e in others]
    assert present == [False] * 4 + [True] * 2, present
    assert store.evictions == 4
    assert store.peek(others[0].orthanc_id) is None  # the hot map forgot the evicted

    # Only pinned entries left and still over the bound: stay over, say so once.
    caplog.set_level(logging.WARNING, logger="dicomcache.cache.store")
    store.max_size = 2 * size
    for blob in blobs_b[:2]:
        commit(store, blob)
    assert all(store.get(e.orthanc_id) is not None for e in pinned)
    warnings = [r for r in caplog.records if "pinned study" in r.getMessage()]
    assert len(warnings) == 1
    assert store.unpin(pinned[0].study_uid or "")
    commit(store, blobs_b[2])
    assert store.stats()["size_bytes"] <= 2 * size
    store.close()


def test_remove_entries_keeps_the_hot_map_consistent(tmp_path: Path) -> None:
    store = Store(tmp_path, 1 << 30)
    entries = [commit(store, blob) for blob in study(3, seed=31)]
    assert store.peek(entries[0].orthanc_id) is not None
    assert store.purge(entries[:2]) == (2, entries[0].size + entries[1].size)
    assert store.peek(entries[0].orthanc_id) is None and store.get(entries[0].orthanc_id) is None
    assert store.peek(entries[2].orthanc_id) is not None
    assert store.purge(entries[:2]) == (0, 0)  # already gone: nothing to do
    store.close()


async def test_stats_reads_the_running_daemons_hit_ratio(
        tmp_path: Path, orthanc: OrthancProcess, wan: WanEmulator, ct_series: list[Sample],
        capsys: pytest.CaptureFixture[str]) -> None:
    """The ratio is over instance requests only (a search or metadata is not an instance
    miss), and failed viewer requests are a figure of their own."""
    port = free_port()
    cfg = write_config(tmp_path, port=port, upstream=f"http://127.0.0.1:{wan.port}",
                       extra=f'username = "{orthanc.username}"\n'
                             f'password = "{orthanc.password}"\nretries = 0')
    runner = web.AppRunner(make_app(await asyncio.to_thread(load, cfg)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    base = f"http://127.0.0.1:{port}"
    s = ct_series[4]
    try:
        import aiohttp
        async with aiohttp.ClientSession() as http:
            for _ in range(4):  # one miss, three hits
                async with http.get(f"{base}/instances/{s.orthanc_id}/file") as resp:
                    assert resp.status == 200
            for path in (f"/dicom-web/studies?StudyInstanceUID={s.study}",
                         f"/dicom-web/studies/{s.study}/series/{s.series}/metadata"):
                async with http.get(base + path,
                                    headers={"Accept": "application/dicom+json"}) as resp:
                    assert resp.status == 200
            wan.set_down(True)
            async with http.get(f"{base}/instances/{ct_series[5].orthanc_id}/file") as resp:
                assert resp.status == 502
        # The CLI blocks (urllib): run it off the loop that serves the daemon.
        code = await asyncio.to_thread(main, ["stats", "--config", str(cfg)])
        out = capsys.readouterr().out
        assert code == 0
        assert ("hit ratio   75.0% of instance requests (3 hits, 1 misses since the daemon "
                "started)") in out
        assert "failed      1 viewer request(s) since the daemon started (upstream 1)" in out
        assert "1 instance(s) in 1 study(ies)" in out
        code = await asyncio.to_thread(main, ["stats", "--config", str(cfg), "--json"])
        data = json.loads(capsys.readouterr().out)
        assert (data["hits"], data["misses"], data["failed_requests"]) == (3, 1, 1)
    finally:
        await runner.cleanup()


def test_purge_by_patient_or_instance_leaves_no_copy_behind(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A purge removes the files, their quarantined copies, the DICOMweb metadata kept on
    disk and the relay's delivered copies of those studies; other patients keep theirs."""
    from dicomcache.config import load as load_config
    from dicomcache.dicomweb.answers import Cached, DiskCopies
    from dicomcache.relay.outcome import DELIVERED, Outcome
    from dicomcache.relay.spool import Spool, info_from_bytes

    spool_dir = tmp_path / "spool"
    cfg = write_config(tmp_path, extra="",)
    cfg.write_text(cfg.read_text() + f'[relay]\nspool_directory = "{spool_dir}"\n'
                   "retention = 3600\n")
    settings = load_config(cfg)
    gone = [encode(d, d.file_meta.TransferSyntaxUID)
            for d in make_ct_series(3, rows=16, columns=16, seed=81, patient_id="PGONE")]
    kept = [encode(d, d.file_meta.TransferSyntaxUID)
            for d in make_ct_series(2, rows=16, columns=16, seed=82, patient_id="PKEPT")]
    store = Store(settings.cache.directory, 1 << 30)
    entries = [commit(store, b) for b in gone + kept]
    store.quarantine(entries[0], "md5_mismatch", "flipped")  # a quarantined copy of PGONE
    store.close()
    copies = DiskCopies(settings.cache.directory / "dicomweb", 1 << 20)
    for e in (entries[1], entries[3]):
        assert e.study_uid is not None
        copies.save(f"json:/dicom-web/studies/{e.study_uid}/metadata", e.study_uid,
                    Cached(b'[{"00100010":"' + e.patient_id.encode() + b'"}]',
                           "application/dicom+json", 0.0, 10.0), 0.0, 0.0)
    spool = Spool(spool_dir, ["PACS"], retention=3600.0)
    spool.open()
    keys = [spool.put(b, info_from_bytes(b), "MODALITY") for b in (gone[1], kept[0])]
    spool.record("PACS", [Outcome(k, DELIVERED, 0, "") for k in keys])
    spool.close()

    code, out, _ = run(capsys, "purge", "--config", str(cfg), "--patient", "PGONE")
    assert code == 0, out
    assert "purged 2 instance(s)" in out and "1 quarantined file(s)" in out
    assert "1 delivered relay cop(ies)" in out and "metadata copies of 1 stud" in out
    # The indexes' own files included; the audit trail is not a copy of the data: it
    # must say whose data was purged (and does).
    everything = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
                          and p.suffix != ".toml" and p.parent.name != "audit")
    trail = (tmp_path / "audit" / "audit.jsonl").read_text()
    assert '"action":"purge"' in trail and '"patient_id":"PGONE"' in trail
    assert b"PGONE" not in everything and b"PKEPT" in everything
    assert all(b not in everything for b in gone)
    # One instance by its SOP Instance UID.
    code, out, _ = run(capsys, "purge", "--config", str(cfg), "--instance", entries[3].sop_uid)
    assert code == 0 and "purged 1 instance(s)" in out
    store = Store(settings.cache.directory, 1 << 30)
    assert [e.orthanc_id for e in store.entries()] == [entries[4].orthanc_id]
    store.close()
