"""``dicomcache audit``: who looked at this patient (or study), from the audit trail.

    dicomcache audit --patient ID [--study UID] [--principal NAME]
                     [--since 2026-12-01|2h] [--until …] [--json] --config FILE

Reads the current file and every rotated one (gzipped ones too), oldest first,
streaming (bounded memory): one line per matching record, or the records
themselves as JSON lines with ``--json`` (each with ``"match"``: why it
matched — ``patient``, ``study``, ``orthanc id``, ``query``).  Exit status 0
when something matched, 1 when nothing did, 2 on a usage error.

Also :func:`operator_actor` and :func:`record_operation`, which the
administration commands use to audit what they do to patient data (purges).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from dicomcache.audit.query import Query, parse_when, search, stamp
from dicomcache.audit.record import Actor, Record
from dicomcache.audit.trail import AuditLog, audit_files
from dicomcache.cli.common import USAGE, load_settings
from dicomcache.config import Settings
from dicomcache.metrics import Metrics


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "audit", help="who accessed a patient's data (from the audit trail)",
        description="Search the audit trail ([audit] file and its rotated files) for the "
                    "accesses to a patient's or a study's data.")
    p.add_argument("--config", "-c", type=Path, help="TOML config (its [audit] file is read)")
    p.add_argument("--patient", metavar="ID", help="Patient ID (records naming it, its "
                   "studies, its Orthanc IDs, and searches for it)")
    p.add_argument("--study", metavar="UID", help="Study Instance UID")
    p.add_argument("--principal", metavar="NAME", help="only this user / calling AE title")
    p.add_argument("--since", metavar="WHEN", help="from (ISO date/time, or 2h, 7d… ago)")
    p.add_argument("--until", metavar="WHEN", help="until (excluded; a date alone: its end)")
    p.add_argument("--json", action="store_true", help="the records as JSON lines")
    p.set_defaults(func=run)


def _line(why: str, rec: dict[str, object]) -> str:
    def g(key: str) -> str:
        value = rec.get(key)
        return "-" if value is None else str(value)
    what = " ".join(f"{k}={rec[k]}" for k in ("patient_id", "study_uid", "series_uid",
                                              "sop_uid", "orthanc_id", "query",
                                              "destination") if rec.get(k) is not None)
    return (f"{g('time')}  {g('principal')} ({g('auth')}) from {g('client')}  "
            f"{g('action')} {g('outcome')} {g('status')} {g('bytes')} B  "
            f"{g('method')} {g('path')}  {what}  [{why}; {g('source')}]")


def run(args: argparse.Namespace) -> int:
    if args.patient is None and args.study is None and args.principal is None:
        print("give --patient, --study or --principal", file=sys.stderr)
        return USAGE
    settings = load_settings(args)
    if settings is None:
        return USAGE
    try:
        since = stamp(parse_when(args.since)) if args.since else None
        until = stamp(parse_when(args.until, end=True)) if args.until else None
    except ValueError as exc:
        print(f"--since/--until: {exc}", file=sys.stderr)
        return USAGE
    files = audit_files(settings.audit.file)
    if not files:
        print(f"no audit trail at {settings.audit.file}", file=sys.stderr)
        return 1
    query = Query(patient=args.patient, study=args.study, principal=args.principal,
                  since=since, until=until)
    bad = [0]
    found = 0
    try:
        for why, rec in search(query, files, bad):
            found += 1
            if args.json:
                print(json.dumps({**rec, "match": why}, separators=(",", ":")))
            else:
                print(_line(why, rec))
    except PermissionError as exc:
        print(f"cannot read the audit trail: {exc} (run as the service's user)",
              file=sys.stderr)
        return 1
    if query.overflow:
        print("note: the patient has too many studies to follow all of them; records naming "
              "only a study may be missing", file=sys.stderr)
    if bad[0]:
        print(f"note: {bad[0]} line(s) were not records (cut by a crash) and were skipped",
              file=sys.stderr)
    if not args.json:
        print(f"{found} record(s) in {len(files)} file(s)", file=sys.stderr)
    return 0 if found else 1


# --- what administration commands do to patient data ---------------------------------------
def operator_actor() -> Actor:
    """The person running a command: their login name (the OS authenticated them)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = f"uid {os.getuid()}"
    return Actor(name, "admin", "os")


def open_trail(settings: Settings) -> AuditLog | None:
    """The trail, opened now (blocking; a CLI has no event loop).  ``None`` after saying
    why when it cannot be written and ``[audit] required`` forbids going on."""
    trail = AuditLog(settings.audit, Metrics(), source="cli")
    try:
        trail.open()
    except OSError as exc:
        if settings.audit.required:
            print(f"refused: the audit trail {settings.audit.file} cannot be written "
                  f"({exc.strerror or exc}) and [audit] required = true", file=sys.stderr)
            return None
        print(f"warning: the audit trail {settings.audit.file} cannot be written "
              f"({exc.strerror or exc}); going on ([audit] required = false)",
              file=sys.stderr)
    return trail


def record_operation(trail: AuditLog, rec: Record) -> bool:
    """Write ``rec`` durably now; False (said) when it could not be."""
    try:
        trail.record_now(rec)
    except OSError as exc:
        print(f"error: the audit record of this operation could not be written to "
              f"{trail.settings.file}: {exc.strerror or exc}", file=sys.stderr)
        return False
    finally:
        trail.close()
    return True
