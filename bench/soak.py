"""A bounded soak: viewers, prefetch and a faulty link for minutes, a restart in the middle.

One real Orthanc, the WAN emulator in front of it injecting faults into 5 % of
its answers (lying truncations, cuts, resets, flipped bytes, 503s), and
``dicomcache serve`` as a subprocess with study prefetch on and a cache smaller
than the data (so eviction runs too).  Simulated viewers open random studies
the way OHIF and WADO-URI viewers do (QIDO, series QIDO, series metadata, then
every slice as ``frames/1`` or as a WADO-URI / Orthanc-REST file) and check
**every byte** they receive against the generated originals.  Half-way,
dicomcache is stopped (SIGTERM) and started again on the same cache.

Reported: requests, failed answers (by status), wrong bodies (must be 0),
requests refused while restarting, the dicomcache process's peak and final
RSS and open file descriptors (sampled every second), and bytes on the link
per byte delivered to viewers (the baseline, Orthanc direct, is 1.0 by
definition: each viewer byte would cross the link).

    ./run bench bench/soak.py                 # 10 minutes, 40 viewers
    ./run bench bench/soak.py --short         # 45 s, 6 viewers (CI runs this)

Exit 1 when a viewer got a wrong body, when more than ``--max-error-rate`` of
the answers failed outside the restart, or when the second half needed more
descriptors than the first (the open-file cache and the pools are bounded: more
would be a leak).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from _daemon import Daemon, descriptors, rss, sampling, serve_settings  # noqa: E402
from dicomcache.devtools.orthanc import OrthancProcess  # noqa: E402
from dicomcache.devtools.samples import encode, make_ct_series  # noqa: E402
from dicomcache.devtools.wanem import LinkProfile, ThreadedWanEmulator  # noqa: E402
from dicomcache.dicom import multipart  # noqa: E402

FRAME_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
#: 5 % of Orthanc's answers get one fault.
FAULTY = LinkProfile(latency_ms=10, bandwidth_mbit=200, truncate_lying=0.01, truncate=0.01,
                     reset=0.01, corrupt=0.01, status_503=0.01)


@dataclass(frozen=True)
class Slice:
    study: str
    series: str
    sop: str
    orthanc_id: str
    md5: str
    pixels_md5: str


@dataclass
class Tally:
    requests: int = 0
    viewer_bytes: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    refused_in_restart: int = 0
    restarting: bool = False


def make_data(orthanc: OrthancProcess, studies: int, series: int, slices: int,
              size: int) -> list[Slice]:
    out: list[Slice] = []
    for s in range(studies):
        for e in range(series):
            datasets = make_ct_series(slices, rows=size, columns=size, seed=1000 + s * 10 + e,
                                      patient_id=f"PSOAK{s}")
            if e:  # the second series joins the first one's study
                first = out[-1]
                for ds in datasets:
                    ds.StudyInstanceUID = first.study
            blobs = [encode(ds, ExplicitVRLittleEndian) for ds in datasets]
            ids = orthanc.upload(blobs)
            out += [Slice(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                          str(ds.SOPInstanceUID), oid, hashlib.md5(blob).hexdigest(),
                          hashlib.md5(ds.PixelData).hexdigest())
                    for ds, blob, oid in zip(datasets, blobs, ids, strict=True)]
    return out


async def get(session: aiohttp.ClientSession, tally: Tally, url: str,
              accept: str | None = None) -> tuple[int, str, bytes] | None:
    """One request; ``None`` when dicomcache was not there (restart) or failed to answer."""
    tally.requests += 1
    try:
        async with session.get(url, headers={"Accept": accept} if accept else None) as resp:
            body = await resp.read()
            tally.viewer_bytes += len(body)
            if resp.status != 200:
                tally.failed[str(resp.status)] += 1
                return None
            return resp.status, resp.headers.get("Content-Type", ""), body
    except (aiohttp.ClientError, TimeoutError) as exc:
        if tally.restarting or isinstance(exc, aiohttp.ClientConnectorError):
            tally.refused_in_restart += 1
            await asyncio.sleep(0.5)
        else:
            tally.failed[type(exc).__name__] += 1
        return None


async def open_study(session: aiohttp.ClientSession, base: str, tally: Tally,
                     study: list[Slice], rng: random.Random) -> None:
    """OHIF's open sequence for one series of the study, then its slices."""
    uid = study[0].study
    dw = f"{base}/dicom-web/studies"
    await get(session, tally, f"{dw}?StudyInstanceUID={uid}", "application/dicom+json")
    await get(session, tally, f"{dw}/{uid}/series", "application/dicom+json")
    series = rng.choice(sorted({s.series for s in study}))
    await get(session, tally, f"{dw}/{uid}/series/{series}/metadata", "application/dicom+json")
    for sl in [s for s in study if s.series == series]:
        how = rng.random()
        if how < 0.6:
            got = await get(session, tally, f"{dw}/{uid}/series/{series}/instances/{sl.sop}"
                            "/frames/1", FRAME_ACCEPT)
            if got is not None:
                parts = multipart.split(got[2], got[1])
                if len(parts) != 1 or hashlib.md5(parts[0].body).hexdigest() != sl.pixels_md5:
                    tally.wrong.append(f"frames/1 of {sl.sop}")
            continue
        url = (f"{base}/wado?requestType=WADO&studyUID={uid}&seriesUID={series}"
               f"&objectUID={sl.sop}&contentType=application/dicom" if how < 0.8
               else f"{base}/instances/{sl.orthanc_id}/file")
        got = await get(session, tally, url)
        if got is not None and hashlib.md5(got[2]).hexdigest() != sl.md5:
            tally.wrong.append(f"{url.split('?')[0].rsplit('/', 1)[-1]} of {sl.sop}")


async def viewers(base: str, data: list[Slice], n: int, until: float, tally: Tally,
                  seed: int) -> None:
    studies: dict[str, list[Slice]] = {}
    for sl in data:
        studies.setdefault(sl.study, []).append(sl)
    timeout = aiohttp.ClientTimeout(total=120)

    async def one(i: int) -> None:
        rng = random.Random(seed + i)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < until:
                await open_study(session, base, tally, rng.choice(list(studies.values())), rng)

    await asyncio.gather(*(one(i) for i in range(n)))


def sample(daemon: Daemon) -> tuple[int, int] | None:
    """(RSS bytes, open descriptors) of the running daemon, or None."""
    if not daemon.running():
        return None
    memory = rss(daemon.pid)
    return (memory, descriptors(daemon.pid)) if memory else None  # 0: it just ended


def sample_into(daemon: Daemon, into: list[tuple[float, int, int]]) -> Callable[[], None]:
    """A sampler for ``sampling``: the daemon's RSS and descriptors, with the time."""
    def run() -> None:
        got = sample(daemon)
        if got is not None:
            into.append((time.monotonic(), *got))

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="45 s and 6 viewers (CI)")
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--viewers", type=int, default=40)
    ap.add_argument("--max-error-rate", type=float, default=0.01,
                    help="failed answers allowed outside the restart (fraction)")
    args = ap.parse_args()
    seconds, n_viewers = (45.0, 6) if args.short else (args.seconds, args.viewers)
    studies, per_series, size = (3, 12, 128) if args.short else (8, 40, 256)

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp_name:
        tmp = Path(tmp_name)
        orthanc = OrthancProcess(tmp / "orthanc")
        orthanc.start()
        try:
            print(f"generating {studies} studies × 2 series × {per_series} slices "
                  f"({size}²)…", file=sys.stderr)
            data = make_data(orthanc, studies, 2, per_series, size)
            data_bytes = sum(os.path.getsize(p) for p in (tmp / "orthanc" / "storage").rglob("*")
                             if p.is_file() and len(p.name) == 36)
            with ThreadedWanEmulator("127.0.0.1", orthanc.http_port) as wan:
                wan.set_profile(FAULTY)
                # A cache of 60 % of the data: eviction runs during the soak.
                workdir = tmp / "dicomcache"
                daemon = Daemon(workdir, serve_settings(
                    workdir, f"http://127.0.0.1:{wan.port}", orthanc,
                    max_size=max(int(data_bytes * 0.6), 1 << 20), prefetch={"mode": "study"}),
                    log=workdir / "dicomcache.log")
                tally = Tally()
                samples: list[tuple[float, int, int]] = []
                daemon.start()
                started = time.monotonic()
                half = started + seconds / 2
                restarted = started + seconds  # set by the restart

                async def restart() -> None:
                    nonlocal restarted
                    await asyncio.sleep(max(0.0, half - time.monotonic()))
                    tally.restarting = True
                    await asyncio.to_thread(daemon.stop)
                    await asyncio.to_thread(daemon.start)
                    restarted = time.monotonic()
                    await asyncio.sleep(2.0)  # connections cut by the stop, retried
                    tally.restarting = False

                async def soak() -> None:
                    await asyncio.gather(restart(), viewers(
                        daemon.base, data, n_viewers, started + seconds, tally, seed=1))

                with sampling(1.0, sample_into(daemon, samples)):
                    asyncio.run(soak())
                    final = sample(daemon)
                before_restart = max((s for s in samples if s[0] < half), default=None,
                                     key=lambda s: s[0])
                daemon.stop()
                link = wan.stats()
        finally:
            orthanc.stop()

    answered = tally.requests - tally.refused_in_restart
    failed = sum(tally.failed.values())
    after = [s for s in samples if s[0] > restarted + 5]
    print(f"\nsoak: {seconds:.0f} s, {n_viewers} viewers, {len(data)} instances "
          f"({data_bytes / 2**20:.1f} MiB), faults on 5 % of Orthanc's answers, "
          "a restart half-way")
    print(f"  requests {tally.requests}, failed answers {failed} "
          f"({failed / max(answered, 1):.2%}: {dict(tally.failed) or 'none'}), "
          f"refused while restarting {tally.refused_in_restart}")
    print(f"  wrong bodies {len(tally.wrong)}" + (f": {tally.wrong[:5]}" if tally.wrong else ""))
    if samples:
        print(f"  RSS peak {max(s[1] for s in samples) / 2**20:.0f} MiB, "
              f"before restart {before_restart[1] / 2**20 if before_restart else 0:.0f} MiB, "
              f"final {final[0] / 2**20 if final else 0:.0f} MiB")
        print(f"  descriptors peak {max(s[2] for s in samples)}, "
              f"before restart {before_restart[2] if before_restart else '-'}, "
              f"final {final[1] if final else '-'}")
    print(f"  link: {link.bytes_down / 2**20:.1f} MiB down for {tally.viewer_bytes / 2**20:.1f} "
          f"MiB to viewers = {link.bytes_down / max(tally.viewer_bytes, 1):.3f} bytes on the "
          "link per viewer byte (direct: 1.0)")
    print(f"  link faults injected: {link.summary()}")
    bad = []
    if tally.wrong:
        bad.append("a viewer got a wrong body")
    if failed > args.max_error_rate * max(answered, 1):
        bad.append(f"more than {args.max_error_rate:.0%} of answers failed")
    first_half = [s[2] for s in samples if s[0] < restarted]
    if first_half and after and max(s[2] for s in after) > max(first_half) + 16:
        # The open-file cache (512) and the pools are bounded: a second half needing
        # more descriptors than the first is a leak.
        bad.append("descriptors grew beyond the first half's peak")
    for why in bad:
        print(f"FAIL: {why}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
