"""Config loading: defaults, every key checked, every problem named."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomcache.config import Settings, format_size, from_dict, load, parse_size
from dicomcache.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_is_valid(tmp_path: Path) -> None:
    (tmp_path / "orthanc-password").write_text("secret\n")
    text = (ROOT / "config.example.toml").read_text()
    # The example uses a password_file beside it; make one so it loads.
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    settings = load(cfg)
    assert settings.server.host == "127.0.0.1"
    assert settings.upstream.url == "http://orthanc.example.org:8042"
    assert settings.cache.max_size == 50 << 30
    assert settings.relay.destinations[0].transfer_syntax_strategy == "conservative"
    assert settings.audit.file == Path("/var/log/dicomcache/audit.jsonl")
    assert settings.audit.required and settings.audit.syslog is None


def test_defaults() -> None:
    s = from_dict({})
    assert s == Settings(cache=s.cache, relay=s.relay)
    assert s.server.port == 8080 and s.server.host == "127.0.0.1"
    assert (s.upstream.connect_timeout, s.upstream.read_timeout, s.upstream.retries) == (15, 60, 3)
    assert s.upstream.url is None
    assert s.upstream.compression == "auto"  # measured per link (dicomcache.upstream.link)


@pytest.mark.parametrize("mode", ["none", "json", "all", "auto"])
def test_compression_modes(mode: str) -> None:
    assert from_dict({"upstream": {"compression": mode}}).upstream.compression == mode


def test_an_unknown_compression_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"upstream\.compression.*auto"):
        from_dict({"upstream": {"compression": "gzip"}})


def test_frames_transfer_syntax_is_off_by_default_and_lossless_only() -> None:
    from dicomcache.config import FRAMES_TRANSFER_SYNTAXES
    from dicomcache.dicom.syntaxes import LOSSLESS, SYNTAXES

    assert from_dict({}).upstream.frames_transfer_syntax == ""
    # config's list is the lossless syntaxes a frame has a media type of its own for
    assert set(FRAMES_TRANSFER_SYNTAXES) == {
        u for u in LOSSLESS if SYNTAXES[u].frame_media_type}
    jls = "1.2.840.10008.1.2.4.80"
    assert from_dict({"upstream": {"frames_transfer_syntax": jls}}
                     ).upstream.frames_transfer_syntax == jls
    for bad in ("1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.1", "jpeg-ls"):
        with pytest.raises(ConfigError, match=r"upstream\.frames_transfer_syntax.*4\.80"):
            from_dict({"upstream": {"frames_transfer_syntax": bad}})


@pytest.mark.parametrize(("text", "size"), [
    # binary units (an "i"): powers of 1024, as df -h and the status page print them
    ("50GiB", 50 << 30), ("1 MiB", 1 << 20), ("512KiB", 512 << 10), ("2TiB", 2 << 40),
    ("1.5GiB", int(1.5 * (1 << 30))), ("256mib", 256 << 20),
    # decimal units: powers of 1000, as disks are sold
    ("50GB", 50 * 10**9), ("1 MB", 10**6), ("64kB", 64 * 10**3), ("64KB", 64 * 10**3),
    ("2TB", 2 * 10**12), ("1.5GB", 1_500_000_000), ("2gb", 2 * 10**9),
    # bytes
    ("100", 100), ("100B", 100), (4096, 4096),
])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["fifty", "10PB", "-1GB", "", "GB", "1.5.5GB", "2 Gibibytes",
                                 True, 1.5])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("ambiguous", ["50G", "50 g", "512K", "1T", "64M"])
def test_a_unit_without_b_is_refused_as_ambiguous(ambiguous: str) -> None:
    """"50G" was read as 50 GiB; it is neither unit for sure, so the operator chooses."""
    with pytest.raises(ValueError, match=r"ambiguous.*iB.*powers of 1024.*powers of 1000"):
        parse_size(ambiguous)


def test_a_bad_size_names_its_key_and_both_unit_families() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"cache": {"max_size": "50G"}})
    [(key, message)] = err.value.problems
    assert key == "cache.max_size" and '"50GiB"' in message and '"50GB"' in message


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (10**6, "976.6 KiB"), (1 << 20, "1.0 MiB"), (10**9, "953.7 MiB"), (50 << 30, "50.0 GiB"),
    (50 * 10**9, "46.6 GiB"), (3 << 40, "3.0 TiB"), (5000 << 40, "5000.0 TiB"),
])
def test_format_size_prints_binary_units(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize(("value", "expected"), [
    (None, 2 << 30), ("5GiB", 5 << 30), ("512MB", 512 * 10**6), (0, 0), ("0", 0),
])
def test_min_free(value: str | int | None, expected: int) -> None:
    """A size as for max_size; 0 turns the guard off (the default: 2 GiB)."""
    cache = {} if value is None else {"min_free": value}
    assert from_dict({"cache": cache}).cache.min_free == expected


@pytest.mark.parametrize("bad", ["lots", -1, "-1GB", True, 1.5])
def test_min_free_rejects(bad: object) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"cache": {"min_free": bad}})
    assert [key for key, _ in err.value.problems] == ["cache.min_free"]


def test_every_problem_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({
            "server": {"port": 70000, "colour": "blue"},
            "upstream": {"url": "ftp://x", "retries": "3", "read_timeout": -1,
                         "username": "u"},
            "cache": {"max_size": "lots"},
            "access": {"allow": ["delete everything"]},
            "relay": {"ae_title": "THIS_AE_TITLE_IS_TOO_LONG",
                      "destinations": [{"name": "A", "remote_ae_title": "PACS",
                                        "remote_host": "h", "remote_port": 104,
                                        "transfer_syntax_strategy": "fastest"}]},
            "bogus": {},
        })
    keys = {key for key, _ in err.value.problems}
    assert keys >= {"server.port", "server.colour", "upstream.url", "upstream.retries",
                    "upstream.read_timeout", "upstream.username", "cache.max_size",
                    "access.allow", "relay.ae_title",
                    "relay.destinations[0].transfer_syntax_strategy", "bogus"}


def test_password_file_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[upstream]\nurl = "http://o:8042/"\nusername = "u"\npassword_file = "pw"\n'
                   '[cache]\ndirectory = "cache"\n')
    s = load(cfg)
    assert s.upstream.password == "s3cret"
    assert s.upstream.url == "http://o:8042"
    assert s.cache.directory == tmp_path / "cache"
    assert "s3cret" not in repr(s)


def test_missing_password_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[upstream]\nusername = "u"\npassword_file = "nope"\n')
    with pytest.raises(ConfigError) as err:
        load(cfg)
    assert ("upstream.password_file" in {k for k, _ in err.value.problems})


def test_toml_syntax_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server\nport = 1")
    with pytest.raises(ConfigError) as err:
        load(cfg)
    assert err.value.problems[0][0] == "(syntax)"


def test_settings_are_frozen() -> None:
    s = from_dict({})
    with pytest.raises(AttributeError):
        s.server.port = 1  # type: ignore[misc]


def test_access_rules_normalised() -> None:
    s = from_dict({"access": {"allow": ["post /tools/find", "GET /jobs/*"]}})
    assert s.access.allow == ("POST /tools/find", "GET /jobs/*")


# --- [audit] ---------------------------------------------------------------------------
def test_audit_defaults_and_embedded_default_are_writable_by_a_user() -> None:
    from dicomcache.cli.common import settings_from, state_dir

    d = from_dict({}).audit
    assert d.file == Path("/var/log/dicomcache/audit.jsonl") and d.required
    import argparse
    embedded = settings_from(argparse.Namespace(config=None)).audit
    assert embedded.file == state_dir() / "audit" / "audit.jsonl"


@pytest.mark.parametrize(("section", "key", "words"), [
    ({"keep": -1}, "audit.keep", "between 0"),
    ({"max_queue": 5}, "audit.max_queue", "between 100"),
    ({"max_file_size": "1KB"}, "audit.max_file_size", "at least"),
    ({"trusted_proxies": ["proxy.example"]}, "audit.trusted_proxies", "not an IP"),
    ({"syslog": "http://collector"}, "audit.syslog", "not a syslog collector"),
    ({"syslog": "udp://user:pw@collector"}, "audit.syslog", "not a syslog collector"),
    ({"syslog": "udp://collector", "syslog_ca_file": "ca.pem"}, "audit.syslog_ca_file",
     "only used with"),
    ({"syslog": "tls://collector", "syslog_ca_file": "missing.pem"}, "audit.syslog_ca_file",
     "cannot read"),
    ({"syslog": "tls://collector", "syslog_cert_file": "a.crt"}, "audit.syslog_key_file",
     "go together"),
    ({"required": "yes"}, "audit.required", ""),
    ({"bogus": 1}, "audit.bogus", ""),
])
def test_audit_problems_name_their_key(tmp_path: Path, section: dict[str, object], key: str,
                                       words: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"audit": section}, base=tmp_path)
    found = dict(err.value.problems)
    assert key in found, err.value.problems
    assert words in found[key]


def test_audit_tls_syslog_files_checked(tmp_path: Path) -> None:
    import trustme

    from tests.tls_support import write_ca, write_pair

    ca = trustme.CA()
    pair = write_pair(ca, tmp_path, "node")
    write_ca(ca, tmp_path / "ca.pem")
    a = from_dict({"audit": {"syslog": "tls://collector:6514", "syslog_ca_file": "ca.pem",
                             "syslog_cert_file": "node.crt", "syslog_key_file": "node.key",
                             "file": "audit/a.jsonl", "trusted_proxies": ["10.0.0.0/8"]}},
                  base=tmp_path).audit
    assert a.syslog_ca_file == tmp_path / "ca.pem" and a.syslog_cert_file == pair.cert
    assert a.file == tmp_path / "audit" / "a.jsonl"
    assert a.trusted_proxies == ("10.0.0.0/8",)


@pytest.mark.parametrize("upstream, expected", [
    ({}, 16), ({"max_connections": 8}, 4), ({"max_connections": 2}, 1),
    ({"max_connections": 8, "read_through_connections": 7}, 7),
])
def test_read_through_keeps_connections_for_viewers(upstream: dict[str, int],
                                                     expected: int) -> None:
    settings = from_dict({"upstream": {"url": "http://o:8042", **upstream}})
    assert settings.upstream.read_through_connections == expected


@pytest.mark.parametrize("upstream, key", [
    ({"max_connections": 8, "read_through_connections": 8}, "upstream.read_through_connections"),
    ({"read_through_connections": 0}, "upstream.read_through_connections"),
    ({"max_connections": 1}, "upstream.max_connections"),
])
def test_read_through_cannot_take_the_whole_pool(upstream: dict[str, int], key: str) -> None:
    with pytest.raises(ConfigError) as bad:
        from_dict({"upstream": {"url": "http://o:8042", **upstream}})
    assert key in str(bad.value)


@pytest.mark.parametrize(("section", "key", "words"), [
    ({"max_requests_per_client": -1}, "server.max_requests_per_client", "at least 0"),
    ({"max_requests_per_client": 1.5}, "server.max_requests_per_client", "must be int"),
    ({"client_rate": -0.5}, "server.client_rate", "at least 0"),
    ({"client_rate": "fast"}, "server.client_rate", "must be float"),
    ({"client_burst": 0}, "server.client_burst", "at least 1"),
    ({"max_connections_per_client": -1}, "server.max_connections_per_client", "at least 0"),
    ({"max_connections_per_client": "many"}, "server.max_connections_per_client",
     "must be int"),
])
def test_client_limit_problems_name_their_key(section: dict[str, object], key: str,
                                              words: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"server": section})
    found = dict(err.value.problems)
    assert key in found, err.value.problems
    assert words in found[key]


def test_client_limits_read() -> None:
    server = from_dict({"server": {"max_requests_per_client": 0, "client_rate": 50,
                                   "client_burst": 200}}).server
    assert (server.max_requests_per_client, server.client_rate, server.client_burst) == (
        0, 50.0, 200)
    assert from_dict({}).server.max_connections_per_client == 64
    assert from_dict({"server": {"max_connections_per_client": 0}}
                     ).server.max_connections_per_client == 0


@pytest.mark.parametrize(("value", "expected"), [(None, 5.0), (0, 0.0), (2.5, 2.5), (3600, 3600.0)])
def test_forward_idle_release(value: float | None, expected: float) -> None:
    relay = {} if value is None else {"forward_idle_release": value}
    assert from_dict({"relay": relay}).relay.forward_idle_release == expected


@pytest.mark.parametrize("bad", [-1, 3601, "5", True])
def test_forward_idle_release_rejects(bad: object) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"relay": {"forward_idle_release": bad}})
    assert [key for key, _ in err.value.problems] == ["relay.forward_idle_release"]
