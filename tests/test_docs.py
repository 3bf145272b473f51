"""docs/ is for operators, and stays whole.

The index lists every page, every link between pages lands (anchors too), every
shipped alert rule has its entry in docs/troubleshooting.md, and no benchmark
diary creeps back into docs/ (figures and their history live in bench/README.md).
"""

from __future__ import annotations

import argparse
import re
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if p.name != "README.md")
#: Markdown files whose links are checked.
LINKED = [ROOT / "README.md", ROOT / "bench" / "README.md", DOCS / "README.md", *PAGES]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (``_`` and ``-``
    kept, as in `min_free`), spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(path: Path) -> list[str]:
    return _LINK.findall(_FENCE.sub("", path.read_text()))


def test_the_index_lists_every_page() -> None:
    listed = {target for target in links(DOCS / "README.md") if "/" not in target}
    assert {p.name for p in PAGES} - listed == set(), "pages missing from docs/README.md"


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_lands(path: Path) -> None:
    broken = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file, _, frag = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target}: no heading #{frag} in {dest.name}")
    assert broken == []


def test_anchor_follows_github() -> None:
    assert anchor("Health, readiness and the status page") == \
        "health-readiness-and-the-status-page"
    assert anchor("What viewers may read through (the allow-list)") == \
        "what-viewers-may-read-through-the-allow-list"
    assert anchor("[[relay.destinations]]") == "relaydestinations"
    assert anchor("The accelerator (`relay.accelerate`)") == "the-accelerator-relayaccelerate"


def alert_names() -> list[str]:
    """The rules of dashboards/alerts.yml (its syntax is checked by test_dashboard.py)."""
    text = (ROOT / "dashboards" / "alerts.yml").read_text()
    return re.findall(r"^\s*- alert: (\w+)\s*$", text, re.M)


def test_every_alert_has_its_entry_in_troubleshooting() -> None:
    """Meaning, what to check, what to do: one section per shipped rule, no other."""
    text = (DOCS / "troubleshooting.md").read_text()
    sections = dict(re.findall(r"^### (Dicomcache\w+)\n(.*?)(?=^##)", text + "\n##",
                               re.S | re.M))
    names = alert_names()
    assert len(names) >= 10
    assert set(sections) == set(names)
    for name, body in sections.items():
        for part in ("**Means**", "**Check**", "**Do**"):
            assert part in body, f"{name}: no {part}"


#: What a benchmark diary looks like (each seen in docs/ before it moved to bench/).
DIARY = [
    (re.compile(r"\bstop \d+\b", re.I), "a work session ('stop 10')"),
    (re.compile(r"\bcommit [0-9a-f]{7,40}\b"), "a commit hash"),
    (re.compile(r"tried and dropped|measured and dropped|and were dropped", re.I),
     "what was tried"),
    (re.compile(r"before → after|→ after|previous code|earlier runs", re.I),
     "before/after figures"),
    (re.compile(r"\bgoal (≤|≥|<=|>=)"), "benchmark goals"),
]


@pytest.mark.parametrize("path", [DOCS / "README.md", *PAGES], ids=lambda p: p.name)
def test_no_benchmark_diary_in_docs(path: Path) -> None:
    text = path.read_text()
    found = [f"{why}: {m.group(0)!r}" for rx, why in DIARY for m in rx.finditer(text)]
    assert found == [], "move it to bench/README.md (or a commit message)"


def test_the_diary_patterns_catch_a_diary() -> None:
    diary = ("**Warm from files** (stop 10). Tried and dropped, measured: more read-ahead. "
             "| change | cold before → after | … baseline (commit 1f9adb9) … (goal ≤ 1.1×)")
    assert len([rx for rx, _ in DIARY if rx.search(diary)]) == len(DIARY)


# --- every name a page uses exists ------------------------------------------------------
#
# An operator copies what the pages say: a configuration key, a command and its flags, a
# metric for a Grafana query, an alert's name.  Each must be one the program has, or the
# page has gone stale (docs/configuration.md and the dashboards are checked on their own,
# in tests/cli/test_config_reference.py and tests/test_dashboard.py).

READ = [ROOT / "README.md", DOCS / "README.md", *PAGES]
_CODE = re.compile(r"`([^`]+)`")
_TOML = re.compile(r"^([ \t]*)```toml[^\n]*\n(.*?)^\1```", re.S | re.M)
#: What follows a section's name when a page names a file, not a key (``relay.md``,
#: ``auth.py``, the audit trail ``audit.jsonl``, the relay's ``relay.lock``).
FILE_SUFFIXES = {"md", "py", "jsonl", "lock"}


def prose_code(text: str) -> list[str]:
    """The inline code of ``text`` (fenced blocks left out)."""
    return _CODE.findall(_FENCE.sub("", text))


def config_keys() -> set[str]:
    """``section.key`` for every key of the configuration file, and the names of the
    sections that are arrays of tables (``relay.destinations``)."""
    from dicomcache.cli.config_reference import SECTIONS
    return {f"{name}.{key}" for name, section in SECTIONS.items()
            for key in section.keys} | set(SECTIONS)


def named_keys(text: str) -> list[str]:
    """The configuration keys ``text`` names: ``section.key`` and ``[section] key`` in its
    inline code, and the keys of its ```toml blocks."""
    from dicomcache.cli.config_reference import SECTIONS
    sections = "|".join(re.escape(s) for s in sorted(SECTIONS, key=len, reverse=True))
    dotted = re.compile(rf"(?<![\w./-])({sections})\.([a-z_][a-z0-9_]*)(?![\w.(/-])")
    bracketed = re.compile(rf"^\[\[?({sections})\]\]?\s+([a-z_][a-z0-9_]*)\b")
    found = [f"{m.group(1)}.{m.group(2)}" for code in prose_code(text)
             for rx in (dotted, bracketed) for m in rx.finditer(code.strip())]
    for m in _TOML.finditer(text):
        found += toml_keys(tomllib.loads(textwrap.dedent(m.group(2))), "")
    return [k for k in found if k.rpartition(".")[2] not in FILE_SUFFIXES]


def toml_keys(table: dict[str, Any], prefix: str) -> list[str]:
    """Dotted names of a parsed TOML document's keys; tables and arrays of tables are
    sections (``relay.destinations``), everything else a key of the one it is in."""
    out = []
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out += toml_keys(value, name)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out += [k for item in value for k in toml_keys(item, name)]
        else:
            out.append(name)
    return out


@pytest.mark.parametrize("path", READ, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_configuration_key_named_exists(path: Path) -> None:
    unknown = sorted(set(named_keys(path.read_text())) - config_keys())
    assert unknown == [], "not keys of the configuration (dicomcache config-reference)"


def test_keys_are_found_where_pages_name_them() -> None:
    page = textwrap.dedent("""\
        Set `cache.max_size`, `[access] allow` and `upstream.frames_transfer_syntx`;
        the trail is `audit.jsonl`, see [relay.md](relay.md), `relay.md` and
        `[[relay.destinations]]`.

        ```toml
        [server]
        port = 8443
        [[relay.destinations]]
        name = "PACS"
        remote_hots = "pacs"
        ```
        """)
    assert named_keys(page) == ["cache.max_size", "access.allow",
                                "upstream.frames_transfer_syntx", "relay.destinations",
                                "server.port",
                                "relay.destinations.name", "relay.destinations.remote_hots"]
    assert set(named_keys(page)) - config_keys() == {"upstream.frames_transfer_syntx",
                                                     "relay.destinations.remote_hots"}


def metric_names() -> set[str]:
    """Every sample name ``/metrics`` can have (from the ``Metrics`` registry)."""
    from dicomcache.metrics import Metrics
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "info": ("_info",)}
    families = list(Metrics().registry.collect())
    return {family.name + suffix for family in families
            for suffix in suffixes.get(family.type, ("",))} | {f.name for f in families}


@pytest.mark.parametrize("path", READ, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_metric_and_alert_named_exists(path: Path) -> None:
    text, metrics = path.read_text(), metric_names()
    unknown = []
    # A name ending in `_*` stands for a family of metrics (``dicomcache_relay_*``).
    for m in re.finditer(r"\bdicomcache_[a-z][a-z0-9_]*(\*)?", text):
        name = m.group(0).rstrip("*")
        if not (name in metrics or (m.group(1) and any(n.startswith(name) for n in metrics))):
            unknown.append(m.group(0))
    unknown += [a for a in re.findall(r"\bDicomcache[A-Z]\w*", text) if a not in alert_names()]
    assert unknown == [], "no such metric (dicomcache/metrics.py) or alert (dashboards/alerts.yml)"


_DICOMCACHE = re.compile(r"(?:^|(?<=[\s(])|(?<=/bin/))(?:dicomcache|dc)[ \t]+(.*)")
#: Inline code that is a command: ``dicomcache …``, ``dc …`` (the pages' alias), as the
#: service's user or by its full path.
_COMMAND_CODE = re.compile(r"^(?:sudo -u dicomcache |sudo )?(?:/opt/dicomcache/\.venv/bin/)?"
                           r"(?:dicomcache|dc) ")


def command_lines(text: str) -> list[str]:
    """What follows ``dicomcache`` (or the pages' alias ``dc``) in each command of the
    shell blocks (comments left out) and in inline code that is a command: a
    subcommand, its arguments."""
    from tests.test_doc_commands import SHELLS, commands
    found = []
    texts = [code for code in prose_code(text) if _COMMAND_CODE.match(code)] + [
        line.partition(" #")[0] for m in _BLOCK.finditer(text) if m.group(2).split()[:1]
        and m.group(2).split()[0] in SHELLS for line in commands(textwrap.dedent(m.group(3)))]
    for line in texts:
        line = re.sub(r"\bsudo -u dicomcache\b|-s?u dicomcache\b", "", line)
        found += [m.group(1) for m in _DICOMCACHE.finditer(line)]
    return found


_BLOCK = re.compile(r"^([ \t]*)```([^\n]*)\n(.*?)^\1```[ \t]*$", re.S | re.M)


def command_problems(line: str) -> list[str]:
    """Why ``line`` (what follows ``dicomcache``) is not a command the CLI has: an unknown
    subcommand where one is expected, or a ``--flag`` its parser does not take."""
    from dicomcache.cli.main import build_parser

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return next((dict(a.choices) for a in parser._actions
                     if isinstance(a, argparse._SubParsersAction)), {})

    parser, chain = build_parser(), ["dicomcache"]
    words = re.split(r"\s+|(?=[|;&#)])", line.strip())
    while words and words[0] in subcommands(parser):
        chain.append(words[0])
        parser = subcommands(parser)[words.pop(0)]
    if subcommands(parser) and words and re.fullmatch(r"[a-z][a-z-]*", words[0]):
        return [f"{' '.join(chain)} has no command {words[0]!r}"]
    options = {o for a in parser._actions for o in a.option_strings}
    flags = []
    for word in words:
        if re.match(r"[|;&#)]", word):
            break  # the command ends (a pipe, a comment): what follows is not its
        if word.startswith("--"):
            flags.append(word.split("=")[0].rstrip(",.`"))
    return [f"{' '.join(chain)} has no option {f}" for f in flags if f not in options]


@pytest.mark.parametrize("path", READ, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_named_exists(path: Path) -> None:
    problems = [p for line in command_lines(path.read_text()) for p in command_problems(line)]
    assert problems == [], "not what `dicomcache --help` (and each command's --help) says"


def test_commands_are_checked_as_written() -> None:
    assert command_problems("relay drain --timeout 900 --config F || exit 1") == []
    assert command_problems("stats --config F | head --lines 3") == []
    assert command_problems("relay drian --config F") == [
        "dicomcache relay has no command 'drian'"]
    assert command_problems("purge --config F --studdy UID") == [
        "dicomcache purge has no option --studdy"]
    page = ("Run `sudo -u dicomcache dicomcache verify --config F` or\n`dc pin $C UID`;\n"
            "`dicomcache` is on the path.\n\n```sh test\n./run serve  # runs dicomcache on "
            "a demo\ndicomcache stats --config F\n```\n")
    assert command_lines(page) == ["verify --config F", "pin $C UID", "stats --config F"]
