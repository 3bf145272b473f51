"""What every command shares: reading the configuration, reporting its problems, logging."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dicomcache.config import Settings, from_dict, load
from dicomcache.dicom.uids import is_uid
from dicomcache.errors import ConfigError

#: Exit status of a command given a bad configuration or command line.
USAGE = 2


def state_dir() -> Path:
    """Where the embedded default keeps its cache and demo Orthanc (no config given)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dicomcache"


def settings_from(args: argparse.Namespace) -> Settings:
    """The config file's settings, or the embedded default (a per-user cache dir and
    audit trail, so ``dicomcache serve`` works for an ordinary user with no config)."""
    if getattr(args, "config", None):
        return load(args.config)
    return from_dict({"cache": {"directory": str(state_dir() / "cache"), "max_size": "2GiB"},
                      "audit": {"file": str(state_dir() / "audit" / "audit.jsonl")}})


def report_config_error(exc: ConfigError, source: object) -> int:
    """Print every problem of a configuration, one per line naming its key; :data:`USAGE`."""
    print(f"{source or '(embedded default)'}: {len(exc.problems)} configuration "
          f"problem(s):", file=sys.stderr)
    for key, message in exc.problems:
        print(f"  {key}: {message}", file=sys.stderr)
    return USAGE


def load_settings(args: argparse.Namespace) -> Settings | None:
    """:func:`settings_from`, or ``None`` after reporting the problems."""
    try:
        return settings_from(args)
    except ConfigError as exc:
        report_config_error(exc, getattr(args, "config", None))
        return None


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``server.log_format = "json"``)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_daemon(level: str = "INFO", fmt: str = "plain") -> None:
    """What a long-running dicomcache process sets up first: its logging, and
    ``/metrics`` without the ``*_created`` series (one per counter and histogram child,
    doubling what Prometheus stores for nothing a dashboard reads)."""
    import prometheus_client

    setup_logging(level, fmt)
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


def setup_logging(level: str = "INFO", fmt: str = "plain") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's per-request access log is not an event a person needs; nor are
    # pynetdicom's per-message INFO lines (the relay logs what matters), unless debugging.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if root.getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def study_uid(text: str) -> str:
    """A StudyInstanceUID: digits and dots, at most 64 characters."""
    if not is_uid(text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a DICOM UID (digits and dots)")
    return text
