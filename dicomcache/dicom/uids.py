"""Identifiers: DICOM UIDs (PS3.5 §9.1) and Orthanc resource IDs, checked before any use.

A UID read from a URL, a query, a config file or a DICOM body goes through
:func:`is_uid` before it names anything (a request to Orthanc, a log line, a
cache key); an Orthanc ID through :func:`is_orthanc_id`.
"""

from __future__ import annotations

import hashlib
import re

#: Longest UID (PS3.5 §9.1).
MAX_UID = 64
#: PS3.5 §9.1: components of digits, none empty, none with a leading zero ("0" itself is one).
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
#: Orthanc's IDs are SHA-1 based: five groups of eight hex digits.
_ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")


def is_uid(value: str) -> bool:
    """Digits and dots, no empty component, at most 64 characters."""
    return len(value) <= MAX_UID and _UID.fullmatch(value) is not None


def uid_problem(value: str | None, what: str) -> str | None:
    """Why ``value`` is not a UID (a sentence naming ``what``), or ``None``."""
    if not value:
        return f"{what} is missing"
    if len(value) > MAX_UID:
        return f"{what} is longer than {MAX_UID} characters"
    if not _UID.fullmatch(value):
        return (f"{what} {value[:80]!r} is not a DICOM UID (digits and dots, no empty "
                "component, no leading zero: PS3.5 §9.1)")
    return None


def is_orthanc_id(value: str) -> bool:
    return _ORTHANC_ID.fullmatch(value) is not None


def _orthanc_id(*identifiers: str) -> str:
    digest = hashlib.sha1("|".join(identifiers).encode(), usedforsecurity=False).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def orthanc_instance_id(patient_id: str, study: str, series: str, sop: str) -> str:
    """Orthanc's ID of an instance: the SHA-1 of ``PatientID|Study|Series|SOP`` in five
    groups of eight hex digits (one SOP Instance UID under two patients is two instances)."""
    return _orthanc_id(patient_id, study, series, sop)


def orthanc_series_id(patient_id: str, study: str, series: str) -> str:
    """Orthanc's ID of the series of such an instance (``PatientID|Study|Series``)."""
    return _orthanc_id(patient_id, study, series)


def orthanc_study_id(patient_id: str, study: str) -> str:
    """Orthanc's ID of the study of such an instance (``PatientID|Study``)."""
    return _orthanc_id(patient_id, study)


def orthanc_patient_id(patient_id: str) -> str:
    """Orthanc's ID of a patient (the SHA-1 of the Patient ID alone)."""
    return _orthanc_id(patient_id)
