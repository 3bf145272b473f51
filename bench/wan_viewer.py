"""A viewer opening a 200-slice CT across an emulated WAN: direct vs dicomcache.

One run, one real Orthanc, the WAN emulator in between (``ThreadedWanEmulator``
in this process), ``dicomcache serve`` as a subprocess with a fresh cache for
every cold run.  The viewer loads every slice in slice order with
``GET /instances/{id}/file`` and checks every body's MD5.

* **latency-bound** (one request at a time, as simple stack viewers do), 80 ms
  RTT, 200 Mbit/s: Orthanc direct vs dicomcache cold with prefetch (goal
  ≤ 0.5×), and warm (second opening; goal ≥ 20× faster than direct);
* **bandwidth-bound** (6 parallel requests), 40 ms RTT, 100 Mbit/s: dicomcache
  cold vs the link's own limit (study bytes ÷ bandwidth; goal ≤ 1.2×), with
  and without ``upstream.compression = "all"``;
* bytes over the link (down) for each run, with and without compression.

    ./run bench bench/wan_viewer.py [--slices 200] [--prefetch-parallel 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from _daemon import Daemon, serve_settings  # noqa: E402
from dicomcache.devtools.orthanc import OrthancProcess  # noqa: E402
from dicomcache.devtools.samples import encode, make_ct_series  # noqa: E402
from dicomcache.devtools.wanem import LinkProfile, ThreadedWanEmulator  # noqa: E402


async def view(base: str, ids: list[str], md5s: list[str], parallel: int,
               auth: str | None = None, gzip: bool = False) -> float:
    """Load every slice in order with ``parallel`` requests in flight; seconds taken."""
    headers = {"Accept-Encoding": "gzip" if gzip else "identity"}
    if auth:
        headers["Authorization"] = auth
    next_index = 0
    async with aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(limit=parallel),
            timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def worker() -> None:
            nonlocal next_index
            while next_index < len(ids):
                i = next_index
                next_index += 1
                async with session.get(f"{base}/instances/{ids[i]}/file") as resp:
                    body = await resp.read()  # decompressed if gzip was sent
                    if resp.status != 200 or hashlib.md5(body).hexdigest() != md5s[i]:
                        raise RuntimeError(f"slice {i}: {resp.status}, bad body")

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(parallel)))
        return time.monotonic() - started


@contextlib.contextmanager
def dicomcache(workdir: Path, orthanc: OrthancProcess, wan_port: int, *, parallel: int,
               compression: str = "json") -> Iterator[str]:
    """``dicomcache serve`` on a fresh cache behind the emulated link; yields its base URL."""
    settings = serve_settings(workdir, f"http://127.0.0.1:{wan_port}", orthanc,
                              max_size="2GiB", upstream={"compression": compression},
                              prefetch={"mode": "study", "parallel": parallel})
    with Daemon(workdir, settings) as daemon:
        yield daemon.base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--prefetch-parallel", type=int, default=8)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="wan-bench-") as tmp_name:
        tmp = Path(tmp_name)
        orthanc = OrthancProcess(tmp / "orthanc", overrides={"HttpCompressionEnabled": True})
        orthanc.start()
        try:
            print(f"generating and uploading {args.slices} slices…", file=sys.stderr)
            datasets = make_ct_series(args.slices, seed=4242, patient_id="PWANBENCH")
            blobs = [encode(ds, ExplicitVRLittleEndian) for ds in datasets]
            ids = orthanc.upload(blobs)
            md5s = [hashlib.md5(b).hexdigest() for b in blobs]
            study_bytes = sum(len(b) for b in blobs)
            auth = "Basic " + base64.b64encode(
                f"{orthanc.username}:{orthanc.password}".encode()).decode()
            rows: list[tuple[str, float, int]] = []

            with ThreadedWanEmulator("127.0.0.1", orthanc.http_port) as wan:
                def run(label: str, profile: LinkProfile, base: str | None, parallel: int,
                        n: int = len(ids), **kw: object) -> float:
                    wan.set_profile(profile)
                    wan.reset_stats()
                    url = base or f"http://127.0.0.1:{wan.port}"
                    seconds = asyncio.run(view(url, ids[:n], md5s[:n], parallel,
                                               auth=None if base else auth, **kw))  # type: ignore[arg-type]
                    time.sleep(0.5)  # prefetch stragglers, counted with the run
                    rows.append((label, seconds, wan.stats().bytes_down))
                    print(f"  {label:48s} {seconds:7.2f} s  {wan.stats().bytes_down / 1e6:8.1f} MB",
                          file=sys.stderr)
                    return seconds

                lat = LinkProfile(latency_ms=40, bandwidth_mbit=200)
                bw = LinkProfile(latency_ms=20, bandwidth_mbit=100)
                print("latency-bound viewer (1 request at a time), 80 ms RTT, 200 Mbit/s",
                      file=sys.stderr)
                direct = run("direct", lat, None, 1)
                with dicomcache(tmp / "c1", orthanc, wan.port,
                                parallel=args.prefetch_parallel) as base:
                    cold = run("dicomcache cold, prefetch", lat, base, 1)
                    warm = run("dicomcache warm", lat, base, 1)
                print("bandwidth-bound viewer (6 parallel), 40 ms RTT, 100 Mbit/s",
                      file=sys.stderr)
                direct6 = run("direct (6 parallel)", bw, None, 6)
                direct6_gz = run("direct, Accept-Encoding: gzip", bw, None, 6, gzip=True)
                with dicomcache(tmp / "c2", orthanc, wan.port,
                                parallel=args.prefetch_parallel) as base:
                    cold6 = run("dicomcache cold, prefetch", bw, base, 6)
                with dicomcache(tmp / "c3", orthanc, wan.port, parallel=args.prefetch_parallel,
                                compression="all") as base:
                    cold6_gz = run("dicomcache cold, prefetch, compression=all", bw, base, 6)
                slow = LinkProfile(latency_ms=20, bandwidth_mbit=20)
                n_slow = min(40, len(ids))
                print(f"slow link: 20 Mbit/s, 40 ms RTT, 6 parallel, first {n_slow} slices",
                      file=sys.stderr)
                with dicomcache(tmp / "c4", orthanc, wan.port,
                                parallel=args.prefetch_parallel) as base:
                    slow_id = run("slow link: dicomcache cold", slow, base, 6, n_slow)
                with dicomcache(tmp / "c5", orthanc, wan.port, parallel=args.prefetch_parallel,
                                compression="all") as base:
                    slow_gz = run("slow link: dicomcache cold, compression=all", slow, base, 6,
                                  n_slow)
        finally:
            orthanc.stop()

    limit = study_bytes * 8 / 100e6
    by = {label: nbytes for label, _, nbytes in rows}
    print(f"\nstudy: {args.slices} slices, {study_bytes / 1e6:.1f} MB; prefetch.parallel = "
          f"{args.prefetch_parallel}")
    print("latency-bound (80 ms RTT, 200 Mbit/s, 1 request at a time)")
    print(f"  direct {direct:.2f} s, dicomcache cold {cold:.2f} s, warm {warm:.3f} s")
    print(f"  cold / direct  = {cold / direct:.2f}   (goal ≤ 0.5)")
    print(f"  direct / warm  = {direct / warm:.0f}×   (goal ≥ 20×)")
    print("bandwidth-bound (40 ms RTT, 100 Mbit/s, 6 parallel)")
    print(f"  link limit {limit:.2f} s; direct {direct6:.2f} s; dicomcache cold {cold6:.2f} s; "
          f"with compression {cold6_gz:.2f} s")
    print(f"  cold / limit = {cold6 / limit:.2f}   (goal ≤ 1.2)")
    print(f"  cold with compression / limit = {cold6_gz / limit:.2f}   (goal < 1)")
    print(f"  direct / limit = {direct6 / limit:.2f}; "
          f"direct gzip / limit = {direct6_gz / limit:.2f}")
    slow_limit = sum(len(b) for b in blobs[:n_slow]) * 8 / 20e6
    print(f"slow link (40 ms RTT, 20 Mbit/s, 6 parallel, {n_slow} slices): limit "
          f"{slow_limit:.2f} s")
    print(f"  identity {slow_id:.2f} s ({slow_id / slow_limit:.2f}× the limit); "
          f"compression=all {slow_gz:.2f} s ({slow_gz / slow_limit:.2f}× the limit)")
    print("bytes over the link (down)")
    for label, _, nbytes in rows:
        print(f"  {label:48s} {nbytes / 1e6:8.1f} MB  ({nbytes / study_bytes:.2f}× the study)")
    ratio = by["dicomcache cold, prefetch, compression=all"] / by["dicomcache cold, prefetch"]
    print(f"  compression: {ratio:.2f}× the bytes of identity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
