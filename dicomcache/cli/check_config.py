"""``dicomcache check-config``: validate a configuration file and print what it means."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from dicomcache.cli import online, startup
from dicomcache.cli.common import USAGE, load_settings
from dicomcache.cli.startup import users_problem
from dicomcache.config import AuthSettings, RelaySettings, format_size, is_loopback_host
from dicomcache.http import users


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "check-config", help="validate a config file and print a summary",
        description="Validate a configuration file: exit 0 with a summary, or 2 listing "
                    "every problem with its key.")
    p.add_argument("--config", "-c", type=Path, help="TOML config (default: embedded demo)")
    p.add_argument("--online", action="store_true",
                   help="also ask what the file names: Orthanc (credentials, DICOMweb "
                        "plugin, /changes, MD5s), the listening ports and each relay "
                        "destination (C-ECHO); exit 1 when any of them is not ready")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    s = load_settings(args)
    if s is None:
        return USAGE
    where = args.config or "(embedded default)"
    found = startup.problems(s, from_file=args.config is not None)
    for key, message in found:
        print(f"{where}: {key}: {message}", file=sys.stderr)
    if found:
        return USAGE
    print(f"{where}: OK")
    print(f"  listen        http://{s.server.host}:{s.server.port}"
          + (f" (status and metrics on {s.server.admin_host}:{s.server.admin_port})"
             if s.server.admin_port else ""))
    print(f"  upstream      {s.upstream.url or '(none: a demo Orthanc is started)'}"
          f" user={s.upstream.username or '-'} timeouts={s.upstream.connect_timeout:g}/"
          f"{s.upstream.read_timeout:g}s retries={s.upstream.retries}")
    print(f"  cache         {s.cache.directory} max {format_size(s.cache.max_size)}")
    print(f"  min_free      {format_size(s.cache.min_free)} kept free on its file system"
          if s.cache.min_free else "  min_free      0: no guard (the cache writes until its "
          "disk is full)")
    for key, message in startup.cache_warnings(s):
        print(f"  warning       {key} {message}", file=sys.stderr)
    print(f"  access.allow  {', '.join(s.access.allow) or '(read-only)'}")
    auth_problem = describe_auth(s.auth, s.server.host)
    if auth_problem is not None:
        print(f"{args.config}: auth.users_file: {auth_problem}", file=sys.stderr)
        return USAGE
    if s.relay.enabled:
        print(f"  relay         {s.relay.ae_title}@{s.relay.host}:{s.relay.port} → "
              + (", ".join(f"{d.name} ({d.transfer_syntax_strategy})"
                           for d in s.relay.destinations) or "no destinations"))
        for dest, count in _waiting_for_unconfigured(s.relay).items():
            print(f"  warning       {count} instance(s) in the spool wait for destination "
                  f"{dest!r}, which is not configured: they are kept; add it back or "
                  f"`dicomcache relay reroute --from {dest} --to NAME`", file=sys.stderr)
    else:
        print("  relay         disabled")
    if args.online:
        return report_online(online.run_checks(s))
    return 0


def report_online(findings: list[online.Finding]) -> int:
    """Print each online finding (problems on stderr); 0, or :data:`online.NOT_READY`."""
    print("online checks:")
    for f in findings:
        print(f"  {'ok' if f.ok else 'PROBLEM':8}{f.key}: {f.message}")
    bad = [f.key for f in findings if not f.ok]
    if bad:
        print(f"{len(bad)} online problem(s): {', '.join(bad)}", file=sys.stderr)
        return online.NOT_READY
    return 0


def describe_auth(a: AuthSettings, host: str) -> str | None:
    """Print the authentication setup; a problem that must stop the start, or ``None``."""
    if a.mode == "none":
        exposed = not is_loopback_host(host)
        print("  auth          none: every request is an anonymous admin"
              + (" — ON THE NETWORK (allow_anonymous_network)" if exposed else
                 " (loopback only)"))
    elif a.mode == "basic":
        assert a.users_file is not None
        problem = users_problem(a.users_file)
        if problem is not None:
            return problem
        found = users.read(a.users_file)
        roles = sorted(u.role for u in found.values())
        print(f"  auth          basic: {a.users_file} ({roles.count('admin')} admin(s), "
              f"{roles.count('viewer')} viewer(s))")
        warning = users.exposure(a.users_file)
        if warning:
            print(f"  warning       {warning}", file=sys.stderr)
    else:
        print(f"  auth          bearer: issuer {a.issuer}, audience {a.audience}, keys "
              f"{a.jwks_url or '(OIDC discovery)'}; viewer roles "
              f"{', '.join(a.viewer_roles)}; admin roles {', '.join(a.admin_roles) or '-'}")
    if a.authorization_url:
        print(f"  authorization {a.authorization_url} (per study; refused while it cannot "
              "answer)")
    return None


def _waiting_for_unconfigured(rs: RelaySettings) -> dict[str, int]:
    """Spooled instances waiting for destinations the configuration no longer names."""
    from dicomcache.relay.spool import Spool

    if not (rs.spool_directory / "state.sqlite").exists():
        return {}
    spool = Spool(rs.spool_directory, [d.name for d in rs.destinations])
    try:
        spool.open_readonly()
        return spool.unconfigured()
    except (OSError, sqlite3.Error):
        return {}  # unreadable here (another user): the relay itself reports it
    finally:
        spool.close()
