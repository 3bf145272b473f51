"""``dicomcache users`` and the refusals of ``serve``/``check-config``, as an operator
runs them: subprocesses, the password on stdin (never in argv)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dicomcache.http import users


def run(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomcache", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "dicomcache.toml"
    path.write_text(f'''
[upstream]
url = "http://127.0.0.1:9"
[cache]
directory = "{tmp_path / 'cache'}"
[auth]
mode = "basic"
users_file = "users"
''')
    return path


def test_add_list_remove(config: Path) -> None:
    users_file = config.parent / "users"
    added = run("users", "add", "alice", "--config", str(config), stdin="alice-secret-1\n")
    assert added.returncode == 0, added.stderr
    assert "added alice (viewer)" in added.stdout
    admin = run("users", "add", "bob", "--role", "admin", "--config", str(config),
                stdin="bob-secret-22")  # no newline at the end: fine
    assert admin.returncode == 0, admin.stderr
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600

    found = users.read(users_file)
    assert {n: u.role for n, u in found.items()} == {"alice": "viewer", "bob": "admin"}
    assert users.verify_password(found["alice"], "alice-secret-1")
    assert users.verify_password(found["bob"], "bob-secret-22")

    listed = run("users", "list", "--config", str(config))
    assert listed.returncode == 0
    assert listed.stdout.splitlines() == ["alice\tviewer", "bob\tadmin"]
    assert "argon2" not in listed.stdout + listed.stderr

    again = run("users", "add", "alice", "--config", str(config), stdin="another-pass-1\n")
    assert again.returncode == 1 and "--replace" in again.stderr
    replaced = run("users", "add", "alice", "--role", "admin", "--replace", "--config",
                   str(config), stdin="another-pass-1\n")
    assert replaced.returncode == 0, replaced.stderr
    alice = users.read(users_file)["alice"]
    assert alice.role == "admin" and users.verify_password(alice, "another-pass-1")

    removed = run("users", "remove", "bob", "--config", str(config))
    assert removed.returncode == 0
    assert list(users.read(users_file)) == ["alice"]
    missing = run("users", "remove", "bob", "--config", str(config))
    assert missing.returncode == 1 and "no user 'bob'" in missing.stderr


@pytest.mark.parametrize(("name", "stdin", "problem"), [
    ("carol", "short\n", "at least 8 characters"),
    ("carol", "\n", "at least 8 characters"),
    ("carol", "", "at least 8 characters"),
    ("carol", "x" * 5000 + "\n", "at most 1024"),
    ("ca:rol", "long-enough-1\n", "is not a user name"),
])
def test_refused_input_changes_nothing(config: Path, name: str, stdin: str,
                                       problem: str) -> None:
    done = run("users", "add", name, "--config", str(config), stdin=stdin)
    assert done.returncode != 0
    assert problem in done.stderr
    assert not (config.parent / "users").exists()
    secret = stdin.strip()[:20]
    assert not secret or secret not in done.stdout + done.stderr  # never echoed


def test_no_password_argument(config: Path) -> None:
    done = run("users", "add", "dave", "secret-on-argv", "--config", str(config))
    assert done.returncode == 2  # argparse: unrecognized argument
    assert not (config.parent / "users").exists()


def test_users_needs_a_basic_config(tmp_path: Path) -> None:
    path = tmp_path / "none.toml"
    path.write_text(f'[cache]\ndirectory = "{tmp_path}"\n')
    done = run("users", "list", "--config", str(path))
    assert done.returncode == 2 and "users_file is not set" in done.stderr


def none_config(tmp_path: Path, host: str, allow: bool = False) -> Path:
    path = tmp_path / "none.toml"
    path.write_text(f'''
[server]
host = "{host}"
[upstream]
url = "http://127.0.0.1:9"
[cache]
directory = "{tmp_path / 'cache'}"
[auth]
mode = "none"
allow_anonymous_network = {"true" if allow else "false"}
''')
    return path


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_anonymous_network_bind_is_refused(tmp_path: Path, command: str) -> None:
    done = run(command, "--config", str(none_config(tmp_path, "0.0.0.0")))
    assert done.returncode == 2
    assert "auth.mode" in done.stderr and "0.0.0.0" in done.stderr


def test_serve_host_override_is_refused(tmp_path: Path) -> None:
    done = run("serve", "--config", str(none_config(tmp_path, "127.0.0.1")),
               "--host", "0.0.0.0")
    assert done.returncode == 2
    assert "auth.mode" in done.stderr and "0.0.0.0" in done.stderr


def test_anonymous_network_when_allowed(tmp_path: Path) -> None:
    done = run("check-config", "--config", str(none_config(tmp_path, "0.0.0.0", allow=True)))
    assert done.returncode == 0, done.stderr
    assert "ON THE NETWORK" in done.stdout


def test_basic_without_a_users_file_is_refused(config: Path) -> None:
    for command in ("check-config", "serve"):
        done = run(command, "--config", str(config))
        assert done.returncode == 2, (command, done.stderr)
        assert "dicomcache users add" in done.stderr


def test_password_from_the_terminal(config: Path) -> None:
    """On a terminal the password is asked twice and not echoed (a real pty)."""
    import os
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        os.execv(sys.executable, [sys.executable, "-m", "dicomcache", "users", "add", "erin",
                                  "--config", str(config)])
    seen = b""

    def expect(prompt: bytes, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while prompt not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {prompt!r} in {seen!r}"
            if select.select([fd], [], [], left)[0]:
                try:
                    seen += os.read(fd, 1024)
                except OSError:  # the child closed the terminal
                    break

    try:
        expect(b"Password for erin: ")
        os.write(fd, b"terminal-secret-1\n")
        expect(b"Again: ")
        os.write(fd, b"terminal-secret-1\n")
        expect(b"added erin")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert b"terminal-secret-1" not in seen  # not echoed
    assert users.verify_password(users.read(config.parent / "users")["erin"],
                                 "terminal-secret-1")
