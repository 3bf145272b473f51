"""A dicomcache configuration written as TOML by tools that make one (the benchmarks,
the tests that start ``dicomcache serve`` as a process): the standard library reads
TOML but does not write it."""

from __future__ import annotations

import json
from collections.abc import Mapping

#: Section name → key → value.
Sections = Mapping[str, Mapping[str, object]]


def dumps(settings: Sections) -> str:
    """``settings`` as TOML: strings, numbers and booleans (all a configuration made by a
    tool sets); ``None`` values are left out, so the daemon's default applies."""
    lines = []
    for name, keys in settings.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_value(v)}" for key, v in keys.items() if v is not None]
    return "\n".join(lines) + "\n"


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    raise TypeError(f"no TOML for {v!r}")
