"""What must hold before ``serve`` says it is listening, checked first.

Every problem is one line naming the configuration key at fault, and exit
code 2 (``USAGE``), before any "listening" line: a port another program holds,
a file where the cache directory should be, a relay spool the service cannot
write or one written by a newer dicomcache, a configuration file without an
Orthanc.  (A cache directory it cannot write is no such problem: the daemon
serves with its cache degraded.)  ``check-config`` runs the same checks
(without binding), so the unit's ``ExecStartPre`` catches them
too; the unit does not restart on exit 2 (``RestartPreventExitStatus=2``): a
configuration problem does not fix itself.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from dicomcache.config import Settings, exposure_problem, format_size
from dicomcache.http import users


def _nearest(path: Path) -> Path:
    """``path`` when it exists, else the nearest existing parent it would be made in."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def not_a_directory(path: Path) -> str | None:
    """A file where the directory ``path`` (or a parent of it) should be, or None."""
    probe = _nearest(path)
    return f"{probe} is not a directory" if probe.exists() and not probe.is_dir() else None


def write_problem(path: Path) -> str | None:
    """Why the service could not create or write the directory ``path``, or None
    (checked without creating anything)."""
    probe = _nearest(path)
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "write in" if probe == path else f"create {path} in"
        return f"cannot {what} {probe} (permission denied, or a read-only file system)"
    return None


def directory_problem(path: Path) -> str | None:
    """Why the service could not create or write ``path`` (a directory), or None."""
    return not_a_directory(path) or write_problem(path)


def users_problem(path: Path) -> str | None:
    """Why the users file cannot be used, or ``None``."""
    if not path.exists():
        return (f"{path} does not exist: create it with "
                "`dicomcache users add NAME --role admin --config FILE`")
    try:
        users.read(path)
    except users.UsersFileError as exc:
        return str(exc)
    return None


def problems(settings: Settings, *, from_file: bool) -> list[tuple[str, str]]:
    """Problems that stop ``serve`` before it listens, as (key, message): also those
    ``--host`` may create (anonymous access on a network address)."""
    found: list[tuple[str, str]] = []
    exposure = exposure_problem(settings.server, settings.auth)
    if exposure is not None:
        found.append(("auth.mode", exposure))
    if settings.auth.mode == "basic" and settings.auth.users_file is not None:
        problem = users_problem(settings.auth.users_file)
        if problem is not None:
            found.append(("auth.users_file", problem))
    if from_file and settings.upstream.url is None:
        found.append(("upstream.url", "required: the Orthanc to cache (the demo Orthanc "
                                      "with its sample patient runs only when serve is "
                                      "given no --config at all)"))
    # A cache directory that cannot be written (full, read-only, missing) is not one: the
    # daemon serves with its cache degraded (cache_warnings), and caches once it can.
    cache = not_a_directory(settings.cache.directory)
    if cache is not None:
        found.append(("cache.directory", cache))
    if settings.relay.enabled:
        spool = directory_problem(settings.relay.spool_directory)
        if spool is not None:
            found.append(("relay.spool_directory", spool))
        else:
            from dicomcache.relay.spool import schema_problem

            schema = schema_problem(settings.relay.spool_directory)
            if schema is not None:
                found.append(("relay.spool_directory", schema))
    return found


def size_warning(directory: Path, max_size: int) -> str | None:
    """A warning when ``max_size`` exceeds the file system that holds ``directory`` (its
    nearest existing parent): the cache would fill the disk before its own bound."""
    probe = directory
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        total = shutil.disk_usage(probe).total
    except OSError:
        return None
    if max_size <= total:
        return None
    return (f"max_size ({format_size(max_size)}) is larger than the file system "
            f"holding {directory} ({format_size(total)}): the disk fills before the "
            "cache evicts anything; lower it, leaving room for the index and other files")


def min_free_warning(directory: Path, min_free: int) -> str | None:
    """A warning when ``min_free`` cannot be met on the file system of ``directory``: it
    is not smaller than the file system, or more than is free there now."""
    if min_free <= 0:
        return None
    try:
        usage = shutil.disk_usage(_nearest(directory))
    except OSError:
        return None
    gib = 1 << 30
    if min_free >= usage.total:
        return (f"min_free ({min_free / gib:.1f} GiB) is not smaller than the file system "
                f"holding {directory} ({usage.total / gib:.1f} GiB): nothing would ever be "
                "cached (the cache stays degraded); lower it")
    if min_free > usage.free:
        return (f"min_free ({min_free / gib:.1f} GiB) is more than is free on the file "
                f"system holding {directory} now ({usage.free / gib:.1f} GiB): the cache "
                "evicts its least recently used entries to restore it, and caches nothing "
                "new while it cannot (free space, or lower min_free)")
    return None


def cache_warnings(settings: Settings) -> list[tuple[str, str]]:
    """What ``check-config`` warns about the cache, as (key, message): it still starts."""
    cache = settings.cache
    found: list[tuple[str, str]] = []
    unwritable = write_problem(cache.directory)
    if unwritable is not None:
        found.append(("cache.directory", f"{unwritable}: dicomcache serves without caching "
                                         "(cache degraded) until it can write there"))
    too_big = size_warning(cache.directory, cache.max_size)
    if too_big is not None:
        found.append(("cache.max_size", too_big.removeprefix("max_size ")))
    low = min_free_warning(cache.directory, cache.min_free)
    if low is not None:
        found.append(("cache.min_free", low.removeprefix("min_free ")))
    return found


class ListenError(OSError):
    """A listening socket that could not be opened; ``key`` names its setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def bind(key: str, host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as aiohttp's own
    sites would open them), or :class:`ListenError`."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(key, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(
                (i[0], i[1], i[2], i[3], i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno == 98:
            reason += " (another program, or another dicomcache, holds it)"
        elif exc.errno == 13:
            reason += " (ports below 1024 need CAP_NET_BIND_SERVICE, see docs/security.md)"
        raise ListenError(key, f"cannot listen on {host}:{port}: {reason}") from exc
    return sockets


@dataclass
class Bound:
    """The daemon's listening sockets, opened before anything else starts."""

    viewer: list[socket.socket]
    admin: list[socket.socket] = field(default_factory=list)
    redirect: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in (*self.viewer, *self.admin, *self.redirect):
            sock.close()


def bind_all(settings: Settings) -> Bound:
    """Every port ``serve`` listens on, or :class:`ListenError` for the first that
    cannot be opened (those opened before are closed)."""
    s = settings.server
    bound = Bound(bind("server.port", s.host, s.port))
    try:
        if s.admin_port is not None:
            bound.admin = bind("server.admin_port", s.admin_host, s.admin_port)
        if s.http_redirect_port is not None:
            bound.redirect = bind("server.http_redirect_port", s.host, s.http_redirect_port)
    except ListenError:
        bound.close()
        raise
    return bound
