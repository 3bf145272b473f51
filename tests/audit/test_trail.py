"""The audit file: several processes appending and rotating with nothing lost or doubled,
a crash mid-write, a real full disk (tmpfs), the bounded queue, no symlinks followed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomcache.audit.query import read_records
from dicomcache.audit.record import RETRIEVE, SUCCESS, Actor, Record, Subject, encode
from dicomcache.audit.trail import AuditFile, AuditLog, audit_files, rotated_files
from dicomcache.config import AuditSettings
from dicomcache.metrics import Metrics
from tests.conftest import eventually_sync, fill_filesystem, metric_value, tmpfs

ROOT = Path(__file__).resolve().parents[2]
WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dicomcache.audit.record import RETRIEVE, SUCCESS, Actor, Record, Subject
    from dicomcache.audit.trail import AuditLog
    from dicomcache.config import AuditSettings

    path, who, n, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    log = AuditLog(AuditSettings(file=path, max_file_size=size, max_queue=100000),
                   source=who)
    log.open()
    log.start()
    for i in range(n):
        log.submit(Record(RETRIEVE, Actor(who, "viewer", "basic"),
                          Subject(patient_id=f"{who}-{i}"), SUCCESS))
        if i % 50 == 0:
            log.flush()
    assert log.flush(30)
    log.close()
    print("done", flush=True)
""")


def rec(i: int = 0, who: str = "alice") -> Record:
    return Record(RETRIEVE, Actor(who, "viewer", "basic"), Subject(patient_id=f"P{i}"),
                  SUCCESS)


@pytest.mark.blocking_allowed(reason="synchronous test of a blocking writer")
def test_processes_writing_and_rotating_lose_and_double_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    n, writers = 1500, 4
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{k}", str(n),
                               str(64 << 10)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for k in range(writers)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and b"done" in out, err.decode()[-2000:]
    assert len(rotated_files(path)) >= 3  # 6000 records of ~250 B in files of 64 KiB
    bad = [0]
    recs = list(read_records(list(audit_files(path)), bad))
    assert bad[0] == 0
    assert len(recs) == n * writers and len({r["id"] for r in recs}) == n * writers
    for k in range(writers):
        mine = [r["patient_id"] for r in recs if r["source"] == f"w{k}"]
        assert mine == [f"w{k}-{i}" for i in range(n)]  # in order, each once
    for f in audit_files(path):
        assert f.stat().st_size <= 64 << 10
        assert f.stat().st_mode & 0o777 == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700


@pytest.mark.blocking_allowed(reason="synchronous test of a blocking writer")
def test_a_line_cut_by_a_crash_stays_apart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    f = AuditFile(path, 1 << 20)
    f.append([encode(rec(1), source="serve")])
    with open(path, "ab") as raw:  # what a crash before the fsync can leave
        raw.write(encode(rec(2), source="serve")[:40])
    f.append([encode(rec(3), source="serve")])
    f.close()
    bad = [0]
    assert [r["patient_id"] for r in read_records([path], bad)] == ["P1", "P3"]
    assert bad[0] == 1


@pytest.mark.blocking_allowed(reason="kills a writer process and reads the file back")
def test_kill_9_mid_write_then_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "victim", "1000000",
                          str(1 << 30)], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    eventually_sync(lambda: path.exists() and path.stat().st_size > 200_000, timeout=60,
                    what="the victim writing")
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    f = AuditFile(path, 1 << 30)
    f.append([encode(rec(7, "after"), source="serve")])
    f.close()
    bad = [0]
    recs = list(read_records([path], bad))
    assert bad[0] <= 1 and recs[-1]["principal"] == "after"
    victim = [int(r["patient_id"].split("-")[1]) for r in recs if r["source"] == "victim"]
    assert victim == list(range(len(victim)))  # a prefix: no gap, no double


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "size=256k,mode=0700") as where:
        yield where


@pytest.mark.blocking_allowed(reason="synchronous test of a blocking writer")
def test_full_disk_writes_nothing_half_then_recovers(small_fs: Path) -> None:
    path = small_fs / "audit.jsonl"
    metrics = Metrics()
    log = AuditLog(AuditSettings(file=path, max_queue=100), metrics, source="serve")
    log.open()
    log.start()
    try:
        log.submit(rec(0))
        assert log.flush()
        filler = fill_filesystem(small_fs)
        size = path.stat().st_size
        for i in range(1, 60):  # more than what is left of the file's last page
            log.submit(rec(i))
        eventually_sync(lambda: not log.healthy, what="the failure noticed")
        assert not log.accepting()
        assert log.error is not None and log.error.startswith("disk_full")
        assert metric_value(metrics, "dicomcache_audit_write_errors_total",
                            cause="disk_full") >= 1
        assert metric_value(metrics, "dicomcache_audit_up") == 0
        # Whatever was written is whole lines (a failed batch is cut back).
        data = path.read_bytes()
        assert len(data) >= size and data.endswith(b"\n")
        # Past the queue bound: dropped and counted, never blocking.
        for i in range(200):
            log.submit(rec(1000 + i))
        assert log.dropped > 0
        assert metric_value(metrics, "dicomcache_audit_dropped_total", sink="file",
                            cause="queue_full") == log.dropped
        filler.unlink()
        assert log.flush(10)
        assert log.healthy and log.accepting()
        ids = [r["patient_id"] for r in read_records([path])]
        assert len(ids) == len(set(ids))
        kept = [f"P{i}" for i in range(60)]
        assert ids[:60] == kept  # every record taken before the disk filled, in order
    finally:
        log.close()


@pytest.mark.blocking_allowed(reason="synchronous test of a blocking writer")
def test_never_through_a_symlink_and_never_a_name_from_data(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    path = tmp_path / "audit.jsonl"
    path.symlink_to(target)
    with pytest.raises(OSError):
        AuditFile(path, 1 << 20).open()
    # Rotated names come from the clock, whatever the records say.
    real = tmp_path / "d" / "audit.jsonl"
    f = AuditFile(real, 64 << 10, keep=2)
    hostile = Record(RETRIEVE, Actor("../../etc/passwd", "viewer", "basic"),
                     Subject(patient_id="../../x" * 20), SUCCESS)
    for _ in range(1200):
        f.append([encode(hostile, source="serve")])
    f.close()
    names = sorted(p.name for p in real.parent.iterdir())
    assert len(rotated_files(real)) == 2  # keep = 2: older ones deleted
    assert all(n == "audit.jsonl" or n == "audit.jsonl.lock" or
               n.startswith("audit.jsonl.20") for n in names), names


@pytest.mark.blocking_allowed(reason="synchronous test of a blocking writer")
def test_submit_never_blocks_and_close_writes_what_is_queued(tmp_path: Path) -> None:
    log = AuditLog(AuditSettings(file=tmp_path / "a.jsonl", max_queue=1000), source="serve")
    log.open()
    log.start()
    started = time.perf_counter()
    for i in range(1000):
        log.submit(rec(i))
    assert time.perf_counter() - started < 1.0
    log.close()
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines()
    assert len(lines) == 1000 and json.loads(lines[-1])["patient_id"] == "P999"
