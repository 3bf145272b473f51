"""DICOMweb for OHIF-style viewers: the routes, and the state they share.

* WADO-RS retrieve of an instance, a series or a study: :mod:`.wado_rs`.
* Frames and bulk pixel data: :mod:`.frames`.
* Metadata, QIDO-RS, rendered and thumbnails: :mod:`.metadata`.

The state behind them (answer caches, listings, series streams) is
:class:`~dicomcache.dicomweb.state.DicomWeb`, created here once the store and
the upstream client exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from dicomcache.dicomweb.state import DicomWeb
from dicomcache.http.frames import bulk_pixel_data, frames
from dicomcache.http.keys import CLIENT, DICOMWEB, FETCHER, SETTINGS, STORE, STUDY_CHANGED
from dicomcache.http.metadata import metadata, qido, rendered
from dicomcache.http.wado_rs import instance, retrieve


async def _dicomweb_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    dw = DicomWeb(settings.dicomweb, app[CLIENT], app[STORE], app[FETCHER],
                  directory=settings.cache.directory / "dicomweb")
    app[DICOMWEB] = dw
    if dw.disk is not None:
        await asyncio.to_thread(dw.disk.prune)
    # Told when a study changed (it grew: answers go stale) or lost content (deleted,
    # replaced, purged: its answers are dropped), by the change feed and the store.
    hooks = app.get(STUDY_CHANGED)
    if hooks is not None:
        hooks.append(dw.study_changed)
    yield
    await dw.stop()
    # Parts already verified and queued are made durable by the store's own
    # clean-up (app._store_ctx drains the queue before closing the index).
    if hooks is not None and dw.study_changed in hooks:
        hooks.remove(dw.study_changed)


def add_routes(app: web.Application) -> None:
    """DICOMweb routes; the state is created after the store and upstream contexts."""
    app.cleanup_ctx.append(_dicomweb_ctx)
    r = app.router
    st = "/dicom-web/studies/{study}"
    se = st + "/series/{series}"
    inst = se + "/instances/{sop}"
    for path in ("/dicom-web/studies", "/dicom-web/series", "/dicom-web/instances",
                 st + "/series", st + "/instances", se + "/instances"):
        r.add_get(path, qido)
    r.add_get(st, retrieve)
    r.add_get(se, retrieve)
    r.add_get(inst, instance)
    for path in (st, se, inst):
        r.add_get(path + "/metadata", metadata)
        r.add_get(path + "/rendered", rendered)
        r.add_get(path + "/thumbnail", rendered)
    r.add_get(inst + "/frames/{frames}", frames)
    r.add_get(inst + "/bulk/{tag}", bulk_pixel_data)
    r.add_get(inst + "/frames/{frames}/rendered", rendered)
    r.add_get(inst + "/frames/{frames}/thumbnail", rendered)
