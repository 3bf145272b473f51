"""Durable file writes: what the cache, the relay spool and the change cursor share.

A durable write is: a temp file created exclusively (``O_EXCL``, never
following a symlink) in a directory on the same file system, written whole,
``fsync``-ed, renamed over its final name, and the directory ``fsync``-ed.
After :func:`write_durably` returns, a power cut leaves either the old file or
the new one, never a mix; on any error the temp file is gone and the
``OSError`` (``ENOSPC`` when the disk is full) propagates.

Blocking: call from a worker thread (:func:`in_thread` from the event loop when the
call writes through a descriptor the caller closes afterwards).
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: Files dicomcache writes hold patient data: owner read/write, group read, no others.
FILE_MODE = 0o640
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of a directory (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes | bytearray | memoryview, *, sync: bool = True,
              mode: int = FILE_MODE) -> None:
    """Create ``path`` (it must not exist, permissions ``mode`` less the umask), write
    ``data`` and, with ``sync``, fsync it.

    On any error the file is removed and the error propagates.
    """
    fd = os.open(path, _CREATE, mode)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def temp_name(final: Path) -> str:
    """A fresh temp file name for ``final`` (never reused, so never clobbered)."""
    return f".{final.name}.{secrets.token_hex(4)}.part"


def write_durably(final: Path, data: bytes | bytearray | memoryview, *,
                  temp_dir: Path | None = None, sync: bool = True) -> None:
    """Atomically replace ``final`` with ``data`` (see the module docstring).

    ``temp_dir`` must be on the same file system as ``final`` (default: its
    directory).  ``sync=False`` keeps the atomic rename but skips the fsyncs,
    for copies that are cheap to lose (a crash may leave the old file).
    """
    tmp = (temp_dir or final.parent) / temp_name(final)
    write_new(tmp, data, sync=sync)
    try:
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(final.parent)


def is_disk_full(exc: OSError) -> bool:
    """The disk (or the user's quota) is full."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``asyncio.to_thread``, but a cancelled caller waits for the thread to finish.

    A cancelled ``to_thread`` returns at once while its thread goes on; a caller
    that then closes the descriptor the thread writes through could have the number
    reused by another file and written into.  Here the cancellation is re-raised
    only once the call is over.
    """
    call = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        await asyncio.gather(call, return_exceptions=True)
        raise
