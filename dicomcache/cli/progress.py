"""One progress bar for the long commands (``purge``, ``verify``, ``prefetch``, ``relay send``).

It draws one updating line on stderr only when stderr is a terminal (or when
``--progress`` forces it): a log file, a pipe or cron's mail never get
carriage-return noise.  The commands print their summary on stdout either way.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from dicomcache.config import format_size

#: Bar width in characters, and the shortest time between two redraws.
WIDTH = 28
REDRAW = 0.1


class Progress:
    """Counts of a long operation, drawn as one line while it runs."""

    def __init__(self, label: str, total: int, total_bytes: int = 0, *,
                 enabled: bool | None = None, stream: TextIO | None = None,
                 unit: str = "") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.unit = f" {unit}" if unit else ""
        self.total = total
        self.total_bytes = total_bytes
        self.done = 0
        self.done_bytes = 0
        self.failed = 0
        self.started = time.monotonic()
        self._drawn = float("-inf")

    def update(self, count: int = 1, nbytes: int = 0, *, failed: int = 0) -> None:
        self.done += count
        self.done_bytes += nbytes
        self.failed += failed
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= REDRAW or self.done >= self.total):
            self._drawn = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(frac * WIDTH)
        elapsed = max(now - self.started, 1e-6)
        text = (f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {frac:4.0%} "
                f"{self.done}/{self.total}{self.unit}")
        if self.total_bytes or self.done_bytes:
            rate = self.done_bytes / elapsed
            left = max(self.total_bytes - self.done_bytes, 0)
            eta = f"{left / rate:.0f}s" if rate > 0 else "?"
            text += f" {format_size(self.done_bytes)} {format_size(rate)}/s ETA {eta}"
        else:
            text += f" {self.done / elapsed:.1f}/s"
        if self.failed:
            text += f" failed {self.failed}"
        return text

    def _draw(self, now: float) -> None:
        self.stream.write("\r" + self.line(now) + "  ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
