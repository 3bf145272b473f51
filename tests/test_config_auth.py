"""The ``[auth]`` section: every bad value a ConfigError naming its key; the exposure
rule for ``mode = "none"``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from dicomcache.config import AuthSettings, from_dict
from dicomcache.errors import ConfigError

BEARER = {"mode": "bearer", "issuer": "https://idp.example/realms/clinic",
          "audience": "dicomcache", "viewer_roles": ["viewer"]}


def problems(**sections: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        from_dict(sections)
    return caught.value.problems


def test_defaults_are_anonymous_on_loopback() -> None:
    settings = from_dict({})
    assert settings.auth == AuthSettings()
    assert settings.auth.mode == "none" and settings.server.host == "127.0.0.1"


@pytest.mark.parametrize(("auth", "key"), [
    ({"mode": "ldap"}, "auth.mode"),
    ({"mode": "basic"}, "auth.users_file"),
    ({"users_file": "users"}, "auth.users_file"),
    ({**BEARER, "issuer": ""}, "auth.issuer"),
    ({**BEARER, "audience": ""}, "auth.audience"),
    ({**BEARER, "viewer_roles": []}, "auth.viewer_roles"),
    ({**BEARER, "issuer": "http://idp.example/realms/x"}, "auth.issuer"),  # not https
    ({**BEARER, "jwks_url": "ftp://idp.example/jwks"}, "auth.jwks_url"),
    ({**BEARER, "jwks_url": "https://user:pw@idp.example/jwks"}, "auth.jwks_url"),
    ({**BEARER, "algorithms": ["HS256"]}, "auth.algorithms"),
    ({**BEARER, "algorithms": ["none"]}, "auth.algorithms"),
    ({**BEARER, "algorithms": []}, "auth.algorithms"),
    ({**BEARER, "admin_roles": ["*"]}, "auth.admin_roles"),
    ({**BEARER, "leeway": 3600}, "auth.leeway"),
    ({**BEARER, "roles_claim": "realm access"}, "auth.roles_claim"),
    ({"issuer": "https://idp.example"}, "auth.issuer"),  # only with bearer
    ({"realm": 'a"b'}, "auth.realm"),
    ({"max_failures": 0}, "auth.max_failures"),
    ({"max_delay": 0}, "auth.max_delay"),
    ({"authorization_url": "http://authz.example/decide"}, "auth.authorization_url"),
    ({"authorization_timeout": 0}, "auth.authorization_timeout"),
    ({"unknown_key": 1}, "auth.unknown_key"),
])
def test_bad_values_name_their_key(auth: dict[str, Any], key: str) -> None:
    assert key in [k for k, _ in problems(auth=auth)]


def test_issuer_is_kept_exactly() -> None:
    """OIDC compares ``iss`` exactly: an issuer ending in "/" (Auth0) must stay so."""
    settings = from_dict({"auth": {**BEARER, "issuer": "https://tenant.auth0.example/"}})
    assert settings.auth.issuer == "https://tenant.auth0.example/"


def test_users_file_relative_to_the_config(tmp_path: Path) -> None:
    settings = from_dict({"auth": {"mode": "basic", "users_file": "users"}}, base=tmp_path)
    assert settings.auth.users_file == tmp_path / "users"


@pytest.mark.parametrize(("server", "auth", "refused"), [
    ({"host": "127.0.0.1"}, {}, False),
    ({"host": "::1"}, {}, False),
    ({"host": "localhost"}, {}, False),
    ({"host": "0.0.0.0"}, {}, True),
    ({"host": "::"}, {}, True),
    ({"host": "192.0.2.10"}, {}, True),
    ({"host": "dicomcache.clinic.example"}, {}, True),
    ({"host": "0.0.0.0"}, {"allow_anonymous_network": True}, False),
    # the admin port's address counts too: status and metrics are admin's
    ({"admin_port": 9100, "admin_host": "0.0.0.0"}, {}, True),
    ({"admin_port": 9100, "admin_host": "127.0.0.1"}, {}, False),
    ({"host": "0.0.0.0"}, {"mode": "basic", "users_file": "u"}, False),
])
def test_anonymous_access_only_on_loopback(server: dict[str, Any], auth: dict[str, Any],
                                           refused: bool) -> None:
    if refused:
        assert "auth.mode" in [k for k, _ in problems(server=server, auth=auth)]
    else:
        from_dict({"server": server, "auth": auth})


def uncommented(block_start: str, block_end: str | None = None) -> list[str]:
    """The example's commented ``key = value`` lines between two markers, uncommented."""
    text = (Path(__file__).resolve().parents[1] / "config.example.toml").read_text()
    start = text.index(block_start)
    block = text[start:text.index(block_end, start) if block_end else None]
    return [line[2:] for line in block.splitlines() if re.match(r"# [a-z_]+ = ", line)]


@pytest.mark.parametrize(("start", "end", "mode"), [
    ('# --- mode = "basic"', '# --- mode = "bearer"', "basic"),
    ('# --- mode = "bearer"', "# --- optional", "bearer"),
])
def test_example_auth_blocks_are_valid(tmp_path: Path, start: str, end: str,
                                       mode: str) -> None:
    import tomllib

    from dicomcache.config import load

    lines = uncommented(start, end) + uncommented("# --- optional")
    cfg = tmp_path / "config.toml"
    cfg.write_text("[auth]\n" + "\n".join(lines) + "\n")
    tomllib.loads(cfg.read_text())
    settings = load(cfg)
    assert settings.auth.mode == mode
    assert settings.auth.authorization_url == "https://authz.clinic.example/decide"
