"""What an audit record says, and its JSON line (pure: no I/O).

A record answers *who* (:class:`Actor`: the principal, how it was
authenticated, the client's address), *what* (:class:`Subject`: the patient,
the study/series/instance UIDs or the Orthanc ID, or the query), the
*action* (:data:`ACTIONS`) and the *outcome* (HTTP or DIMSE status, bytes,
seconds).  Every field is bounded in length, so a record is a few KiB at most
whatever a request carries.  Nothing here can hold a credential: an
:class:`Actor` is built from a principal's name, role and method only (never
its token), and query strings pass :func:`redact_query`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

from dicomcache.principal import Principal

#: A viewer (or any HTTP client) read an instance, a frame, metadata, a rendering…
RETRIEVE = "retrieve"
#: A search or a listing (QIDO-RS, Orthanc's ``/studies``, ``/tools/find``…).
QUERY = "query"
#: An instance downloaded ahead of a viewer because of its touch (attributed to it).
PREFETCH = "prefetch"
#: A C-STORE received from a modality by the relay.
RELAY_RECEIVE = "relay-receive"
#: An instance the relay sent on to a destination.
RELAY_FORWARD = "relay-forward"
#: Cached copies deleted by an operator (``dicomcache purge``).
PURGE = "purge"
#: A write to Orthanc through dicomcache (only where ``[access] allow`` opens one).
MODIFY = "modify"
DELETE = "delete"
ACTIONS = (RETRIEVE, QUERY, PREFETCH, RELAY_RECEIVE, RELAY_FORWARD, PURGE, MODIFY, DELETE)

#: Outcomes: done; refused by access control (401/403, a rejected association);
#: failed (an error status); cut off while the answer was being sent; refused
#: because the audit trail could not be written (``[audit] required``).
SUCCESS, DENIED, FAILED, ABORTED, REFUSED = "success", "denied", "failed", "aborted", "refused"
OUTCOMES = (SUCCESS, DENIED, FAILED, ABORTED, REFUSED)

#: Length bounds of the fields (characters): a record stays small whatever comes in.
_LIMITS = {"principal": 256, "role": 32, "auth": 32, "client": 64, "proxy": 64,
           "patient_id": 256, "study_uid": 128, "series_uid": 128, "sop_uid": 128,
           "sop_class": 128, "orthanc_id": 64, "level": 16, "query": 2048, "method": 16,
           "path": 1024, "destination": 256, "detail": 512}
#: Query parameters whose values are never written (credentials some clients put in URLs).
_SECRET_PARAM = re.compile(
    r"^(access_?token|id_?token|token|auth|authorization|password|passwd|pwd|pass|secret|"
    r"api_?key|apikey|key|jwt|session|sessionid|sid|code|signature|sig|credentials?)$",
    re.IGNORECASE)
REDACTED = "[redacted]"
#: Version of the JSON line format (``"v"``).
FORMAT = 1


def clip(value: str | None, limit: int) -> str | None:
    """``value`` cut to ``limit`` characters (marked with ``…``); ``None`` stays ``None``."""
    if value is None or len(value) <= limit:
        return value
    return value[:limit - 1] + "…"


def redact_query(raw: str) -> str:
    """A query string with the values of credential-like parameters replaced."""
    if not raw:
        return raw
    out = []
    for pair in raw.split("&"):
        name, sep, _value = pair.partition("=")
        if sep and _SECRET_PARAM.match(unquote_plus(name).strip()):
            pair = f"{name}={REDACTED}"
        out.append(pair)
    return "&".join(out)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who: the principal a request or association acts for, and where it came from."""

    principal: str
    role: str
    #: How it was authenticated (``none``, ``basic``, ``bearer``, ``dimse``, ``os``…).
    auth: str
    #: The client's address (the viewer, the modality); ``""`` when not known (local).
    client: str = ""
    #: The trusted proxy the request came through, when the client is from its header.
    proxy: str | None = None

    @classmethod
    def of(cls, principal: Principal, client: str = "", proxy: str | None = None) -> Actor:
        """The actor for ``principal`` (its name, role and method: never its token)."""
        return cls(principal.name, principal.role, principal.method, client, proxy)


@dataclass(frozen=True, slots=True)
class Subject:
    """What was accessed: as much as is known of the patient and the resource."""

    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    sop_class: str | None = None
    #: Orthanc's ID of the resource a URL names, and its level (patient/study/series/instance).
    orthanc_id: str | None = None
    level: str | None = None
    #: Instances in the answer (a series or study retrieve, a purge).
    instances: int | None = None
    #: The query string of a search (credentials redacted).
    query: str | None = None

    def merged(self, more: Subject | None) -> Subject:
        """This subject, with the fields it lacks taken from ``more``."""
        if more is None:
            return self
        return replace(self, **{f.name: getattr(more, f.name) for f in fields(Subject)
                                if getattr(self, f.name) is None
                                and getattr(more, f.name) is not None})


@dataclass(frozen=True, slots=True)
class Record:
    """One access to patient data (see the module docstring)."""

    action: str
    actor: Actor
    subject: Subject
    outcome: str
    #: The HTTP status, or the DIMSE status (an int; written as ``0xA700``-style text).
    status: int | None = None
    bytes: int = 0
    seconds: float = 0.0
    #: When the access started (Unix time).
    time: float = field(default_factory=time.time)
    method: str | None = None
    path: str | None = None
    #: Where a relay forward went (``name AE@host:port``).
    destination: str | None = None
    #: A short reason (why it failed or was refused).
    detail: str | None = None
    #: A DIMSE status rather than an HTTP one.
    dimse: bool = False
    #: Unique: duplicates and losses can be counted (128 random bits).
    id: str = field(default_factory=lambda: os.urandom(16).hex())


def iso_time(ts: float) -> str:
    """``2026-12-04T13:42:35.123456Z`` (UTC, microseconds)."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def as_dict(record: Record, *, source: str) -> dict[str, Any]:
    """The record as its JSON object (``None`` fields left out; every string bounded)."""
    out: dict[str, Any] = {"v": FORMAT, "time": iso_time(record.time), "id": record.id,
                           "source": source, "action": record.action,
                           "outcome": record.outcome}
    if record.status is not None:
        out["status"] = f"0x{record.status:04X}" if record.dimse else record.status
    out["bytes"] = max(int(record.bytes), 0)
    seconds = record.seconds if math.isfinite(record.seconds) else 0.0
    out["seconds"] = round(max(seconds, 0.0), 6)
    actor, subject = record.actor, record.subject
    for name, value in (("principal", actor.principal), ("role", actor.role),
                        ("auth", actor.auth), ("client", actor.client), ("proxy", actor.proxy),
                        ("method", record.method), ("path", record.path)):
        if value is not None:
            out[name] = clip(value, _LIMITS[name])
    for f in fields(Subject):
        value = getattr(subject, f.name)
        if value is not None:
            out[f.name] = value if isinstance(value, int) else clip(value, _LIMITS[f.name])
    for name, value in (("destination", record.destination), ("detail", record.detail)):
        if value is not None:
            out[name] = clip(value, _LIMITS[name])
    return out


def encode(record: Record, *, source: str) -> bytes:
    """One JSON line (ASCII: every control character and line break escaped)."""
    return json.dumps(as_dict(record, source=source), ensure_ascii=True,
                      separators=(",", ":")).encode("ascii") + b"\n"


def decode(line: bytes | str) -> dict[str, Any] | None:
    """A line read back as its JSON object; ``None`` for anything that is not a record
    (a line cut by a crash before it was made durable, garbage)."""
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("time"), str) \
            or not isinstance(value.get("action"), str):
        return None
    return value


def outcome_of_http(status: int) -> str:
    """The outcome of an HTTP answer with ``status``."""
    if status in (401, 403, 407):
        return DENIED
    return SUCCESS if status < 400 else FAILED


def outcome_of_dimse(status: int | None) -> str:
    """The outcome of a DIMSE status (success and warnings are done; none: aborted)."""
    if status is None:
        return ABORTED
    return SUCCESS if status == 0 or 0xB000 <= status <= 0xBFFF else FAILED
