"""The open-file cache of the hit path never holds the disk space of removed files."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiohttp.test_utils import TestClient

from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom import syntaxes
from dicomcache.http.app import make_app
from tests.conftest import SettingsFactory, eventually


def held_removed(directory: Path) -> list[str]:
    """Files under ``directory`` this process holds open although they were removed."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)) and target.endswith(" (deleted)"):
            held.append(target)
    return held


async def test_evicted_files_are_not_held_open(aiohttp_client, make_settings: SettingsFactory,
                                               orthanc: OrthancProcess, tmp_path: Path) -> None:
    """Before: each served entry kept a descriptor (up to 512) after eviction removed its
    file, so the disk space of up to 512 evicted instances (500 MB each for a large
    multi-frame) stayed in use: the cache's bound and the disk's free space lied."""
    blobs = [encode(ds, syntaxes.EXPLICIT_LE)
             for ds in make_ct_series(6, rows=512, columns=512, seed=512)]  # 512 KiB each
    ids = await asyncio.to_thread(orthanc.upload, blobs)
    # A 1 MiB cache: room for one or two of them; serving the rest evicts the first ones.
    client: TestClient = await aiohttp_client(make_app(make_settings(
        cache={"max_size": "1MiB"})))
    for oid, blob in zip(ids, blobs, strict=True):
        for _ in range(2):  # a miss, then a hit through the open-file cache
            resp = await client.get(f"/instances/{oid}/file")
            assert resp.status == 200
            assert await resp.read() == blob
    cache = tmp_path / "cache"
    await eventually(lambda: not held_removed(cache), timeout=10,
                     what=f"descriptors of evicted files closed ({held_removed(cache)})")
