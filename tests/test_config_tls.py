"""The TLS keys of the configuration: files checked when it is read, each problem named."""

from __future__ import annotations

import datetime as dt
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import trustme

from dicomcache.config import from_dict
from dicomcache.errors import ConfigError
from tests.tls_support import write_ca, write_pair


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def problems(data: dict[str, Any], base: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as refused:
        from_dict(data, base=base)
    return dict(refused.value.problems)


DEST = {"name": "PACS", "remote_ae_title": "PACS", "remote_host": "pacs.example",
        "remote_port": 11112}


def test_good_tls_keys_relative_to_the_config(ca: trustme.CA, tmp_path: Path) -> None:
    write_pair(ca, tmp_path / "tls", "server")
    write_ca(ca, tmp_path / "tls" / "ca.pem")
    s = from_dict({
        "server": {"tls_certificate": "tls/server.crt", "tls_key": "tls/server.key",
                   "http_redirect_port": 8081},
        "upstream": {"url": "https://orthanc.example:8042", "ca_file": "tls/ca.pem"},
        "relay": {"tls_certificate": "tls/server.crt", "tls_key": "tls/server.key",
                  "tls_ca_file": "tls/ca.pem",
                  "destinations": [{**DEST, "tls": True, "tls_ca_file": "tls/ca.pem",
                                    "tls_certificate": "tls/server.crt",
                                    "tls_key": "tls/server.key",
                                    "tls_server_name": "pacs.internal"}]},
    }, base=tmp_path)
    assert s.server.tls_certificate == tmp_path / "tls/server.crt"
    assert s.server.http_redirect_port == 8081
    assert s.upstream.ca_file == tmp_path / "tls/ca.pem"
    assert s.relay.tls_ca_file == tmp_path / "tls/ca.pem"
    assert s.relay.tls_require_client_certificate is True
    dest = s.relay.destinations[0]
    assert dest.tls and dest.tls_server_name == "pacs.internal"
    assert dest.tls_key == tmp_path / "tls/server.key"


def test_defaults_are_plain() -> None:
    s = from_dict({})
    assert s.server.tls_certificate is None and s.server.http_redirect_port is None
    assert s.upstream.ca_file is None and s.relay.tls_certificate is None


def test_bad_files_are_named_by_their_key(ca: trustme.CA, tmp_path: Path) -> None:
    good = write_pair(ca, tmp_path, "good")
    other = write_pair(ca, tmp_path, "other")
    expired = write_pair(ca, tmp_path, "expired",
                         not_before=dt.datetime(2020, 1, 1, tzinfo=UTC),
                         not_after=dt.datetime(2021, 1, 1, tzinfo=UTC))
    (tmp_path / "junk.pem").write_text("not a certificate")
    found = problems({
        "server": {"tls_certificate": str(expired.cert), "tls_key": str(expired.key)},
        "upstream": {"url": "https://orthanc.example", "ca_file": "junk.pem"},
        "relay": {"tls_certificate": str(good.cert), "tls_key": str(other.key),
                  "destinations": [{**DEST, "tls": True, "tls_ca_file": "missing.pem",
                                    "tls_certificate": str(good.cert)}]},
    }, tmp_path)
    assert "expired on 2021-01-01" in found["server.tls_certificate"]
    assert "no PEM certificate" in found["upstream.ca_file"]
    assert "does not belong to the certificate" in found["relay.tls_key"]
    assert "cannot read" in found["relay.destinations[0].tls_ca_file"]
    assert "go together" in found["relay.destinations[0].tls_key"]


def test_keys_that_need_another(ca: trustme.CA, tmp_path: Path) -> None:
    good = write_pair(ca, tmp_path, "good")
    write_ca(ca, tmp_path / "ca.pem")
    found = problems({
        "server": {"tls_certificate": str(good.cert), "http_redirect_port": 80},
        "upstream": {"url": "http://orthanc.example", "ca_file": "ca.pem"},
        "relay": {"tls_ca_file": "ca.pem", "tls_require_client_certificate": False,
                  "destinations": [{**DEST, "tls_ca_file": "ca.pem",
                                    "tls_server_name": "x"}]},
    }, tmp_path)
    assert "go together" in found["server.tls_key"]
    assert "only with tls_certificate" in found["server.http_redirect_port"]
    assert "only for an https://" in found["upstream.ca_file"]
    assert "only with tls_certificate" in found["relay.tls_ca_file"]
    assert "only with tls = true" in found["relay.destinations[0].tls_ca_file"]
    assert "only with tls = true" in found["relay.destinations[0].tls_server_name"]
    assert set(problems({"relay": {"tls_require_client_certificate": True}}, tmp_path)) == {
        "relay.tls_require_client_certificate"}
    pair = {"tls_certificate": str(good.cert), "tls_key": str(good.key)}
    assert "already server.port" in problems(
        {"server": {**pair, "port": 8443, "http_redirect_port": 8443}},
        tmp_path)["server.http_redirect_port"]
