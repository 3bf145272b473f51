"""packaging/build.py's decisions, and the release metadata in pyproject.toml and
CHANGELOG.md (tests/test_package.py builds and installs the real thing)."""

from __future__ import annotations

import importlib.util
import itertools
import re
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from dicomcache import __version__

REPO = Path(__file__).resolve().parents[1]


def load_build() -> ModuleType:
    # A script, not a module of the product: loaded from its path (a package named
    # "packaging" would shadow the library of that name).
    spec = importlib.util.spec_from_file_location("dicomcache_build", REPO / "packaging/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build()


@pytest.mark.parametrize("pep440, debian", [
    ("0.1.0", "0.1.0"),
    ("1.2", "1.2"),
    ("1.2.0rc1", "1.2.0~rc1"),
    ("1.2.0a3", "1.2.0~a3"),
    ("1.2.0.b2", "1.2.0~b2"),
    ("1.2.0.post1", "1.2.0+post1"),
    ("1.2.0.dev4", "1.2.0~~dev4"),
    ("1.2.0.post1.dev2", "1.2.0+post1~dev2"),
    ("1.2.0rc1.dev2", "1.2.0~rc1~dev2"),
])
def test_debian_version(pep440: str, debian: str) -> None:
    assert build.debian_version(pep440) == debian


@pytest.mark.parametrize("bad", ["1!2.0", "1.0+local", "v1.0", "1.0-1", ""])
def test_debian_version_refuses_what_has_no_clear_spelling(bad: str) -> None:
    with pytest.raises(build.BuildError, match="is not a plain"):
        build.debian_version(bad)


def test_debian_versions_sort_as_python_versions_do() -> None:
    """dpkg must see an upgrade where pip does: rc before release before post."""
    ordered = ["1.0.dev1", "1.0a1", "1.0rc1.dev2", "1.0rc1", "1.0", "1.0.post1", "1.1"]
    spelled = [build.debian_version(v) for v in ordered]
    for lower, higher in itertools.pairwise(spelled):
        done = subprocess.run(["dpkg", "--compare-versions", lower, "lt", higher], check=False)
        assert done.returncode == 0, f"dpkg does not sort {lower} before {higher}"


@pytest.mark.parametrize("tags, floor", [
    ([], None),
    ([["py3-none-any"]], None),
    # A wheel needs the oldest glibc among its tags (aliases of one another)...
    ([["cp311-cp311-manylinux_2_17_x86_64", "cp311-cp311-manylinux2014_x86_64"]], (2, 17)),
    ([["cp311-cp311-manylinux_2_5_x86_64", "cp311-cp311-manylinux1_x86_64"]], (2, 5)),
    # ...the environment the newest of what its wheels need.
    ([["cp311-cp311-manylinux_2_17_x86_64"], ["cp311-abi3-manylinux_2_34_x86_64"],
      ["py3-none-any"]], (2, 34)),
    ([["cp310-abi3-manylinux2010_x86_64"], ["cp311-cp311-manylinux_2_12_x86_64"]], (2, 12)),
])
def test_glibc_floor(tags: list[list[str]], floor: tuple[int, int] | None) -> None:
    assert build.glibc_floor(tags) == floor


def test_the_version_has_one_home() -> None:
    """pyproject.toml reads the version from dicomcache/__init__.py; nothing else has one."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "dicomcache.__version__"}


def test_license_metadata_and_a_pinned_build_backend() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # an SPDX expression, not a table
    assert project["project"]["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    # Exact versions: a backend release cannot change or break a build of this commit.
    requires = project["build-system"]["requires"]
    assert requires and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", r)
                            for r in requires), requires


def test_the_changelog_has_an_entry_for_this_version() -> None:
    text = (REPO / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M)


def test_the_environment_pins_its_transitive_dependencies() -> None:
    """packaging/constraints.txt pins exactly, and never a direct dependency (those are
    pyproject.toml's: two pins of one package would drift apart)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())

    def name(requirement: str) -> str:
        return re.split(r"[=<>!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    direct = {name(r) for r in project["project"]["dependencies"]}
    lines = [line for line in (REPO / "packaging/constraints.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", x) for x in lines)
    assert not direct & {name(x) for x in lines}
