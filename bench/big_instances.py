"""Memory with large multi-frame instances: dicomcache's RSS under cold big misses and viewers.

One real Orthanc holding ``--count`` Enhanced CT instances of ``--size-mb`` each
(generated), and a small study; ``dicomcache serve`` as a subprocess on a fresh
cache.  At once: every big instance is asked cold (``/instances/{id}/file``,
every byte checked), while ``--viewers`` clients load the small study's slices
over and over (hits, after the first pass).  The dicomcache process's RSS is
sampled every 0.2 s; the run reports its peak against the goal (issue 15:
≤ 300 MiB with 8 × 500 MB and 200 viewers) and, as the baseline measured in
the same run, the big instances fetched from Orthanc directly (without the
viewers: Orthanc gives each keep-alive connection one of its HTTP threads) with
Orthanc's own peak RSS.

    ./run bench bench/big_instances.py                       # 8 × 500 MB, 200 viewers
    ./run bench bench/big_instances.py --count 4 --size-mb 100 --viewers 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from _daemon import Daemon, rss, sampling, serve_settings  # noqa: E402
from dicomcache.devtools.orthanc import OrthancProcess  # noqa: E402
from dicomcache.devtools.samples import encode, make_ct_series  # noqa: E402


class Peak:
    """The peak RSS of some processes, sampled every 0.2 s while the block runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self.peak_anon = dict.fromkeys(pids, 0)
        self._stack = contextlib.ExitStack()

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], rss(pid))
            self.peak_anon[name] = max(self.peak_anon[name], rss(pid, "RssAnon"))

    def __enter__(self) -> Peak:
        self._stack.enter_context(sampling(0.2, self._sample))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


async def get_checked(session: aiohttp.ClientSession, url: str, md5: str) -> int:
    digest = hashlib.md5()
    size = 0
    async with session.get(url) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {(await resp.read())[:200]!r}")
        async for chunk in resp.content.iter_chunked(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    if digest.hexdigest() != md5:
        raise RuntimeError(f"{url}: wrong body")
    return size


async def load(base: str, big: list[tuple[str, str]], small: list[tuple[str, str]],
               viewers: int, auth: str | None) -> tuple[float, int]:
    """Every big instance cold, at once, with ``viewers`` clients looping over the small
    study until the big ones are in; (seconds, small bodies served)."""
    headers = {"Authorization": auth} if auth else None
    done = asyncio.Event()
    served = 0
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        async def viewer(i: int) -> None:
            nonlocal served
            while not done.is_set():
                for oid, md5 in small[i % len(small):] + small[:i % len(small)]:
                    await get_checked(session, f"{base}/instances/{oid}/file", md5)
                    served += 1
                    if done.is_set():
                        return

        started = time.monotonic()
        views = [asyncio.create_task(viewer(i)) for i in range(viewers)]
        try:
            await asyncio.gather(*(get_checked(session, f"{base}/instances/{oid}/file", md5)
                                   for oid, md5 in big))
            seconds = time.monotonic() - started
        finally:
            done.set()
            await asyncio.gather(*views)
    return seconds, served


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--viewers", type=int, default=200)
    args = ap.parse_args()
    frames = max(1, args.size_mb * 10**6 // (1024 * 1024 * 2))
    with tempfile.TemporaryDirectory(prefix="big-bench-") as tmp_name:
        tmp = Path(tmp_name)
        orthanc = OrthancProcess(tmp / "orthanc")
        orthanc.start()
        try:
            big: list[tuple[str, str]] = []
            for i in range(args.count):
                print(f"generating and uploading big instance {i + 1}/{args.count} "
                      f"({frames} frames of 1024², {frames * 2 * 1024 * 1024 / 1e6:.0f} MB)…",
                      file=sys.stderr)
                (ds,) = make_ct_series(1, rows=1024, columns=1024, frames=frames, seed=900 + i,
                                       patient_id=f"PBIG{i}")
                blob = encode(ds, ExplicitVRLittleEndian)
                del ds
                (oid,) = orthanc.upload([blob])
                big.append((oid, hashlib.md5(blob).hexdigest()))
                del blob
            small_blobs = [encode(ds, ExplicitVRLittleEndian)
                           for ds in make_ct_series(40, seed=901, patient_id="PSMALL")]
            small = list(zip(orthanc.upload(small_blobs),
                             (hashlib.md5(b).hexdigest() for b in small_blobs), strict=True))
            assert orthanc.proc is not None
            print("direct (Orthanc alone)…", file=sys.stderr)
            # Without viewers: Orthanc gives each keep-alive connection one of its HTTP
            # threads, so viewers looping on it would starve the big downloads.
            with Peak({"orthanc": orthanc.proc.pid}) as direct:
                direct_s, _ = asyncio.run(load(orthanc.url, big, small, 0,
                                               orthanc.auth_header))
            workdir = tmp / "dicomcache"
            settings = serve_settings(workdir, orthanc.url, orthanc, max_size="64GiB",
                                      upstream={"read_timeout": 600}, prefetch={"mode": "off"})
            with Daemon(workdir, settings) as daemon:
                idle = rss(daemon.pid)
                print("through dicomcache, cold…", file=sys.stderr)
                with Peak({"dicomcache": daemon.pid, "orthanc": orthanc.proc.pid}) as cold:
                    cold_s, served = asyncio.run(load(daemon.base, big, small, args.viewers,
                                                      None))
                after = rss(daemon.pid)
                after_anon = rss(daemon.pid, "RssAnon")
        finally:
            orthanc.stop()
    mib = 1 << 20
    print(f"\n{args.count} cold instances of {frames * 2 * 1024 * 1024 / 1e6:.0f} MB at once, "
          f"{args.viewers} viewers loading a 40-slice study meanwhile")
    print(f"  direct (the big ones alone): {direct_s:.1f} s; Orthanc peak RSS "
          f"{direct.peak['orthanc'] / mib:.0f} MiB")
    print(f"  dicomcache cold: {cold_s:.1f} s ({cold_s / direct_s:.2f}× direct), "
          f"{served} small bodies served meanwhile")
    print(f"  dicomcache RSS: idle {idle / mib:.0f} MiB, peak {cold.peak['dicomcache'] / mib:.0f}"
          f" MiB, after {after / mib:.0f} MiB   (goal: peak ≤ 300 MiB)")
    print(f"    of which its own allocations (RssAnon): peak "
          f"{cold.peak_anon['dicomcache'] / mib:.0f} MiB, after {after_anon / mib:.0f} MiB")
    print(f"  Orthanc peak RSS behind dicomcache {cold.peak['orthanc'] / mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
