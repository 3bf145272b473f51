"""Identifiers taken from a request, checked before anything else sees them, and the
labels a route puts on its request for the metrics."""

from __future__ import annotations

from aiohttp import web

from dicomcache.dicom.uids import is_orthanc_id, uid_problem
from dicomcache.http.keys import ANSWER, FAMILY, OUTCOME
from dicomcache.http.respond import BadRequest


def orthanc_id(value: str, what: str = "instance ID") -> str:
    """An Orthanc resource ID (SHA-1 based: 5 groups of 8 hex digits), or a 400."""
    if not is_orthanc_id(value):
        raise BadRequest(f"{value[:80]!r} is not an Orthanc {what} (like 079d74f5-e5b0bb07-…)")
    return value


def dicom_uid(value: str | None, what: str) -> str:
    """A DICOM UID (digits and dots, at most 64 characters, no empty component), or a 400."""
    problem = uid_problem(value, what)
    if problem is not None:
        raise BadRequest(problem)
    assert value is not None
    return value


def dicomweb_uids(request: web.Request) -> tuple[str, str | None, str | None]:
    """Study, series and SOP Instance UIDs of a DICOMweb path (the levels it has)."""
    mi = request.match_info
    study = dicom_uid(mi["study"], "StudyInstanceUID")
    series = dicom_uid(mi["series"], "SeriesInstanceUID") if "series" in mi else None
    sop = dicom_uid(mi["sop"], "SOPInstanceUID") if "sop" in mi else None
    return study, series, sop


def family_of(request: web.Request, family: str, outcome: str | None = None, *,
              answer: bool = False) -> None:
    """Label the request for the metrics (read by the app's middleware); ``answer``: its
    hit or miss is of the answer cache, not an instance's (not in the hit ratio)."""
    request[FAMILY] = family
    if answer:
        request[ANSWER] = True
    if outcome is not None:
        request[OUTCOME] = outcome
