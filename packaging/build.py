#!/usr/bin/env python3
"""Build dicomcache's release artifacts: the wheel and the Debian package.

    ./run package [--out DIR] [--compression xz|zstd|gzip] [--python /usr/bin/python3]

Writes ``DIR/dicomcache-<version>-py3-none-any.whl`` and
``DIR/dicomcache_<version>_<arch>.deb`` (``DIR`` defaults to ``dist/``).

The Debian package carries the program in its own virtual environment, built here
(the way dh-virtualenv does it) and unpacked by dpkg like any other file: installing it
needs no network and no pip at the hospital, ``dpkg -L``/``debsums`` account for every
file, and what runs is exactly what was built and tested.  The environment holds
compiled extension modules (numpy, the image codecs, cryptography), so the package is
for one architecture and one Python: this machine's ``dpkg --print-architecture`` and
the Debian interpreter given by ``--python`` (its package is a dependency).

Layout (docs/install.md has the operator's view):

    /opt/dicomcache/.venv/                 the program (root-owned, read-only to the service)
    /opt/dicomcache/{docs,dashboards,...}  documentation, dashboards, the example configuration
    /usr/bin/dicomcache                    -> /opt/dicomcache/.venv/bin/dicomcache
    /lib/systemd/system/dicomcache.service the hardened unit from systemd/
    /etc/dicomcache/config.toml            a conffile (dpkg keeps the operator's edits)
    /var/cache/dicomcache, /var/lib/dicomcache, /var/log/dicomcache   owned by dicomcache
                                           (postinst, through dpkg-statoverride)

The sources are the files git knows in this checkout (committed or not, untracked ones
not ignored), never build leftovers.  Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "dicomcache"
PREFIX = Path("/opt/dicomcache")
VENV = PREFIX / ".venv"
UNIT = "/lib/systemd/system/dicomcache.service"
CONFFILE = "/etc/dicomcache/config.toml"
#: Directories shipped empty, with the mode they have in the package.  Their owners
#: (and these modes, again) are set by postinst through dpkg-statoverride, which keeps
#: them across upgrades: packaging/deb/postinst has the same table.
PRIVATE_DIRS = {
    "/etc/dicomcache": 0o750,
    "/var/cache/dicomcache": 0o700,
    "/var/lib/dicomcache": 0o700,
    "/var/log/dicomcache": 0o700,
}
#: What /opt/dicomcache holds besides the program: for the operator on that machine.
#: (The unit is not among them: one copy, the one systemd reads, in /lib/systemd/system.)
SHIPPED = ["README.md", "CHANGELOG.md", "LICENSE", "config.example.toml", "docs", "dashboards"]
DEFAULT_MAINTAINER = "dicomcache maintainers <root@localhost>"
DESCRIPTION = """\
verified edge cache and DICOM relay in front of a remote Orthanc PACS
 dicomcache sits at a clinic between DICOM viewers (OHIF, Cornerstone, WADO-URI)
 and modalities on one side and a distant Orthanc PACS on the other. It verifies
 every instance before a viewer sees it (length, MD5, DICOM parse, identity),
 keeps verified instances on local disk, serves them when the WAN is down, and
 relays C-STOREs from modalities through a durable spool.
 .
 This package carries the program in its own Python virtual environment under
 /opt/dicomcache; nothing is downloaded at install time."""


class BuildError(Exception):
    """Something the person building must fix; printed as one line, exit 1."""


def run(argv: Sequence[str | Path], *, capture: bool = False,
        log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (its output captured, or written to ``log``, or passed through);
    a failure names the command and ends with what it printed."""
    cmd = [str(a) for a in argv]
    if log is not None:
        with log.open("w") as fh:
            done = subprocess.run(cmd, text=True, check=False, stdout=fh,
                                  stderr=subprocess.STDOUT)
        printed = log.read_text()
    else:
        done = subprocess.run(cmd, text=True, check=False, capture_output=capture)
        printed = (done.stdout or "") + (done.stderr or "")
    if done.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} exited {done.returncode}\n{printed[-4000:]}".rstrip())
    return done


def debian_version(version: str) -> str:
    """The Debian spelling of a PEP 440 version: pre-releases sort before the release.

    ``1.2.0`` → ``1.2.0``, ``1.2.0rc1`` → ``1.2.0~rc1``, ``1.2.0.post1`` → ``1.2.0+post1``,
    ``1.2.0.dev3`` → ``1.2.0~~dev3`` (before ``1.2.0~a1``, as pip sorts it),
    ``1.2.0rc1.dev2`` → ``1.2.0~rc1~dev2``.  Local versions and epochs are refused.
    """
    m = re.fullmatch(r"(\d+(?:\.\d+)*)(?:\.?(a|b|rc)(\d+))?(?:\.post(\d+))?(?:\.dev(\d+))?",
                     version)
    if m is None:
        raise BuildError(f"version {version!r} (dicomcache/__init__.py) is not a plain "
                         "PEP 440 release, pre-, post- or dev-release")
    release, pre, pre_n, post, dev = m.groups()
    out = release
    if pre:
        out += f"~{pre}{pre_n}"
    if post:
        out += f"+post{post}"
    if dev:
        # "~~" sorts before any pre-release's "~" of the same release.
        out += f"~dev{dev}" if pre or post else f"~~dev{dev}"
    return out


def glibc_floor(wheel_tags: Sequence[Sequence[str]]) -> tuple[int, int] | None:
    """The newest glibc the installed wheels need, from their platform tags.

    Each wheel lists its tags (``cp311-cp311-manylinux_2_17_x86_64``, often with the
    legacy alias ``manylinux2014``); a wheel needs the oldest glibc any of its tags
    names, the environment needs the newest of those.  None: no compiled wheel.
    """
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    floor: tuple[int, int] | None = None
    for tags in wheel_tags:
        needs: list[tuple[int, int]] = []
        for tag in tags:
            platform = tag.rsplit("-", 1)[-1]
            m = re.match(r"manylinux_(\d+)_(\d+)_", platform)
            if m:
                needs.append((int(m.group(1)), int(m.group(2))))
            elif platform.split("_")[0] in legacy:
                needs.append(legacy[platform.split("_")[0]])
        if needs and (floor is None or min(needs) > floor):
            floor = min(needs)
    return floor


def export_sources(dest: Path) -> None:
    """Copy the files git knows (tracked, or untracked and not ignored) to ``dest``."""
    if not (REPO / ".git").exists():
        raise BuildError(f"{REPO} is not a git checkout: build from one "
                         "(the file list comes from git)")
    listed = run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
                  "--exclude-standard"], capture=True).stdout
    for rel in sorted(set(filter(None, listed.split("\0")))):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the work tree is left out
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if run(["git", "-C", REPO, "status", "--porcelain"], capture=True).stdout.strip():
        print("package: the work tree has uncommitted changes; they are in this build",
              file=sys.stderr)


def debian_interpreter(python: Path) -> tuple[Path, str]:
    """The real interpreter behind ``python`` and the Debian package to depend on."""
    real = python.resolve()
    ver = run([real, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
              capture=True).stdout.strip()
    if tuple(int(x) for x in ver.split(".")) < (3, 11):
        raise BuildError(f"{real} is Python {ver}; dicomcache needs 3.11 or later")
    owner = subprocess.run(["dpkg", "-S", str(real)], capture_output=True, text=True,
                           check=False)
    if owner.returncode != 0:
        raise BuildError(f"{real} belongs to no Debian package: the virtual environment "
                         "must use the distribution's Python (--python /usr/bin/python3)")
    return real, f"python{ver}"


def build_wheel(python: Path, src: Path, out: Path, log: Path) -> Path:
    """The wheel, built by the pinned backend; any deprecation it prints fails the build
    (it names a date after which builds stop working)."""
    for old in out.glob(f"{NAME}-*.whl"):
        old.unlink()
    run([python, "-m", "pip", "wheel", "--verbose", "--no-deps", "--wheel-dir", out, src],
        log=log)
    warned = [line.strip() for line in log.read_text().splitlines()
              if "DeprecationWarning" in line]
    if warned:
        raise BuildError("the build backend warns of a deprecation (fix pyproject.toml):\n  "
                         + "\n  ".join(warned))
    wheels = list(out.glob(f"{NAME}-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel in {out}, found {wheels}")
    return wheels[0]


def install_environment(python: Path, venv: Path, wheel: Path, constraints: Path,
                        log: Path) -> list[str]:
    """Install the wheel and its dependencies (binary wheels only, transitive ones
    pinned by packaging/constraints.txt) into ``venv``; pip and setuptools are removed
    afterwards: the service needs neither.  Returns the installed ``name==version``s."""
    run([python, "-m", "venv", venv])
    py = venv / "bin" / "python"
    run([py, "-m", "pip", "install", "--no-compile", "--only-binary", ":all:",
         "--constraint", constraints, wheel], log=log)
    # A file:// URL of this build machine, meaningless where the package is installed.
    for url in venv.glob(f"lib/python*/site-packages/{NAME}-*.dist-info/direct_url.json"):
        url.unlink()
    frozen = run([py, "-m", "pip", "list", "--format=freeze", "--exclude", "pip",
                  "--exclude", "setuptools"], capture=True).stdout.split()
    run([py, "-m", "pip", "uninstall", "--quiet", "--yes", "pip", "setuptools"])
    return sorted(frozen, key=str.lower)


def wheel_tags(venv: Path) -> list[list[str]]:
    return [[line.split(":", 1)[1].strip() for line in wheel.read_text().splitlines()
             if line.startswith("Tag:")]
            for wheel in venv.glob("lib/python*/site-packages/*.dist-info/WHEEL")]


def relocate(root: Path, venv: Path) -> None:
    """Make the environment built at ``root/opt/...`` work at ``/opt/...``.

    Scripts' ``#!`` lines and ``pyvenv.cfg`` name the build path: rewritten.  Bytecode
    is compiled here with the installed path as its file name (tracebacks name real
    files) and hash-checked, so it stays valid whatever modification times dpkg gives
    the sources, and the service (PYTHONDONTWRITEBYTECODE) never recompiles at start.
    """
    built, final = str(root).encode(), b""
    for path in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if built in data:
                path.write_bytes(data.replace(built, final))
    for lib in venv.glob("lib/python*"):
        run([venv / "bin" / "python", "-m", "compileall", "-q", "-f", "-j", "0",
             "--invalidation-mode", "checked-hash", "-s", root, "-p", "/", lib],
            capture=True)


def leaked_paths(root: Path, *needles: Path) -> list[str]:
    """Files under ``root`` that still name a build-time path (they would not work)."""
    marks = [str(n).encode() for n in needles]
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(mark in data for mark in marks):
                found.append("/" + str(path.relative_to(root)))
    return found


def lay_out(root: Path, src: Path, frozen: list[str]) -> None:
    """Everything but the environment and DEBIAN/."""
    prefix = root / PREFIX.relative_to("/")
    for item in SHIPPED:
        if (src / item).is_dir():
            shutil.copytree(src / item, prefix / item)
        else:
            shutil.copy2(src / item, prefix / item)
    (prefix / "python-packages.txt").write_text(
        "# The Python packages in /opt/dicomcache/.venv, exactly\n" + "\n".join(frozen) + "\n")
    unit = (src / "systemd" / "dicomcache.service").read_text()
    if f"{VENV}/bin/dicomcache serve" not in unit:
        raise BuildError(f"systemd/dicomcache.service does not run {VENV}/bin/dicomcache")
    _write(root, UNIT, unit)
    _write(root, CONFFILE, (src / "config.example.toml").read_text())
    link = root / "usr/bin/dicomcache"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(VENV / "bin" / "dicomcache")
    for d in PRIVATE_DIRS:
        (root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    doc = root / "usr/share/doc" / NAME
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        f"Upstream-Name: {NAME}\n\nFiles: *\nCopyright: the dicomcache authors\n"
        "License: MIT\n " + "\n ".join(line or "." for line in
                                       (src / "LICENSE").read_text().splitlines()) + "\n")
    with gzip.GzipFile(doc / "changelog.gz", "wb", compresslevel=9, mtime=0) as fh:
        fh.write((src / "CHANGELOG.md").read_bytes())


def _write(root: Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def normalise_modes(root: Path) -> None:
    """Files 0644 (0755 if executable), directories 0755, whatever this build's umask;
    then the private directories and the conffile (0640: it may hold a password)."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)
    for d, mode in PRIVATE_DIRS.items():
        (root / d.lstrip("/")).chmod(mode)
    (root / CONFFILE.lstrip("/")).chmod(0o640)


def control_files(root: Path, src: Path, version: str, arch: str, depends: list[str]) -> None:
    debian = root / "DEBIAN"
    debian.mkdir()
    size_kib = sum((p.lstat().st_size + 1023) // 1024 if p.is_file() else 1
                   for p in root.rglob("*") if debian not in p.parents and p != debian)
    # Debian's own variables name whoever builds a release; a default otherwise.
    who, email = os.environ.get("DEBFULLNAME"), os.environ.get("DEBEMAIL")
    maintainer = f"{who} <{email}>" if who and email else DEFAULT_MAINTAINER
    (debian / "control").write_text(
        f"Package: {NAME}\nVersion: {version}\nArchitecture: {arch}\n"
        f"Maintainer: {maintainer}\nInstalled-Size: {size_kib}\n"
        f"Depends: {', '.join(depends)}\nSection: net\nPriority: optional\n"
        f"Description: {DESCRIPTION}\n")
    (debian / "conffiles").write_text(CONFFILE + "\n")
    sums = []
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if (path.is_file() and not path.is_symlink() and not rel.startswith("DEBIAN/")
                and "/" + rel != CONFFILE):
            sums.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {rel}\n")
    (debian / "md5sums").write_text("".join(sums))
    for script in ("postinst", "prerm", "postrm"):
        shutil.copy(src / "packaging" / "deb" / script, debian / script)
        (debian / script).chmod(0o755)
    for name in ("control", "conffiles", "md5sums"):
        (debian / name).chmod(0o644)


def build(out: Path, python: Path, compression: str) -> tuple[Path, Path]:
    interpreter, python_package = debian_interpreter(python)
    arch = run(["dpkg", "--print-architecture"], capture=True).stdout.strip()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dicomcache-package-") as tmp:
        work = Path(tmp)
        src, root = work / "src", work / "root"
        export_sources(src)
        venv = root / VENV.relative_to("/")
        print(f"package: building the wheel and the environment ({interpreter})",
              file=sys.stderr)
        wheel = build_wheel(interpreter, src, out, work / "wheel.log")
        frozen = install_environment(interpreter, venv, wheel,
                                     src / "packaging" / "constraints.txt", work / "pip.log")
        version = wheel.name.split("-")[1]
        depends = [python_package, "passwd"]
        floor = glibc_floor(wheel_tags(venv))
        if floor:
            depends.insert(1, f"libc6 (>= {floor[0]}.{floor[1]})")
        relocate(root, venv)
        lay_out(root, src, frozen)
        leaked = leaked_paths(root, work)
        if leaked:
            raise BuildError("files still name the build directory: " + ", ".join(leaked[:10]))
        normalise_modes(root)
        deb_version = debian_version(version)
        control_files(root, src, deb_version, arch, depends)
        deb = out / f"{NAME}_{deb_version}_{arch}.deb"
        print(f"package: writing {deb.name} ({compression})", file=sys.stderr)
        run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", root, deb],
            capture=True)
    return wheel, deb


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run package", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist",
                        help="where the wheel and the .deb go (default: dist/)")
    parser.add_argument("--python", type=Path, default=Path("/usr/bin/python3"),
                        help="the Debian interpreter of the package's environment "
                             "(default: /usr/bin/python3)")
    parser.add_argument("--compression", choices=["xz", "zstd", "gzip"], default="xz",
                        help="of the .deb (default xz: the smallest download for a clinic)")
    args = parser.parse_args(argv)
    try:
        wheel, deb = build(args.out.resolve(), args.python, args.compression)
    except BuildError as exc:
        print(f"package: {exc}", file=sys.stderr)
        return 1
    print(wheel)
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
