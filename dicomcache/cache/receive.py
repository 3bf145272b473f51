"""Receiving a large instance body without holding it: into a temp file, hashed on the way.

A 500 MB multi-frame held in memory while it is verified, eight at a time, is
4 GB of a clinic server's RAM.  Bodies above ``cache.stream_above`` (or of
unknown length) are instead decoded (gzip, when Orthanc compressed them), MD5-
hashed and appended to a temp file of the store as they arrive, in worker
threads, a megabyte at a time.  The caller then verifies the file (length and
MD5 already known; a full parse through a read-only mapping that touches the
element headers, not the pixels) and commits it by rename: the bytes are never
all in memory.  A body known to be large goes to the file from its first byte; one
whose decoded size is not known (gzip) is held in memory up to ``HOLD_UNKNOWN`` and
stays there when it turns out small.

The temp file is created with the store's own permissions, fsynced before it is
handed over, and removed on any failure (:meth:`Sink.discard`).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from dicomcache import durable
from dicomcache.errors import Cause, IntegrityError, UpstreamError

#: Bytes gathered on the event loop before one hop to a worker thread.
HOP = 1 << 20

#: At most this much of a body whose decoded size is not known in advance (gzip, or
#: no Content-Length) is held in memory before it goes to a temp file: eight such
#: bodies at once held up to ``stream_above`` (32 MiB) each.  Single-frame CT and MR
#: instances (well under a MiB) stay in memory.
HOLD_UNKNOWN = 4 << 20


def held_in_memory(encoding: str, length: int | None, stream_above: int) -> int | None:
    """How a body is received: ``None`` read whole (small and known to be, as sent);
    else streamed through a :class:`Sink` holding that many bytes in memory before it
    spills to a temp file (0: straight to the file, it is known to be large)."""
    if encoding == "identity" and length is not None:
        return None if length <= stream_above else 0
    if length is not None and length > stream_above:
        return 0  # compressed and large even so
    return min(stream_above, HOLD_UNKNOWN)


@dataclass(frozen=True, slots=True)
class Received:
    """A decoded body: in memory (``data``) or in a fsynced temp file (``temp``)."""

    wire_bytes: int
    size: int
    md5: str
    data: bytes | None = None
    temp: Path | None = None


class Sink:
    """Decode, hash and keep a body fed in pieces (every method runs in a worker thread,
    one at a time)."""

    def __init__(self, encoding: str, memory: int, temp_path: Callable[[], Path]) -> None:
        if encoding in ("gzip", "deflate"):
            self._inflate: zlib._Decompress | None = zlib.decompressobj(47)  # gzip or zlib
        elif encoding == "identity":
            self._inflate = None
        else:
            raise UpstreamError(Cause.ENCODING, f"unsupported Content-Encoding {encoding!r}")
        self.memory = memory
        self._temp_path = temp_path
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._held = bytearray()
        self._fd: int | None = None
        self.temp: Path | None = None
        self.wire = 0
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        self.wire += len(chunk)
        data = self._decode(chunk)
        self._keep(data)

    def _decode(self, chunk: bytes) -> bytes:
        if self._inflate is None:
            return chunk
        try:
            return self._inflate.decompress(chunk)
        except zlib.error as exc:
            raise IntegrityError(Cause.SHORT_BODY, f"bad compressed stream: {exc}") from exc

    def _keep(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        self._md5.update(data)
        if self._fd is None and len(self._held) + len(data) <= self.memory:
            self._held += data
            return
        if self._fd is None:
            self.temp = self._temp_path()
            self._fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                               | os.O_CLOEXEC,
                               durable.FILE_MODE)
            self._write(self._held)  # (no copy: the held bytes were up to `memory`)
            self._held = bytearray()
        self._write(data)

    def _write(self, data: bytes | bytearray) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def end(self) -> Received:
        """The whole body, decoded; a temp file is fsynced and closed first."""
        if self._inflate is not None:
            if not self._inflate.eof:
                raise IntegrityError(Cause.SHORT_BODY, "compressed stream cut short")
            self._keep(self._inflate.flush())
        md5 = self._md5.hexdigest()
        if self._fd is None:
            return Received(self.wire, self.size, md5, data=bytes(self._held))
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        return Received(self.wire, self.size, md5, temp=self.temp)

    def discard(self) -> None:
        """Remove what was written (a failed or abandoned attempt)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)
            self.temp = None


async def receive(resp: aiohttp.ClientResponse, sink: Sink) -> Received:
    """Read ``resp``'s body into ``sink`` a :data:`HOP` at a time; the sink is discarded
    if anything fails (the caller's retry starts from nothing)."""
    try:
        pending = bytearray()
        async for chunk in resp.content.iter_chunked(1 << 16):
            pending += chunk
            if len(pending) >= HOP:
                await durable.in_thread(sink.feed, bytes(pending))
                pending.clear()
        if pending:
            await durable.in_thread(sink.feed, bytes(pending))
        return await durable.in_thread(sink.end)
    except BaseException:
        await durable.in_thread(sink.discard)
        raise
