"""The Debian package, installed where a hospital would install it: a clean Debian root.

``./run package`` builds the wheel and the .deb; each test here unpacks a throwaway root
made by ``debootstrap --variant=minbase`` from Debian's packages (this machine's
release and architecture, plus the package's dependencies), enters it with
``unshare --mount`` + ``chroot`` (with /proc, /dev/pts and /dev/shm mounted in that
private mount namespace only, so nothing is left mounted), and installs the package
there with apt, as docs/install.md says, in a network namespace of its own (the
install needs no network).  This machine's / is never touched.  The bootstrapped root
is kept as a tarball in ~/.cache/dicomcache-tests (made once, about a minute).

Needs root (chroot, mount), as ``./run test`` and CI run.
"""

from __future__ import annotations

import fcntl
import http.client
import os
import re
import shutil
import signal
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomcache import __version__
from dicomcache.devtools.orthanc import OrthancProcess, free_ports
from tests.conftest import Sample, eventually_sync
from tests.test_systemd import directives

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
    host_run(REPO / "run", "package", "--out", out, timeout=1800)
    (wheel,) = out.glob("dicomcache-*.whl")
    (deb,) = out.glob("dicomcache_*.deb")
    yield wheel, deb
    shutil.rmtree(out, ignore_errors=True)


def debian_mirror(release: str) -> str:
    """Where this machine's apt gets ``release`` from (its sources, not a name we pick)."""
    listed = host_run("apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE)",
                      "Identifier: Packages")
    for line in listed.splitlines():
        uri, _, rel = line.partition(" ")
        if rel.strip() == release:
            return uri
    pytest.fail(f"apt on this machine has no source for {release}:\n{listed}")


@pytest.fixture(scope="module")
def clean_root_tarball(packages: tuple[Path, Path]) -> Path:
    """A minimal Debian root of this machine's release with the package's dependencies,
    as a tarball, made once per machine (other suites on this machine may be making it
    at the same moment: a lock)."""
    _, deb = packages
    release = re.search(r"^VERSION_CODENAME=(\S+)$", Path("/etc/os-release").read_text(),
                        re.M)
    assert release, "no VERSION_CODENAME in /etc/os-release"
    arch = host_run("dpkg", "--print-architecture").strip()
    depends = host_run("dpkg-deb", "--field", deb, "Depends")
    include = sorted(re.sub(r"\s*\(.*\)", "", d).strip() for d in depends.split(","))
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
