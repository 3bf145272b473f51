"""Per-study authorization by a web service (``[auth] authorization_url``).

The request is the one the Orthanc authorization plugin sends to its web service
(orthanc-authorization, ``Plugin/AuthorizationWebService.cpp``,
``AuthorizationWebService::IsGrantedInternal``; the Orthanc Book's "Advanced
authorization plugin"): ``POST`` a JSON object

* ``"method"``: ``"get"`` (only reads reach this check: writes are admin-only);
* ``"level"``: ``"study"`` or ``"system"``;
* for ``study``: ``"dicom-uid"`` (the StudyInstanceUID) and ``"orthanc-id"`` (the
  Orthanc study ID, ``""`` when the request did not name it: dicomcache does not ask
  Orthanc for it just to fill the field); for ``system``: ``"uri"`` (the path);
* ``"token-key"``/``"token-value"``: ``"Authorization"`` and the header as received for
  a bearer token (exactly what the plugin sends with ``TokenHttpHeaders:
  ["Authorization"]``); for a users-file login or anonymous access, which have no
  token to forward (a Basic header holds the password), ``"dicomcache-user"`` and the
  user name;
* ``"server-id"``: ``[auth] authorization_server_id`` or ``null``;
* and two fields of dicomcache's own, ignored by services written for the plugin:
  ``"user"`` and ``"role"``.

The answer is ``{"granted": bool, "validity": seconds}`` (``validity`` optional, a
non-negative integer); it is kept that long (0 or absent: not kept), never past a
bearer token's expiry.  Anything else, or no answer within
``authorization_timeout``, is a failure: the request is refused (503), never let
through.

What is decided, and at which level (``target_of``, pure, table-tested):

* everything naming a study is decided **at study level**, once per study and
  principal: DICOMweb paths under ``/studies/{uid}``, WADO-URI's ``studyUID``, and
  Orthanc REST ``/studies|series|instances/{orthanc-id}/…``, whose study is resolved
  first (from the store, else by asking Orthanc for ``…/study``; never by
  downloading the instance), so the service gets both the UID and the Orthanc ID;
* a QIDO-RS search is **filtered**: its answer is asked of Orthanc as usual, then
  each result is kept only if the service grants its study (``0020000D`` of the
  result; a result without one is dropped), one decision per distinct study,
  kept like any other.  A search under ``/studies/{uid}/…`` is also decided on
  that study first (403 when denied).  A search naming a denied study thus
  answers ``[]``, exactly as if the study did not exist, and a search of every
  study lists only the granted ones.  (Paging with ``limit``/``offset`` counts the
  results before filtering, so a page can be shorter than ``limit``.)  At most
  :data:`MAX_SEARCH_STUDIES` distinct studies are checked for one answer; a larger
  answer is refused (400: narrow the search);
* every other viewer resource naming no single study (``/patients/{id}``, Orthanc's
  lists) is a ``system`` decision on its path, as the plugin makes it;
* WADO-URI without ``studyUID`` (which PS3.18 requires anyway) is refused with 400.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from dicomcache.cache.store import AsyncStore
from dicomcache.config import AuthSettings
from dicomcache.dicom.uids import is_orthanc_id, is_uid
from dicomcache.errors import NotFoundUpstream
from dicomcache.http.bearer import read_limited
from dicomcache.principal import Principal
from dicomcache.singleflight import SingleFlight
from dicomcache.upstream.client import OrthancClient

log = logging.getLogger(__name__)

#: Longest a decision is kept, whatever the service says (seconds).
MAX_VALIDITY = 3600
#: Decisions and resolved studies kept at most (least recently used dropped first).
MAX_DECISIONS = 10000
MAX_RESOLVED = 10000
#: Most bytes read from the service's answer.
MAX_ANSWER = 64 << 10
#: Distinct studies of one search answer checked at most, and asked at once.
MAX_SEARCH_STUDIES = 1000
SEARCH_PARALLEL = 8
#: The StudyInstanceUID tag in a DICOM JSON result.
_STUDY_TAG = "0020000D"
_ORTHANC_LEVELS = {"studies": "studies", "series": "series", "instances": "instances"}


class AuthorizationUnavailable(Exception):
    """The service could not be asked or answered nonsense: the request is refused."""


class Refused(Exception):
    """The request cannot be decided as asked (400): the message says what is missing."""


@dataclass(frozen=True, slots=True)
class Target:
    """What the service decides on: a study (by UID) or a system resource (by path)."""

    level: str
    dicom_uid: str = ""
    orthanc_id: str = ""
    uri: str = ""

    @property
    def key(self) -> str:
        return f"study:{self.dicom_uid}" if self.level == "study" else f"system:{self.uri}"


#: ``Target.level`` of a QIDO-RS search answered whole and then filtered per study.
SEARCH = "search"


@dataclass(frozen=True, slots=True)
class Lookup:
    """An Orthanc resource (``studies``, ``series``, ``instances``) whose study must be
    resolved before the decision."""

    kind: str
    orthanc_id: str


# --- pure decisions ---------------------------------------------------------------------

def target_of(path: str, query: Mapping[str, str] | None = None,
              match: Mapping[str, str] | None = None) -> Target | Lookup:
    """What a viewer request (``GET``/``HEAD``) is decided on (see the module docstring).

    ``match`` holds the route's identifiers (``study``), already checked by the
    router's pattern; ``query`` the query arguments.  :class:`Refused` for a WADO-URI
    request without ``studyUID``.
    """
    query = query or {}
    match = match or {}
    study = match.get("study")
    if study is not None and is_uid(study):
        return Target("study", dicom_uid=study)
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["dicom-web", "studies"] and len(parts) >= 3 and is_uid(parts[2]):
        return Target("study", dicom_uid=parts[2])
    if parts[:1] == ["dicom-web"] and len(parts) == 2 and parts[1] in (
            "studies", "series", "instances"):
        return Target(SEARCH, uri=path)  # decided per result (study_of_result)
    if parts == ["wado"]:
        uid = query.get("studyUID")
        if uid is None or not is_uid(uid):
            raise Refused("WADO-URI needs a valid studyUID when per-study authorization is on")
        return Target("study", dicom_uid=uid)
    if len(parts) >= 2 and parts[0] in _ORTHANC_LEVELS and is_orthanc_id(parts[1]):
        return Lookup(_ORTHANC_LEVELS[parts[0]], parts[1])
    return Target("system", uri=path)


def study_of_result(result: Any) -> str | None:
    """The StudyInstanceUID of one QIDO-RS result (DICOM JSON), or ``None`` when it has
    no valid one (such a result is dropped: deny by default)."""
    if not isinstance(result, dict):
        return None
    element = result.get(_STUDY_TAG)
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or len(values) != 1:
        return None
    uid = values[0]
    return uid if isinstance(uid, str) and is_uid(uid) else None


def token_of(principal: Principal) -> tuple[str, str]:
    """``token-key`` and ``token-value``: the bearer header as received, else the user."""
    if principal.method == "bearer" and principal.token:
        return "Authorization", f"Bearer {principal.token}"
    return "dicomcache-user", principal.name


def payload(target: Target, principal: Principal, server_id: str | None) -> dict[str, Any]:
    """The request body, as the Orthanc authorization plugin builds it (module docstring)."""
    body: dict[str, Any] = {"method": "get", "level": target.level}
    if target.level == "system":
        body["uri"] = target.uri
    else:
        body["orthanc-id"] = target.orthanc_id
        body["dicom-uid"] = target.dicom_uid
    body["token-key"], body["token-value"] = token_of(principal)
    body["server-id"] = server_id
    body["user"] = principal.name
    body["role"] = principal.role
    return body


def parse_decision(data: bytes) -> tuple[bool, int]:
    """``(granted, validity)`` from the service's answer; ``ValueError`` if malformed
    (the plugin's own checks: an object, ``granted`` a boolean, ``validity`` a
    non-negative integer when present)."""
    answer = json.loads(data)
    if not isinstance(answer, dict) or not isinstance(answer.get("granted"), bool):
        raise ValueError("the answer has no boolean \"granted\"")
    validity = answer.get("validity", 0)
    if isinstance(validity, bool) or not isinstance(validity, int) or validity < 0:
        raise ValueError("\"validity\" is not a non-negative integer")
    return answer["granted"], min(validity, MAX_VALIDITY)


def principal_key(principal: Principal) -> str:
    """Whose decision it is: a token's (decisions may depend on its claims) or a user's.
    A token is kept only as its digest."""
    if principal.method == "bearer" and principal.token:
        return "token:" + hashlib.sha256(principal.token.encode()).hexdigest()
    return f"{principal.method}:{principal.name}"


# --- the service ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Decision:
    granted: bool
    target: Target
    expires: float  # monotonic


class Authorizer:
    """Decisions of the authorization service, kept as long as it says; studies of
    Orthanc resources, resolved once (an Orthanc ID never changes study)."""

    def __init__(self, settings: AuthSettings, session: aiohttp.ClientSession,
                 client: OrthancClient, store: AsyncStore) -> None:
        assert settings.authorization_url is not None
        self.settings = settings
        self.url = settings.authorization_url
        self.session = session
        self.client = client
        self.store = store
        self._decisions: dict[tuple[str, str], Decision] = {}
        self._resolved: dict[tuple[str, str], Target] = {}
        self._flights: SingleFlight[Decision] = SingleFlight()
        self._resolving: SingleFlight[Target] = SingleFlight()

    async def decide(self, principal: Principal, target: Target | Lookup,
                     token_expires: float | None = None) -> Decision:
        """The service's decision for ``principal`` on ``target`` (kept or asked).

        Raises :class:`AuthorizationUnavailable` (fail closed), and for a
        :class:`Lookup`, :class:`NotFoundUpstream`/:class:`UpstreamError` from Orthanc.
        """
        if isinstance(target, Lookup):
            target = await self.resolve(target)
        key = (principal_key(principal), target.key)
        kept = self._decisions.get(key)
        if kept is not None and kept.expires > time.monotonic():
            return kept
        return await self._flights.run(key, lambda: self._ask(key, principal, target,
                                                               token_expires))

    async def _ask(self, key: tuple[str, str], principal: Principal, target: Target,
                   token_expires: float | None) -> Decision:
        body = payload(target, principal, self.settings.authorization_server_id)
        try:
            async with asyncio.timeout(self.settings.authorization_timeout):
                async with self.session.post(self.url, json=body,
                                             allow_redirects=False) as resp:
                    if resp.status != 200:
                        raise ValueError(f"it answered HTTP {resp.status}")
                    data = await read_limited(resp, MAX_ANSWER)
            granted, validity = parse_decision(data)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {self.settings.authorization_timeout:g} s"
            log.warning("authorization service %s: %s", self.url, reason)
            raise AuthorizationUnavailable(reason) from None
        now = time.monotonic()
        expires = now + validity
        if token_expires is not None:  # never past the token's own end
            expires = min(expires, now + max(0.0, token_expires - time.time()))
        decision = Decision(granted, target, expires)
        if validity > 0:
            self._keep(self._decisions, key, decision, MAX_DECISIONS)
        return decision

    async def granted_studies(self, principal: Principal, studies: set[str],
                              token_expires: float | None = None) -> set[str]:
        """Which of ``studies`` (of one search answer) the service grants ``principal``.

        Raises :class:`Refused` past :data:`MAX_SEARCH_STUDIES`, and
        :class:`AuthorizationUnavailable` when any decision cannot be had (the whole
        answer is refused then, never partly shown).
        """
        if len(studies) > MAX_SEARCH_STUDIES:
            raise Refused(f"the search found {len(studies)} studies; per-study "
                          f"authorization checks at most {MAX_SEARCH_STUDIES}: narrow it "
                          "(limit, dates, patient)")
        gate = asyncio.Semaphore(SEARCH_PARALLEL)

        async def one(uid: str) -> tuple[str, bool]:
            async with gate:
                decision = await self.decide(principal, Target("study", dicom_uid=uid),
                                             token_expires)
            return uid, decision.granted

        answers = await asyncio.gather(*(one(uid) for uid in sorted(studies)))
        return {uid for uid, granted in answers if granted}

    async def resolve(self, lookup: Lookup) -> Target:
        """The study of an Orthanc resource, as a study target with both identifiers."""
        key = (lookup.kind, lookup.orthanc_id)
        known = self._resolved.get(key)
        if known is not None:
            return known
        if lookup.kind == "instances":
            entry = self.store.sync.peek(lookup.orthanc_id)
            if entry is not None and entry.study_uid and is_uid(entry.study_uid):
                target = Target("study", dicom_uid=entry.study_uid)
                return target  # the store knows it: no request, nothing to keep
        return await self._resolving.run(key, lambda: self._resolve(key, lookup))

    async def _resolve(self, key: tuple[str, str], lookup: Lookup) -> Target:
        path = (f"/studies/{lookup.orthanc_id}" if lookup.kind == "studies"
                else f"/{lookup.kind}/{lookup.orthanc_id}/study")
        answer = await self.client.get_json(path, kind="listing")
        tags = answer.get("MainDicomTags") if isinstance(answer, dict) else None
        uid = tags.get("StudyInstanceUID") if isinstance(tags, dict) else None
        oid = answer.get("ID") if isinstance(answer, dict) else None
        if not isinstance(uid, str) or not is_uid(uid):
            raise NotFoundUpstream(404, f"GET {path}: no StudyInstanceUID in Orthanc's answer")
        target = Target("study", dicom_uid=uid,
                        orthanc_id=oid if isinstance(oid, str) and is_orthanc_id(oid) else "")
        self._keep(self._resolved, key, target, MAX_RESOLVED)
        return target

    @staticmethod
    def _keep(table: dict[Any, Any], key: Any, value: Any, bound: int) -> None:
        table.pop(key, None)
        table[key] = value
        while len(table) > bound:
            del table[next(iter(table))]

