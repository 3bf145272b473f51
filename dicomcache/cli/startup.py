"""What must hold before ``serve`` says it is listening, checked first.

Every problem is one line naming the configuration key at fault, and exit
code 2 (``USAGE``), before any "listening" line: a port another program holds,
a cache directory the service cannot write, a configuration file without an
Orthanc, a relay spool written by a newer dicomcache.  ``check-config`` runs
the same checks (without binding), so the unit's ``ExecStartPre`` catches them
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


def directory_problem(path: Path) -> str | None:
    """Why the service could not create or write ``path`` (a directory), or None.
    Checks without creating anything: the directory itself when it exists, else the
    nearest existing parent it would be created in."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "write in" if probe == path else f"create {path} in"
        return f"cannot {what} {probe} (permission denied, or a read-only file system)"
    return None


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
    cache = directory_problem(settings.cache.directory)
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
