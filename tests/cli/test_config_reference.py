"""The configuration reference cannot drift from the settings it documents.

docs/configuration.md is ``dicomcache config-reference``'s output; every key of the
settings has a line there, every line names a key the parser accepts, and
config.example.toml (its commented-out keys too) uses only real keys.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from dicomcache.cli import config_reference as ref
from dicomcache.cli.main import main
from dicomcache.config import from_dict
from dicomcache.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"


def documented() -> dict[str, set[str]]:
    return {name: set(section.keys) for name, section in ref.SECTIONS.items()}


def test_every_key_of_the_settings_is_documented_and_nothing_else() -> None:
    have, doc = ref.settings_keys(), documented()
    assert set(doc) == set(have), "a section without a reference, or one that does not exist"
    for section in have:
        assert doc[section] - have[section] == set(), f"[{section}]: documented, not a setting"
        assert have[section] - doc[section] == set(), f"[{section}]: setting not documented"


def _problems_of(section: str, key: str) -> list[tuple[str, str]]:
    """What the parser says of a file holding only this key (any value: its type or value
    may well be wrong; only whether the key is known matters here)."""
    entry = {key: "x"}
    if section == "relay.destinations":
        data = {"relay": {"destinations": [entry]}}
    elif section == "changes.prewarm":
        data = {"changes": {"prewarm": [entry]}}
    else:
        data = {section: entry}
    try:
        from_dict(data)
    except ConfigError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize(("section", "key"), [
    (s, k) for s, keys in documented().items() for k in sorted(keys)])
def test_every_documented_key_is_one_the_parser_accepts(section: str, key: str) -> None:
    unknown = [k for k, message in _problems_of(section, key) if "unknown key" in message]
    assert unknown == []


def test_a_key_the_parser_does_not_know_is_told_apart() -> None:
    """The check above can fail: an invented key is reported unknown."""
    assert any("unknown key" in m for _, m in _problems_of("cache", "max_sise"))
    assert any("unknown key" in m for _, m in _problems_of("relay.destinations", "colour"))


def test_defaults_are_the_parsed_values_of_an_empty_file() -> None:
    """Read from the settings, not copied: the example values are what from_dict gives."""
    text = ref.render()
    assert "| `max_size` | `\"50GiB\"` | size |" in text
    assert "| `stale_if_error` | `604800` (7 d) | seconds |" in text
    assert "| `remote_port` | `104` | port |" in text  # the parser's default, not a field's
    assert "| `name` | required |" in text
    assert "| `algorithms` | `[\"RS256\", \"ES256\"]` |" in text


@pytest.mark.parametrize(("value", "unit", "literal"), [
    (50 << 30, "size", '"50GiB"'), (256 << 20, "size", '"256MiB"'), (3 << 10, "size", '"3KiB"'),
    (1536, "size", "1536"), (10**9, "size", "1000000000"), (True, "", "true"),
    (False, "", "false"), (0.25, "seconds", "0.25"), (10.0, "seconds", "10"),
    (8080, "port", "8080"),
    ((), "", "[]"), (("a", "b"), "", '["a", "b"]'), (Path("/var/x"), "", '"/var/x"'),
    ("json", "", '"json"'),
])
def test_literal(value: object, unit: str, literal: str) -> None:
    """A default as an operator would write it in the file."""
    assert ref._literal(value, unit) == literal


def test_docs_configuration_md_is_the_rendered_reference() -> None:
    """Regenerate with: dicomcache config-reference > docs/configuration.md"""
    assert DOC.read_text() == ref.render(), \
        "docs/configuration.md is stale: run `dicomcache config-reference > docs/configuration.md`"


def test_the_command_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out == ref.render()


# --- config.example.toml -----------------------------------------------------------------------
_HEADER = re.compile(r"^#?\s*\[\[?([a-z_.]+)\]\]?\s*$")
_KEY = re.compile(r"^#?\s*([a-z_]+)\s*=")


def example_keys() -> list[tuple[int, str, str]]:
    """Every ``key = value`` of the example, commented out or not, with its section."""
    section, found = "", []
    for number, line in enumerate((ROOT / "config.example.toml").read_text().splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            section = header.group(1)
            continue
        key = _KEY.match(line)
        if key and (not line.startswith("#") or line.startswith("# ")):
            found.append((number, section, key.group(1)))
    return found


def test_config_example_parses(tmp_path: Path) -> None:
    (tmp_path / "orthanc-password").write_text("secret\n")
    cfg = tmp_path / "config.toml"
    cfg.write_text((ROOT / "config.example.toml").read_text())
    data = tomllib.loads(cfg.read_text())
    from_dict(data, base=tmp_path)


def test_config_example_holds_only_real_keys() -> None:
    keys = example_keys()
    assert len(keys) > 100  # commented-out keys are read too
    doc = documented()
    wrong = [f"line {n}: [{s}] {k}" for n, s, k in keys if k not in doc.get(s, set())]
    assert wrong == []


def test_a_wrong_key_in_the_example_would_be_found() -> None:
    doc = documented()
    assert "max_sise" not in doc["cache"] and "commented_typo" not in doc["server"]
    assert _KEY.match("# commented_typo = 1") and _HEADER.match("# [[changes.prewarm]]")
