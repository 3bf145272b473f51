"""A read-through answer's buffer: memory up to a bound, then a temp file, as nginx does.

The read-through relays Orthanc's answer to a viewer.  Written straight to the
viewer, a slow reader would hold an upstream connection (and one of Orthanc's
HTTP threads) for as long as it takes to read; :class:`Spill` lets the upstream
side run at the link's speed instead: chunks are kept in memory up to
``memory`` bytes, and beyond that appended to an unlinked temp file on the
cache's file system, from which the viewer's side reads them back in order.
Once Orthanc's answer is read whole, its connection goes back to the pool
while the viewer is still reading.

Disk use is bounded by a :class:`SpillBudget` shared by every answer: when the
budget is spent (or the disk refuses a write), :meth:`Spill.put` waits for the
viewer to catch up instead, which is the unbuffered behaviour.

Order is kept without bookkeeping: once anything sits in the file, every new
chunk goes to the file too, and the reader empties memory before the file;
when the file is read to its end it is closed (its space freed) and memory is
used again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections import deque
from pathlib import Path
from typing import IO

from dicomcache import durable

log = logging.getLogger(__name__)

#: Bytes read back from the temp file at a time.
READ_SIZE = 1 << 16


class SpillBudget:
    """Temp-file bytes all read-through answers may hold together (``total``)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class Spill:
    """An ordered byte buffer between one producer (Orthanc's side) and one consumer
    (the viewer's side), on one event loop.  File I/O runs in threads."""

    def __init__(self, memory: int, budget: SpillBudget, directory: Path) -> None:
        self.memory = memory
        self.budget = budget
        self.directory = directory
        self._mem: deque[bytes] = deque()
        self._mem_bytes = 0
        self._file: IO[bytes] | None = None
        self._written = 0  # bytes in the file
        self._writing = False  # the producer is appending to the file
        self._read = 0  # of which the consumer has taken
        self._done = False
        self._error: BaseException | None = None
        self._closed = False  # the consumer is gone: the producer must stop
        self._taken = 0  # chunks the consumer took: the producer's cue to try again
        self._changed = asyncio.Event()

    # --- the producer ------------------------------------------------------------------
    async def put(self, chunk: bytes) -> None:
        """Keep ``chunk``; waits only while memory is full and the file cannot take it.
        ``ConnectionResetError`` once the consumer has gone."""
        while True:
            if self._closed:
                raise ConnectionResetError("the viewer's side of the read-through ended")
            taken = self._taken
            # Memory always takes one chunk, however big: the reader has something to
            # read, or the two sides could wait for each other.
            if (self._written == self._read and not self._writing
                    and (not self._mem or self._mem_bytes + len(chunk) <= self.memory)):
                self._mem.append(chunk)
                self._mem_bytes += len(chunk)
                self._wake()
                return
            if await self._to_file(chunk):
                self._wake()
                return
            if self._taken == taken:  # the reader took nothing while the file was tried
                await self._wait()

    async def _to_file(self, chunk: bytes) -> bool:
        # The budget counts the file's size, given back when the file is drained and
        # closed: a file can never outgrow it, however the reads interleave.
        if not self.budget.take(len(chunk)):
            return False
        self._writing = True  # the consumer leaves the file alone meanwhile
        try:
            if self._file is None:
                self._file = await durable.in_thread(_new_file, self.directory)
            # Not abandoned if cancelled: close() must never close it under the write.
            await durable.in_thread(_write_at, self._file, self._written, chunk)
        except OSError as exc:  # a full or failing disk: fall back to the viewer's pace
            self.budget.give(len(chunk))
            log.debug("read-through buffer cannot spill to %s: %s", self.directory, exc)
            return False
        finally:
            self._writing = False
            self._wake()
        self._written += len(chunk)
        return True

    def finish(self, error: BaseException | None = None) -> None:
        """No more chunks: Orthanc's answer is complete, or ``error`` cut it."""
        self._done = True
        self._error = error
        self._wake()

    # --- the consumer ------------------------------------------------------------------
    async def get(self) -> bytes | None:
        """The next chunk in order; ``None`` at the end; the producer's error if it was
        cut (after everything before the cut was taken)."""
        while True:
            if self._mem:
                chunk = self._mem.popleft()
                self._mem_bytes -= len(chunk)
                self._took()
                return chunk
            if self._read < self._written:
                return await self._from_file()
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            await self._wait()

    async def _from_file(self) -> bytes:
        f = self._file
        assert f is not None
        n = min(READ_SIZE, self._written - self._read)
        chunk = await durable.in_thread(_read_at, f, self._read, n)
        self._read += len(chunk)
        if self._read == self._written and not self._writing:
            # Drained: memory is used first again, and the file (an unlinked one: its
            # disk space goes with the descriptor) is closed and its budget given back.
            # Every change is made before the await, so the producer never sees half.
            self._file = None
            self.budget.give(self._written)
            self._read = self._written = 0
            self._took()
            await asyncio.to_thread(f.close)
        self._took()
        return chunk

    async def close(self) -> None:
        """The consumer is done (or gone): release the file and its budget."""
        self._closed = True
        self._took()
        while self._writing:  # never close a descriptor a thread is writing to
            await self._wait()
        f, self._file = self._file, None
        if f is not None:
            self.budget.give(self._written)
            self._read = self._written = 0
            await asyncio.to_thread(f.close)

    # --- both ---------------------------------------------------------------------------
    def _wake(self) -> None:
        self._changed.set()

    def _took(self) -> None:
        self._taken += 1
        self._wake()

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()


def _new_file(directory: Path) -> IO[bytes]:
    """An unlinked temp file in ``directory`` (nothing to clean up after a crash)."""
    return tempfile.TemporaryFile(dir=directory)


def _write_at(f: IO[bytes], offset: int, data: bytes) -> None:
    os.pwrite(f.fileno(), data, offset)


def _read_at(f: IO[bytes], offset: int, n: int) -> bytes:
    return os.pread(f.fileno(), n, offset)
