"""``dicomcache serve`` on a cache disk in trouble: degraded, not dead.

The daemon runs as a process (as systemd runs it) in front of the real
Orthanc, its cache on a real tmpfs that is full, mounted read-only, or holds
no cache directory and cannot get one.  Each time it starts anyway, serves
verified instances (from memory, without caching), says "cache degraded" with
the cause on ``/readyz``, the status page and a metric; once the disk is
usable again it caches again by itself, without a restart.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomcache.devtools.orthanc import OrthancProcess, free_port, loopback_env
from tests.conftest import (
    Sample,
    eventually_sync,
    fill_filesystem,
    serve_config,
    start_dicomcache,
    stop_process,
    tmpfs,
)

pytestmark = pytest.mark.blocking_allowed(reason="synchronous tests of a daemon process")


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def metric(text: str, sample: str) -> float | None:
    """The value of one sample (``name{labels}``) in a /metrics page."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return get(f"http://127.0.0.1:{self.port}{path}")

    def json(self, path: str) -> tuple[int, dict[str, Any]]:
        status, _, body = self.get(path)
        return status, json.loads(body)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def serve(tmp_path: Path, orthanc: OrthancProcess) -> Iterator[Any]:
    """Start ``dicomcache serve`` with its cache in a directory; wait until it answers."""
    started: list[subprocess.Popen[bytes]] = []

    def start(directory: Path, upstream: str | None = None) -> Daemon:
        """``upstream``: another Orthanc URL (one that refuses: Orthanc stopped)."""
        port = free_port()
        cfg = serve_config(tmp_path / "c.toml", port, upstream or orthanc.url, orthanc,
                           cache={"directory": str(directory), "max_size": "1GB",
                                  "min_free": 0})
        log = tmp_path / f"serve{len(started)}.log"  # each start's own
        proc = start_dicomcache(["serve", "--config", str(cfg)], log, healthz=port,
                                env=loopback_env())
        started.append(proc)
        return Daemon(proc, port, log)

    yield start
    for proc in started:
        if proc.poll() is None:  # still running: it stops cleanly
            stop_process(proc)
            assert proc.returncode == 0


TROUBLES = {
    # trouble: (cause on /readyz and the metric, words an operator reads on the status page)
    "full": ("disk_full", "full"),
    "read_only": ("read_only", "read-only"),
    "missing": ("missing", "cannot be created"),
}


@pytest.mark.parametrize("trouble", sorted(TROUBLES))
def test_serve_on_a_cache_disk_in_trouble_serves_verified_then_recovers(
        tmp_path: Path, serve: Any, samples: dict[str, list[Sample]], trouble: str) -> None:
    cause, words = TROUBLES[trouble]
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        directory = disk / "cache"
        filler = None
        if trouble == "full":
            filler = fill_filesystem(disk)
        elif trouble == "read_only":
            directory.mkdir()
            remount(disk, "ro")
        else:  # a cache directory that is not there and cannot be made
            directory = disk / "not-there" / "cache"
            remount(disk, "ro")
        daemon = serve(directory)

        # It serves: ready, and says why the cache is degraded.
        status, ready = daemon.json("/readyz")
        assert status == 200 and ready["ready"] is True, ready
        assert f"cache degraded: {cause}" in ready["store"]["status"], ready
        assert ready["store"]["degraded"] == cause
        _, page_state = daemon.json("/status.json")
        assert page_state["cache"]["degraded"] == cause
        _, _, page = daemon.get("/")
        assert b"cache degraded" in page.lower() and words.encode() in page
        _, _, metrics = daemon.get("/metrics")
        text = metrics.decode()
        assert metric(text, f'dicomcache_cache_degraded{{cause="{cause}"}}') == 1.0, text

        # Every instance verified and whole, by each API family, twice (not cached).
        explicit = samples["explicit"]
        for s in explicit[:2]:
            for path in (f"/instances/{s.orthanc_id}/file",
                         f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
                         f"&objectUID={s.sop}&contentType=application/dicom"):
                for _ in range(2):
                    code, headers, body = daemon.get(path)
                    assert code == 200 and body == s.data, (path, code, body[:300])
                    assert headers.get("X-Cache") != "HIT"
        s = explicit[2]
        for path in (f"/dicom-web/studies/{s.study}/series/{s.series}/metadata",
                     f"/dicom-web/studies/{s.study}/metadata"):
            code, _, body = daemon.get(path)
            assert code == 200 and s.sop.encode() in body, body[:300]
        assert daemon.log_text().count("cannot keep a disk copy") <= 1  # not one per answer
        if trouble != "missing":  # nothing was written into the unusable directory
            assert not any(directory.rglob("*.dcm"))

        # The disk becomes usable: it caches again by itself.
        if filler is not None:
            filler.unlink()
        else:
            remount(disk, "rw")

        def recovered() -> bool:
            return "degraded" not in daemon.json("/readyz")[1]["store"]["status"]
        eventually_sync(recovered, timeout=60, interval=0.5, what="the cache recovered")
        _, _, metrics = daemon.get("/metrics")
        assert metric(metrics.decode(), f'dicomcache_cache_degraded{{cause="{cause}"}}') == 0.0
        s = samples["implicit"][0]
        first = daemon.get(f"/instances/{s.orthanc_id}/file")
        again = daemon.get(f"/instances/{s.orthanc_id}/file")
        assert first[0] == again[0] == 200 and first[2] == again[2] == s.data
        assert again[1].get("X-Cache") == "HIT", again[1]
        assert any(directory.rglob("*.dcm"))
        assert "Traceback" not in daemon.log_text(), daemon.log_text()
        stop_process(daemon.proc)
        assert daemon.proc.returncode == 0, daemon.log_text()


@pytest.mark.parametrize("ended", ["stopped", "killed"])
def test_a_cache_disk_remounted_read_only_serves_its_entries_as_hits(
        tmp_path: Path, serve: Any, samples: dict[str, list[Sample]], ended: str) -> None:
    """The clinic's disk went read-only (ext4 ``errors=remount-ro``) and dicomcache was
    restarted while the WAN is down too: what the cache holds is still served, verified,
    from the read-only disk.  ``killed``: the index's write-ahead log (and its -shm) is
    left behind holding the last rows, as after a crash; ``stopped``: a clean stop left
    no log (SQLite then needs ``immutable=1``: ``mode=ro`` cannot create the -shm)."""
    cached = samples["explicit"][:3]
    with tmpfs(tmp_path / "disk", "size=8m") as disk:
        directory = disk / "cache"
        daemon = serve(directory)
        for s in cached:
            assert daemon.get(f"/instances/{s.orthanc_id}/file")[1].get("X-Cache") == "MISS"
        for s in cached:  # on the disk: its copy follows the answer, a request waits for it
            assert daemon.get(f"/instances/{s.orthanc_id}/file")[1].get("X-Cache") == "HIT"
        stop_process(daemon.proc, signal.SIGKILL if ended == "killed" else signal.SIGTERM)
        left = {p.name for p in directory.iterdir()}
        assert ("index.sqlite-wal" in left) == (ended == "killed"), left
        remount(disk, "ro")
        try:
            daemon = serve(directory, upstream=f"http://127.0.0.1:{free_port()}")  # WAN down
            for s in cached:
                for path in (f"/instances/{s.orthanc_id}/file",
                             f"/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
                             f"&objectUID={s.sop}&contentType=application/dicom"):
                    code, headers, body = daemon.get(path)
                    assert code == 200 and body == s.data, (path, code, body[:300])
                    assert headers.get("X-Cache") == "HIT", headers
            _, state = daemon.json("/status.json")
            assert state["cache"]["degraded"] == "read_only", state["cache"]
            assert "cache degraded: read_only" in state["cache"]["status"]
            assert state["cache"]["entries"] == len(cached), state["cache"]
            _, _, metrics = daemon.get("/metrics")
            assert metric(metrics.decode(), 'dicomcache_cache_degraded{cause="read_only"}') == 1
            assert state["cache"]["serving_cached"] is True
            _, _, page = daemon.get("/")
            assert b"already holds are still served from it" in page
            s = samples["implicit"][0]  # not cached, and Orthanc is out of reach
            assert daemon.get(f"/instances/{s.orthanc_id}/file")[0] in (502, 503, 504)
        finally:
            remount(disk, "rw")

        # Writable again (remounted by hand): it caches again by itself, keeping what it held.
        def recovered() -> bool:
            return daemon.json("/readyz")[1]["store"]["degraded"] is None
        eventually_sync(recovered, timeout=60, interval=0.5, what="the cache recovered")
        _, _, metrics = daemon.get("/metrics")
        assert metric(metrics.decode(), 'dicomcache_cache_degraded{cause="read_only"}') == 0
        assert daemon.json("/status.json")[1]["cache"]["entries"] == len(cached)
        for s in cached:
            assert daemon.get(f"/instances/{s.orthanc_id}/file")[1].get("X-Cache") == "HIT"
        assert "Traceback" not in daemon.log_text(), daemon.log_text()
        stop_process(daemon.proc)
        assert daemon.proc.returncode == 0, daemon.log_text()


@contextlib.contextmanager
def ext4(image: Path, where: Path) -> Iterator[Path]:
    """A real ext4 (a loop device) at ``where`` with ``errors=remount-ro``, as a clinic
    mounts its cache disk; unmounted afterwards.  Skipped where loop devices are not
    available."""
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True,
                          text=True, check=False)
    where.mkdir(parents=True, exist_ok=True)
    mounted = made.returncode == 0 and subprocess.run(
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(where)],
        capture_output=True, check=False).returncode == 0
    if not mounted:
        pytest.skip(f"cannot mount an ext4 loop device here: {made.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fs_error(where: Path) -> None:
    """What a failing disk does to ext4 mounted ``errors=remount-ro``: the kernel makes it
    read-only at once, under the running daemon (``mount -o remount,ro`` by hand is
    refused while files on it are open for writing, as the index is)."""
    source = subprocess.run(["findmnt", "-no", "SOURCE", str(where)], capture_output=True,
                            text=True, check=True).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(source).name / "trigger_fs_error"
    if not trigger.exists():
        pytest.skip(f"this kernel has no {trigger}")
    trigger.write_text("test\n")
    options = subprocess.run(["findmnt", "-no", "OPTIONS", str(where)], capture_output=True,
                             text=True, check=True).stdout.strip().split(",")
    assert options[0] == "ro" or "emergency_ro" in options, options


def test_a_cache_disk_that_turns_read_only_at_run_time_keeps_serving(
        tmp_path: Path, serve: Any, samples: dict[str, list[Sample]]) -> None:
    """ext4 remounted read-only by the kernel under the running daemon: cold misses are
    served verified (not cached), hits from the disk, /readyz, the status page and the
    metric say read_only (one cause, not read_only and io_error in turn); after the
    repair it starts and caches."""
    image, mountpoint = tmp_path / "disk.img", tmp_path / "disk"
    cached, cold = samples["explicit"][:2], samples["implicit"]
    with ext4(image, mountpoint) as disk:
        directory = disk / "cache"
        daemon = serve(directory)
        for s in cached:
            assert daemon.get(f"/instances/{s.orthanc_id}/file")[1].get("X-Cache") == "MISS"
        for s in cached:  # on the disk: its copy follows the answer, a request waits for it
            assert daemon.get(f"/instances/{s.orthanc_id}/file")[1].get("X-Cache") == "HIT"
        fs_error(disk)

        for _ in range(2):  # cold misses: served verified, not cached
            code, headers, body = daemon.get(f"/instances/{cold[0].orthanc_id}/file")
            assert code == 200 and body == cold[0].data, (code, body[:300])
            assert headers.get("X-Cache") != "HIT"
        for s in cached:  # hits: still served from the disk
            for _ in range(2):
                code, headers, body = daemon.get(f"/instances/{s.orthanc_id}/file")
                assert code == 200 and body == s.data and headers.get("X-Cache") == "HIT"

        def degraded() -> bool:
            return daemon.json("/readyz")[1]["store"]["degraded"] == "read_only"
        eventually_sync(degraded, timeout=30, interval=0.5, what="degraded: read_only")
        status, ready = daemon.json("/readyz")
        assert status == 200 and "cache degraded: read_only" in ready["store"]["status"]
        _, _, page = daemon.get("/")
        assert b"cache degraded: read_only" in page
        _, _, metrics = daemon.get("/metrics")
        assert metric(metrics.decode(), 'dicomcache_cache_degraded{cause="read_only"}') == 1

        # One cause (an io_error first at most), not read_only and io_error in turn.
        assert daemon.log_text().count("cache degraded: ") <= 2, daemon.log_text()
        # The repair needs the service stopped (the kernel refuses remount,rw after an
        # error, and a lazy unmount keeps the file system alive while files are open):
        # it stops cleanly, then starts on the repaired disk and caches.
        assert "Traceback" not in daemon.log_text(), daemon.log_text()
        stop_process(daemon.proc)
        assert daemon.proc.returncode == 0, daemon.log_text()
        subprocess.run(["umount", str(disk)], check=True)
        subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, check=False)
        subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(disk)],
                       check=True)
        daemon = serve(directory)
        assert daemon.json("/readyz")[1]["store"]["degraded"] is None
        first = daemon.get(f"/instances/{cold[1].orthanc_id}/file")
        again = daemon.get(f"/instances/{cold[1].orthanc_id}/file")
        assert first[0] == again[0] == 200 and again[2] == cold[1].data
        assert again[1].get("X-Cache") == "HIT", again[1]
        assert "Traceback" not in daemon.log_text(), daemon.log_text()
        stop_process(daemon.proc)
        assert daemon.proc.returncode == 0, daemon.log_text()
