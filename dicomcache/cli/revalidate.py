"""``dicomcache revalidate``: compare stored instances with what Orthanc holds now.

For when the change feed cannot be trusted (it was off, Orthanc's history was
reset, a restore happened) or an operator wants certainty now: every chosen
entry's series is listed in Orthanc and every entry's MD5 compared with Orthanc's;
what Orthanc deleted or holds other content for is purged, with its metadata
copies.  Works with or without the daemon running (a running daemon drops what it
derived from the purged studies within a second).  Bodies are never downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TextIO

from dicomcache.cache.coherence import Coherence
from dicomcache.cache.instance import Instance
from dicomcache.cache.store import AsyncStore, Store
from dicomcache.cli.admin import forget_disk_copies
from dicomcache.cli.common import USAGE, load_settings, study_uid
from dicomcache.config import Settings
from dicomcache.errors import UpstreamError
from dicomcache.metrics import Metrics
from dicomcache.upstream.changes import StudyEvent
from dicomcache.upstream.client import OrthancClient


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    text = ("compare stored instances with Orthanc now (its list of each series, each "
            "instance's MD5) and purge what it deleted or changed")
    p = subparsers.add_parser("revalidate", help=text, description=text)
    p.add_argument("--config", "-c", type=Path, help="TOML config (default: embedded demo)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every stored instance")
    which.add_argument("--study", type=study_uid, metavar="UID", action="append",
                       help="one study's instances (repeatable)")
    which.add_argument("--patient", metavar="PATIENT_ID", help="one Patient ID's instances")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if settings is None:
        return USAGE
    if settings.upstream.url is None:
        print("config error: upstream.url: not set (revalidate needs an Orthanc)",
              file=sys.stderr)
        return USAGE
    return asyncio.run(revalidate(settings, studies=args.study or [], patient=args.patient,
                                  everything=args.all, out=sys.stdout))


async def revalidate(settings: Settings, *, studies: list[str], patient: str | None,
                     everything: bool, out: TextIO) -> int:
    """Check the chosen entries; print a summary; 1 when Orthanc could not be asked."""
    metrics = Metrics()
    store = AsyncStore(await asyncio.to_thread(Store, settings.cache.directory,
                                               settings.cache.max_size))
    client = await OrthancClient.create(settings.upstream, metrics)
    purged: set[str] = set()

    async def forget(event: StudyEvent) -> None:
        if event.study_uid is not None:
            purged.add(event.study_uid)

    coherence = Coherence(settings.cache, client, store, metrics, [forget])
    try:
        entries = await asyncio.to_thread(_chosen, store.sync, studies, patient, everything)
        series = sorted({e.series_oid for e in entries})
        try:
            for oid in series:
                await coherence.confirm_series(oid)
            present = await asyncio.to_thread(
                lambda: [e for e in (store.sync.get(x.orthanc_id) for x in entries) if e])
            await coherence.confirm_md5(present)
        except UpstreamError as exc:
            print(f"revalidate: Orthanc could not be asked: {exc}", file=out)
            return 1
        copies = await asyncio.to_thread(forget_disk_copies, settings, purged)
    finally:
        await client.close()
        await asyncio.to_thread(store.sync.close)
    deleted, replaced = coherence.purges["deleted_upstream"], coherence.purges["replaced"]
    also = f", with {copies}" if copies else ""
    print(f"revalidated {len(entries)} instance(s) in {len(series)} series: "
          f"{len(entries) - deleted - replaced} as in Orthanc, {deleted} deleted there, "
          f"{replaced} changed there (both purged{also})", file=out)
    return 0


def _chosen(store: Store, studies: list[str], patient: str | None,
            everything: bool) -> list[Instance]:
    if patient is not None:
        return store.of_patient(patient)
    if everything:
        return list(store.entries())
    wanted = set(studies)
    return [e for e in store.entries() if e.study_uid in wanted]
