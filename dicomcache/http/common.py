"""What every API family shares: identifier checks, app keys, serving an instance."""

from __future__ import annotations

import re
import secrets
from typing import Any

from aiohttp import web

from dicomcache.config import Settings
from dicomcache.dicomweb.state import DicomWeb
from dicomcache.cache.fetch import Fetcher
from dicomcache.metrics import Metrics
from dicomcache.cache.store import AsyncStore
from dicomcache.upstream.client import OrthancClient

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", AsyncStore)
CLIENT = web.AppKey("client", OrthancClient)
FETCHER = web.AppKey("fetcher", Fetcher)
DICOMWEB = web.AppKey("dicomweb", DicomWeb)
#: API family (orthanc, wado_uri, dicomweb, passthrough) and outcome (hit, miss, …) of a request.
FAMILY = web.RequestKey("family", str)
OUTCOME = web.RequestKey("outcome", str)

DICOM = "application/dicom"

_ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(?:-[0-9a-f]{8}){4}$")
_UID = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")


class BadRequest(web.HTTPBadRequest):
    """A malformed identifier or path; the JSON body names the problem."""

    def __init__(self, reason: str) -> None:
        super().__init__(text=json_text("bad request", reason), content_type="application/json")


def json_text(error: str, reason: str, **extra: Any) -> str:
    import json
    return json.dumps({"error": error, "reason": reason, **extra})


def json_error(status: int, error: str, reason: str, **extra: Any) -> web.Response:
    return web.Response(status=status, text=json_text(error, reason, **extra),
                        content_type="application/json")


def orthanc_id(value: str, what: str = "instance ID") -> str:
    """Validate an Orthanc resource ID (SHA-1 based: 5 groups of 8 hex digits)."""
    if not _ORTHANC_ID.match(value):
        raise BadRequest(f"{value[:80]!r} is not an Orthanc {what} (like 079d74f5-e5b0bb07-…)")
    return value


def dicom_uid(value: str | None, what: str) -> str:
    """Validate a DICOM UID: digits and dots, at most 64 characters, no empty component."""
    if not value:
        raise BadRequest(f"{what} is missing")
    if len(value) > 64:
        raise BadRequest(f"{what} is longer than 64 characters")
    if not _UID.match(value):
        raise BadRequest(f"{what} {value[:80]!r} is not a DICOM UID (digits and dots)")
    return value


def family_of(request: web.Request, family: str, outcome: str | None = None) -> None:
    """Label the request for the latency histogram (read by the app's middleware)."""
    request[FAMILY] = family
    if outcome is not None:
        request[OUTCOME] = outcome


def boundary() -> str:
    return secrets.token_hex(16)


def dicomweb_uids(request: web.Request) -> tuple[str, str | None, str | None]:
    """Study, series and SOP Instance UIDs of a DICOMweb path (the levels it has)."""
    mi = request.match_info
    study = dicom_uid(mi["study"], "StudyInstanceUID")
    series = dicom_uid(mi["series"], "SeriesInstanceUID") if "series" in mi else None
    sop = dicom_uid(mi["sop"], "SOPInstanceUID") if "sop" in mi else None
    return study, series, sop
