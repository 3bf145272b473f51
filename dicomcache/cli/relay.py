"""``dicomcache relay run|status|retry|reroute|send``.

``run`` runs the relay alone (no HTTP side) until SIGTERM/SIGINT.
``status`` reads the spool's state database directly (the daemon need not
run); ``retry`` writes to it, which a running relay's forwarders read before
each batch; ``drain`` talks to a running relay through it too
(:mod:`dicomcache.relay.drain`), or delivers the spool itself when none runs.
``send`` is a C-STORE SCU with the relay's negotiation (strategies, fallback,
transcoding); it does not touch the spool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dicomcache.cli.common import USAGE, load_settings, setup_daemon
from dicomcache.cli.progress import Progress
from dicomcache.config import STRATEGIES, DestinationSettings, Settings, format_size
from dicomcache.errors import IntegrityError

if TYPE_CHECKING:  # imported where used: a command loads only what it needs
    from dicomcache.relay.spool import Spool


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``relay run``, ``relay status`` and ``relay send``."""
    relay = subparsers.add_parser("relay", help="the DIMSE relay: run it alone, queue status, "
                                                "manual sends")
    sub = relay.add_subparsers(dest="relay_command", required=True)

    run = sub.add_parser("run", help="run the relay alone (no HTTP cache) until SIGTERM/SIGINT",
                         description="Run the DIMSE relay of the [relay] section alone: its "
                                     "SCP, spool and forwarders.  Prints 'relay listening on "
                                     "HOST:PORT' once it accepts associations.")
    run.add_argument("--config", "-c", type=Path, required=True, help="TOML configuration")
    run.add_argument("--log-level", help="override server.log_level")
    run.add_argument("--forward-in-process", action="store_true",
                     help="run the forwarders in this process, not in a child process "
                          "(debugging, comparisons)")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="queue depth, oldest item, learned strategy, "
                                           "last errors per destination (from the spool)")
    status.add_argument("--config", "-c", type=Path, help="TOML configuration")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    reroute = sub.add_parser(
        "reroute", help="move what waits for one destination to another",
        description="Move the instances waiting in the spool for destination FROM (for "
                    "example one removed from the configuration) to the configured "
                    "destination TO.  Instances TO already has are not sent twice.  Run it "
                    "while the relay is stopped (systemctl stop dicomcache); they are sent "
                    "when it starts.")
    reroute.add_argument("--from", dest="source", required=True, help="destination name now")
    reroute.add_argument("--to", dest="target", required=True,
                         help="a [[relay.destinations]] name from the config")
    reroute.add_argument("--config", "-c", type=Path, help="TOML configuration")
    reroute.set_defaults(func=cmd_reroute)

    retry = sub.add_parser(
        "retry", help="retry now: forget the back-off after fixing a PACS",
        description="Forget the back-off of every destination (or of --destination): its "
                    "own after failed associations, its studies' after refused instances, "
                    "and the refusals counted towards max_instance_retries.  Safe while the "
                    "relay runs: its forwarders attempt again within 5 seconds.")
    retry.add_argument("--destination", help="only this destination (default: all)")
    retry.add_argument("--config", "-c", type=Path, help="TOML configuration")
    retry.set_defaults(func=cmd_retry)

    drain = sub.add_parser(
        "drain", help="before an upgrade: reject new associations, deliver the spool, report",
        description="Ask the running relay (dicomcache serve or relay run) to reject new "
                    "associations (A-ASSOCIATE-RJ transient, temporary congestion: modalities "
                    "retry later) and deliver everything in the spool; with the relay "
                    "stopped, deliver it from this process.  Back-offs are cleared first, as "
                    "`relay retry` does.  Reports per destination what was delivered, what "
                    "still waits and why, and what was quarantined.  Exit status 0: nothing "
                    "waits (stop the service and upgrade; the relay rejects associations "
                    "until it stops, --cancel, or --timeout plus 30 minutes have passed, when "
                    "it withdraws the request itself); 1: something still waits at "
                    "--timeout (the relay takes associations again); 2: could not drain "
                    "(configuration, spool, or a relay that did not answer).")
    drain.add_argument("--config", "-c", type=Path, help="TOML configuration")
    drain.add_argument("--timeout", type=float, default=600.0,
                       help="give up after this many seconds (default 600)")
    drain.add_argument("--json", action="store_true", help="machine-readable report")
    drain.add_argument("--cancel", action="store_true",
                       help="take associations again after a drain (no restart needed)")
    drain.set_defaults(func=cmd_drain)

    send = sub.add_parser("send", help="C-STORE files to a destination with the relay's "
                                       "negotiation and transcoding")
    send.add_argument("files", nargs="+", type=Path, help="DICOM files or directories")
    send.add_argument("--config", "-c", type=Path, help="TOML configuration")
    send.add_argument("--destination", help="a [[relay.destinations]] name from the config")
    send.add_argument("--host", help="peer host (instead of --destination)")
    send.add_argument("--port", type=int, help="peer port")
    send.add_argument("--aet", help="peer AE title (called AE)")
    send.add_argument("--calling-aet", help="our AE title (default: relay.ae_title)")
    send.add_argument("--strategy", choices=STRATEGIES,
                      help="transfer syntax strategy (default: the destination's, or "
                           "conservative)")
    send.add_argument("--max-association-retries", type=int, default=None)
    send.add_argument("--release", action="store_true",
                      help="also send files the relay put in quarantine (a FILE.reason.json "
                           "beside them says why): you have read the reason and take "
                           "responsibility for the PACS storing them as they are")
    send.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    send.set_defaults(func=cmd_send)


# --- run ---------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """Run the relay alone; exit 0 after a stop by signal, 2 on a bad configuration."""
    from dicomcache.relay.spool import schema_problem

    settings = load_settings(args)
    if settings is None:
        return USAGE
    schema = schema_problem(settings.relay.spool_directory)
    if schema is not None:  # one line, before anything starts (as serve does)
        print(f"{args.config}: relay.spool_directory: {schema}", file=sys.stderr)
        return USAGE
    setup_daemon(args.log_level or settings.server.log_level, settings.server.log_format)
    asyncio.run(_run_relay(settings, args.forward_in_process))
    return 0


async def _run_relay(settings: Settings, forward_in_process: bool) -> None:
    from dicomcache.audit.trail import AuditLog
    from dicomcache.metrics import Metrics
    from dicomcache.relay.service import Relay

    metrics = Metrics()
    audit = AuditLog(settings.audit, metrics, source="relay")
    try:
        await asyncio.to_thread(audit.open)
    except OSError as exc:  # required: C-STOREs refused (0xA700) until it can be written
        logging.getLogger("dicomcache").error("audit trail %s cannot be opened: %s",
                                              settings.audit.file, exc)
    audit.start()
    relay = Relay(settings.relay, metrics, forward_in_process=forward_in_process, audit=audit)
    await relay.start()
    print(f"relay listening on {settings.relay.host}:{relay.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = loop.create_task(relay.reload_tls())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()
    await relay.stop(settings.server.shutdown_timeout)
    await asyncio.to_thread(audit.close)


# --- reroute -----------------------------------------------------------------------------
def cmd_reroute(args: argparse.Namespace) -> int:
    """Move pending deliveries; exit 0 when something moved, 1 when nothing waited, 2 on
    a usage error."""
    from dicomcache.relay.spool import Spool, SpoolSchemaError

    settings = load_settings(args)
    if settings is None:
        return USAGE
    rs = settings.relay
    names = [d.name for d in rs.destinations]
    if args.target not in names:
        print(f"--to {args.target!r} is not a configured destination "
              f"({', '.join(names) or 'none configured'})", file=sys.stderr)
        return USAGE
    if args.source == args.target:
        print("--from and --to name the same destination", file=sys.stderr)
        return USAGE
    if not (rs.spool_directory / "state.sqlite").exists():
        print(f"no relay spool at {rs.spool_directory}", file=sys.stderr)
        return 1
    spool = Spool(rs.spool_directory, names, retention=rs.retention)
    try:
        spool.open()
    except SpoolSchemaError as exc:
        print(f"relay.spool_directory: {exc}", file=sys.stderr)
        return USAGE
    try:
        waiting, sent = spool.reroute(args.source, args.target)
    finally:
        spool.close()
    print(f"{waiting} instance(s) now wait for {args.target}"
          + (f"; {sent} it already had were not queued again" if sent else ""))
    return 0 if waiting or sent else 1


# --- retry -------------------------------------------------------------------------------
def cmd_retry(args: argparse.Namespace) -> int:
    """Clear back-offs; exit 0, 1 when there is no spool, 2 for an unknown destination."""
    from dicomcache.relay.spool import Spool, SpoolSchemaError

    settings = load_settings(args)
    if settings is None:
        return USAGE
    rs = settings.relay
    if not (rs.spool_directory / "state.sqlite").exists():
        print(f"no relay spool at {rs.spool_directory}", file=sys.stderr)
        return 1
    configured = [d.name for d in rs.destinations]
    # No recovery: the relay may be running (recovery is the running relay's, at start).
    spool = Spool(rs.spool_directory, configured)
    try:
        spool.open(recover=False)
    except SpoolSchemaError as exc:
        print(f"relay.spool_directory: {exc}", file=sys.stderr)
        return USAGE
    try:
        known = list(dict.fromkeys([*configured, *spool.known_destinations()]))
        if args.destination is not None and args.destination not in known:
            print(f"unknown destination {args.destination!r} ({', '.join(known) or 'none'})",
                  file=sys.stderr)
            return USAGE
        waiting = spool.retry([args.destination] if args.destination else known)
    finally:
        spool.close()
    for name, count in waiting.items():
        print(f"{name}: back-off cleared, {count} instance(s) waiting")
    if any(waiting.values()):
        print("A running relay sends them within 5 seconds (`dicomcache relay status` "
              "shows the outcome).")
    return 0


# --- drain -------------------------------------------------------------------------------
_MAX_DRAIN = 86400.0


class _RelayGone:
    """``relay_gone`` for :func:`drain.wait_running`: keeps the lock once it is free."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fd: int | None = None

    def __call__(self) -> bool:
        from dicomcache.relay import drain

        if self.fd is None:
            self.fd = drain.try_lock(self.directory, exclusive=True)
        return self.fd is not None


def cmd_drain(args: argparse.Namespace) -> int:
    """Drain the spool (see the parser's description for the exit statuses)."""
    from dicomcache.relay import drain
    from dicomcache.relay.spool import SpoolSchemaError, SpoolUnavailable, schema_problem

    settings = load_settings(args)
    if settings is None:
        return USAGE
    if not 0 < args.timeout <= _MAX_DRAIN:
        print(f"--timeout must be more than 0 and at most {_MAX_DRAIN:.0f} seconds",
              file=sys.stderr)
        return USAGE
    rs = settings.relay
    if not (rs.spool_directory / "state.sqlite").exists():
        print(f"no relay spool at {rs.spool_directory}: nothing to drain")
        return 0
    problem = schema_problem(rs.spool_directory)
    if problem is not None:
        print(f"relay.spool_directory: {problem}", file=sys.stderr)
        return USAGE
    owner = rs.spool_directory.stat().st_uid
    if os.geteuid() == 0 and owner != 0:
        # Files root would create in the spool (the database's WAL) lock the service out.
        print(f"run it as the spool's owner (uid {owner}), not as root: "
              f"sudo -u dicomcache dicomcache relay drain --config {args.config}",
              file=sys.stderr)
        return USAGE
    if args.cancel:
        return _drain_cancel(settings)
    # A SIGTERM (``timeout 600 dicomcache relay drain``, a script stopped) ends it as
    # Ctrl-C does: withdrawn, so the relay is not left rejecting associations.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    lock = drain.try_lock(rs.spool_directory, exclusive=True)
    try:
        if lock is not None and drain.listening(rs.host, rs.port):
            print(f"something accepts connections on {rs.host}:{rs.port}, the relay's port, "
                  "but no relay holds the spool: a dicomcache older than this one runs, and "
                  "cannot be asked to drain. Stop it (sudo systemctl stop dicomcache), then "
                  "run `dicomcache relay drain` again: it delivers the spool with the "
                  "service stopped", file=sys.stderr)
            return USAGE
        return _drain(args, settings, lock)
    except (SpoolSchemaError, SpoolUnavailable, sqlite3.Error, OSError) as exc:
        print(f"cannot drain: relay.spool_directory {rs.spool_directory}: {exc}",
              file=sys.stderr)
        return USAGE
    finally:
        drain.unlock(lock)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _drain_cancel(settings: Settings) -> int:
    from dicomcache.relay import drain
    from dicomcache.relay.spool import Spool

    spool = Spool(settings.relay.spool_directory)
    spool.open(recover=False)
    try:
        was = spool.control(drain.REQUEST)
        spool.set_control(drain.REQUEST, None)
    finally:
        spool.close()
    print("drain cancelled: a running relay takes associations again within 2 seconds"
          if was else "no drain was requested")
    return 0


def _drain(args: argparse.Namespace, settings: Settings, lock: int | None) -> int:
    from dicomcache.relay import drain
    from dicomcache.relay.spool import Spool

    rs = settings.relay
    names = [d.name for d in rs.destinations]
    spool = Spool(rs.spool_directory, names, retention=rs.retention)
    spool.open(recover=lock is not None)  # recovery is a running relay's own
    gone = _RelayGone(rs.spool_directory)
    started = time.monotonic()
    deadline = started + args.timeout
    result: dict[str, Any] = {"relay": "running" if lock is None else "stopped",
                              "interrupted": False}
    request: dict[str, Any] | None = None
    waited: drain.Waited | None = None
    drained = False
    try:
        spool.retry(list(dict.fromkeys([*names, *spool.known_destinations()])))
        before = spool.snapshot(names, errors=1)
        first = spool.last_instance_id()
        try:
            if lock is None:
                request = drain.new_request(args.timeout)
                spool.set_control(drain.REQUEST, request)
                waited = drain.wait_running(spool, request, names, deadline, gone)
                if waited.relay_stopped:  # stopped meanwhile: deliver the rest from here
                    result["relay"] = "stopped during the drain"
                elif not waited.answered:
                    spool.set_control(drain.REQUEST, None)
                    print(f"a relay holds the spool but did not answer the drain request "
                          f"within {drain.ANSWER_WITHIN:.0f} s (its log may say why); it "
                          "takes associations as before", file=sys.stderr)
                    return USAGE
                result["active_inbound"] = waited.active_inbound
            if lock is not None or gone.fd is not None:
                remaining = max(deadline - time.monotonic(), 0.0)
                asyncio.run(_deliver_stopped(settings, spool, remaining))
        except KeyboardInterrupt:
            result["interrupted"] = True
        after = spool.snapshot(names, errors=1)
        rows = drain.report(before, after, spool.last_instance_id() - first)
        code = 1 if result["interrupted"] else drain.exit_status(rows)
        if waited is not None and not (waited.done or waited.relay_stopped):
            code = 1  # associations still open may yet bring instances in
        drained = code == 0
    finally:
        if request is not None and not drained:  # modalities may send again
            with contextlib.suppress(sqlite3.Error, OSError):
                spool.set_control(drain.REQUEST, None)
        spool.close()
        drain.unlock(gone.fd)
    result.update(inbound_open=0 if waited is None or waited.done else waited.active_inbound,
                  seconds=round(time.monotonic() - started, 1), timeout=args.timeout,
                  still_waiting=sum(r.waiting for r in rows), exit_status=code,
                  destinations=drain.as_json(rows))
    if args.json:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        _print_drain(result, drain.format_rows(rows), sys.stdout)
    return code


async def _deliver_stopped(settings: Settings, spool: Spool, seconds: float) -> None:
    from dicomcache.audit.trail import AuditLog
    from dicomcache.metrics import Metrics
    from dicomcache.relay import drain

    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    # What is sent is audited as the relay's own forwarding is.
    audit = AuditLog(settings.audit, Metrics(), source="relay-drain")
    try:
        await asyncio.to_thread(audit.open)
    except OSError as exc:
        logging.getLogger("dicomcache").error("audit trail %s cannot be opened: %s",
                                              settings.audit.file, exc)
    audit.start()
    try:
        await drain.deliver_stopped(settings.relay, spool, deadline, audit)
    finally:
        await asyncio.to_thread(audit.close)


def _print_drain(result: dict[str, Any], rows: list[str], out: TextIO) -> None:
    running = result["relay"] == "running"
    if running:
        out.write("The running relay rejected new associations (A-ASSOCIATE-RJ transient, "
                  "temporary congestion) and delivered the spool.\n")
    else:
        out.write(f"The relay was {result['relay']}: the spool was delivered from this "
                  "command.\n")
    for line in rows:
        out.write(f"  {line}\n")
    if result["exit_status"] == 0:
        if running:
            out.write("Spool drained: nothing waits. Stop the service now (sudo systemctl "
                      "stop dicomcache) and upgrade. Until it stops, new associations are "
                      "rejected (`dicomcache relay drain --cancel` takes them again).\n")
        else:
            out.write("Spool drained: nothing waits. Upgrade now.\n")
        return
    why = ("interrupted" if result["interrupted"]
           else f"after {result['seconds']:.0f} s (--timeout {result['timeout']:g})")
    out.write(f"NOT DRAINED: {result['still_waiting']} instance(s) still wait, {why}.\n")
    if result["inbound_open"]:
        out.write(f"  {result['inbound_open']} association(s) from modalities were still "
                  "open.\n")
    if running:
        out.write("The relay takes associations again.\n")
    out.write("What to do: fix what is named above (`dicomcache relay status` has the "
              "details) and run `dicomcache relay drain` again; or upgrade anyway: what "
              "waits stays in the spool and is delivered after the start, unless the "
              "CHANGELOG says the spool's format changes (then upgrade only once it is "
              "empty).\n")


# --- status ------------------------------------------------------------------------------
def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    secs = max(0.0, now - ts)
    if secs < 120:
        return f"{secs:.0f} s ago"
    if secs < 7200:
        return f"{secs / 60:.0f} min ago"
    return f"{secs / 3600:.1f} h ago"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _uid_name(uid: str) -> str:
    """A UID as operators read it: its name (pydicom's dictionary), else the UID."""
    from pydicom.uid import UID

    name = UID(uid).name
    return uid if name == uid else name


def cmd_status(args: argparse.Namespace) -> int:
    """Print the persisted queue state; exit 1 if something waits or is quarantined."""
    from dicomcache.relay.drain import REQUEST as DRAIN_REQUEST
    from dicomcache.relay.service import intake
    from dicomcache.relay.spool import Spool, SpoolSchemaError

    settings = load_settings(args)
    if settings is None:
        return USAGE
    rs = settings.relay
    db = rs.spool_directory / "state.sqlite"
    if not db.exists():
        print(f"no relay spool at {rs.spool_directory} (the relay has not run yet)",
              file=sys.stderr)
        return 1
    spool = Spool(rs.spool_directory)
    try:
        spool.open_readonly()
    except SpoolSchemaError as exc:
        print(f"relay.spool_directory: {exc}", file=sys.stderr)
        return USAGE
    try:
        snap = spool.snapshot([d.name for d in rs.destinations])
        snap["intake"] = intake(spool, rs.min_free)
        snap["drain_requested"] = spool.control(DRAIN_REQUEST)
    finally:
        spool.close()
    for dest in rs.destinations:  # before its first delivery the spool has not recorded it
        entry = snap["destinations"].get(dest.name)
        if entry is not None and not entry.get("configured_strategy"):
            entry["configured_strategy"] = dest.transfer_syntax_strategy
    if args.json:
        json.dump(snap, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        _print_status(snap, sys.stdout)
    waiting = any(d["queue_depth"] for d in snap["destinations"].values())
    return 1 if waiting or snap["quarantine_files"] else 0


def _print_status(snap: dict[str, Any], out: TextIO) -> None:
    from dicomcache.relay.fallback import REPROBE_AFTER_BATCHES, REPROBE_AFTER_SECONDS

    now = float(snap["time"])
    out.write(f"spool {snap['spool_directory']}: {snap['spooled_instances']} instance(s), "
              f"{format_size(snap['spooled_bytes'])} not yet delivered everywhere; "
              f"{snap['quarantine_files']} file(s) in quarantine\n")
    intake = snap.get("intake")
    if intake:
        free = intake["free_bytes"]
        room = "-" if free is None else f"{format_size(free)} free"
        room += f", min_free {format_size(intake['min_free'])}"
        if intake["accepting"]:
            out.write(f"intake            taking C-STOREs ({room})\n")
        else:
            out.write(f"intake            REFUSING new C-STOREs (0xA700): {intake['refusing']}"
                      f" ({room})\n")
    drain = snap.get("drain_requested")
    if drain:
        out.write(f"draining          new associations rejected since {_when(drain.get('time'))}"
                  " (`dicomcache relay drain`; a restart or `relay drain --cancel` ends it)\n")
    for name, d in snap["destinations"].items():
        out.write(f"\n{name}\n")
        if not d.get("configured", True):
            out.write("  NOT CONFIGURED    what waits is kept: configure it again, or "
                      f"`dicomcache relay reroute --from {name} --to NAME`\n")
        out.write(f"  queue depth       {d['queue_depth']} ({format_size(d['queue_bytes'])})\n")
        out.write(f"  oldest item       {_when(d['oldest_received'])} "
                  f"({_ago(d['oldest_received'], now)})\n")
        learned = d["learned_strategy"] or "(none: starts at the configured strategy)"
        out.write(f"  strategy          configured {d['configured_strategy'] or '-'}, "
                  f"learned {learned}\n")
        for entry in d.get("learned_by_class", []):
            out.write(f"  learned for       {_uid_name(entry['sop_class'])} in "
                      f"{_uid_name(entry['transfer_syntax'])}: {entry['strategy']} since "
                      f"{_when(entry['since'])}, {entry['batches']} batches (the configured "
                      f"strategy is tried again after {REPROBE_AFTER_SECONDS / 3600:g} h or "
                      f"{REPROBE_AFTER_BATCHES} batches)\n")
        if d["learned_syntaxes"]:
            for sop, syntaxes in sorted(d["learned_syntaxes"].items()):
                out.write(f"  accepted          {sop}: {', '.join(syntaxes)}\n")
        out.write(f"  quarantined       {d['quarantined']}\n")
        out.write(f"  last success      {_when(d['last_success'])}\n")
        if d["backing_off_until"]:
            out.write(f"  backing off until {_when(d['backing_off_until'])} "
                      f"({d['consecutive_failures']} consecutive failures; fixed it? "
                      f"`dicomcache relay retry --destination {name}`)\n")
        if d["last_error"]:
            # An error before the last delivery is history, not the current state.
            past = d["last_success"] is not None and \
                d["last_success"] > (d["last_error_time"] or 0.0)
            out.write(f"  last error        {_when(d['last_error_time'])}: {d['last_error']}"
                      + (" (recovered: delivered since)" if past else "") + "\n")
        for e in d["recent_errors"][:5]:
            msg = str(e["message"]).replace("\n", " | ")
            out.write(f"    {_when(e['time'])} {e['status'] or ''} {msg}\n")
    if snap["recent_receive_errors"]:
        out.write("\nrejected at reception\n")
        for e in snap["recent_receive_errors"][:5]:
            out.write(f"    {_when(e['time'])} {e['status'] or ''} {e['message']}\n")
    if snap.get("recent_receive_warnings"):
        out.write("\naccepted with problems (stored and forwarded as received)\n")
        for e in snap["recent_receive_warnings"][:5]:
            out.write(f"    {_when(e['time'])} {e['sop_instance_uid'] or '-'} {e['message']}\n")


# --- send ------------------------------------------------------------------------------------
_REASON_SUFFIX = ".reason.json"


def _is_reason(path: Path) -> bool:
    return path.name.endswith(_REASON_SUFFIX)


def _quarantine_reason(path: Path) -> str | None:
    """Why the relay quarantined ``path`` (its ``.reason.json``), None when it did not."""
    reason = path.with_name(path.stem + _REASON_SUFFIX)
    try:
        text = reason.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"its reason file cannot be read: {exc}"
    try:
        info = json.loads(text)
    except ValueError:
        return "its reason file is not JSON"
    return str(info.get("reason") or "no reason recorded") if isinstance(info, dict) \
        else "its reason file is not a JSON object"


def _expand(paths: list[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file())
        else:
            yield p


def cmd_send(args: argparse.Namespace) -> int:
    """Send files; exit 0 when all were stored, 1 when some failed, 2 on usage errors."""
    from dicomcache.relay import accel
    from dicomcache.relay.acceptance import judge_send
    from dicomcache.relay.outcome import DELIVERED
    from dicomcache.relay.scu import SendItem, StoreSCU
    from dicomcache.relay.spool import InstanceInfo, info_from_bytes

    settings = load_settings(args)
    if settings is None:
        return USAGE
    rs = settings.relay
    dest: DestinationSettings | None = None
    if args.destination:
        dest = next((d for d in rs.destinations if d.name == args.destination), None)
        if dest is None:
            names = ", ".join(d.name for d in rs.destinations) or "none configured"
            print(f"unknown destination {args.destination!r} ({names})", file=sys.stderr)
            return 2
    elif args.host and args.port and args.aet:
        dest = DestinationSettings(name=f"{args.aet}@{args.host}:{args.port}",
                                   remote_ae_title=args.aet, remote_host=args.host,
                                   remote_port=args.port)
    else:
        print("give --destination NAME, or --host, --port and --aet", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {}
    if args.strategy:
        overrides["transfer_syntax_strategy"] = args.strategy
        if args.strategy != "extended":
            overrides["allow_lossy_recompression"] = False
    if args.max_association_retries is not None:
        if not 1 <= args.max_association_retries <= 10:
            print("--max-association-retries must be between 1 and 10", file=sys.stderr)
            return 2
        overrides["max_association_retries"] = args.max_association_retries
    if overrides:
        from dataclasses import replace

        dest = replace(dest, **overrides)

    items: list[SendItem] = []
    study_of: dict[int, str] = {}
    bad: list[tuple[Path, str]] = []
    for i, path in enumerate(p for p in _expand(args.files) if not _is_reason(p)):
        parsed: InstanceInfo | str
        try:
            parsed = info_from_bytes(path.read_bytes())
        except (OSError, IntegrityError) as exc:
            parsed = str(exc)
        decision = judge_send(parsed, _quarantine_reason(path), args.release)
        if not decision.send or isinstance(parsed, str):
            bad.append((path, decision.message or "not sent"))
            continue
        if decision.message:
            print(f"{path}: {decision.message}", file=sys.stderr)
        items.append(SendItem(i, path, parsed.sop_class, parsed.sop_instance,
                              parsed.transfer_syntax, parsed.has_pixels))
        study_of[i] = parsed.study_uid
    for path, why in bad:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if rs.accelerate:
        accel.install(rs.max_pdu)
    progress = Progress("send", len(items), enabled=False if args.no_progress else None)
    scu = StoreSCU(args.calling_aet or rs.ae_title, dest, timeout=rs.timeout, max_pdu=rs.max_pdu)
    results = []
    by_key = {it.key: it for it in items}
    # One association per study, in order, as the forwarder does.
    studies: dict[str, list[SendItem]] = {}
    for it in items:
        studies.setdefault(study_of[it.key], []).append(it)
    learned: str | None = None
    started = time.monotonic()
    failed_assoc: list[str] = []
    for batch in studies.values():
        report = scu.send(batch, learned,
                          on_result=lambda r: progress.update(failed=int(r.outcome != DELIVERED)))
        results.extend(report.results)
        learned = report.learned_strategy or learned
        progress.update(len(report.not_attempted), failed=len(report.not_attempted))
        if report.destination_error:
            failed_assoc.append(report.destination_error)
    progress.close()
    elapsed = time.monotonic() - started
    delivered = [r for r in results if r.outcome == DELIVERED]
    failed = len(items) - len(delivered)
    total_bytes = sum(by_key[r.key].path.stat().st_size for r in delivered)
    print(f"sent {len(delivered)}/{len(items)} instance(s) to {scu.peer} in {elapsed:.1f} s "
          f"({format_size(total_bytes / max(elapsed, 1e-6))}/s); failed {failed}; "
          f"skipped {len(bad)}")
    strategies = sorted({r.strategy_used or "" for r in delivered})
    syntaxes = sorted({r.transfer_syntax or "" for r in delivered})
    if delivered:
        print(f"strategy_used: {', '.join(strategies)}; transfer_syntax: {', '.join(syntaxes)}; "
              f"attempts_made: {max(r.attempts_made for r in delivered)}; "
              f"transcoded: {sum(r.transcoded for r in delivered)}")
    for r in results:
        if r.outcome != DELIVERED:
            print(f"FAILED {by_key[r.key].path}: {r.reason}", file=sys.stderr)
    for msg in dict.fromkeys(failed_assoc):
        print(f"FAILED association: {msg}", file=sys.stderr)
    return 0 if failed == 0 and not bad else 1
