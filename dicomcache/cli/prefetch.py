"""``dicomcache prefetch``: fill the cache ahead of time (e.g. tomorrow's list, from cron).

Studies are named by StudyInstanceUID, PatientID or AccessionNumber (the last
two resolved with Orthanc's ``/tools/find``), listed first (so the progress bar
knows the total), then fetched through the same verified path as the daemon's
misses, into the same ``cache.directory`` (safe while ``dicomcache serve``
runs: the store's index is shared through sqlite).  Studies of one run count
as "being viewed" for the cache bound: the run stops before they would fill
more than ``prefetch.max_fraction`` of ``cache.max_size``.

Progress (instances, bytes, rate, ETA) goes to stderr as one updating line when
it is a terminal (nothing otherwise), and a summary to stdout.  Exit status:
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

from dicomcache.cache.fetch import Fetcher
from dicomcache.cache.store import AsyncStore, Store
from dicomcache.cli.common import USAGE, load_settings, study_uid
from dicomcache.cli.progress import Progress
from dicomcache.config import Settings, format_size
from dicomcache.errors import NotFoundUpstream, UpstreamError
from dicomcache.metrics import Metrics
from dicomcache.prefetch.plan import Job
from dicomcache.prefetch.scheduler import Prefetcher, Tally
from dicomcache.upstream.client import OrthancClient


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "prefetch",
        help="fetch studies into the cache ahead of time (by study, patient, accession)",
        # The docstring's second paragraph, without its reStructuredText quoting.
        description=__doc__.split("\n\n")[1].replace("``", "") if __doc__ else None)
    p.add_argument("--config", "-c", type=Path, help="TOML config (default: embedded demo)")
    p.add_argument("--study", action="append", default=[], metavar="UID", type=study_uid,
                   help="StudyInstanceUID (repeatable)")
    p.add_argument("--patient", action="append", default=[], metavar="ID",
                   help="every study of this PatientID (repeatable)")
    p.add_argument("--accession", action="append", default=[], metavar="NUMBER",
                   help="studies with this AccessionNumber (repeatable)")
    p.add_argument("--parallel", type=int, metavar="N",
                   help="downloads in flight (default: prefetch.parallel)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not (args.study or args.patient or args.accession):
        print("dicomcache prefetch: give --study, --patient or --accession", file=sys.stderr)
        return USAGE
    if args.parallel is not None and not 1 <= args.parallel <= 64:
        print("dicomcache prefetch: --parallel must be between 1 and 64", file=sys.stderr)
        return USAGE
    settings = load_settings(args)
    if settings is None:
        return USAGE
    if settings.upstream.url is None:
        print("config error: upstream.url: not set (prefetch needs an Orthanc)", file=sys.stderr)
        return USAGE
    parallel = args.parallel or settings.prefetch.parallel
    return asyncio.run(prefetch(settings, studies=args.study, patients=args.patient,
                                accessions=args.accession, parallel=parallel,
                                out=sys.stdout, err=_progress_stream(args)))


def _progress_stream(args: argparse.Namespace) -> TextIO | None:
    """stderr when a progress bar is wanted there: asked for, or a terminal and not quiet."""
    wanted = args.progress if args.progress is not None else sys.stderr.isatty()
    return sys.stderr if wanted and not args.quiet else None


async def find_studies(client: OrthancClient, key: str, value: str) -> list[str]:
    """StudyInstanceUIDs of the studies whose ``key`` (PatientID, AccessionNumber) is ``value``."""
    query = {"Level": "Study", "Query": {key: value}, "Expand": True}
    found = await client.get_json("/tools/find", method="POST", body=json.dumps(query).encode())
    return [s["MainDicomTags"]["StudyInstanceUID"] for s in found
            if s.get("MainDicomTags", {}).get("StudyInstanceUID")]


async def prefetch(settings: Settings, *, studies: list[str], patients: list[str],
                   accessions: list[str], parallel: int, out: TextIO,
                   err: TextIO | None) -> int:
    """Resolve, list and fetch; draw a progress bar on ``err`` (if given) and print a
    summary to ``out``."""
    metrics = Metrics()
    store = AsyncStore(await asyncio.to_thread(Store, settings.cache.directory,
                                               settings.cache.max_size))
    client = await OrthancClient.create(settings.upstream, metrics)
    problems: list[str] = []
    try:
        fetcher = Fetcher(client, store, metrics, stream_above=settings.cache.stream_above)
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
        progress = Tally()
        bar = Progress("prefetch", total, total_bytes, stream=err, enabled=err is not None,
                       unit="instances")
        drawing = asyncio.create_task(_follow(progress, bar))
        try:
            for job in jobs:
                await prefetcher.fetch_listed(job, progress)
        finally:
            drawing.cancel()
            await asyncio.gather(drawing, return_exceptions=True)
            _sync(progress, bar)
            bar.close()
    finally:
        await client.close()
        await store.flush_touches()
        await asyncio.to_thread(store.sync.close)
    elapsed = time.monotonic() - progress.started if jobs else 0.0
    print(summary(len(jobs), progress, elapsed), file=out)
    for problem in problems + progress.errors[:20]:
        print(f"  {problem}", file=out)
    if len(progress.errors) > 20:
        print(f"  … and {len(progress.errors) - 20} more", file=out)
    return 0 if not problems and not progress.failed and not progress.budget else 1


def summary(studies: int, t: Tally, elapsed: float) -> str:
    """The line a run ends with (sizes in binary units, as everywhere)."""
    rate = t.bytes / elapsed if elapsed > 0 else 0.0
    return (f"prefetch: {studies} stud{'y' if studies == 1 else 'ies'}, "
            f"{t.total} instances: {t.fetched} fetched, {t.present} already "
            f"cached, {t.failed} failed, {t.budget} left out (cache bound); "
            f"{format_size(t.bytes)} in {elapsed:.1f} s ({format_size(rate)}/s)")


def _sync(tally: Tally, bar: Progress) -> None:
    bar.update(tally.done - bar.done, tally.done_bytes - bar.done_bytes,
               failed=tally.failed - bar.failed)


async def _follow(tally: Tally, bar: Progress) -> None:
    """Redraw the bar from the run's counts while it runs."""
    while bar.enabled:
        _sync(tally, bar)
        await asyncio.sleep(0.25)
