"""docs/ is for operators, and stays whole.

The index lists every page, every link between pages lands (anchors too), every
shipped alert rule has its entry in docs/troubleshooting.md, and no benchmark
diary creeps back into docs/ (figures and their history live in bench/README.md).
"""

from __future__ import annotations

import re
from pathlib import Path

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
