"""The layout is the architecture: which package may import which (docs/architecture.md).

Every import of every module under ``dicomcache/`` is read (with ``ast``, so a
lazy import inside a function counts too) and checked against the rule; and
importing every module has no side effects (no threads, no patched pynetdicom).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dicomcache"

#: The base: imported by every layer above it.
BASE = {"errors", "config", "metrics", "durable", "singleflight", "principal", "tls", ""}
#: Layer -> the layers it may import (besides itself).  Mirrors docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "singleflight": set(),
    "durable": set(),
    "principal": set(),
    "tls": set(),
    "config": {"errors", "tls"},
    "metrics": {"errors", ""},
    "": set(),  # dicomcache/__init__.py: the version only
    "dicom": {"errors"},
    # The audit trail: records, the shared file, syslog; used by every side.
    "audit": BASE | {"dicom"},
    "upstream": BASE | {"dicom"},
    "cache": BASE | {"dicom", "upstream"},
    "dicomweb": BASE | {"dicom", "upstream", "cache"},
    "prefetch": BASE | {"dicom", "upstream", "cache", "audit"},
    "http": BASE | {"dicom", "upstream", "cache", "dicomweb", "prefetch", "audit"},
    "relay": BASE | {"dicom", "audit"},
    "devtools": BASE | {"dicom"},
    "cli": BASE | {"dicom", "upstream", "cache", "dicomweb", "prefetch", "http", "relay",
                   "devtools", "audit"},
    "__main__": {"cli"},
}
#: What the pure layer must never touch (sockets, the event loop, databases, HTTP).
IMPURE = {"asyncio", "aiohttp", "socket", "sqlite3", "http", "urllib", "threading",
          "subprocess", "pynetdicom"}


def layer_of(module: str) -> str:
    """``dicomcache.cache.store`` -> ``cache``; ``dicomcache.errors`` -> ``errors``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``module`` imports (absolute names), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
            # `from dicomcache.x import submodule` imports dicomcache.x.submodule
            for alias in node.names:
                found.append((f"{name}.{alias.name}", node.lineno))
    return found


ALL = modules()


def violations() -> list[str]:
    out = []
    for module, path in sorted(ALL.items()):
        mine = layer_of(module)
        allowed = ALLOWED[mine] | {mine}
        for name, line in imports_of(module, path):
            top = name.split(".")[0]
            if layer_of(module) == "dicom" and top in IMPURE:
                out.append(f"{module}:{line} imports {name}: dicom/ is pure (no I/O)")
            if not name.startswith("dicomcache"):
                continue
            if name not in ALL and name.rsplit(".", 1)[0] in ALL:
                name = name.rsplit(".", 1)[0]  # `from m import name`: the module m
            if name not in ALL:
                continue
            target = layer_of(name)
            if target not in allowed:
                out.append(f"{module}:{line} imports {name}: {mine or '(top)'} may not "
                           f"import {target or '(top)'}")
            if name == "dicomcache.http.app" and mine not in ("cli", "http"):
                out.append(f"{module}:{line} imports dicomcache.http.app")
    return out


def test_every_layer_imports_only_the_layers_below_it() -> None:
    assert violations() == []


def test_every_package_has_a_layer() -> None:
    assert {layer_of(m) for m in ALL} <= ALLOWED.keys()


def test_the_rule_catches_a_wrong_import(tmp_path: Path) -> None:
    """The check itself works: a relay module importing HTTP code is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from dicomcache.http.keys import STORE\nfrom ..cache import store\n")
    names = [n for n, _ in imports_of("dicomcache.relay.bad", bad)]
    assert "dicomcache.http.keys" in names and "dicomcache.cache.store" in names
    assert layer_of("dicomcache.http.keys") not in ALLOWED["relay"]


def test_importing_every_module_has_no_side_effects() -> None:
    """No threads started, no pynetdicom function replaced, by importing anything."""
    names = sorted(m for m in ALL if not m.endswith("__main__"))
    script = f"""
import importlib, threading
import pynetdicom._config, pynetdicom.association, pynetdicom.dimse, pynetdicom.dul
import pynetdicom.fsm, pynetdicom.transport
watched = [pynetdicom.dul.DULServiceProvider, pynetdicom.association.Association,
           pynetdicom.transport.AssociationSocket, pynetdicom.dimse.DIMSEServiceProvider]
before = {{(cls, n): v for cls in watched for n, v in vars(cls).items()}}
actions = dict(pynetdicom.fsm.ACTIONS)
for name in {names!r}:
    importlib.import_module(name)
changed = [f"{{cls.__name__}}.{{n}}" for (cls, n), v in before.items() if vars(cls).get(n) is not v]
assert not changed, changed
assert pynetdicom.fsm.ACTIONS == actions, "pynetdicom's state machine patched at import"
assert pynetdicom._config.STORE_SEND_CHUNKED_DATASET is False, "chunked sends set at import"
assert threading.active_count() == 1, [t.name for t in threading.enumerate()]
print("clean")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_linters_are_clean(tool: str) -> None:
    """ruff (rules in pyproject.toml) and mypy --strict stay green."""
    args = {"ruff": [sys.executable, "-m", "ruff", "check", "dicomcache", "tests", "bench"],
            "mypy": [sys.executable, "-m", "mypy"]}[tool]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
