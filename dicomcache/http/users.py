"""The users file of ``[auth] mode = "basic"``: one ``name:role:argon2id-hash`` per line.

Written only by ``dicomcache users`` (atomically, mode 0600: the hashes are secrets
too, an offline guessing target); read by the daemon, which reloads it when it
changes.  Passwords exist here only on their way into :func:`hash_password` and
:func:`verify_password`; nothing keeps or prints them.

Everything here blocks (argon2 is slow on purpose, files are files): call it from
a worker thread on the event loop.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from dicomcache.durable import fsync_dir, temp_name, write_new
from dicomcache.principal import ROLES

#: Owner read/write only: a readable hash can be guessed at offline.
USERS_FILE_MODE = 0o600
#: Basic credentials carry ``name:password``: a name never holds a colon.
_NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MIN_PASSWORD = 8
#: Longest password accepted (bounds the work an outsider can ask of argon2).
MAX_PASSWORD = 1024
HEADER = ("# dicomcache users (name:role:argon2id hash), written by `dicomcache users`;\n"
          "# edit with that command, not by hand.\n")

#: argon2-cffi's defaults (RFC 9106's second recommendation: argon2id, t=3, 64 MiB, p=4).
_HASHER = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the name is unknown, so an unknown user costs the same time
    as a known one (no user enumeration by timing).  Made on first use, not on import."""
    return _HASHER.hash("dicomcache: no such user")


class UsersFileError(ValueError):
    """A users file that cannot be read or does not parse (the message says where)."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: str
    #: The argon2id hash (``$argon2id$v=19$m=…``).
    password_hash: str = field(repr=False)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a user name, or ``None``."""
    if not _NAME_RE.match(name):
        return (f"{name[:80]!r} is not a user name: 1-64 letters, digits, '.', '_', '@' "
                "or '-'")
    return None


def password_problem(password: str) -> str | None:
    """Why ``password`` is refused, or ``None``."""
    if len(password) < MIN_PASSWORD:
        return f"a password needs at least {MIN_PASSWORD} characters"
    if len(password) > MAX_PASSWORD:
        return f"a password has at most {MAX_PASSWORD} characters"
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in password):
        return "a password cannot hold control characters"
    return None


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (slow: about 0.1 s and 64 MiB)."""
    return _HASHER.hash(password)


def verify_password(user: User | None, password: str) -> bool:
    """Whether ``password`` is ``user``'s (``None``: an unknown name, always ``False``,
    after the same work as a known one)."""
    if len(password) > MAX_PASSWORD:
        return False
    try:
        _HASHER.verify(user.password_hash if user else _dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return user is not None


def parse(text: str, source: str = "users file") -> dict[str, User]:
    """The users of a file's text; :class:`UsersFileError` naming the first bad line."""
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        role, _, password_hash = rest.partition(":")
        problem = name_problem(name)
        if problem is None and role not in ROLES:
            problem = f"role {role[:20]!r} is not one of {', '.join(ROLES)}"
        if problem is None and not password_hash.startswith("$argon2id$"):
            problem = "the password hash is not an argon2id hash"
        if problem is None and name in users:
            problem = f"user {name!r} is listed twice"
        if problem is not None:
            raise UsersFileError(f"{source}, line {number}: {problem}")
        users[name] = User(name, role, password_hash)
    return users


def render(users: Iterable[User]) -> str:
    """The file's text for ``users`` (sorted by name)."""
    lines = [f"{u.name}:{u.role}:{u.password_hash}\n"
             for u in sorted(users, key=lambda u: u.name)]
    return HEADER + "".join(lines)


def read(path: Path) -> dict[str, User]:
    """The users in ``path`` (:class:`UsersFileError` when unreadable or malformed)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"cannot read the users file {path}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from exc
    return parse(text, str(path))


def write(path: Path, users: Iterable[User]) -> None:
    """Replace ``path`` atomically and durably with ``users``, readable by its owner only.

    A file replaced by root keeps its owner (the service user must still read it).
    """
    try:
        before: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        before = None
    tmp = path.parent / temp_name(path)
    write_new(tmp, render(users).encode("utf-8"), mode=USERS_FILE_MODE)
    try:
        if before is not None and os.geteuid() == 0 and (before.st_uid, before.st_gid) != (0, 0):
            os.chown(tmp, before.st_uid, before.st_gid)
        os.chmod(tmp, USERS_FILE_MODE)  # whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def exposure(path: Path) -> str | None:
    """A warning when ``path`` can be read by others than its owner, or ``None``."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return (f"{path} is readable by others (mode {mode:04o}): the password hashes can "
                f"be guessed at offline; chmod 600 {path}")
    return None


def signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when the file is replaced or edited (inode, size, mtime, ctime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
