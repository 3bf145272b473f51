"""WADO-RS whole-series retrieve: Orthanc direct vs dicomcache cold vs warm, same run.

Uploads a 200-instance 512 KiB CT series to a real Orthanc (DICOMweb plugin),
starts ``dicomcache serve`` as users run it, and times
``GET /dicom-web/studies/{st}/series/{se}`` (``transfer-syntax=*``, the whole
multipart read and its parts counted):

* ``orthanc``: Orthanc's plugin, direct (median of ``--runs``, after one warm-up);
* ``cold``: through dicomcache with an empty cache (each run on a fresh cache:
  dicomcache is restarted on a new directory);
* ``warm``: through dicomcache again (median of ``--runs``).

Series metadata is timed the same way.  Goals (issue 3): cold <= 1.1 x direct,
warm >= 2 x faster than direct.  Everything listens on 127.0.0.1.

The client above is Python's ``http.client``, which spends about 0.3 CPU-s
reading Orthanc's length-less answer (dicomcache's answers carry a
Content-Length), so the same three are also timed with ``curl`` (unless
``--no-curl``), a client that is not CPU-bound: that shows how far each server
is from what the link could carry.

    ./run bench bench/wado_rs.py [--instances 200] [--runs 3] [--profile cold.svg]
                                 [--wan 100 [--rtt-ms 40]]

``--wan MBIT`` adds the setting dicomcache is built for: Orthanc behind an
emulated WAN link (dicomcache's own emulator, ``dicomcache.devtools.wanem``, in this
process), the viewer on the LAN.  Direct and cold cross the link; warm does not.

``--profile FILE`` records the dicomcache process with ``py-spy`` during the
first cold retrieve (all threads, idle time included, so waiting shows too;
that run is slowed by the sampling, so take the figures from a run without it);
``FILE`` ending in ``.txt`` gets py-spy's collapsed stacks instead of a flame graph.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _daemon import Daemon, serve_settings  # noqa: E402
from dicomcache.devtools.orthanc import OrthancProcess  # noqa: E402
from dicomcache.devtools.samples import encode, make_ct_series  # noqa: E402
from dicomcache.devtools.wanem import LinkProfile, ThreadedWanEmulator  # noqa: E402

ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def timed_get(port: int, path: str, headers: dict[str, str]) -> tuple[float, int, bytes]:
    """Seconds to the last byte, body size, and the body (whole)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t = time.perf_counter()
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    elapsed = time.perf_counter() - t
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: {resp.status} {body[:200]!r}")
    return elapsed, len(body), body


def curl_get(port: int, path: str, headers: dict[str, str]) -> tuple[float, int]:
    """Seconds to the last byte and bytes, read by curl (a client that is not CPU-bound)."""
    cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total} %{size_download}"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run([*cmd, f"http://127.0.0.1:{port}{path}"], capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    if out[0] != "200":
        raise RuntimeError(f"curl GET {path}: {out[0]}")
    return float(out[1]), int(out[2])


def count_parts(body: bytes) -> int:
    first = body.split(b"\r\n", 1)[0]
    return body.count(first + b"\r\n")


def start_proxy(work: Path, orthanc: OrthancProcess, name: str, concurrency: int,
                upstream: str | None = None) -> Daemon:
    """``dicomcache serve`` as users run it, started on a fresh cache directory."""
    settings = serve_settings(work / name, upstream or orthanc.url, orthanc, max_size="4GiB",
                              dicomweb={"retrieve_concurrency": concurrency})
    proxy = Daemon(work / name, settings)
    proxy.start()
    return proxy


class Profiler:
    """``py-spy record`` attached to a process until :meth:`stop` (needs ptrace rights)."""

    def __init__(self, pid: int, out: Path) -> None:
        py_spy = Path(sys.executable).with_name("py-spy")
        fmt = "raw" if out.suffix == ".txt" else "flamegraph"
        self.proc = subprocess.Popen(
            [str(py_spy if py_spy.exists() else "py-spy"), "record", "--pid", str(pid),
             "--rate", "250", "--threads", "--idle", "--format", fmt, "--output", str(out)],
            stdout=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches before the timed request starts

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        self.proc.wait(timeout=60)


def across_wan(args: argparse.Namespace, work: Path, orthanc: OrthancProcess,
               proxies: list[Daemon], series: str, direct_h: dict[str, str],
               ours_h: dict[str, str], total: int, check: Callable[[bytes, str], None]) -> None:
    """Direct and cold across the emulated link, warm from the LAN, same run."""
    profile = LinkProfile(latency_ms=args.rtt_ms / 2, bandwidth_mbit=args.wan)
    direct, cold, warm = [], [], []
    with ThreadedWanEmulator("127.0.0.1", orthanc.http_port, profile) as wan:
        far = f"http://127.0.0.1:{wan.port}"
        for run in range(args.runs):
            s, _, body = timed_get(wan.port, series, direct_h)
            check(body, "orthanc across the WAN")
            direct.append(s)
            proxy = start_proxy(work, orthanc, f"wan{run}", args.concurrency, upstream=far)
            proxies.append(proxy)
            s, _, body = timed_get(proxy.port, series, ours_h)
            check(body, "cold across the WAN")
            cold.append(s)
            for _ in range(args.runs):
                s, _, body = timed_get(proxy.port, series, ours_h)
                check(body, "warm")
                warm.append(s)
            proxy.stop()
            proxies.remove(proxy)
            print(f"WAN run {run + 1}: orthanc {direct[-1]:.2f} s  cold {cold[-1]:.2f} s  "
                  f"warm {min(warm[-args.runs:]):.3f} s", flush=True)
    d, c, w = (statistics.median(x) for x in (direct, cold, warm))
    limit = total * 8 / (args.wan * 1e6)
    print(f"across an emulated WAN ({args.wan:g} Mbit/s, {args.rtt_ms:g} ms RTT; the link alone "
          f"needs {limit:.2f} s), median of {args.runs}:")
    print(f"  orthanc direct {d:.2f} s, dicomcache cold {c:.2f} s, warm {w:.3f} s")
    print(f"  cold / direct = {c / d:.2f}  (goal <= 1.10)")
    print(f"  direct / warm = {d / w:.0f}  (goal >= 2)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8,
                    help="dicomweb.retrieve_concurrency of the proxy")
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="py-spy profile of dicomcache during the first cold retrieve")
    ap.add_argument("--no-curl", action="store_true",
                    help="skip the second set of timings read by curl")
    ap.add_argument("--wan", type=float, metavar="MBIT",
                    help="also time direct and cold across an emulated WAN link of this "
                         "bandwidth (dicomcache's setting: Orthanc far away, viewers on the LAN)")
    ap.add_argument("--rtt-ms", type=float, default=40.0, help="round trip of --wan (ms)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dicomcache-wado-bench-"))
    orthanc = OrthancProcess(work / "orthanc")
    proxies: list[Daemon] = []
    try:
        orthanc.start()
        datasets = make_ct_series(args.instances, seed=11)
        blobs = [encode(ds, ds.file_meta.TransferSyntaxUID) for ds in datasets]
        t = time.monotonic()
        orthanc.upload(blobs)
        total = sum(len(b) for b in blobs)
        print(f"uploaded {len(blobs)} instances ({total / 1e6:.0f} MB) in "
              f"{time.monotonic() - t:.1f} s", flush=True)
        st, se = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
        series = f"/dicom-web/studies/{st}/series/{se}"
        direct_h = {"Accept": ANY, "Authorization": orthanc.auth_header}
        ours_h = {"Accept": ANY}

        def check(body: bytes, what: str) -> None:
            if count_parts(body) != len(blobs):
                raise RuntimeError(f"{what}: {count_parts(body)} parts, not {len(blobs)}")

        timed_get(orthanc.http_port, series, direct_h)  # warm Orthanc's page cache
        use_curl = not args.no_curl and shutil.which("curl") is not None
        curl: dict[str, list[float]] = {"direct": [], "cold": [], "warm": []}
        direct, cold, warm = [], [], []
        meta_direct, meta_cold, meta_warm = [], [], []
        for run in range(args.runs):
            s, _, body = timed_get(orthanc.http_port, series, direct_h)
            check(body, "orthanc")
            direct.append(s)
            s, _, _ = timed_get(orthanc.http_port, series + "/metadata",
                                {"Authorization": orthanc.auth_header})
            meta_direct.append(s)
            proxy = start_proxy(work, orthanc, f"cache{run}", args.concurrency)
            proxies.append(proxy)
            profiler = Profiler(proxy.pid, args.profile) \
                if args.profile and run == 0 else None
            try:
                s, _, body = timed_get(proxy.port, series, ours_h)
            finally:
                if profiler is not None:
                    profiler.stop()
            check(body, "cold")
            ours_size = len(body)
            cold.append(s)
            s, _, _ = timed_get(proxy.port, series + "/metadata", {})
            meta_cold.append(s)
            for _ in range(args.runs):
                s, _, body = timed_get(proxy.port, series, ours_h)
                check(body, "warm")
                warm.append(s)
                s, _, _ = timed_get(proxy.port, series + "/metadata", {})
                meta_warm.append(s)
            proxy.stop()
            proxies.remove(proxy)
            print(f"run {run + 1}: orthanc {direct[-1]:.3f} s  cold {cold[-1]:.3f} s  "
                  f"warm {min(warm[-args.runs:]):.3f} s", flush=True)
            if use_curl:  # the same three with curl, cold on another fresh cache
                curl["direct"].append(curl_get(orthanc.http_port, series, direct_h)[0])
                proxy = start_proxy(work, orthanc, f"curl{run}", args.concurrency)
                proxies.append(proxy)
                # Warm as often as above: the first may still be sent from memory
                # (commits deferred while the cold stream was read), the rest from files.
                for name in ("cold", *["warm"] * args.runs):
                    s, size = curl_get(proxy.port, series, ours_h)
                    if size != ours_size:  # same parts, same length of boundary
                        raise RuntimeError(f"curl {name}: {size} bytes, not {ours_size}")
                    curl[name].append(s)
                proxy.stop()
                proxies.remove(proxy)

        d, c, w = (statistics.median(x) for x in (direct, cold, warm))
        print(f"\nseries retrieve, {len(blobs)} instances, {total / 1e6:.0f} MB, "
              f"median of {args.runs}:")
        for name, v in (("orthanc direct", d), ("dicomcache cold", c), ("dicomcache warm", w)):
            print(f"  {name:16s} {v:7.3f} s  {total / v / 1e6:7.0f} MB/s")
        print(f"  cold / direct = {c / d:.2f}  (goal <= 1.10)")
        print(f"  direct / warm = {d / w:.2f}  (goal >= 2.00)")
        if use_curl:
            cd, cc, cw = (statistics.median(curl[k]) for k in ("direct", "cold", "warm"))
            print(f"the same read by curl (not CPU-bound; Orthanc's length-less answer costs "
                  f"Python's http.client ~0.3 CPU-s):\n  orthanc direct {cd:.3f} s, "
                  f"dicomcache cold {cc:.3f} s ({cc / cd:.1f}x), warm {cw:.3f} s "
                  f"(direct / warm = {cd / cw:.2f})")
        md, mc, mw = (statistics.median(x) for x in (meta_direct, meta_cold, meta_warm))
        print(f"series metadata: orthanc {md * 1000:.0f} ms, dicomcache cold {mc * 1000:.0f} ms, "
              f"warm {mw * 1000:.1f} ms (direct / warm = {md / mw:.0f})")
        if args.wan:
            across_wan(args, work, orthanc, proxies, series, direct_h, ours_h, total, check)
        return 0
    finally:
        for p in proxies:
            p.stop()
        orthanc.stop()
        if not os.environ.get("KEEP_BENCH"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
