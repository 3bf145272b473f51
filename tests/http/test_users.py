"""The users file (http/users.py): parsing, writing, hashing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dicomcache.http import users
from dicomcache.http.users import User, UsersFileError


@pytest.fixture(scope="module")
def hashed() -> str:
    return users.hash_password("correct horse")


def test_hash_and_verify(hashed: str) -> None:
    assert hashed.startswith("$argon2id$")
    alice = User("alice", "viewer", hashed)
    assert users.verify_password(alice, "correct horse")
    assert not users.verify_password(alice, "correct horsE")
    assert not users.verify_password(None, "correct horse")  # unknown: same work, False
    assert not users.verify_password(alice, "x" * (users.MAX_PASSWORD + 1))
    assert "argon2" not in repr(alice)  # the hash is not printed with the user


def test_write_then_read(tmp_path: Path, hashed: str) -> None:
    path = tmp_path / "users"
    written = [User("bob", "admin", hashed), User("alice", "viewer", hashed)]
    old_umask = os.umask(0)
    try:
        users.write(path, written)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # whatever the umask
    assert users.read(path) == {"alice": written[1], "bob": written[0]}
    assert users.exposure(path) is None
    path.chmod(0o644)
    assert "chmod 600" in (users.exposure(path) or "")
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temp file left


@pytest.mark.parametrize(("text", "problem"), [
    ("alice:viewer:$argon2id$x\nalice:admin:$argon2id$y\n", "line 2: user 'alice' is listed twice"),
    ("alice:root:$argon2id$x\n", "line 1: role 'root' is not one of viewer, admin"),
    ("alice:viewer:$2b$12$bcrypt\n", "line 1: the password hash is not an argon2id hash"),
    ("alice:viewer:$argon2i$v=19$x\n", "not an argon2id hash"),
    ("al ice:viewer:$argon2id$x\n", "is not a user name"),
    (":viewer:$argon2id$x\n", "is not a user name"),
    ("# comment\n\nalice\n", "line 3"),
])
def test_parse_names_the_bad_line(text: str, problem: str) -> None:
    with pytest.raises(UsersFileError, match=problem.replace("$", r"\$")):
        users.parse(text, "users")


def test_parse_skips_comments_and_blank_lines() -> None:
    text = users.HEADER + "\n  alice:viewer:$argon2id$v=19$x  \n"
    assert list(users.parse(text)) == ["alice"]


@pytest.mark.parametrize(("name", "ok"), [
    ("alice", True), ("a.b_c-d@clinic", True), ("x" * 64, True),
    ("x" * 65, False), ("", False), ("al:ice", False), ("al ice", False), ("é", False),
])
def test_name_problem(name: str, ok: bool) -> None:
    assert (users.name_problem(name) is None) is ok


@pytest.mark.parametrize(("password", "ok"), [
    ("12345678", True), ("1234567", False), ("x" * 1024, True), ("x" * 1025, False),
    ("tab\there", False), ("long enough but\x00", False), ("ünïcödé pass", True),
])
def test_password_problem(password: str, ok: bool) -> None:
    assert (users.password_problem(password) is None) is ok


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="cannot read the users file"):
        users.read(tmp_path / "missing")
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    with pytest.raises(UsersFileError, match="cannot read"):
        users.read(tmp_path / "binary")
