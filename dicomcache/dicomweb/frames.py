"""Frames cut out of a verified instance: the byte ranges planned by
:mod:`dicomcache.dicom.frames`, read from the stored file (``pread``, never the whole
file) or sliced from the bytes in memory."""

from __future__ import annotations

import asyncio
import os

from dicomcache.cache.instance import Instance
from dicomcache.cache.store import Store

#: Byte ranges of each frame: ``[(offset, length), …]`` per frame (fragments of one frame).
Ranges = list[list[tuple[int, int]]]


def _pread_all(store: Store, found: Instance, ranges: Ranges) -> list[bytes]:
    fd, _st = store.open_checked(found)
    path = found.path
    try:
        out = []
        for frame in ranges:
            chunks = []
            for off, length in frame:
                chunk = os.pread(fd, length, off)
                if len(chunk) != length:
                    raise FileNotFoundError(f"{path} is shorter than its index says")
                chunks.append(chunk)
            out.append(b"".join(chunks))
        return out
    finally:
        os.close(fd)


async def read_frames(store: Store, found: Instance, ranges: Ranges) -> list[bytes]:
    """The bytes of each frame; ``FileNotFoundError`` when a stored file is gone, cut or
    bad (checked the first time this process reads it: :meth:`Store.open_checked`)."""
    if found.path is not None:
        return await asyncio.to_thread(_pread_all, store, found, ranges)
    data = found.content()
    return [b"".join(data[off:off + length] for off, length in frame) for frame in ranges]
