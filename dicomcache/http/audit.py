"""The audit middleware: one record per request for patient data, denied ones too.

Placed just before authentication (``[host_check, cors_preflight, canonical_path,
audit, auth.guard, errors_and_metrics]``), so a request authentication refuses
(401/403) is recorded as a denied access of an unauthenticated client, and
every answer the handlers give is seen with its real status.

**Bytes are counted, not guessed.**  A hit is answered with a response the
handler returns unprepared (the body goes out by ``sendfile`` when it is
prepared); this middleware prepares and finishes it itself (``prepare`` and
``write_eof`` are idempotent, aiohttp's own finishing then does nothing), so
when the record is made the body has been sent: ``body_length`` plus what
``sendfile`` sent (:attr:`~.respond.StoredBody.file_bytes`).  A streamed answer
(a series retrieve) is sent inside its handler; if the viewer leaves midway,
what had been written is read from the response remembered by
:func:`remember_response` (``on_response_prepare``).

**Who and what.**  The principal is ``request[PRINCIPAL]`` (set by
authentication; :data:`~dicomcache.principal.ANONYMOUS` when absent); the
client is the peer address (or, behind a proxy listed in ``[audit]
trusted_proxies``, the address it forwards).  The route gives the UIDs or
Orthanc's ID (:func:`subject_of`, pure); the instance served (``SERVED``, set
by :func:`~.respond.serve_instance`) or the store's index gives the Patient ID
— never a request to Orthanc.

**``[audit] required``** (the default): while the trail cannot be written (a
full disk, an I/O error, a writer that stalls), requests for patient data are
answered ``503`` (their refusal recorded in memory, written once the file
takes writes again) rather than served unaudited.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl

from aiohttp import hdrs, web

from dicomcache.audit import record as r
from dicomcache.audit.record import Actor, Record, Subject
from dicomcache.dicom.uids import is_orthanc_id, is_uid
from dicomcache.http.keys import AUDIT, AUDIT_RESPONSE, PRINCIPAL, SERVED, STORE
from dicomcache.http.respond import StoredBody, json_error
from dicomcache.principal import ANONYMOUS

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Paths that never carry patient data (the status page, health, metrics).
NOT_AUDITED = frozenset({"/", "/healthz", "/readyz", "/metrics", "/status.json",
                         "/favicon.ico"})
_LEVELS = {"patients": "patient", "studies": "study", "series": "series",
           "instances": "instance"}
#: Orthanc REST listings and searches (anything else read is a retrieve).
_ORTHANC_LISTINGS = frozenset({"/patients", "/studies", "/series", "/instances"})
_ORTHANC_SEARCHES = frozenset({"/tools/find", "/tools/lookup"})
RETRY_AFTER = 30


# --- pure decisions ------------------------------------------------------------------------
def audited(method: str, path: str) -> bool:
    """Whether a request may touch patient data (everything but the status page family;
    CORS preflights are answered before this middleware)."""
    return method != "OPTIONS" and path not in NOT_AUDITED


def action_of(method: str, path: str) -> str:
    """The audit action of a request: ``query`` (QIDO-RS, Orthanc listings and
    ``/tools/find``), ``delete``, ``modify`` (other writes) or ``retrieve``."""
    parts = [p for p in path.split("/") if p]
    if path in _ORTHANC_SEARCHES or (path in _ORTHANC_LISTINGS and method in ("GET", "HEAD")):
        return r.QUERY
    if method == "DELETE":
        return r.DELETE
    if method not in ("GET", "HEAD"):
        return r.MODIFY
    if parts[:1] == ["dicom-web"]:
        rest = parts[1:]
        # /studies, /series, /instances, /studies/X/series, /studies/X/instances,
        # /studies/X/series/Y/instances: a listing (odd length ending in a level).
        if rest and rest[-1] in _LEVELS and len(rest) % 2 == 1:
            return r.QUERY
    return r.RETRIEVE


def _uid(value: str | None) -> str | None:
    return value if value and is_uid(value) else None


def subject_of(path: str, query: str) -> Subject:
    """What a request names, from its path and query alone (identifiers that are not
    valid UIDs or Orthanc IDs are left out: they name nothing)."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["dicom-web"]:
        found: dict[str, str | None] = {}
        for key, name in (("studies", "study_uid"), ("series", "series_uid"),
                          ("instances", "sop_uid")):
            if key in parts[1:]:
                i = parts.index(key, 1)
                found[name] = _uid(parts[i + 1]) if i + 1 < len(parts) else None
        return Subject(study_uid=found.get("study_uid"), series_uid=found.get("series_uid"),
                       sop_uid=found.get("sop_uid"))
    if parts == ["wado"]:
        params = dict(parse_qsl(query, keep_blank_values=True))
        return Subject(study_uid=_uid(params.get("studyUID")),
                       series_uid=_uid(params.get("seriesUID")),
                       sop_uid=_uid(params.get("objectUID")))
    if len(parts) >= 2 and parts[0] in _LEVELS and is_orthanc_id(parts[1]):
        return Subject(orthanc_id=parts[1], level=_LEVELS[parts[0]])
    return Subject()


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """``[audit] trusted_proxies``, parsed once when the application is made (the limits
    and the audit middleware ask on every request)."""

    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> TrustedProxies:
        return cls(tuple(ipaddress.ip_network(e, strict=False) for e in entries))

    def trusts(self, address: str) -> bool:
        """Whether ``address`` (a zone suffix ignored) is one of the trusted proxies."""
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address.strip().split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in n for n in self.networks)


def client_of(remote: str | None, forwarded_for: str | None, trusted: TrustedProxies
              ) -> tuple[str, str | None]:
    """``(client, proxy)``: the peer, or — when the peer is a trusted proxy — the last
    address of ``X-Forwarded-For`` that is not itself a trusted proxy."""
    peer = remote or ""
    if not forwarded_for or not trusted.trusts(peer):
        return peer, None
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not trusted.trusts(hop):
            return hop, peer
    return (hops[0] if hops else peer), peer


#: The parsed ``[audit] trusted_proxies`` (set by ``make_app``).
TRUSTED_PROXIES = web.AppKey("trusted_proxies", TrustedProxies)
#: A request's ``(client, proxy)``, worked out once by the first middleware that asks.
CLIENT_ADDRESS: web.RequestKey[tuple[str, str | None]] = web.RequestKey("client_address")


def client_address(request: web.Request) -> tuple[str, str | None]:
    """``(client, proxy)`` of a request (:func:`client_of`), worked out once per request
    and shared by the per-client limits and the audit record."""
    found = request.get(CLIENT_ADDRESS)
    if found is None:
        trusted = request.app.get(TRUSTED_PROXIES) or TrustedProxies()
        found = request[CLIENT_ADDRESS] = client_of(
            request.remote, request.headers.get(hdrs.X_FORWARDED_FOR), trusted)
    return found


# --- the middleware --------------------------------------------------------------------------
async def remember_response(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the response whose bytes a record counts."""
    if SERVED in request:
        request[AUDIT_RESPONSE] = response


def _head_size(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """The size of the status line and headers as aiohttp writes them."""
    v = request.version
    head = f"HTTP/{v.major}.{v.minor} {response.status} {response.reason}\r\n" + "".join(
        f"{k}: {val}\r\n" for k, val in response.headers.items()) + "\r\n"
    return len(head.encode("utf-8"))


def body_bytes(request: web.BaseRequest, response: web.StreamResponse | None,
               complete: bool) -> int:
    """Body bytes sent: a complete answer with a length sent exactly that (its writer
    stops at it); otherwise what went through the writer after the headers (chunk
    framing included), plus what ``sendfile`` sent beside it."""
    if response is None or not response.prepared or request.method == "HEAD":
        return 0
    if complete and response.content_length is not None and not response.chunked:
        return response.content_length
    sent = max(response.body_length - _head_size(request, response), 0)
    if isinstance(response, StoredBody):
        sent += response.file_bytes
    return sent


@web.middleware
async def audit_access(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every request for patient data (module docstring)."""
    trail = request.app.get(AUDIT)
    if trail is None or not audited(request.method, request.path):
        return await handler(request)
    request[SERVED] = []
    started, t0 = time.time(), time.monotonic()
    if trail.required and not trail.accepting():
        trail.refuse(_record(request, 503, r.REFUSED, 0, started, 0.0,
                             detail=f"audit trail unavailable: {trail.error or 'stalled'}"),
                     "http")
        answer = json_error(503, "audit trail unavailable", "records of access to patient "
                            "data cannot be written now ([audit] required); try again later")
        answer.headers[hdrs.RETRY_AFTER] = str(RETRY_AFTER)
        return answer
    status, outcome, detail, sent = 500, r.FAILED, None, 0
    cancelled = False
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            # Sent now, so the record says what went out (see the module docstring).
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:  # the viewer left: aiohttp's own finish is quiet too
                outcome, detail = r.ABORTED, "the client went away"
                sent = body_bytes(request, response, False)
                return response
        sent = body_bytes(request, response, True)
        outcome = r.outcome_of_http(status)
        return response
    except web.HTTPException as exc:
        status = exc.status
        outcome = r.outcome_of_http(status)
        raise
    except (ConnectionError, asyncio.CancelledError) as exc:
        cancelled = isinstance(exc, asyncio.CancelledError)
        status, outcome, detail = 499, r.ABORTED, "the client went away"
        sent = body_bytes(request, request.get(AUDIT_RESPONSE), False)
        raise
    except Exception as exc:
        detail = type(exc).__name__
        raise
    finally:
        rec = _record(request, status, outcome, sent, started, time.monotonic() - t0,
                      detail=detail)
        if not cancelled:
            with contextlib.suppress(Exception):  # a lookup never costs the record
                rec = await _with_patient(request, rec)
        trail.submit(rec)


def actor_of(request: web.Request) -> Actor:
    """Who a request acts for, and from where."""
    client, proxy = client_address(request)
    return Actor.of(request.get(PRINCIPAL) or ANONYMOUS, client, proxy)


def _record(request: web.Request, status: int, outcome: str, sent: int, started: float,
            seconds: float, *, detail: str | None = None) -> Record:
    action = action_of(request.method, request.path)
    subject = subject_of(request.path, request.query_string)
    if action == r.QUERY:
        subject = Subject(query=r.redact_query(request.query_string)).merged(subject)
    served = request.get(SERVED) or []
    if served:
        first = served[0]
        subject = Subject(patient_id=first.patient_id, study_uid=first.study_uid,
                          series_uid=first.series_uid,
                          sop_uid=first.sop_uid if len(served) == 1 else None,
                          instances=len(served) if len(served) > 1 else None).merged(subject)
    return Record(action, actor_of(request), subject, outcome, status=status,
                  bytes=sent, seconds=seconds, time=started, method=request.method,
                  path=request.path, detail=detail)


async def _with_patient(request: web.Request, rec: Record) -> Record:
    """``rec`` with the Patient ID the store knows for what it names (one patient only)."""
    s = rec.subject
    store = request.app.get(STORE)
    if s.patient_id is not None or store is None:
        return rec
    patients: list[str] = []
    if s.sop_uid:
        patients = sorted({i.patient_id for i in store.sync.peek_uids(
            s.sop_uid, s.study_uid, s.series_uid)})
    elif s.orthanc_id and s.level == "instance":
        found = store.sync.peek(s.orthanc_id)
        patients = [found.patient_id] if found is not None else []
    if not patients:
        column, value = (("study_uid", s.study_uid) if s.study_uid else
                         ("study_oid", s.orthanc_id) if s.level == "study" else
                         ("series_oid", s.orthanc_id) if s.level == "series" else ("", None))
        if value:
            patients = await asyncio.to_thread(store.sync.patients_of, column, value)
    if len(patients) != 1:
        return rec
    return replace(rec, subject=Subject(patient_id=patients[0]).merged(s))
