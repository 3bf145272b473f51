"""Cache administration: ``stats``, ``purge``, ``verify``, ``pin`` and ``unpin``.

These work on the store's directory directly, so they run with or without
the daemon; while it runs, both see the same sqlite index (a pin made here
is honoured by its very next eviction; a purged or quarantined file that it
still had open may be served until it falls out of its open-file cache).
``stats`` adds the daemon's hit ratio (instance requests) and failed requests when its
``/metrics`` answers.

Usage::

    dicomcache stats [--config FILE] [--top 10] [--json]
    dicomcache purge [--config FILE] (--all | --study UID | --older-than 30d)
                     [--include-pinned] [--dry-run]
    dicomcache verify [--config FILE]
    dicomcache pin STUDY_UID [--config FILE]
    dicomcache unpin STUDY_UID [--config FILE]

Long operations draw a progress bar on stderr when it is a terminal
(``--progress`` / ``--no-progress`` to choose).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomcache.audit.record import PURGE, SUCCESS, Record, Subject
from dicomcache.cache.admin import check_entry, choose_purge, study_use
from dicomcache.cache.index import INDEX_FILE
from dicomcache.cache.store import Store
from dicomcache.cli.audit import open_trail, operator_actor, record_operation
from dicomcache.cli.common import USAGE, load_settings, study_uid
from dicomcache.cli.progress import Progress
from dicomcache.config import Settings, format_size
from dicomcache.dicom.uids import is_orthanc_id, is_uid
from dicomcache.dicomweb.answers import DiskCopies
from dicomcache.relay.spool import Spool

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

Command = Callable[[argparse.Namespace], int]


# --- argument types ----------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """``"30d"`` → seconds (units s, m, h, d, w)."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration such as 30d, 12h, 90m (units s, m, h, d, w)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``stats``, ``purge``, ``verify``, ``pin`` and ``unpin``."""
    def command(name: str, func: Command, text: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=text, description=text)
        p.add_argument("--config", "-c", type=Path, help="TOML config (default: embedded demo)")
        p.set_defaults(func=func)
        return p

    def progress_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: when stderr is a terminal)")

    p = command("stats", cmd_stats, "cache size, entries, hit ratio and top studies")
    p.add_argument("--top", type=int, default=10, metavar="N", help="studies to list (10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("purge", cmd_purge, "delete cached instances (files, quarantined copies, "
                "metadata copies, delivered relay copies): all, a study, a patient, an "
                "instance, or older ones")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every entry")
    which.add_argument("--study", type=study_uid, metavar="UID", help="one study's entries "
                       "(even if pinned; the pin stays)")
    which.add_argument("--patient", metavar="PATIENT_ID", help="one Patient ID's entries")
    which.add_argument("--instance", metavar="ID", help="one instance: its Orthanc ID or "
                       "SOP Instance UID (every patient's copy)")
    which.add_argument("--older-than", type=parse_duration, metavar="AGE",
                       help="entries stored longer ago than AGE, e.g. 30d, 12h")
    p.add_argument("--include-pinned", action="store_true",
                   help="with --all or --older-than, pinned studies too")
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    progress_flag(p)

    p = command("verify", cmd_verify, "re-check every stored entry's MD5 and DICOM structure; "
                "quarantine and report bad ones (exit 1 if any)")
    progress_flag(p)

    p = command("pin", cmd_pin, "keep a study's instances out of eviction")
    p.add_argument("study_uid", type=study_uid, metavar="STUDY_UID")
    p = command("unpin", cmd_unpin, "let a pinned study be evicted again")
    p.add_argument("study_uid", type=study_uid, metavar="STUDY_UID")


# --- shared ---------------------------------------------------------------------------------
def _open(args: argparse.Namespace, *, create: bool = False) -> tuple[Settings, Store] | int:
    """The settings and their store, or an exit status after saying what is wrong."""
    settings = load_settings(args)
    if settings is None:
        return USAGE
    directory = settings.cache.directory
    if not create and not (directory / INDEX_FILE).exists():
        print(f"no cache at {directory} (nothing stored yet, or another cache.directory?)",
              file=sys.stderr)
        return 1
    return settings, Store(directory, settings.cache.max_size)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def daemon_figures(settings: Settings, timeout: float = 2.0) -> dict[str, Any] | None:
    """Hit counters and upstream state from a running daemon's ``/metrics``, if it answers."""
    from prometheus_client.parser import text_string_to_metric_families

    server = settings.server
    host = server.admin_host if server.admin_port else server.host
    host = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{server.admin_port or server.port}/metrics"
    failed: dict[str, float] = {}
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8")
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                values[s.name] = values.get(s.name, 0.0) + s.value
                if s.name == "dicomcache_http_failed_requests_total" and s.value:
                    reason = s.labels.get("reason", "")
                    failed[reason] = failed.get(reason, 0.0) + s.value
    except Exception:
        return None
    if "dicomcache_cache_hits_total" not in values:
        return None
    return {"url": url, "hits": int(values["dicomcache_cache_hits_total"]),
            "misses": int(values.get("dicomcache_cache_misses_total", 0)),
            "failed": {k: int(v) for k, v in sorted(failed.items())},
            "upstream_up": values.get("dicomcache_upstream_up")}


def cmd_stats(args: argparse.Namespace) -> int:
    """Print size, entries, hit ratio (from the daemon) and the largest studies."""
    opened = _open(args)
    if isinstance(opened, int):
        return opened
    settings, store = opened
    try:
        stats = store.stats()
        pins = store.pinned()
        studies = study_use(store.listing(), pins)
        quarantined = len(list(store.quarantine_dir.glob("*.dcm")))
    finally:
        store.close()
    live = daemon_figures(settings)
    hits, misses = (live["hits"], live["misses"]) if live else (0, 0)
    failed: dict[str, int] = live["failed"] if live else {}
    ratio = hits / (hits + misses) if hits + misses else None
    top = sorted(studies.values(), key=lambda s: s.size_bytes, reverse=True)[:max(args.top, 0)]
    pinned_use = [s for s in studies.values() if s.pinned]
    if args.json:
        print(json.dumps({
            "directory": str(settings.cache.directory), **stats,
            "studies": len(studies), "pinned_studies": sorted(pins),
            "quarantined_files": quarantined, "daemon": live and live["url"],
            "hits": live and hits, "misses": live and misses, "hit_ratio": ratio,
            "failed_requests": live and sum(failed.values()), "failed_by_reason": failed,
            "top_studies": [{"study_uid": s.study_uid, "instances": s.instances,
                             "size_bytes": s.size_bytes, "last_used": s.last_used,
                             "pinned": s.pinned} for s in top],
        }, indent=2))
        return 0
    used = stats["size_bytes"] / stats["max_bytes"] if stats["max_bytes"] else 0.0
    print(f"cache       {settings.cache.directory}")
    print(f"size        {format_size(stats['size_bytes'])} of "
          f"{format_size(stats['max_bytes'])} ({used:.1%})")
    print(f"entries     {stats['entries']} instance(s) in {len(studies)} study(ies)")
    print(f"pinned      {len(pins)} study(ies)"
          + (f", {sum(s.instances for s in pinned_use)} instance(s), "
             f"{format_size(sum(s.size_bytes for s in pinned_use))} cached" if pins else ""))
    if live is None:
        print("hit ratio   n/a (the daemon's /metrics does not answer)")
    elif ratio is None:
        print(f"hit ratio   n/a (no instance requests yet; {live['url']})")
    else:
        print(f"hit ratio   {ratio:.1%} of instance requests ({hits} hits, {misses} misses "
              "since the daemon started)")
    if live is not None:
        why = ", ".join(f"{k} {v}" for k, v in failed.items())
        print(f"failed      {sum(failed.values())} viewer request(s) since the daemon started"
              + (f" ({why})" if why else ""))
    if quarantined:
        print(f"quarantine  {quarantined} file(s) in {store.quarantine_dir}")
    if top:
        print(f"\ntop {len(top)} studies by size:")
        print(f"  {'StudyInstanceUID':<64} {'inst':>6} {'size':>10}  last used")
        for s in top:
            print(f"  {s.study_uid:<64} {s.instances:>6} {format_size(s.size_bytes):>10}  "
                  f"{_when(s.last_used)}{'  pinned' if s.pinned else ''}")
    return 0


# --- purge -------------------------------------------------------------------------------
def cmd_purge(args: argparse.Namespace) -> int:
    """Delete the chosen entries (and their files)."""
    opened = _open(args)
    if isinstance(opened, int):
        return opened
    store = opened[1]
    trail = None
    if not args.dry_run:
        trail = open_trail(opened[0])  # refused before anything is deleted, when required
        if trail is None:
            store.close()
            return 1
    try:
        choice = choose_purge(store.entries(), store.pinned(), now=time.time(),
                              study=args.study, patient=args.patient,
                              instance=args.instance, older_than=args.older_than,
                              include_pinned=args.include_pinned)
        chosen, kept_pinned = choice.entries, choice.kept_pinned
        nbytes = sum(e.size for e in chosen)
        kept = f"; {kept_pinned} instance(s) of pinned studies kept" if kept_pinned else ""
        if args.dry_run:
            print(f"would purge {len(chosen)} instance(s), {format_size(nbytes)}{kept}")
            return 0
        progress = Progress("purge", len(chosen), nbytes, enabled=args.progress)
        removed = removed_bytes = 0
        for start in range(0, len(chosen), 256):
            batch = chosen[start:start + 256]
            n, b = store.purge(batch, every_study=args.all or args.older_than is not None)
            removed += n
            removed_bytes += b
            progress.update(len(batch), sum(e.size for e in batch))
        progress.close()
        others = _purge_copies(opened[0], store, args, {e.study_uid for e in chosen
                                                          if e.study_uid})
        store.index.checkpoint()
    finally:
        store.close()
    print(f"purged {removed} instance(s), {format_size(removed_bytes)}{kept}{others}")
    assert trail is not None
    return 0 if record_operation(trail, _purge_record(args, removed, removed_bytes)) else 1


def _purge_record(args: argparse.Namespace, removed: int, removed_bytes: int) -> Record:
    """The audit record of a purge: who ran it, what it selected, how much went."""
    instance = args.instance
    selection = ("--all" if args.all else f"--older-than {args.older_than:.0f}s"
                 if args.older_than is not None else None)
    subject = Subject(patient_id=args.patient, study_uid=args.study,
                      sop_uid=instance if instance and is_uid(instance) else None,
                      orthanc_id=instance if instance and is_orthanc_id(instance) else None,
                      instances=removed)
    return Record(PURGE, operator_actor(), subject, SUCCESS, bytes=removed_bytes,
                  detail=selection)


def _purge_copies(settings: Settings, store: Store, args: argparse.Namespace,
                  studies: set[str]) -> str:
    """What a purge by study, patient or instance (or of everything) removes besides the
    entries: quarantined files, the DICOMweb metadata copies on disk and the relay's
    delivered copies of those studies; a note for the summary line."""
    if args.older_than is not None:
        return ""
    if args.study:
        studies.add(args.study)
    everything = bool(args.all)
    quarantined = store.drop_quarantined(None if everything else studies,
                                         patient=args.patient, instance=args.instance)
    relayed = 0
    spool_dir = settings.relay.spool_directory
    if (spool_dir / "state.sqlite").exists() and (everything or studies):
        spool = Spool(spool_dir)
        spool.open(recover=False)
        try:
            relayed = spool.purge_delivered(None if everything else studies)
        finally:
            spool.close()
    answers = forget_disk_copies(settings, None if everything else studies)
    parts = [f"{n} {what}" for n, what in ((quarantined, "quarantined file(s)"),
                                           (relayed, "delivered relay cop(ies)")) if n]
    if answers:
        parts.append(answers)
    return f"; also removed {', '.join(parts)}" if parts else ""


def forget_disk_copies(settings: Settings, studies: set[str] | None) -> str:
    """Delete the DICOMweb answers kept on disk for these studies (``None``: all), as a
    running daemon does when it learns of a purge: a stopped one must not find them at
    its next start.  Says what went, for a summary line ("" when nothing)."""
    copies = DiskCopies(settings.cache.directory / "dicomweb", settings.dicomweb.memory_size)
    if not copies.directory.is_dir() or studies == set():
        return ""
    if studies is None:
        copies.forget(None)
        return "every DICOMweb metadata copy"
    for uid in studies:
        copies.forget(uid)
    return f"the DICOMweb metadata copies of {len(studies)} stud(ies)"


# --- verify ------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    """Re-check every entry; quarantine bad ones; exit 1 if any was bad or missing."""
    opened = _open(args)
    if isinstance(opened, int):
        return opened
    store = opened[1]
    bad: dict[str, int] = {}
    missing = intact = 0
    try:
        entries = list(store.entries())
        total_bytes = sum(e.size for e in entries)
        progress = Progress("verify", len(entries), total_bytes, enabled=args.progress)
        for entry in entries:
            try:
                error = check_entry(entry)
            except FileNotFoundError:
                # Gone with its row (evicted by a running daemon meanwhile) is fine;
                # a row left without its file is dropped so the instance is fetched again.
                if store.purge([entry])[0]:
                    missing += 1
                    _report(progress, f"MISSING {entry.sop_uid} (study {entry.study_uid}): "
                            f"{entry.path} is gone; entry dropped")
            else:
                if error is None:
                    intact += 1
                else:
                    bad[error.cause] = bad.get(error.cause, 0) + 1
                    moved = store.quarantine(entry, error.cause, error.reason)
                    _report(progress, f"BAD {error.cause} {entry.sop_uid} "
                            f"(study {entry.study_uid}): {error.reason}; "
                            f"quarantined to {moved}")
            progress.update(1, entry.size)
        progress.close()
    finally:
        store.close()
    causes = ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
    print(f"verified {len(entries)} instance(s), {format_size(total_bytes)}: {intact} intact, "
          f"{sum(bad.values())} quarantined{f' ({causes})' if causes else ''}, "
          f"{missing} missing")
    return 1 if bad or missing else 0


def _report(progress: Progress, line: str) -> None:
    """A finding on stdout, without tearing the progress bar on a shared terminal."""
    if progress.enabled:
        progress.stream.write("\r\033[K")
    print(line, flush=True)


# --- pin / unpin -------------------------------------------------------------------------
def _study_summary(store: Store, uid: str) -> tuple[int, int]:
    entries = [e for e in store.entries() if e.study_uid == uid]
    return len(entries), sum(e.size for e in entries)


def cmd_pin(args: argparse.Namespace) -> int:
    """Pin a study (cached or not): its instances are never evicted."""
    opened = _open(args, create=True)
    if isinstance(opened, int):
        return opened
    store = opened[1]
    try:
        new = store.pin(args.study_uid)
        count, nbytes = _study_summary(store, args.study_uid)
    finally:
        store.close()
    state = "pinned" if new else "already pinned"
    print(f"{state}: study {args.study_uid} ({count} instance(s), {format_size(nbytes)} "
          "cached now; instances fetched later are kept too)")
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    """Unpin a study: eviction may take its instances again."""
    opened = _open(args, create=True)
    if isinstance(opened, int):
        return opened
    store = opened[1]
    try:
        was = store.unpin(args.study_uid)
    finally:
        store.close()
    print(f"{'unpinned' if was else 'was not pinned'}: study {args.study_uid}")
    return 0

