"""The command line: check-config, serve (graceful stop, demo mode), kill -9 safety."""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomcache.cache.store import Store
from dicomcache.cli.main import build_parser, main
from dicomcache.devtools.orthanc import OrthancProcess, free_port
from dicomcache.devtools.wanem import LinkProfile, ThreadedWanEmulator
from dicomcache.dicom.verify import verify_file
from tests.conftest import Sample, serve_config, start_dicomcache


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert "dicomcache" in capsys.readouterr().out


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[upstream]\nurl = "http://pacs:8042"\n'
                   '[cache]\ndirectory = "x"\nmax_size = "2GiB"\n')
    assert main(["check-config", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "http://pacs:8042" in out and "2.0 GiB" in out


def test_check_config_lists_every_problem(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = "eighty"\n[upstream]\nurl = "nope"\nretries = -1\n'
                   '[cache]\nmax_size = "huge"\n')
    assert main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    for key in ("server.port", "upstream.url", "upstream.retries", "cache.max_size"):
        assert key in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "none.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def get(url: str, timeout: float = 30) -> bytes:
    return urllib.request.urlopen(url, timeout=timeout).read()  # type: ignore[no-any-return]


def write_config(path: Path, port: int, upstream: str, orthanc: OrthancProcess) -> Path:
    """Prefetch and the change feed as the daemon has them by default."""
    return serve_config(path, port, upstream, orthanc, prefetch=None, changes=None,
                        server={"shutdown_timeout": 5},
                        upstream={"retries": 1, "backoff_base": 0.05},
                        cache={"max_size": "1GiB"})


@pytest.fixture
def serve(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> Callable[..., Any]:
    """``serve(*args, port=…)``: ``dicomcache serve ARGS`` once it answers on ``port``,
    its output in ``serve0.log``, ``serve1.log``…; ``env``: more environment."""

    def start(*args: str, port: int, env: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.Popen[bytes]:
        proc = start_dicomcache(["serve", *args], tmp_path / f"serve{len(processes)}.log",
                                healthz=port, timeout=timeout,
                                env={**os.environ, **(env or {})})
        processes.append(proc)
        return proc

    return start


def test_serve_and_sigterm(serve, tmp_path: Path, orthanc: OrthancProcess,  # type: ignore[no-untyped-def]
                           ct_series: list[Sample]) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", port, orthanc.url, orthanc)
    proc = serve("--config", str(cfg), port=port)
    base = f"http://127.0.0.1:{port}"
    assert get(f"{base}/instances/{ct_series[0].orthanc_id}/file") == ct_series[0].data
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    log = (tmp_path / "serve0.log").read_text()
    assert "listening on" in log and "dicomcache stopped" in log
    assert orthanc.password not in log


def test_kill_9_during_downloads_then_restart(serve, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              orthanc: OrthancProcess,
                                              ct_series: list[Sample]) -> None:
    # A slow link so that downloads are in flight when the process is killed.
    with ThreadedWanEmulator("127.0.0.1", orthanc.http_port,
                             LinkProfile(latency_ms=5, bandwidth_mbit=40)) as wan:
        port = free_port()
        cfg = write_config(tmp_path / "c.toml", port, f"http://127.0.0.1:{wan.port}", orthanc)
        proc = serve("--config", str(cfg), port=port)
        base = f"http://127.0.0.1:{port}"
        pool = concurrent.futures.ThreadPoolExecutor(len(ct_series))
        futures = [pool.submit(get, f"{base}/instances/{s.orthanc_id}/file") for s in ct_series]
        time.sleep(0.6)  # the deliberate kill delay: some downloads done, others in flight
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = 0
        for s, fut in zip(ct_series, futures, strict=True):
            try:
                body = fut.result(timeout=30)
            except (OSError, urllib.error.URLError, ConnectionError, Exception):
                continue
            assert body == s.data  # whatever a viewer got before the kill was whole
            done += 1
        pool.shutdown()
        assert done < len(ct_series), "the kill came too late to test anything"

        # The store the killed process left: every entry complete and verified.
        store = Store(tmp_path / "cache", 1 << 30)
        for entry in store.entries():
            verify_file(entry.path, expected_length=entry.size, expected_md5=entry.md5)
        store.sweep(min_age=0)
        assert not list((tmp_path / "cache" / "tmp").iterdir())
        store.close()

        proc = serve("--config", str(cfg), port=port)
        for s in ct_series:
            assert get(f"{base}/instances/{s.orthanc_id}/file") == s.data
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_demo_mode_without_config(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    proc = serve("--port", str(port), port=port, timeout=120,
                 env={"XDG_STATE_HOME": str(tmp_path / "state")})
    base = f"http://127.0.0.1:{port}"
    import json
    studies = json.loads(get(f"{base}/dicom-web/studies"))  # QIDO: what a viewer lists
    [study] = [s["0020000D"]["Value"][0] for s in studies]
    [series] = json.loads(get(f"{base}/dicom-web/studies/{study}/series"))
    se = series["0020000E"]["Value"][0]
    instances = json.loads(get(f"{base}/dicom-web/studies/{study}/series/{se}/instances"))
    assert len(instances) == 40
    sop = instances[0]["00080018"]["Value"][0]
    body = get(f"{base}/wado?requestType=WADO&studyUID={study}&seriesUID={se}"
               f"&objectUID={sop}&contentType=application/dicom")
    assert body[128:132] == b"DICM"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = (tmp_path / "serve0.log").read_text()
    assert "demo Orthanc" in log
    # The demo Orthanc we started is gone with us.
    orthanc_log = tmp_path / "state" / "dicomcache" / "demo-orthanc" / "orthanc.log"
    assert orthanc_log.exists()


@pytest.mark.parametrize("argv", [["prefetch", "--study", "../etc/passwd"],
                                  ["prefetch", "--study", "1.2.x"],
                                  ["pin", "1.2;3"], ["revalidate", "--study", "1..2"]])
def test_a_malformed_uid_is_a_usage_error(argv: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 and the reason, before any configuration or Orthanc is read."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert "is not a DICOM UID" in capsys.readouterr().err


def _parsers(parser: argparse.ArgumentParser, chain: str
             ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser, ``dicomcache`` first, each with its command line."""
    yield chain, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{chain} {name}")


def test_every_help_is_plain_text() -> None:
    """``--help`` is read in a terminal: no reStructuredText from a docstring in it
    (``prefetch --help`` showed ````cache.directory```` that way)."""
    markup = re.compile(r"``|:(?:func|class|meth|mod|data|attr):`")
    shown = {chain: parser.format_help() for chain, parser in _parsers(build_parser(),
                                                                        "dicomcache")}
    assert len(shown) > 20
    assert [chain for chain, text in shown.items() if markup.search(text)] == []
