"""Orthanc REST: ``GET /instances/{id}/file`` from the verified store.

Every other Orthanc resource is read through :mod:`.passthrough`.
"""

from __future__ import annotations

from aiohttp import web

from dicomcache.http.keys import FETCHER, OUTCOME
from dicomcache.http.params import family_of, orthanc_id
from dicomcache.http.respond import serve_instance


async def instance_file(request: web.Request) -> web.StreamResponse:
    """The instance's DICOM file, byte-identical to Orthanc's ``/file``."""
    oid = orthanc_id(request.match_info["id"])
    family_of(request, "orthanc")
    fetcher = request.app[FETCHER]
    entry = await fetcher.stored(oid)
    request[OUTCOME] = "miss" if entry is None else "hit"
    found = entry or await fetcher.by_orthanc_id(oid)
    return await serve_instance(request, found, filename=f"{oid}.dcm",
                                refetch=lambda: fetcher.by_orthanc_id(oid))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/instances/{id}/file", instance_file)
