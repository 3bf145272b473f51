"""WADO-URI (``GET /wado?requestType=WADO&…&contentType=application/dicom``).

Requests for the DICOM object itself are served from the verified store (the
same bytes Orthanc returns); rendered images and any other parameter are read
through from Orthanc.
"""

from __future__ import annotations

from aiohttp import web

from dicomcache.http.keys import FETCHER, OUTCOME
from dicomcache.http.params import dicom_uid, family_of
from dicomcache.http.passthrough import passthrough
from dicomcache.http.respond import BadRequest, serve_instance

#: Parameters that do not change the DICOM bytes Orthanc returns.
_PLAIN = {"requestType", "studyUID", "seriesUID", "objectUID", "contentType"}


async def wado(request: web.Request) -> web.StreamResponse:
    q = request.query
    if q.get("requestType") != "WADO":
        raise BadRequest("requestType must be WADO")
    study = dicom_uid(q["studyUID"], "studyUID") if "studyUID" in q else None
    series = dicom_uid(q["seriesUID"], "seriesUID") if "seriesUID" in q else None
    sop = dicom_uid(q.get("objectUID"), "objectUID")
    if q.get("contentType") != "application/dicom" or set(q) - _PLAIN:
        return await passthrough(request)
    family_of(request, "wado_uri")
    fetcher = request.app[FETCHER]
    found, hit = await fetcher.by_uids(sop, study, series)
    request[OUTCOME] = "hit" if hit else "miss"
    return await serve_instance(request, found,
                                refetch=lambda: fetcher.by_orthanc_id(found.orthanc_id))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/wado", wado)
