"""``dicomcache users add|remove|list``: the users file of ``[auth] mode = "basic"``.

The password is read from the terminal (asked twice, not echoed) or, when stdin is
not a terminal, as one line from stdin (``printf '%s\\n' "$PW" | dicomcache users add
…``); never from the command line, where every user of the machine can read it in the
process list and the shell keeps it in its history.  The file is replaced atomically
(mode 0600); a running daemon picks the change up within seconds (or at once on
SIGHUP), without a restart.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from dicomcache.cli.common import USAGE, load_settings
from dicomcache.http import users as users_file
from dicomcache.principal import ROLES, VIEWER


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "users", help="manage the users of [auth] mode = \"basic\"",
        description="Add, remove or list the users who may log in with HTTP Basic "
                    "authentication ([auth] users_file).  Passwords are read from the "
                    "terminal, or from stdin when it is not a terminal; never from "
                    "arguments.")
    sub = p.add_subparsers(dest="users_command", required=True)
    add = sub.add_parser("add", help="add a user (asks for the password)")
    add.add_argument("name", help="user name: letters, digits, '.', '_', '@', '-'")
    add.add_argument("--role", choices=ROLES, default=VIEWER,
                     help="viewer (patient data; default) or admin (also status, metrics)")
    add.add_argument("--replace", action="store_true",
                     help="replace an existing user's password and role")
    remove = sub.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    sub.add_parser("list", help="list the users and their roles (never the hashes)")
    for command in (add, remove, sub.choices["list"]):
        command.add_argument("--config", "-c", type=Path, required=True,
                             help="TOML config whose [auth] users_file is managed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if settings is None:
        return USAGE
    path = settings.auth.users_file
    if path is None:
        print(f"{args.config}: [auth] users_file is not set (with mode = \"basic\")",
              file=sys.stderr)
        return USAGE
    try:
        if args.users_command == "list":
            return _list(path)
        if args.users_command == "remove":
            return _remove(path, args.name)
        return _add(path, args.name, args.role, replace=args.replace)
    except users_file.UsersFileError as exc:
        print(f"dicomcache users: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dicomcache users: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _existing(path: Path) -> dict[str, users_file.User]:
    return users_file.read(path) if path.exists() else {}


def _list(path: Path) -> int:
    found = _existing(path)
    warning = users_file.exposure(path)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if not found:
        print(f"no users in {path}")
    for user in sorted(found.values(), key=lambda u: u.name):
        print(f"{user.name}\t{user.role}")
    return 0


def _remove(path: Path, name: str) -> int:
    with _locked(path):
        found = _existing(path)
        if found.pop(name, None) is None:
            print(f"dicomcache users: no user {name!r} in {path}", file=sys.stderr)
            return 1
        users_file.write(path, found.values())
    print(f"removed {name}; the running daemon refuses them within seconds")
    return 0


def _add(path: Path, name: str, role: str, *, replace: bool) -> int:
    problem = users_file.name_problem(name)
    if problem is not None:
        print(f"dicomcache users: {problem}", file=sys.stderr)
        return USAGE
    with _locked(path):
        created = not path.exists()
        found = _existing(path)
        if name in found and not replace:
            print(f"dicomcache users: {name!r} exists; add --replace to change their "
                  "password and role", file=sys.stderr)
            return 1
        existed = name in found
        password = read_password(name)
        if password is None:
            return USAGE
        found[name] = users_file.User(name, role, users_file.hash_password(password))
        users_file.write(path, found.values())
    print(f"{'updated' if existed else 'added'} {name} ({role}) in {path}")
    if created and os.geteuid() == 0:
        print(f"note: {path} was created by root, mode 0600: the daemon's user must own it "
              f"(chown dicomcache: {path}), or run this as that user", file=sys.stderr)
    return 0


def read_password(name: str) -> str | None:
    """The new password: from the terminal, asked twice; else one line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != first:
            print("dicomcache users: the passwords differ; nothing changed", file=sys.stderr)
            return None
        password = first
    else:
        line = sys.stdin.readline(users_file.MAX_PASSWORD + 2)
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
    problem = users_file.password_problem(password)
    if problem is not None:
        print(f"dicomcache users: {problem}; nothing changed", file=sys.stderr)
        return None
    return password


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One change at a time (two admins adding users at once lose neither)."""
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
