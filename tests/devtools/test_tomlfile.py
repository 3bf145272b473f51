"""dicomcache.devtools.tomlfile: what it writes reads back as the same settings."""

from __future__ import annotations

import tomllib

import pytest

from dicomcache.devtools.tomlfile import dumps


def test_what_is_written_reads_back() -> None:
    settings = {"server": {"host": "127.0.0.1", "port": 8080, "tls": False},
                "upstream": {"url": 'http://x/"quoted"\\path', "read_timeout": 2.5},
                "prefetch": {"mode": "off"}}
    assert tomllib.loads(dumps(settings)) == settings


def test_none_leaves_the_key_out() -> None:
    assert tomllib.loads(dumps({"cache": {"max_size": None, "min_free": 0}})) == \
        {"cache": {"min_free": 0}}


def test_anything_else_is_refused() -> None:
    with pytest.raises(TypeError, match="no TOML"):
        dumps({"server": {"ports": [1, 2]}})
