"""``dicomcache prefetch``: fill the cache ahead of time (e.g. tomorrow's list, from cron).

Studies are named by StudyInstanceUID, PatientID or AccessionNumber (the last
two resolved with Orthanc's ``/tools/find``), listed first (so the progress bar
knows the total), then fetched through the same verified path as the daemon's
misses, into the same ``cache.directory`` (safe while ``dicomcache serve``
runs: the store's index is shared through sqlite).  Studies of one run count
as "being viewed" for the cache bound: the run stops before they would fill
more than ``prefetch.max_fraction`` of ``cache.max_size``.

Progress (instances, bytes, rate, ETA) goes to stderr — one updating line on a
terminal, a line every 5 s otherwise — and a summary to stdout.  Exit status:
0 when every instance is local, 1 when anything failed, was not found or did
not fit, 2 for a bad config or command line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TextIO

from dicomcache.config import Settings
from dicomcache.errors import ConfigError, NotFoundUpstream, UpstreamError
from dicomcache.cache.fetch import Fetcher
from dicomcache.metrics import Metrics
from dicomcache.prefetch.scheduler import Job, Prefetcher, Progress, get_json
from dicomcache.cache.store import AsyncStore, Store
from dicomcache.upstream.client import OrthancClient


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "prefetch", help="fetch studies into the cache ahead of time (by study, patient, accession)",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--config", "-c", type=Path, help="TOML config (default: embedded demo)")
    p.add_argument("--study", action="append", default=[], metavar="UID",
                   help="StudyInstanceUID (repeatable)")
    p.add_argument("--patient", action="append", default=[], metavar="ID",
                   help="every study of this PatientID (repeatable)")
    p.add_argument("--accession", action="append", default=[], metavar="NUMBER",
                   help="studies with this AccessionNumber (repeatable)")
    p.add_argument("--parallel", type=int, metavar="N",
                   help="downloads in flight (default: prefetch.parallel)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicomcache.cli.main import settings_from  # cli imports this module's add_cli: import late

    if not (args.study or args.patient or args.accession):
        print("dicomcache prefetch: give --study, --patient or --accession", file=sys.stderr)
        return 2
    if args.parallel is not None and not 1 <= args.parallel <= 64:
        print("dicomcache prefetch: --parallel must be between 1 and 64", file=sys.stderr)
        return 2
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        for key, message in exc.problems:
            print(f"config error: {key}: {message}", file=sys.stderr)
        return 2
    if settings.upstream.url is None:
        print("config error: upstream.url: not set (prefetch needs an Orthanc)", file=sys.stderr)
        return 2
    parallel = args.parallel or settings.prefetch.parallel
    return asyncio.run(prefetch(settings, studies=args.study, patients=args.patient,
                                accessions=args.accession, parallel=parallel,
                                out=sys.stdout, err=None if args.quiet else sys.stderr))


async def find_studies(client: OrthancClient, key: str, value: str) -> list[str]:
    """StudyInstanceUIDs of the studies whose ``key`` (PatientID, AccessionNumber) is ``value``."""
    query = {"Level": "Study", "Query": {key: value}, "Expand": True}
    found = await get_json(client, "/tools/find", method="POST", body=json.dumps(query).encode())
    return [s["MainDicomTags"]["StudyInstanceUID"] for s in found
            if s.get("MainDicomTags", {}).get("StudyInstanceUID")]


async def prefetch(settings: Settings, *, studies: list[str], patients: list[str],
                   accessions: list[str], parallel: int, out: TextIO,
                   err: TextIO | None) -> int:
    """Resolve, list and fetch; print progress to ``err`` and a summary to ``out``."""
    metrics = Metrics()
    store = AsyncStore(await asyncio.to_thread(Store, settings.cache.directory,
                                               settings.cache.max_size))
    client = OrthancClient(settings.upstream, metrics)
    problems: list[str] = []
    try:
        fetcher = Fetcher(client, store, metrics)
        prefetcher = Prefetcher(dataclasses.replace(settings.prefetch, parallel=parallel),
                                fetcher, store, metrics, settings.cache.max_size)
        uids = list(dict.fromkeys(studies))
        for key, values in (("PatientID", patients), ("AccessionNumber", accessions)):
            for value in values:
                try:
                    found = await find_studies(client, key, value)
                except (UpstreamError, NotFoundUpstream) as exc:
                    problems.append(f"{key} {value}: {exc}")
                    continue
                if not found:
                    problems.append(f"{key} {value}: no study in Orthanc")
                uids.extend(u for u in found if u not in uids)
        jobs: list[Job] = []
        for uid in uids:
            job = Job(uid, None, None, "study")
            try:
                job.items = collections.deque(await prefetcher.listing(job))
            except (UpstreamError, NotFoundUpstream) as exc:
                problems.append(f"study {uid}: {exc}")
                continue
            jobs.append(job)
            prefetcher.viewing[uid] = time.monotonic()  # the whole run is one working set
            prefetcher.study_bytes[job.key] = sum(it.size for it in job.items)
        total = sum(len(j.items) for j in jobs)
        total_bytes = sum(prefetcher.study_bytes[j.key] for j in jobs)
        progress = Progress()
        bar = asyncio.create_task(_progress(progress, total, total_bytes, err)) if err else None
        try:
            for job in jobs:
                await prefetcher.fetch_listed(job, progress)
        finally:
            if bar is not None:
                bar.cancel()
                await asyncio.gather(bar, return_exceptions=True)
                _draw(progress, total, total_bytes, err, final=True)  # type: ignore[arg-type]
    finally:
        await client.close()
        await store.flush_touches()
        await asyncio.to_thread(store.sync.close)
    elapsed = time.monotonic() - progress.started if jobs else 0.0
    rate = progress.bytes / elapsed / 1e6 if elapsed > 0 else 0.0
    print(f"prefetch: {len(jobs)} stud{'y' if len(jobs) == 1 else 'ies'}, "
          f"{progress.total} instances: {progress.fetched} fetched, {progress.present} already "
          f"cached, {progress.failed} failed, {progress.budget} left out (cache bound); "
          f"{progress.bytes / 1e6:.1f} MB in {elapsed:.1f} s ({rate:.1f} MB/s)", file=out)
    for problem in problems + progress.errors[:20]:
        print(f"  {problem}", file=out)
    if len(progress.errors) > 20:
        print(f"  … and {len(progress.errors) - 20} more", file=out)
    return 0 if not problems and not progress.failed and not progress.budget else 1


def _draw(p: Progress, total: int, total_bytes: int, err: TextIO, final: bool = False) -> None:
    elapsed = max(1e-6, time.monotonic() - p.started)
    rate = p.bytes / elapsed
    left = max(0, total_bytes - p.done_bytes)
    eta = f"{left / rate:.0f}s" if rate > 0 and left else ("0s" if not left else "?")
    frac = p.done / total if total else 1.0
    width = 24
    fill = int(frac * width)
    line = (f"[{'#' * fill}{'.' * (width - fill)}] {p.done}/{total} instances  "
            f"{p.done_bytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB  {rate / 1e6:.1f} MB/s  "
            f"ETA {eta}" + (f"  {p.failed} failed" if p.failed else ""))
    if err.isatty():
        err.write("\r" + line + ("\n" if final else ""))
    else:
        err.write(line + "\n")
    err.flush()


async def _progress(p: Progress, total: int, total_bytes: int, err: TextIO) -> None:
    interval = 0.25 if err.isatty() else 5.0
    while True:
        await asyncio.sleep(interval)
        _draw(p, total, total_bytes, err)
