"""Every command in the docs either runs here, or says why it cannot.

Each fenced ``sh`` or ``console`` block of README.md and docs/*.md (indented ones in
lists too) carries tags in its info string:

* ```` ```sh test ````: run here, command by command, against a real Orthanc (the
  session fixture, given a small study of its own) and a real ``dicomcache serve``
  started on a free loopback port; each command must exit 0 and print something
  (never a traceback).
* ```` ```sh package ````: run by tests/test_package.py as written (sudo, apt, systemctl,
  journalctl, sudoedit), by an administrator in a clean Debian root booted with systemd,
  with the .deb just built; each block is named in one of that module's plans.
* ```` ```sh build ````: the build of a release, ``./run package``: run by
  tests/test_package.py to build what it installs (with ``--out`` into its own
  temporary directory, so a checkout's ``dist/`` is left alone).
* ```` ```sh no-test ````: needs what no test here has (another machine, a server that
  runs until stopped, the test suite itself, a benchmark), alone.

A block that is neither run nor marked fails :func:`test_every_command_block_is_tested_or_marked`;
a ``package`` block no plan names fails :func:`test_every_package_block_is_planned`.

In tested blocks these stand for the test's own things (docs/README.md says the same):

============================================  ===========================================
``/etc/dicomcache/config.toml``               the test's configuration file
``sudo -u dicomcache``                        nothing: the test is the service's user
``/opt/dicomcache/.venv/bin/dicomcache``      ``dicomcache`` of the test's virtualenv
``http://127.0.0.1:8080``                     the running daemon
``STUDY_UID``, ``PATIENT_ID``,                a study in Orthanc, its patient, its
``ACCESSION_NUMBER``, ``INSTANCE_ID``         accession number, one instance's Orthanc ID
============================================  ===========================================

An ``alias`` or a variable assignment is set up for the later commands of its block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import Dataset

from dicomcache.devtools.orthanc import OrthancProcess, free_port, loopback_env
from dicomcache.devtools.samples import encode, make_ct_series
from tests.conftest import serve_config, start_dicomcache, stop_process

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("sh", "console", "bash", "shell")
# Indented fences too (a block inside a numbered step): the closing fence at the same indent.
_BLOCK = re.compile(r"^([ \t]*)```([^\n]*)\n(.*?)^\1```[ \t]*$", re.S | re.M)
RUN = {"test", "package", "build"}
_SETUP = re.compile(r"^(alias \w+=|[A-Za-z_]\w*=)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    tags: tuple[str, ...]
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    """The shell blocks of the documents."""
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for m in _BLOCK.finditer(text):
            words = m.group(2).split()
            if words and words[0] in SHELLS:
                found.append(Block(path, text[:m.start()].count("\n") + 1, tuple(words[1:]),
                                   textwrap.dedent(m.group(3))))
    return found


def commands(text: str) -> list[str]:
    """Logical command lines: continuations joined, comments and blank lines left out."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = pending + (raw.lstrip() if pending else raw)
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1].rstrip() + " "
            continue
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def marked(tags: tuple[str, ...]) -> bool:
    """Run by a test (``test``, ``package``, ``build``), or ``no-test`` alone."""
    return set(tags) == {"no-test"} or (bool(set(tags) & RUN) and set(tags) <= RUN)


def test_every_command_block_is_tested_or_marked() -> None:
    unmarked = [b.where for b in blocks() if not marked(b.tags)]
    assert unmarked == [], "tag each block `sh test`, `sh package` or `sh no-test` (this module)"


def test_the_tags_are_read_as_documented() -> None:
    assert marked(("test",)) and marked(("package",)) and marked(("test", "package"))
    assert marked(("no-test",))
    assert not marked(()) and not marked(("no-test", "test")) and not marked(("chroot",))


def test_indented_blocks_are_found() -> None:
    """A block in a numbered step is a block (one escaped untagged that way)."""
    found = [b for b in blocks() if b.path.name == "upgrade.md"
             and commands(b.text)[:1] == ["dicomcache --version"]]
    assert found and all(not b.text.startswith(" ") for b in found)


def test_every_package_block_is_planned() -> None:
    """tests/test_package.py runs every ```sh package block: each document that has one
    has a plan there, and the plan names each of its blocks (checked here without root)."""
    from tests import test_package
    planned = {b.where for document, plan in test_package.PLANS
               for b in test_package.claimed(plan, document)}
    unplanned = [b.where for b in blocks() if "package" in b.tags and b.where not in planned]
    assert unplanned == [], "name them in a plan of tests/test_package.py (PLANS)"


def test_every_build_block_is_the_package_build() -> None:
    """tests/test_package.py builds with the one command ```sh build blocks show."""
    from tests import test_package
    built = [b for b in blocks() if "build" in b.tags]
    assert built and all(test_package.build_command(b) == ["./run", "package"] for b in built)


def test_the_docs_have_tested_commands() -> None:
    """The convention is used: a check that would pass with nothing to check is none."""
    tested = [b for b in blocks() if "test" in b.tags]
    assert len(tested) >= 8
    assert sum(len(commands(b.text)) for b in tested) >= 12


def test_commands_are_split_as_a_shell_reads_them() -> None:
    text = "# a comment\ndicomcache verify \\\n     --config F --no-progress\n\nls  # trailing\n"
    assert commands(text) == ["dicomcache verify --config F --no-progress",
                              "ls  # trailing"]


# --- running them ------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """What the placeholders of tested blocks stand for."""

    config: Path
    base: str
    values: dict[str, str]
    env: dict[str, str]

    def substitute(self, command: str) -> str:
        for old, new in (("sudo -u dicomcache ", ""),
                         ("/opt/dicomcache/.venv/bin/dicomcache", "dicomcache"),
                         ("/etc/dicomcache/config.toml", str(self.config)),
                         ("http://127.0.0.1:8080", self.base), *self.values.items()):
            command = command.replace(old, new)
        return command


PATIENT, ACCESSION = "PDOCS", "DOCS-0001"


def _study(orthanc: OrthancProcess) -> list[tuple[str, Dataset, bytes]]:
    """A small study of the documents' own (a patient and an accession number to find)."""
    datasets = make_ct_series(3, rows=64, columns=64, seed=21, patient_id=PATIENT,
                              accession_number=ACCESSION)
    blobs = [encode(ds, ds.file_meta.TransferSyntaxUID) for ds in datasets]
    return list(zip(orthanc.upload(blobs), datasets, blobs, strict=True))


@pytest.fixture(scope="module")
def site(orthanc: OrthancProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """``dicomcache serve`` with the documents' configuration, on a free port."""
    tmp = tmp_path_factory.mktemp("doc-commands")
    port = free_port()
    (tmp / "orthanc-password").write_text(orthanc.password + "\n")
    # The change feed as the daemon has it; the password from a file, as documented.
    config = serve_config(tmp / "config.toml", port, orthanc.url, orthanc, changes=None,
                          upstream={"password": None, "password_file": "orthanc-password"},
                          cache={"max_size": "1GiB"})
    (oid, ds, blob), *_ = _study(orthanc)
    venv_bin = str(Path(sys.executable).parent)
    env = loopback_env({**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"})
    base = f"http://127.0.0.1:{port}"
    log = tmp / "serve.log"
    proc = start_dicomcache(["serve", "--config", str(config)], log, healthz=port, env=env)
    try:
        # One access, so the audit trail and the hit ratio have something to show.
        with urllib.request.urlopen(f"{base}/instances/{oid}/file", timeout=30) as resp:
            assert resp.read() == blob
        yield Site(config, base, {"STUDY_UID": str(ds.StudyInstanceUID), "INSTANCE_ID": oid,
                                  "PATIENT_ID": PATIENT, "ACCESSION_NUMBER": ACCESSION}, env)
    finally:
        stop_process(proc, timeout=30)
    assert proc.returncode == 0, log.read_text()[-3000:]


TESTED = [b for b in blocks() if "test" in b.tags]


@pytest.mark.parametrize("block", TESTED, ids=[b.where for b in TESTED])
def test_documented_commands_run(site: Site, block: Block) -> None:
    setup: list[str] = []
    for command in commands(block.text):
        line = site.substitute(command)
        if _SETUP.match(line):
            setup.append(line)
            continue
        script = "shopt -s expand_aliases\n" + "".join(f"{s}\n" for s in setup) + line
        done = subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=ROOT,
                              env=site.env, capture_output=True, text=True, timeout=300,
                              check=False)
        said = f"{block.where}: {command}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        assert done.returncode == 0, said
        assert done.stdout.strip(), f"printed nothing: {said}"
        assert "Traceback" not in done.stderr, said
