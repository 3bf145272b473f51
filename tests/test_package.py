"""The Debian package, installed where a hospital would install it: a clean Debian root.

``./run package`` builds the wheel and the .deb; each test here unpacks a throwaway root
made by ``debootstrap --variant=minbase`` from Debian's packages (this machine's
release and architecture, plus the package's dependencies), enters it with
``unshare --mount`` + ``chroot`` (with /proc, /dev/pts and /dev/shm mounted in that
private mount namespace only, so nothing is left mounted), and installs the package
there with apt, as docs/install.md says, in a network namespace of its own (the
install needs no network).  This machine's / is never touched.  The bootstrapped root
is kept as a tarball in ~/.cache/dicomcache-tests (made once, about a minute).

docs/install.md and docs/upgrade.md are then followed as written (their ```sh package
blocks): in such a root with systemd added, booted by ``systemd-nspawn`` so that
``systemctl`` and ``journalctl`` talk to a real systemd, by an administrator with sudo;
the upgrade from the previous release (0.1.0, built from its commit) and between two
builds with drain, backup, start, check and roll back.

Needs root (chroot, mount, systemd-nspawn), as ``./run test`` and CI run.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from pydicom import Dataset

from dicomcache import __version__
from dicomcache.devtools.orthanc import OrthancProcess, free_ports, loopback_env
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom.syntaxes import JPEG_LS_LOSSLESS
from tests.conftest import Sample, eventually_sync
from tests.test_doc_commands import Block, blocks, commands
from tests.test_systemd import directives
from tests.tls_support import write_ca, write_pair

REPO = Path(__file__).resolve().parents[1]
CONF = "/etc/dicomcache/config.toml"
ROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
            "DEBIAN_FRONTEND": "noninteractive"}
# Run inside the private mount namespace: mount what programs there expect, then chroot.
ENTER = ('mount -t proc proc "$1/proc" && mount -t tmpfs -o mode=1777 tmpfs "$1/dev/shm" && '
         'mount -t devpts -o newinstance,ptmxmode=0666 devpts "$1/dev/pts" && '
         'root="$1" && shift && exec chroot "$root" "$@"')

pytestmark = [
    pytest.mark.slow,
    # Building the package (a virtual environment, xz) and, the first time on a
    # machine, bootstrapping the root take minutes on a shared two-core machine.
    pytest.mark.timeout(2400),
]


def in_root(root: Path, *argv: str, user: str | None = None,
            network: bool = True) -> list[str]:
    """The command line that runs ``argv`` inside ``root`` (as ``user``, if given; with
    no network at all unless ``network``).  Each ``exec``s the next, so the process
    started is the program itself: a signal sent to it reaches it."""
    inner = list(argv)
    if user is not None:
        inner = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--",
                 *inner]
    spaces = ["--mount", "--propagation", "private"] + ([] if network else ["--net"])
    return ["unshare", *spaces, "sh", "-c", ENTER, "sh", str(root), *inner]


def sh(root: Path, *argv: str, user: str | None = None, network: bool = False,
       expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(in_root(root, *argv, user=user, network=network), env=ROOT_ENV,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == expect, (f"{' '.join(argv)} exited {done.returncode}, "
                                       f"not {expect}:\n{done.stdout}{done.stderr}")
    return done


def host_run(*argv: str | Path, timeout: float = 600) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


# --- the artifacts and the clean root ---------------------------------------------------

@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(wheel, .deb), built by ``./run package`` as a release is."""
    if os.geteuid() != 0:
        pytest.skip("installing into a chroot needs root (./run test and CI run as root)")
    out = tmp_path_factory.mktemp("dist")
    # The documents' build command (```sh build), into this test's directory.
    (documented,) = {tuple(build_command(b)) for b in blocks() if "build" in b.tags}
    program, *argv = documented
    host_run(REPO / program, *argv, "--out", out, timeout=1800)
    (wheel,) = out.glob("dicomcache-*.whl")
    (deb,) = out.glob("dicomcache_*.deb")
    yield wheel, deb
    shutil.rmtree(out, ignore_errors=True)


def build_command(block: Block) -> list[str]:
    """The command of a ```sh build block (one line), as words, its comment left out."""
    (line,) = commands(block.text)
    return shlex.split(line, comments=True)


def debian_mirror(release: str) -> str:
    """Where this machine's apt gets ``release`` from (its sources, not a name we pick)."""
    listed = host_run("apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE)",
                      "Identifier: Packages")
    for line in listed.splitlines():
        uri, _, rel = line.partition(" ")
        if rel.strip() == release:
            return uri
    pytest.fail(f"apt on this machine has no source for {release}:\n{listed}")


def bootstrap(deb: Path, extra: tuple[str, ...] = ()) -> Path:
    """A minimal Debian root of this machine's release with the package's dependencies
    (and ``extra`` packages), as a tarball, made once per machine (other suites on this
    machine may be making it at the same moment: a lock)."""
    release = re.search(r"^VERSION_CODENAME=(\S+)$", Path("/etc/os-release").read_text(),
                        re.M)
    assert release, "no VERSION_CODENAME in /etc/os-release"
    arch = host_run("dpkg", "--print-architecture").strip()
    depends = host_run("dpkg-deb", "--field", deb, "Depends")
    include = sorted(re.sub(r"\s*\(.*\)", "", d).strip() for d in depends.split(","))
    include += sorted(extra)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dicomcache-tests"
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"debian-{release[1]}-{arch}-minbase-{'-'.join(include)}.tar"
    assert shutil.which("debootstrap"), "debootstrap is missing (./run test installs it)"
    with (cache / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not tarball.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                target = Path(tmp) / "root"
                host_run("debootstrap", "--variant=minbase", f"--arch={arch}",
                         f"--include={','.join(include)}", release[1], target,
                         debian_mirror(release[1]), timeout=1800)
                # The downloaded .debs and package lists: not part of a clean root's use here.
                for junk in [*target.glob("var/cache/apt/archives/*.deb"),
                             *target.glob("var/lib/apt/lists/*_*")]:
                    junk.unlink()
                host_run("tar", "--numeric-owner", "-C", target, "-cf", Path(tmp) / "root.tar",
                         ".")
                os.replace(Path(tmp) / "root.tar", tarball)
    return tarball


@pytest.fixture(scope="module")
def clean_root_tarball(packages: tuple[Path, Path]) -> Path:
    """The clean root: the package's dependencies and nothing else."""
    return bootstrap(packages[1])


@pytest.fixture
def root(clean_root_tarball: Path, packages: tuple[Path, Path],
         tmp_path: Path) -> Iterator[Path]:
    """A fresh clean root with the .deb copied to its /tmp; deleted afterwards."""
    where = tmp_path / "root"
    where.mkdir()
    host_run("tar", "--numeric-owner", "-xpf", clean_root_tarball, "-C", where)
    shutil.copy(packages[1], where / "tmp")
    yield where
    shutil.rmtree(where, ignore_errors=True)


# --- reading the installed root from outside ---------------------------------------------

def names(root: Path, table: str) -> dict[int, str]:
    out = {}
    for line in (root / "etc" / table).read_text().splitlines():
        fields = line.split(":")
        out[int(fields[2])] = fields[0]
    return out


def owner_mode(root: Path, path: str) -> tuple[str, str, int]:
    st = os.lstat(root / path.lstrip("/"))
    return (names(root, "passwd")[st.st_uid], names(root, "group")[st.st_gid],
            st.st_mode & 0o7777)


def expected_owners() -> dict[str, tuple[str, str, int]]:
    """Who owns what after an install: the directories with the modes the unit gives
    them at every start (so the package and systemd never disagree)."""
    unit = {k: v[-1] for k, v in directives().items()}
    return {
        "/etc/dicomcache": ("root", "dicomcache", int(unit["ConfigurationDirectoryMode"], 8)),
        CONF: ("root", "dicomcache", 0o640),  # the Orthanc password may be in it
        "/var/cache/dicomcache": ("dicomcache", "dicomcache", int(unit["CacheDirectoryMode"], 8)),
        "/var/lib/dicomcache": ("dicomcache", "dicomcache", int(unit["StateDirectoryMode"], 8)),
        "/var/log/dicomcache": ("dicomcache", "dicomcache", int(unit["LogsDirectoryMode"], 8)),
    }


def owners(root: Path) -> dict[str, tuple[str, str, int]]:
    return {path: owner_mode(root, path) for path in expected_owners()}


def replace_once(text: str, pattern: str, new: str) -> str:
    out, n = re.subn(pattern, new, text, flags=re.M)
    assert n == 1, f"{pattern!r} matched {n} times in the text this test edits"
    return out


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        conn.close()


def answers(port: int, path: str) -> bool:
    try:
        return get(port, path)[0] == 200
    except OSError:
        return False


def with_version(deb: Path, version: str, where: Path) -> Path:
    """The same package under another version (what an upgrade installs)."""
    tree = where / "tree"
    host_run("dpkg-deb", "--raw-extract", deb, tree)
    control = tree / "DEBIAN" / "control"
    control.write_text(replace_once(control.read_text(), r"^Version: .*$", f"Version: {version}"))
    out = where / f"dicomcache_{version}.deb"
    host_run("dpkg-deb", "--root-owner-group", "-Zzstd", "--build", tree, out)
    shutil.rmtree(tree)
    return out


FAKE_SYSTEMCTL = """#!/bin/sh
# Stands in for systemd's systemctl in the test root: records each call, keeps one
# service's state in a file.
echo "$*" >> /run/systemctl.calls
case "$1" in
    is-active) [ -e /run/dicomcache-fake-active ] ;;
    stop) rm -f /run/dicomcache-fake-active ;;
    start) touch /run/dicomcache-fake-active ;;
esac
"""


def fake_systemd(root: Path) -> Path:
    """A root that looks booted with systemd (/run/systemd/system) and a recording
    systemctl; returns the file of recorded calls."""
    (root / "run/systemd/system").mkdir(parents=True, exist_ok=True)
    systemctl = root / "usr/bin/systemctl"
    assert not systemctl.exists(), "the clean root has a systemctl of its own"
    systemctl.write_text(FAKE_SYSTEMCTL)
    systemctl.chmod(0o755)
    calls = root / "run/systemctl.calls"
    calls.write_text("")
    return calls


# --- the tests ----------------------------------------------------------------------------

def test_installs_into_a_clean_root_checks_its_config_and_serves(
        root: Path, packages: tuple[Path, Path], orthanc: OrthancProcess,
        samples: dict[str, list[Sample]]) -> None:
    deb = packages[1]
    done = sh(root, "apt-get", "install", "--yes", f"/tmp/{deb.name}")
    assert "not started until it is configured" in done.stdout

    # The user, who owns what, the program read-only, one unit, the conffile.
    user = next(line for line in (root / "etc/passwd").read_text().splitlines()
                if line.startswith("dicomcache:")).split(":")
    assert int(user[2]) < 1000 and user[5:] == ["/var/lib/dicomcache", "/usr/sbin/nologin"]
    assert owners(root) == expected_owners()
    for path in [root / "opt/dicomcache", *(root / "opt/dicomcache").rglob("*")]:
        st = os.lstat(path)
        # Nobody but root can change the program (a symlink's own mode means nothing).
        assert st.st_uid == 0 and (path.is_symlink() or not st.st_mode & 0o022), path
    assert os.readlink(root / "usr/bin/dicomcache") == "/opt/dicomcache/.venv/bin/dicomcache"
    assert ((root / "lib/systemd/system/dicomcache.service").read_bytes()
            == (REPO / "systemd/dicomcache.service").read_bytes())
    conffiles = sh(root, "dpkg-query", "--showformat=${Conffiles}", "--show", "dicomcache")
    assert CONF in conffiles.stdout
    sh(root, "dpkg", "--verify", "dicomcache")  # every file as shipped (md5sums)
    version = sh(root, "dicomcache", "--version", user="dicomcache").stdout
    assert version.strip() == f"dicomcache {__version__}"

    # As installed, the example configuration names what is left to do, exit 2.
    unset = sh(root, "dicomcache", "check-config", "--config", CONF, user="dicomcache",
               expect=2)
    assert "upstream.password_file" in unset.stdout + unset.stderr

    # The operator's first configuration: the real Orthanc, its password in a file.
    (port,) = free_ports(1)
    conf = root / CONF.lstrip("/")
    text = replace_once(conf.read_text(), r'^url = "http://orthanc\.example\.org:8042"',
                        f'url = "{orthanc.url}"')
    text = replace_once(text, r'^username = "dicomcache"(?= )',
                        f'username = "{orthanc.username}"')
    text = replace_once(text, r"^port = 8080\b", f"port = {port}")
    conf.write_text(text)
    password = root / "etc/dicomcache/orthanc-password"
    password.write_text(orthanc.password + "\n")
    gid = {v: k for k, v in names(root, "group").items()}["dicomcache"]
    os.chown(password, 0, gid)
    password.chmod(0o640)
    sh(root, "dicomcache", "check-config", "--config", CONF, user="dicomcache", network=True)

    # A short serve as the service user: health, readiness (Orthanc reached from the
    # root with the password file), an instance fetched, cached and served again.
    log = root.parent / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            in_root(root, "dicomcache", "serve", "--config", CONF, user="dicomcache"),
            env=ROOT_ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            assert serve.poll() is None, f"serve exited {serve.returncode}:\n{log.read_text()}"
            return answers(port, "/healthz")
        eventually_sync(up, timeout=180, interval=0.5, what="the installed serve's /healthz")
        eventually_sync(lambda: answers(port, "/readyz"), timeout=60, interval=0.5,
                        what="/readyz (Orthanc reached from the root)")
        sample = samples["explicit"][0]
        for expected_cache in ("MISS", "HIT"):
            status, headers, body = get(port, f"/instances/{sample.orthanc_id}/file")
            assert (status, headers.get("X-Cache"), body) == (200, expected_cache, sample.data)
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=120) == 0, log.read_text()
    # What it wrote is the service user's, in the places the package made for it.
    stored = [p for p in (root / "var/cache/dicomcache").rglob("*") if p.is_file()]
    assert stored and {owner_mode(root, "/" + str(p.relative_to(root)))[0]
                       for p in stored} == {"dicomcache"}
    assert owner_mode(root, "/var/log/dicomcache/audit.jsonl") == (
        "dicomcache", "dicomcache", 0o600)
    assert owners(root) == expected_owners()


def test_upgrade_keeps_the_configuration_and_nothing_deletes_the_spool(
        root: Path, packages: tuple[Path, Path], tmp_path: Path) -> None:
    deb = packages[1]
    sh(root, "apt-get", "install", "--yes", f"/tmp/{deb.name}")
    old = sh(root, "dpkg-query", "--showformat=${Version}", "--show", "dicomcache").stdout

    # What a running site has: an edited configuration, a study waiting in the relay
    # spool, cached instances, an audit trail.
    conf = root / CONF.lstrip("/")
    conf.write_text(conf.read_text() + "# edited by the clinic's IT\n")
    uid = {v: k for k, v in names(root, "passwd").items()}["dicomcache"]
    data = {root / "var/lib/dicomcache/spool/study/pending.dcm": b"not yet at the PACS",
            root / "var/cache/dicomcache/objects/ab/cached": b"a cached instance",
            root / "var/log/dicomcache/audit.jsonl": b'{"who": "someone"}\n'}
    for path, content in data.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        for p in [path, *path.parents]:
            if p in (root / "var/lib/dicomcache", root / "var/cache/dicomcache",
                     root / "var/log/dicomcache"):
                break
            os.chown(p, uid, uid)
    spool = root / "var/lib/dicomcache/spool/study/pending.dcm"

    # The service runs and is enabled.  systemd cannot run in this root: a systemctl
    # that records its calls and keeps the service's state stands in for it, to see
    # what the maintainer scripts ask of systemd.
    calls = fake_systemd(root)
    (root / "run/dicomcache-fake-active").touch()
    wants = root / "etc/systemd/system/multi-user.target.wants/dicomcache.service"
    wants.parent.mkdir(parents=True, exist_ok=True)
    wants.symlink_to("/lib/systemd/system/dicomcache.service")

    # Upgrade: the same package with a later version.  The service is stopped before
    # the files are replaced and started again after.
    newer = with_version(deb, old + "+1", tmp_path)
    shutil.copy(newer, root / "tmp")
    upgraded = sh(root, "apt-get", "install", "--yes", f"/tmp/{newer.name}")
    assert sh(root, "dpkg-query", "--showformat=${Version}", "--show",
              "dicomcache").stdout == old + "+1"
    assert conf.read_text().endswith("# edited by the clinic's IT\n")
    assert all(path.read_bytes() == content for path, content in data.items())
    assert owners(root) == expected_owners()
    assert [c for c in calls.read_text().splitlines() if c.split()[0] in ("stop", "start")] == [
        "stop dicomcache.service", "start dicomcache.service"], upgraded.stdout
    assert (root / "run/dicomcache-fake-active").exists()
    assert not (root / "run/dicomcache.restart-after-upgrade").exists()

    # Remove: the service is stopped, the program goes; configuration, cache, spool
    # and audit trail stay.
    calls.write_text("")
    removed = sh(root, "apt-get", "remove", "--yes", "dicomcache")
    assert "stop dicomcache.service" in calls.read_text().splitlines()
    assert not (root / "run/dicomcache-fake-active").exists()
    assert not (root / "run/dicomcache.stopped-by-package").exists()  # nothing to restart
    assert not (root / "opt/dicomcache").exists() and not (root / "usr/bin/dicomcache").exists()
    assert all(path.read_bytes() == content for path, content in data.items())
    assert conf.exists() and "/var/lib/dicomcache (1 files)" in removed.stdout

    # Purge: the configuration file and the cache go; the spool and the audit trail
    # stay, and the output says where they are.
    purged = sh(root, "apt-get", "purge", "--yes", "dicomcache")
    assert not conf.exists() and not (root / "var/cache/dicomcache").exists()
    assert spool.read_bytes() == b"not yet at the PACS"
    assert (root / "var/log/dicomcache/audit.jsonl").exists()
    assert "/var/lib/dicomcache (1 files): relay spool" in purged.stdout
    assert sh(root, "dpkg-statoverride", "--list", expect=1).stdout == ""  # 1: none left
    assert not wants.is_symlink()  # no longer enabled
    # A later install finds the spool where it was, owned by the service user again.
    sh(root, "apt-get", "install", "--yes", f"/tmp/{deb.name}")
    assert spool.read_bytes() == b"not yet at the PACS"
    assert owners(root) == expected_owners()
    assert owner_mode(root, "/var/lib/dicomcache/spool/study/pending.dcm")[0] == "dicomcache"


def test_the_artifacts_carry_one_version_and_the_license(packages: tuple[Path, Path]) -> None:
    wheel, deb = packages
    assert wheel.name == f"dicomcache-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(f"dicomcache-{__version__}.dist-info/METADATA").decode()
        assert zf.read(f"dicomcache-{__version__}.dist-info/licenses/LICENSE") == (
            REPO / "LICENSE").read_bytes()
    assert f"\nVersion: {__version__}\n" in meta and "\nLicense-Expression: MIT\n" in meta
    fields = host_run("dpkg-deb", "--field", deb, "Package", "Version", "Architecture",
                      "Depends")
    arch = host_run("dpkg", "--print-architecture").strip()
    assert f"Version: {__version__}\n" in fields and f"Architecture: {arch}\n" in fields
    assert deb.name == f"dicomcache_{__version__}_{arch}.deb"
    assert re.search(r"Depends: python3\.\d+, libc6 \(>= 2\.\d+\), passwd", fields), fields


# --- the documents' own commands, in a root booted with systemd -------------------------
#
# docs/install.md and docs/upgrade.md tag their commands ```sh package: they are run
# here as written, by an administrator (a user with sudo, as on a server) in a clean
# root that runs a real systemd as its PID 1 (systemd-nspawn --boot), with the .deb
# just built.  tests/test_doc_commands.py fails a ```sh package block that no plan below
# runs.

#: What the booted root has besides the package's dependencies: systemd to boot, D-Bus
#: for systemctl as a user, and what the documents' commands use (sudo, curl, openssl,
#: rsync, Prometheus's promtool, DCMTK's storescu).
BOOTED_EXTRAS = ("ca-certificates", "curl", "dbus", "dcmtk", "openssl", "prometheus", "rsync",
                 "sudo", "systemd")
#: Services of BOOTED_EXTRAS that would start at boot (on this machine's network, which the
#: booted root shares) and that no document needs running: masked.
MASKED = ("prometheus.service",)
ADMIN = "admin"
#: What ``sudoedit`` and ``systemctl edit`` open the files with: stands for the
#: administrator typing the edit.  The edits (a JSON list of [regex, replacement]), the
#: password and a drop-in's text come from the test.
EDITOR = """import json, os, re, sys
for name in sys.argv[1:]:
    with open(name) as f:
        text = f.read()
    if "orthanc-password" in os.path.basename(name):
        text = os.environ["DOC_PASSWORD"] + "\\n"
    elif "override.conf" in os.path.basename(name):
        text = os.environ["DOC_DROPIN"]
    else:
        for pattern, new in json.loads(os.environ["DOC_EDITS"]):
            text, n = re.subn(pattern, new, text, count=1, flags=re.M)
            assert n == 1, pattern
    with open(name, "w") as f:
        f.write(text)
"""


def doc_blocks(document: str) -> list[Block]:
    """The ```sh package blocks of ``document`` (a path from the repository's top)."""
    return [b for b in blocks() if "package" in b.tags and b.path == REPO / document]


def claimed(plan: list[str], document: str) -> list[Block]:
    """The blocks of ``document`` in the order of ``plan``, each block named by the start
    of its commands (one a line) and matching exactly one block."""
    found = doc_blocks(document)
    ordered = []
    for start in plan:
        matching = [b for b in found if "\n".join(commands(b.text)).startswith(start)]
        assert len(matching) == 1, f"{document}: {start!r} names {len(matching)} blocks"
        ordered.append(matching[0])
    assert len(set(ordered)) == len(ordered), f"{document}: a block named twice in one plan"
    return ordered


class Booted:
    """``root`` booted by systemd-nspawn (sharing this machine's network, so the real
    Orthanc on loopback is reached); commands are run in it with nsenter."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        with log.open("wb") as out:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "--directory", str(root), "--boot",
                 "--register=no", "--keep-unit", "--console=pipe",
                 f"--machine=dicomcache-test-{os.getpid()}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            self.leader = eventually_sync(self._leader, timeout=60, interval=0.2,
                                          what="systemd started by systemd-nspawn")
            # Until systemd listens, systemctl prints nothing: ask again.
            state = eventually_sync(self._state, timeout=180, interval=0.5,
                                    what="systemd's answer to is-system-running")
            assert state == "running", (
                state + self.run("systemctl --failed --no-pager", user=None).stdout)
        except BaseException:
            self.stop()
            raise

    def _leader(self) -> int:
        """The container's PID 1 (systemd), seen from here: a descendant of nspawn."""
        assert self.nspawn.poll() is None, self.log.read_text()
        parents, names = {}, {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            pid = int(stat.parent.name)
            names[pid] = text[text.index("(") + 1:text.rindex(")")]
            parents[pid] = int(text.rpartition(")")[2].split()[1])
        for pid, name in names.items():
            ancestor = parents.get(pid)
            while name == "systemd" and ancestor:
                if ancestor == self.nspawn.pid:
                    return pid
                ancestor = parents.get(ancestor)
        return 0

    def _state(self) -> str:
        return self.run("systemctl is-system-running --wait", user=None,
                        timeout=180).stdout.strip()

    def run(self, command: str, *, user: str | None = ADMIN, env: dict[str, str] | None = None,
            timeout: float = 600, typed: str = "") -> subprocess.CompletedProcess[str]:
        """``command`` by bash in the booted root, as ``user`` (root if None), in its home,
        with ``typed`` on its standard input (what a command that asks is answered)."""
        home = f"/home/{user}" if user else "/root"
        environment = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": home,
                       "LANG": "C.UTF-8", "USER": user or "root", "LOGNAME": user or "root",
                       **(env or {})}
        inner = ["env", "-i", *(f"{k}={v}" for k, v in environment.items()),
                 "bash", "-o", "pipefail", "-c", f"cd {home} && {command}"]
        if user is not None:
            inner = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *inner]
        return subprocess.run(["nsenter", f"--target={self.leader}", "--all", "--root",
                               "--wd", *inner], input=typed, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def stop(self) -> None:
        if self.nspawn.poll() is None:
            if getattr(self, "leader", 0):
                self.run("systemctl poweroff", user=None)
            else:
                self.nspawn.terminate()
            try:
                self.nspawn.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()


@pytest.fixture
def booted(packages: tuple[Path, Path], tmp_path: Path) -> Iterator[Booted]:
    """A fresh root with systemd, an administrator in the sudo group (no password asked:
    there is no one to type it) and the .deb in the administrator's home, booted."""
    if not shutil.which("systemd-nspawn"):
        pytest.fail("systemd-nspawn is missing (./run test installs systemd-container)")
    tarball = bootstrap(packages[1], BOOTED_EXTRAS)
    where = tmp_path / "booted"
    where.mkdir()
    host_run("tar", "--numeric-owner", "-xpf", tarball, "-C", where)
    sh(where, "useradd", "--create-home", "--shell", "/bin/bash", "--groups",
       "sudo,adm,systemd-journal", ADMIN)
    # systemctl edit, run by sudo, finds the editor standing in for the administrator.
    (where / "etc/sudoers.d/admin").write_text(f"{ADMIN} ALL=(ALL:ALL) NOPASSWD: ALL\n"
                                               'Defaults env_keep += "SYSTEMD_EDITOR DOC_DROPIN"\n')
    (where / "etc/sudoers.d/admin").chmod(0o440)
    # apt asks before installing; an administrator answers yes.
    (where / "etc/apt/apt.conf.d/90yes").write_text('APT::Get::Assume-Yes "true";\n')
    for unit in MASKED:
        (where / "etc/systemd/system" / unit).symlink_to("/dev/null")
    editor = where / "usr/local/bin/doc-edit"
    (python, *_) = sorted(where.glob("usr/bin/python3.*[0-9]"))  # the package's dependency
    editor.write_text(f"#!/{python.relative_to(where)}\n{EDITOR}")
    editor.chmod(0o755)
    shutil.copy(packages[1], where / "home" / ADMIN)
    system = Booted(where, tmp_path / "nspawn.log")
    try:
        yield system
    finally:
        system.stop()
        shutil.rmtree(where, ignore_errors=True)


#: Commands that follow a log until the administrator stops them (Ctrl-C): run for
#: FOLLOW_SECONDS, then interrupted; what they printed by then is checked.
FOLLOWING = ("journalctl -u dicomcache -f",)
FOLLOW_SECONDS = 5
#: Commands that refuse to run without a terminal ("Cannot edit units if not on a tty"):
#: given one, as the administrator's session has.
ON_A_TERMINAL = ("sudo systemctl edit ",)


@dataclass
class Operator:
    """Runs the documents' blocks in the booted root as the administrator would type them,
    with this test's names in place of the documents' examples."""

    booted: Booted
    replace: dict[str, str]
    env: dict[str, str]

    def run_block(self, block: Block, typed: str = "") -> list[str]:
        """Each command must exit 0 (a ``curl`` of the just-started service: within a
        minute), but one whose comment says ``# must fail`` must not; a command that
        follows a log until Ctrl-C (:data:`FOLLOWING`) is stopped after a few seconds.
        ``typed`` is what the administrator types where a command asks (a password).
        Returns what each printed."""
        printed = []
        for command in commands(block.text):
            line = command
            for old, new in self.replace.items():
                line = line.replace(old, new)
            fails = line.endswith("# must fail")
            follows = line.startswith(FOLLOWING)
            if follows:
                line = f"timeout --signal=INT {FOLLOW_SECONDS} {line}"
            if line.startswith(ON_A_TERMINAL):  # util-linux's script: a pseudo-terminal
                line = f"script --quiet --return --command {shlex.quote(line)} /dev/null"
            deadline = time.monotonic() + (60 if line.startswith("curl ") else 0)
            while True:
                done = self.booted.run(line, env=self.env, typed=typed)
                if done.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(1)
            said = f"{block.where}: {line}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            if fails:
                assert done.returncode != 0, said
            elif follows:
                assert done.returncode == 124 and done.stdout.strip(), said  # stopped by us
            else:
                assert done.returncode == 0, said
            assert "Traceback" not in done.stderr, said
            printed.append(done.stdout + done.stderr)
        return printed


def operator(booted: Booted, orthanc: OrthancProcess, port: int,
             extra_edits: list[tuple[str, str]] | None = None) -> Operator:
    edits = [(r'^url = "http://orthanc\.example\.org:8042"', f'url = "{orthanc.url}"'),
             (r'^username = "dicomcache"(?= )', f'username = "{orthanc.username}"'),
             (r"^port = 8080\b", f"port = {port}"), *(extra_edits or [])]
    return Operator(booted, {"http://127.0.0.1:8080": f"http://127.0.0.1:{port}"},
                    {"SUDO_EDITOR": "/usr/local/bin/doc-edit", "DOC_EDITS": json.dumps(edits),
                     "DOC_PASSWORD": orthanc.password})


#: docs/install.md's blocks, in the order an administrator runs them.
INSTALL_PLAN = ["sha256sum", "sudo apt install", "sudoedit", "sudo install -m 640",
                "sudo -u dicomcache dicomcache check-config", "sudo systemctl enable --now",
                "sudo apt remove"]


def test_install_md_as_written_on_a_booted_root(
        booted: Booted, packages: tuple[Path, Path], orthanc: OrthancProcess) -> None:
    deb = packages[1]
    (port,) = free_ports(1)
    admin = operator(booted, orthanc, port)
    admin.replace["dicomcache_0.1.0_amd64.deb"] = deb.name
    *setup, remove = claimed(INSTALL_PLAN, "docs/install.md")
    out = [admin.run_block(b) for b in setup]
    assert out[0][0].split()[0] == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert "not started until it is configured" in out[1][0]
    # Started by systemd, as the service's user: ready (curl -f: /readyz answered 200).
    status = out[5]
    assert "Active: active (running)" in status[1], status[1]
    assert status[3].strip()
    assert booted.run("systemctl show -p User --value dicomcache").stdout.strip() == "dicomcache"
    assert booted.run("stat -c %U /proc/$(systemctl show -p MainPID --value dicomcache)"
                      ).stdout.strip() == "dicomcache"
    # Removed, then purged: the audit trail is kept, and said to be.  (The relay is off
    # here: its empty spool directory goes with the package; a spool holding studies
    # stays, test_upgrade_keeps_the_configuration_and_nothing_deletes_the_spool.)
    removed, purged = admin.run_block(remove)
    assert not (booted.root / "opt/dicomcache").exists()
    assert (booted.root / "var/log/dicomcache/audit.jsonl").exists()
    assert "/var/log/dicomcache" in removed and "/var/log/dicomcache" in purged
    assert not (booted.root / CONF.lstrip("/")).exists()
    assert booted.run("systemctl is-active dicomcache").stdout.strip() == "inactive"


#: docs/upgrade.md's blocks, in the order of its steps: what runs now, drain and stop,
#: back up, drain as a script would (the service stopped), upgrade, start, check, roll back.
UPGRADE_PLAN = ["dicomcache --version\ndpkg-query",
                "sudo -u dicomcache dicomcache relay drain --config", "sudo tar -C /",
                "sudo -u dicomcache dicomcache relay drain --timeout 900",
                "sudo apt install ./dicomcache_0.2.0", "sudo systemctl start",
                "dicomcache --version\nsudo -u", "sudo apt install --allow-downgrades"]


def relay_edits(relay_port: int, pacs: OrthancProcess) -> list[tuple[str, str]]:
    """The relay on, listening on ``relay_port``, its one destination ``pacs``."""
    return [(r"^enabled = false(?=\s+# true to run the relay)", "enabled = true"),
            (r"^port = 11112\b", f"port = {relay_port}"),
            (r'^remote_ae_title = "PACS_SCP"', f'remote_ae_title = "{pacs.aet}"'),
            (r'^remote_host = "192\.168\.1\.100"', 'remote_host = "127.0.0.1"'),
            (r"^remote_port = 11112\b", f"remote_port = {pacs.dicom_port}")]


def send_study(tmp_path: Path, relay_port: int, seed: int) -> Dataset:
    """A modality (DCMTK's storescu) sends a one-instance study to the relay."""
    (ds,) = make_ct_series(1, rows=32, columns=32, seed=seed, patient_id=f"PUPGRADE{seed}")
    study = tmp_path / f"study-{seed}.dcm"
    study.write_bytes(encode(ds, ds.file_meta.TransferSyntaxUID))
    sent = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "DICOMCACHE", "-xe",
                           "127.0.0.1", str(relay_port), str(study)], env=loopback_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return ds


def stored(pacs: OrthancProcess, ds: Dataset) -> bool:
    """Whether the PACS holds the instance."""
    return bool(pacs.json("POST", "/tools/find", json.dumps(
        {"Level": "Instance", "Query": {"SOPInstanceUID": str(ds.SOPInstanceUID)}}).encode()))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """A real Orthanc that takes C-STOREs: the relay's destination."""
    with OrthancProcess(tmp_path_factory.mktemp("pacs"), dicom=True) as proc:
        yield proc


def test_upgrade_md_as_written_on_a_booted_root(
        booted: Booted, packages: tuple[Path, Path], pacs: OrthancProcess,
        tmp_path: Path) -> None:
    deb = packages[1]
    # The next release: this build under a later version (the real previous release is
    # the next test's; this one rolls back too, which needs a release that has drain).
    newer = with_version(deb, f"{__version__}+1", tmp_path)
    shutil.copy(newer, booted.root / "home" / ADMIN)
    http_port, relay_port = free_ports(2)
    admin = operator(booted, pacs, http_port, extra_edits=relay_edits(relay_port, pacs))
    admin.replace.update({"dicomcache_0.1.0_amd64.deb": deb.name,
                          "dicomcache_0.2.0_amd64.deb": newer.name})
    # Installed and running as docs/install.md says, the relay on.
    for block in claimed(INSTALL_PLAN, "docs/install.md")[1:6]:
        admin.run_block(block)
    conf = booted.root / CONF.lstrip("/")
    configured = conf.read_text()
    assert f"remote_port = {pacs.dicom_port}" in configured
    # A modality sends a study.
    ds = send_study(tmp_path, relay_port, seed=23)

    out = [admin.run_block(b) for b in claimed(UPGRADE_PLAN, "docs/upgrade.md")]
    assert out[0][0].strip() == f"dicomcache {__version__}"
    # Drained (delivered to the PACS), then stopped.
    assert stored(pacs, ds)
    # The backup holds the configuration and the spool.
    listing = booted.run("sudo tar -tzf /root/dicomcache-before-upgrade.tar.gz").stdout
    assert "etc/dicomcache/config.toml" in listing and "var/lib/dicomcache/spool/" in listing
    # Upgraded, started, checked: the new version runs with the clinic's configuration.
    assert f"Unpacking dicomcache ({__version__}+1) over ({__version__})" in out[4][0]
    assert "Active: active (running)" in out[6][2]
    # Rolled back to the version before, the configuration still the clinic's.
    assert f"Unpacking dicomcache ({__version__}) over ({__version__}+1)" in out[7][0]
    assert booted.run("dpkg-query --showformat='${Version}' --show dicomcache").stdout == (
        __version__)
    assert conf.read_text() == configured
    assert (booted.root / "var/lib/dicomcache/spool").is_dir()


#: The release before this one, built from its commit: 0.1.0 (no tag was made for it;
#: its CHANGELOG entry was written by this commit).
PREVIOUS_RELEASE = ("0.1.0", "edaa2c00209d4d00a5a4919e198b4820901745aa")
#: docs/upgrade.md's way from 0.1.0 (it has no relay drain).
UPGRADE_FROM_0_1_0_PLAN = ["sudo systemctl stop dicomcache\nsudo tar"]


@pytest.fixture(scope="module")
def previous_release(packages: tuple[Path, Path],
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The .deb of the previous release, built by its own ``./run package`` from its
    commit (a clone of this repository's history: no network for the sources)."""
    version, commit = PREVIOUS_RELEASE
    tmp = tmp_path_factory.mktemp("previous")
    host_run("git", "clone", "--quiet", "--shared", "--no-checkout", REPO, tmp / "src")
    checkout = subprocess.run(["git", "-C", tmp / "src", "checkout", "--quiet", "--detach",
                               commit], capture_output=True, text=True, check=False)
    assert checkout.returncode == 0, (
        f"the previous release's commit {commit} is not in this clone (a shallow clone?): "
        f"{checkout.stderr}")
    host_run(tmp / "src" / "run", "package", "--out", tmp / "dist", timeout=1800)
    (deb,) = (tmp / "dist").glob("dicomcache_*.deb")
    assert deb.name.startswith(f"dicomcache_{version}_")
    yield deb
    shutil.rmtree(tmp, ignore_errors=True)


def test_upgrade_from_the_previous_release_delivers_what_it_left_in_the_spool(
        booted: Booted, packages: tuple[Path, Path], previous_release: Path,
        orthanc: OrthancProcess, tmp_path: Path) -> None:
    """0.1.0, built from its commit and running with the relay on, holds a study its
    PACS has not received; docs/upgrade.md's steps from 0.1.0 upgrade it to this build,
    which delivers the study, with the clinic's configuration kept."""
    old_version = PREVIOUS_RELEASE[0]
    newer = packages[1]
    if subprocess.run(["dpkg", "--compare-versions", __version__, "gt", old_version],
                      check=False).returncode != 0:
        newer = with_version(newer, f"{__version__}+1", tmp_path)  # the next release
    shutil.copy(previous_release, booted.root / "home" / ADMIN)
    shutil.copy(newer, booted.root / "home" / ADMIN)
    # The PACS is down while the modality sends: nothing listens on its port yet.
    pacs = OrthancProcess(tmp_path / "pacs", dicom=True)
    http_port, relay_port = free_ports(2)
    admin = operator(booted, orthanc, http_port, extra_edits=relay_edits(relay_port, pacs))
    admin.replace.update({"dicomcache_0.1.0_amd64.deb": previous_release.name,
                          "dicomcache_0.2.0_amd64.deb": newer.name})
    for block in claimed(INSTALL_PLAN, "docs/install.md")[1:6]:
        admin.run_block(block)
    assert booted.run("dicomcache --version").stdout.strip() == f"dicomcache {old_version}"
    conf = booted.root / CONF.lstrip("/")
    configured = conf.read_text()
    ds = send_study(tmp_path, relay_port, seed=24)
    with pacs:
        (block,) = claimed(UPGRADE_FROM_0_1_0_PLAN, "docs/upgrade.md")
        out = admin.run_block(block)
        assert "delivered" in out[3], out[3]
        assert stored(pacs, ds)
    assert booted.run("dicomcache --version").stdout.strip() == f"dicomcache {__version__}"
    assert booted.run("systemctl is-active dicomcache").stdout.strip() == "active"
    assert conf.read_text() == configured
    assert (booted.root / "etc/dicomcache/config.toml.dpkg-dist").exists()  # the new example


# --- operating it: README.md, operations.md, troubleshooting.md, orthanc.md, security.md ---

#: README.md's install, on the server.
README_PLAN = ["sudo apt install ./dicomcache_0.1.0_amd64.deb"]
#: docs/operations.md: the service and its log, the check against the real world, the
#: alert rules, a drop-in for a cache elsewhere, a hit seen over HTTPS.
OPERATIONS_PLAN = ["sudo systemctl enable --now dicomcache\nsystemctl status",
                   "sudo -u dicomcache dicomcache check-config --online",
                   "sudo install -D -m 644", "sudo systemctl edit dicomcache",
                   "curl -sI -u alice"]
#: docs/troubleshooting.md: Orthanc asked from the dicomcache machine; a start that fails.
TROUBLESHOOTING_PLAN = ["curl -s -o /dev/null", "journalctl -u dicomcache -n 20"]
#: docs/orthanc.md: Orthanc's answers to dicomcache's user.
ORTHANC_PLAN = ["curl -su dicomcache http://orthanc.hospital.example:8042/system",
                "curl -su dicomcache http://orthanc.hospital.example:8042/instances/ID"]
#: docs/security.md: users, HTTPS, authentication.
SECURITY_PLAN = ["sudo dicomcache users add alice", "curl --cacert",
                 "sudo -u dicomcache dicomcache check-config"]
#: Where the documents' names point in the booted root (its /etc/hosts).
DOC_HOSTS = ("dicomcache.clinic.example", "orthanc.hospital.example")
#: The passwords the administrator types (alice's) and a script pipes in (ward3's).
ALICE_PASSWORD, WARD3_PASSWORD = "alice at the viewer", "ward three's scripted one"


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[OrthancProcess, str, Dataset]]:
    """The documents' Orthanc: dicomcache's user on it is called ``dicomcache``, as they
    write; two studies of one instance in it: the first one's Orthanc ID returned (the
    instance the documents fetch), and the second's data set (a study nobody opens, so
    nothing prefetches it, before dicomweb.md's check of a cold frame)."""
    with OrthancProcess(tmp_path_factory.mktemp("hospital"), username="dicomcache") as proc:
        (first,) = make_ct_series(1, rows=32, columns=32, seed=31, patient_id="PHOSPITAL")
        (cold,) = make_ct_series(1, rows=32, columns=32, seed=32, patient_id="PHOSPITAL")
        instance, _ = proc.upload([encode(ds, ds.file_meta.TransferSyntaxUID)
                                   for ds in (first, cold)])
        yield proc, instance, cold


def map_doc_hosts(booted: Booted) -> None:
    """The documents' host names are this root (its /etc/hosts)."""
    hosts = booted.root / "etc/hosts"
    before = hosts.read_text() if hosts.exists() else "127.0.0.1 localhost\n"
    hosts.write_text(before + f"127.0.0.1 {' '.join(DOC_HOSTS)}\n")


def dropin(block: Block) -> str:
    """What a ``systemctl edit`` block's comment lines say to type."""
    lines = [line.strip().removeprefix("#").strip() for line in block.text.splitlines()]
    return "\n".join(line for line in lines[1:] if line) + "\n"


def test_operating_docs_as_written_on_a_booted_root(
        booted: Booted, packages: tuple[Path, Path],
        hospital: tuple[OrthancProcess, str, Dataset]) -> None:
    """Installed as README.md says, then operated as operations.md, troubleshooting.md,
    orthanc.md, security.md and dicomweb.md say: with the documents' host names (this root's
    /etc/hosts), dicomcache's own Orthanc user, a hospital CA of the test's own, the
    passwords typed on standard input."""
    orthanc, instance, cold = hospital
    deb = packages[1]
    http_port, redirect_port = free_ports(2)
    admin = operator(booted, orthanc, http_port)
    admin.replace.update({
        "dicomcache_0.1.0_amd64.deb": deb.name,
        "orthanc.hospital.example:8042": f"orthanc.hospital.example:{orthanc.http_port}",
        "dicomcache.clinic.example:8443": f"dicomcache.clinic.example:{http_port}",
        "dicomcache.clinic.example:8080": f"dicomcache.clinic.example:{redirect_port}",
        "/instances/ID/": f"/instances/{instance}/"})
    # The UIDs dicomweb.md's frame check asks the administrator to set.
    admin.env.update({"SYSTEMD_EDITOR": "/usr/local/bin/doc-edit", "PW": WARD3_PASSWORD,
                      "STUDY": str(cold.StudyInstanceUID), "SERIES": str(cold.SeriesInstanceUID),
                      "SOP": str(cold.SOPInstanceUID)})
    map_doc_hosts(booted)
    (readme,) = claimed(README_PLAN, "README.md")
    service, online, alerts, edit, hit = claimed(OPERATIONS_PLAN, "docs/operations.md")
    orthanc_down, not_starting = claimed(TROUBLESHOOTING_PLAN, "docs/troubleshooting.md")
    orthanc_answers, md5 = claimed(ORTHANC_PLAN, "docs/orthanc.md")
    users, https, auth = claimed(SECURITY_PLAN, "docs/security.md")
    (cold_frame,) = claimed(DICOMWEB_PLAN, "docs/dicomweb.md")
    typed_orthanc = orthanc.password + "\n"

    # Installed, configured, checked, started: README.md's lines.
    installed = admin.run_block(readme)
    assert "not started until it is configured" in installed[0]
    # Checked against the real Orthanc with the service stopped, as operations.md says
    # (a running dicomcache holds the port the check tries): every line ok.
    assert booted.run("sudo systemctl stop dicomcache").returncode == 0
    (checked,) = admin.run_block(online)
    assert "upstream.url" in checked and "PROBLEM" not in checked, checked
    _, status, log = admin.run_block(service)
    assert "Active: active (running)" in status, status
    assert "listening on" in log, log
    (answers, same_log) = admin.run_block(not_starting)
    assert "listening on" in answers and f"{CONF}: OK" in same_log, same_log
    # Orthanc as dicomcache's user sees it (the password typed when curl asks).
    (code,) = admin.run_block(orthanc_down, typed=typed_orthanc)
    assert re.search(r"^200$", code, re.M), code  # (curl's prompt is on stderr)
    system, plugins, changes = admin.run_block(orthanc_answers, typed=typed_orthanc)
    assert '"ApiVersion"' in system and '"dicom-web"' in plugins and '"Changes"' in changes
    (kept,) = admin.run_block(md5, typed=typed_orthanc)
    assert re.match(r"[0-9a-f]{32}", kept), kept
    # The alert rules, installed and found valid by Prometheus's own checker.
    _, valid = admin.run_block(alerts)
    assert "SUCCESS" in valid, valid

    # The cache moved to /srv: the drop-in operations.md shows lets the hardened unit
    # write there (ProtectSystem=strict refuses it otherwise).
    assert booted.run("sudo install -d -o dicomcache -g dicomcache -m 700 /srv/dicomcache-cache"
                      ).returncode == 0
    conf = booted.root / CONF.lstrip("/")
    conf.write_text(replace_once(conf.read_text(), r'^directory = "/var/cache/dicomcache"',
                                 'directory = "/srv/dicomcache-cache"'))
    admin.env["DOC_DROPIN"] = dropin(edit)
    admin.run_block(edit)
    assert "ReadWritePaths=/srv/dicomcache-cache" in booted.run(
        "systemctl cat dicomcache").stdout
    restarted = booted.run("sudo systemctl restart dicomcache && curl -fsS -o /dev/null "
                           f"--retry 30 --retry-connrefused --retry-delay 1 "
                           f"http://127.0.0.1:{http_port}/instances/{instance}/file")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert [p for p in (booted.root / "srv/dicomcache-cache").rglob("*") if p.is_file()]

    # HTTPS with the hospital's CA (trusted by this root, as by the clinic's machines),
    # a plain-HTTP port that redirects, Basic authentication with a users file.
    ca = trustme.CA()
    tls = booted.root / "etc/dicomcache/tls"
    pair = write_pair(ca, tls, "dicomcache", DOC_HOSTS[0])
    gid = {v: k for k, v in names(booted.root, "group").items()}["dicomcache"]
    for path, mode in ((tls, 0o750), (pair.cert, 0o640), (pair.key, 0o640)):
        os.chown(path, 0, gid)
        path.chmod(mode)
    write_ca(ca, booted.root / "usr/local/share/ca-certificates/hospital-ca.crt")
    trusted = booted.run("update-ca-certificates", user=None)
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert (booted.root / "etc/ssl/certs/hospital-ca.pem").is_symlink()
    text = conf.read_text()
    for pattern, new in ((r'^# (tls_certificate = "tls/dicomcache\.crt")', r"\1"),
                         (r'^# (tls_key = "tls/dicomcache\.key")', r"\1"),
                         (r"^# http_redirect_port = 80\b", f"http_redirect_port = {redirect_port}"),
                         (r"^# allowed_hosts = \[.*?\]", f'allowed_hosts = ["{DOC_HOSTS[0]}"]'),
                         (r'^mode = "none"', 'mode = "basic"'),
                         (r'^# (users_file = "users")', r"\1"),
                         # dicomweb.md's option, whose effect its frame check shows.
                         (r"^\[upstream\]\n", '[upstream]\nframes_transfer_syntax = '
                                               f'"{JPEG_LS_LOSSLESS}"\n')):
        text = replace_once(text, pattern, new)
    conf.write_text(text)
    out = admin.run_block(users, typed=ALICE_PASSWORD + "\n")
    assert "added alice (viewer)" in out[0] and "chown dicomcache:" in out[0]
    assert "updated alice" in out[4] and "removed alice" in out[5]
    listed = out[6]
    assert "it-ops" in listed and "ward3" in listed and "alice" not in listed, listed
    assert "$argon2" not in listed
    assert owner_mode(booted.root, "/etc/dicomcache/users") == ("dicomcache", "dicomcache", 0o600)
    # alice again, for what follows (the block above ends by removing her).
    again = booted.run("sudo dicomcache users add alice --config /etc/dicomcache/config.toml",
                       typed=ALICE_PASSWORD + "\n")
    assert again.returncode == 0, again.stdout + again.stderr
    restarted = booted.run("sudo systemctl restart dicomcache")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr + booted.run(
        "journalctl -u dicomcache -n 30 --no-pager").stdout

    healthz, refused, redirect = admin.run_block(https)
    assert '{"status": "ok"}' in healthz, healthz
    # Refused by the server (no TLS 1.1 handshake), not by this openssl.
    assert "no protocols available" not in refused and "Cipher is (NONE)" in refused, refused
    assert " 308" in redirect, redirect

    checked, anonymous, viewer, not_admin = admin.run_block(auth, typed=ALICE_PASSWORD + "\n")
    assert "basic:" in checked, checked
    assert " 401" in anonymous and "www-authenticate" in anonymous.lower(), anonymous
    assert " 200" in viewer.split("\n", 1)[0] or "HTTP/1.1 200" in viewer, viewer
    assert " 403" in not_admin, not_admin

    # A cold frame as OHIF asks for it, as alice: transcoded by Orthanc (image/jls), or
    # cut from the original if that failed (a timeout on a loaded machine): the answer's
    # part type says which, and a refusal (401, 403) has no such line.
    (frame,) = admin.run_block(cold_frame, typed=ALICE_PASSWORD + "\n")
    assert re.search(r'(?im)^content-type: multipart/related;.*\btype="?'
                     r"(image/jls|application/octet-stream)\b", frame), frame

    (cached,) = admin.run_block(hit, typed=ALICE_PASSWORD + "\n")
    assert re.search(r"(?im)^x-cache: (HIT|MISS)", cached), cached



#: docs/dicomweb.md: a frame of an instance not cached yet, asked as OHIF asks.
DICOMWEB_PLAN = ["curl -sf -D - -o /dev/null -u alice"]
#: docs/security.md: a modality sending over DICOM TLS (DCMTK's storescu, in this root).
MODALITY_PLAN = ["storescu +tls"]
#: docs/relay.md: a quarantined file released; drain, stop, back up before an upgrade.
RELAY_PLAN = ["sudo -u dicomcache dicomcache relay send",
              "sudo -u dicomcache dicomcache relay drain --config /etc/dicomcache/config.toml\n"
              "sudo systemctl stop"]


def send_study_tls(booted: Booted, relay_port: int) -> Dataset:
    """The modality in the root sends one more study over DICOM TLS."""
    (ds,) = make_ct_series(1, rows=32, columns=32, seed=43, patient_id="PWAITING")
    home = booted.root / "home" / ADMIN
    (home / "waiting.dcm").write_bytes(encode(ds, ds.file_meta.TransferSyntaxUID))
    sent = booted.run("storescu +tls modality.key modality.crt +cf clinic-ca.pem "
                      f"-aec DICOMCACHE {DOC_HOSTS[0]} {relay_port} /home/{ADMIN}/waiting.dcm")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return ds


def test_relay_md_as_written_on_a_booted_root(
        booted: Booted, packages: tuple[Path, Path], pacs: OrthancProcess,
        tmp_path: Path) -> None:
    """The relay with DICOM TLS towards the modalities (a clinic CA of the test's own):
    a modality's storescu as security.md shows it; a file quarantined by the relay
    released as relay.md says; the spool drained, the service stopped and the spool
    backed up as before an upgrade."""
    deb = packages[1]
    http_port, relay_port = free_ports(2)
    admin = operator(booted, pacs, http_port, extra_edits=[
        *relay_edits(relay_port, pacs),
        (r'^# (tls_certificate = "tls/relay\.crt")(?=\s+# PEM chain)', r"\1"),
        (r'^# (tls_key = "tls/relay\.key")(?=\s+# PEM, unencrypted)', r"\1"),
        (r'^# (tls_ca_file = "tls/modalities-ca\.pem")', r"\1")])
    admin.replace.update({"dicomcache_0.1.0_amd64.deb": deb.name,
                          f"{DOC_HOSTS[0]} 11112 ": f"{DOC_HOSTS[0]} {relay_port} "})
    map_doc_hosts(booted)
    install = claimed(INSTALL_PLAN, "docs/install.md")
    admin.run_block(install[1])  # installed: its user and /etc/dicomcache exist
    # The clinic's CA: the relay's certificate, the modalities' CA; a modality's own
    # certificate and a study in the administrator's home (the modality, here).
    ca = trustme.CA()
    tls = booted.root / "etc/dicomcache/tls"
    relay_pair = write_pair(ca, tls, "relay", DOC_HOSTS[0])
    write_ca(ca, tls / "modalities-ca.pem")
    gid = {v: k for k, v in names(booted.root, "group").items()}["dicomcache"]
    for path, mode in ((tls, 0o750), (relay_pair.cert, 0o640), (relay_pair.key, 0o640),
                       (tls / "modalities-ca.pem", 0o644)):
        os.chown(path, 0, gid)
        path.chmod(mode)
    home = booted.root / "home" / ADMIN
    write_pair(ca, home, "modality", "modality.clinic.example")
    write_ca(ca, home / "clinic-ca.pem")
    study = make_ct_series(2, rows=32, columns=32, seed=41, patient_id="PMODALITY")
    for i, ds in enumerate(study):
        (home / f"ct{i}.dcm").write_bytes(encode(ds, ds.file_meta.TransferSyntaxUID))
    uid = {v: k for k, v in names(booted.root, "passwd").items()}[ADMIN]
    for path in home.iterdir():
        os.chown(path, uid, uid)
    for block in install[2:6]:  # configured (the relay on, with TLS), checked, started
        admin.run_block(block)
    (modality_sends,) = claimed(MODALITY_PLAN, "docs/security.md")
    release, drain = claimed(RELAY_PLAN, "docs/relay.md")

    # The modality sends over DICOM TLS; the relay forwards to the PACS.
    admin.run_block(modality_sends)
    eventually_sync(lambda: all(stored(pacs, ds) for ds in study), timeout=120, interval=1,
                    what="the study sent over DICOM TLS, at the PACS")

    # A file in the spool that the relay did not write (found at its start): quarantined.
    assert booted.run("sudo systemctl stop dicomcache").returncode == 0
    (liar,) = make_ct_series(1, rows=32, columns=32, seed=42, patient_id="PQUARANTINE")
    stray = booted.root / "var/lib/dicomcache/spool/objects/stray.dcm"
    stray.write_bytes(encode(liar, liar.file_meta.TransferSyntaxUID))
    service_uid = {v: k for k, v in names(booted.root, "passwd").items()}["dicomcache"]
    os.chown(stray, service_uid, gid)
    assert booted.run("sudo systemctl start dicomcache").returncode == 0
    quarantine = booted.root / "var/lib/dicomcache/spool/quarantine"
    (reason,) = eventually_sync(lambda: list(quarantine.glob("*.reason.json")), timeout=120,
                                interval=1, what="the stray file quarantined")
    assert "not written by the relay" in reason.read_text()
    name = reason.name.removesuffix(".reason.json")
    assert not stored(pacs, liar)
    admin.replace["/quarantine/NAME.dcm"] = f"/quarantine/{name}.dcm"
    (released,) = admin.run_block(release)
    assert "sent 1/1" in released, released
    assert stored(pacs, liar)
    # Step 3: the released file and its reason deleted, as relay.md says.
    removed = booted.run(f"sudo rm /var/lib/dicomcache/spool/quarantine/{name}.dcm "
                         f"/var/lib/dicomcache/spool/quarantine/{name}.reason.json")
    assert removed.returncode == 0, removed.stderr

    # Before an upgrade: a study waiting, drained to the PACS, the service stopped, the
    # spool backed up.
    waiting = send_study_tls(booted, relay_port)
    drained, _, _ = admin.run_block(drain)
    assert stored(pacs, waiting), drained
    assert booted.run("systemctl is-active dicomcache").stdout.strip() == "inactive"
    backup = booted.root / "root/spool-before-upgrade"
    assert (backup / "state.sqlite").is_file() and (backup / "quarantine").is_dir()
    assert owner_mode(booted.root, "/root/spool-before-upgrade/state.sqlite")[0] == "dicomcache"


#: Every ```sh package block of the documents is run by one of these
#: (tests/test_doc_commands.py checks it).
PLANS = [("docs/install.md", INSTALL_PLAN), ("docs/upgrade.md", UPGRADE_PLAN),
         ("docs/upgrade.md", UPGRADE_FROM_0_1_0_PLAN), ("README.md", README_PLAN),
         ("docs/operations.md", OPERATIONS_PLAN),
         ("docs/troubleshooting.md", TROUBLESHOOTING_PLAN), ("docs/orthanc.md", ORTHANC_PLAN),
         ("docs/security.md", SECURITY_PLAN), ("docs/security.md", MODALITY_PLAN),
         ("docs/relay.md", RELAY_PLAN), ("docs/dicomweb.md", DICOMWEB_PLAN)]
