"""Who may do what on the HTTP side: authentication, roles, per-study decisions.

Every request passes :func:`guard` (a middleware after the CORS preflights, which
are answered without credentials, and after the canonical-path redirect):

1. :func:`required_role` (pure, table-tested) says what the route needs:
   nothing (``/healthz``, ``/readyz``: load balancers), ``viewer`` (patient data:
   instances, metadata, frames, rendered, QIDO, the read-only Orthanc REST JSON) or
   ``admin`` (the status page, ``/status.json``, ``/metrics``, anything else, any
   write).  A route this module does not know needs ``admin``: deny by default.
2. :class:`Authenticator` finds the principal: ``ANONYMOUS`` with ``mode = "none"``;
   a user of the users file (``basic``; argon2id in a worker thread, a successful
   check kept a minute under a keyed digest of the header, so a study load of
   hundreds of requests costs one argon2 run); or a verified access token
   (``bearer``, :mod:`.bearer`).  Failures answer 401 with the right
   ``WWW-Authenticate``; an address with repeated failures waits (:class:`Backoff`,
   429 + ``Retry-After``).  Credentials are never logged, kept or echoed.
3. With ``authorization_url``, viewer requests are decided per study by the
   authorization service (:mod:`.authz`): 403 when denied, 503 when it cannot say;
   a QIDO-RS answer keeps only the results of granted studies
   (:meth:`Authenticator.filter_search`).

The principal is left on the request (``request[PRINCIPAL]``) for handlers, the audit
trail and the prefetcher, which prefetches only for requests that passed, and at
most ``prefetch.max_studies_per_principal`` studies per principal and window
(:func:`may_prefetch`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import hdrs, web

from dicomcache import tls
from dicomcache.config import AuthSettings, Settings, exposure_problem
from dicomcache.dicom.accept import accepts_json
from dicomcache.errors import NotFoundUpstream, UpstreamError
from dicomcache.http import bearer, users
from dicomcache.http.authz import (
    SEARCH,
    AuthorizationUnavailable,
    Authorizer,
    Lookup,
    Refused,
    study_of_result,
    target_of,
)
from dicomcache.http.keys import CLIENT, PRINCIPAL, RELOADERS, SETTINGS, STORE
from dicomcache.http.middleware import error_answer
from dicomcache.http.passthrough import denial
from dicomcache.http.respond import json_error
from dicomcache.prefetch.budget import PrincipalBudget
from dicomcache.principal import ADMIN, ANONYMOUS, VIEWER, Principal

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# --- which route needs which role (pure) ----------------------------------------------------

#: The catch-all read-through (:mod:`.passthrough`): its role depends on the path.
PASSTHROUGH = "/{tail}"
#: Routes (aiohttp resource patterns) and the role they need; ``None``: open to all.
#: DICOMweb routes (``/dicom-web/…``) need ``viewer``; any other route, ``admin``.
ROUTE_ROLES: dict[str, str | None] = {
    "/healthz": None,
    "/readyz": None,
    "/": ADMIN,
    "/status.json": ADMIN,
    "/metrics": ADMIN,
    "/instances/{id}/file": VIEWER,
    "/wado": VIEWER,
}
READS = ("GET", "HEAD")
#: QIDO-RS routes: their answers are filtered per study by the authorization service.
SEARCH_ROUTES = frozenset({
    "/dicom-web/studies", "/dicom-web/series", "/dicom-web/instances",
    "/dicom-web/studies/{study}/series", "/dicom-web/studies/{study}/instances",
    "/dicom-web/studies/{study}/series/{series}/instances"})


def required_role(method: str, path: str, route: str | None) -> str | None:
    """The role a request needs (``viewer``, ``admin``), or ``None`` when it is open.

    ``route`` is the pattern of the aiohttp resource that matched (``None`` if none
    did).  Writes always need ``admin`` (they also stay closed unless ``[access]
    allow`` opens them); so does any route not listed here.
    """
    if route is not None and route in ROUTE_ROLES and ROUTE_ROLES[route] is None:
        return None if method in READS else ADMIN
    if method not in READS:
        return ADMIN
    if route == PASSTHROUGH:
        # What viewers read through (the read-through allow-list: one resource of one
        # patient, DICOMweb, WADO-URI) is viewer data; anything ``[access] allow``
        # opens beyond it (/system, /changes, /tools/…, listings of everyone) is admin's.
        return VIEWER if denial("GET", path, ()) is None else ADMIN
    if route is not None and route.startswith("/dicom-web/"):
        return VIEWER
    if route is None:
        return ADMIN
    return ROUTE_ROLES.get(route, ADMIN)


def route_of(request: web.Request) -> str | None:
    """The pattern of the resource that matched ``request`` (``None``: none did)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


# --- brute force (pure, time injected) ------------------------------------------------------

def client_key(remote: str | None) -> str:
    """Whom failures are counted against: an IPv4 address, or an IPv6 /64 (one host
    commonly holds a whole /64, so counting single IPv6 addresses bounds nothing)."""
    if not remote:
        return "local"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@dataclass(slots=True)
class _Tally:
    failures: int = 0
    until: float = 0.0
    last: float = 0.0


class Backoff:
    """Failed attempts per client: after ``free`` failures each further one makes the
    client wait ``1, 2, 4 … max_delay`` seconds before it may try again.

    A client quiet for ``forget_after`` seconds starts afresh.  At most ``capacity``
    clients are remembered (the least recently failing are forgotten first), so an
    attacker's many addresses bound the memory, not the table.
    """

    def __init__(self, free: int, max_delay: float, *, capacity: int = 10000,
                 forget_after: float | None = None) -> None:
        self.free = free
        self.max_delay = max_delay
        self.capacity = capacity
        self.forget_after = forget_after if forget_after is not None else max(900.0,
                                                                              2 * max_delay)
        self._table: OrderedDict[str, _Tally] = OrderedDict()

    def wait(self, key: str, now: float) -> float:
        """Seconds ``key`` must wait before a new check (0: it may try now)."""
        tally = self._table.get(key)
        if tally is None:
            return 0.0
        if now - tally.last > self.forget_after:
            del self._table[key]
            return 0.0
        return max(0.0, tally.until - now)

    def failed(self, key: str, now: float) -> float:
        """Record a failure of ``key``; the wait it now has (0 while within ``free``)."""
        tally = self._table.pop(key, None)
        if tally is None or now - tally.last > self.forget_after:
            tally = _Tally()
        self._table[key] = tally
        while len(self._table) > self.capacity:
            self._table.popitem(last=False)
        tally.failures += 1
        tally.last = now
        over = tally.failures - self.free
        if over >= 0:
            tally.until = now + min(self.max_delay, 2.0 ** min(over, 32))
        return max(0.0, tally.until - now)

    def __len__(self) -> int:
        return len(self._table)


class _Expiring:
    """A bounded map whose entries expire (monotonic time), least recently set dropped."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, tuple[float, Any]] = OrderedDict()

    def get(self, key: bytes, now: float) -> Any:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._items[key]
            return None
        return item[1]

    def put(self, key: bytes, value: Any, expires: float) -> None:
        self._items.pop(key, None)
        self._items[key] = (expires, value)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


# --- answers ---------------------------------------------------------------------------------

def _quoted(text: str) -> str:
    """An RFC 7235 quoted-string of plain text (no quotes, backslashes or controls)."""
    return '"' + "".join(c for c in text if 0x20 <= ord(c) < 0x7f and c not in '"\\') + '"'


def challenge(settings: AuthSettings, error: str | None = None,
              description: str | None = None) -> str:
    """The ``WWW-Authenticate`` value for the configured mode (RFC 7617, RFC 6750 §3)."""
    if settings.mode == "basic":
        return f"Basic realm={_quoted(settings.realm)}, charset=\"UTF-8\""
    value = f"Bearer realm={_quoted(settings.realm)}"
    if error:
        value += f", error={_quoted(error)}"
        if description:
            value += f", error_description={_quoted(description)}"
    return value


@dataclass(frozen=True, slots=True)
class Failure:
    """Why credentials were not accepted: the answer's status and words, and whether it
    counts as a guess for :class:`Backoff`."""

    status: int
    reason: str
    counts: bool
    error: str | None = "invalid_token"
    #: Kept as a known-bad header for a while (not for "cannot check now" failures).
    remember: bool = True
    #: Seconds to wait (429 only).
    retry_after: float = 0.0


def failure_answer(settings: AuthSettings, failure: Failure) -> web.Response:
    if failure.status == 429:
        return too_many(failure.retry_after)
    if failure.status == 503:
        response = json_error(503, "authentication unavailable", failure.reason)
        response.headers[hdrs.RETRY_AFTER] = "10"
        return response
    title = "forbidden" if failure.status == 403 else "unauthorized"
    response = json_error(failure.status, title, failure.reason)
    response.headers[hdrs.WWW_AUTHENTICATE] = challenge(settings, failure.error, failure.reason)
    return response


def too_many(wait: float) -> web.Response:
    seconds = max(1, math.ceil(wait))
    response = json_error(429, "too many requests",
                          "too many failed authentication attempts from this address; "
                          f"retry in {seconds} s", retry_after=seconds)
    response.headers[hdrs.RETRY_AFTER] = str(seconds)
    return response


MISSING = "credentials are required"


# --- the authenticator ----------------------------------------------------------------------

#: A successful check is trusted this long without a new one (seconds).
VERIFIED_FOR = 60.0
#: A failed header is answered without a new check this long (seconds).
REJECTED_FOR = 60.0
#: Headers remembered (verified or rejected) at most.
MAX_REMEMBERED = 4096
#: argon2 runs at once (each takes ~0.1 s of a core and 64 MiB), and waiting at most.
ARGON2_PARALLEL = 2
ARGON2_QUEUE = 32
#: The users file is looked at this often for changes (seconds); SIGHUP: at once.
USERS_POLL = 2.0
#: Who reaches an open route (``/healthz``) without authentication.
UNAUTHENTICATED = Principal("unauthenticated", VIEWER, "none")


@dataclass(frozen=True, slots=True)
class Verified:
    principal: Principal
    #: The token's ``exp`` (epoch seconds) for a bearer principal.
    expires: float | None = None
    generation: int = 0


class UsersFile:
    """The users of ``[auth] users_file``, reloaded when the file changes or on SIGHUP.

    A file that becomes unreadable or malformed is reported and the last good users
    are kept (``dicomcache users`` writes atomically, so this is a hand edit gone
    wrong); ``generation`` counts reloads so earlier verifications can be dropped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.users: dict[str, users.User] = {}
        self.generation = 0
        self.error: str | None = None
        self._signature: tuple[int, int, int, int] | None = None

    async def load(self) -> bool:
        """(Re)read the file; True when the users changed."""
        sig = await asyncio.to_thread(users.signature, self.path)
        try:
            loaded = await asyncio.to_thread(users.read, self.path)
        except users.UsersFileError as exc:
            if str(exc) != self.error:
                log.error("auth: %s; keeping the %d user(s) loaded before", exc,
                          len(self.users))
            self.error = str(exc)
            self._signature = sig
            return False
        self.error = None
        self._signature = sig
        if loaded == self.users and self.generation:
            return False
        self.users = loaded
        self.generation += 1
        log.info("auth: %d user(s) from %s", len(loaded), self.path)
        return True

    async def changed(self) -> bool:
        return await asyncio.to_thread(users.signature, self.path) != self._signature


class Authenticator:
    """Finds the principal of a request; keeps what makes repeated checks cheap."""

    def __init__(self, settings: AuthSettings, *, users_file: UsersFile | None = None,
                 keys: bearer.KeySet | None = None,
                 authorizer: Authorizer | None = None) -> None:
        self.settings = settings
        self.users_file = users_file
        self.keys = keys
        self.authorizer = authorizer
        self.backoff = Backoff(settings.max_failures, settings.max_delay)
        self._secret = secrets.token_bytes(32)  # the digest key: never a password, never stored
        self._verified = _Expiring(MAX_REMEMBERED)
        self._rejected = _Expiring(MAX_REMEMBERED)
        self._flights: dict[bytes, asyncio.Future[Verified | Failure]] = {}
        self._argon2 = asyncio.Semaphore(ARGON2_PARALLEL)
        self._argon2_waiting = 0
        self.argon2_runs = 0  # observed by tests: a study load costs one

    def forget(self) -> None:
        """Drop every remembered check (the users changed)."""
        self._verified.clear()
        self._rejected.clear()

    async def authenticate(self, request: web.Request) -> Verified | web.Response:
        """The request's principal, or the answer refusing it."""
        settings = self.settings
        if settings.mode == "none":
            return Verified(ANONYMOUS)
        header = request.headers.get(hdrs.AUTHORIZATION, "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != settings.mode or not credentials.strip():
            return failure_answer(settings, Failure(401, MISSING, counts=False, error=None))
        digest = hmac.digest(self._secret, header.encode("utf-8", "surrogateescape"), "sha256")
        now = time.monotonic()
        known = self._verified.get(digest, now)
        generation = self.users_file.generation if self.users_file else 0
        if isinstance(known, Verified) and known.generation == generation:
            return known
        rejected = self._rejected.get(digest, now)
        if isinstance(rejected, Failure):
            return failure_answer(settings, rejected)
        address = client_key(request.remote)
        wait = self.backoff.wait(address, now)
        if wait > 0:
            return too_many(wait)
        flight = self._flights.get(digest)
        if flight is None:  # one check however many requests carry the same header
            flight = asyncio.ensure_future(self._check(credentials.strip(), digest, address))
            self._flights[digest] = flight
            flight.add_done_callback(lambda _f: self._flights.pop(digest, None))
        outcome = await asyncio.shield(flight)
        if isinstance(outcome, Failure):
            return failure_answer(settings, outcome)
        return outcome

    async def _check(self, credentials: str, digest: bytes, address: str) -> Verified | Failure:
        if self.settings.mode == "basic":
            outcome = await self._check_basic(credentials, address)
        else:
            outcome = await self._check_bearer(credentials)
        now = time.monotonic()
        if isinstance(outcome, Verified):
            expires = now + VERIFIED_FOR
            if outcome.expires is not None:
                expires = min(expires, now + outcome.expires - time.time())
            self._verified.put(digest, outcome, expires)
            return outcome
        if outcome.counts:
            wait = self.backoff.failed(address, now)
            if wait > 0:
                log.warning("auth: %s must wait %.0f s after repeated failed "
                            "authentications", address, wait)
        if outcome.remember:
            self._rejected.put(digest, outcome, now + REJECTED_FOR)
        return outcome

    async def _check_basic(self, credentials: str, address: str) -> Verified | Failure:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return Failure(401, "malformed Basic credentials", counts=True)
        name, colon, password = decoded.partition(":")
        if not colon:
            return Failure(401, "malformed Basic credentials", counts=True)
        assert self.users_file is not None
        generation = self.users_file.generation
        user = self.users_file.users.get(name)
        if self._argon2_waiting >= ARGON2_QUEUE:
            return Failure(503, "too many logins at once; retry shortly", counts=False,
                           remember=False)
        self._argon2_waiting += 1
        try:
            async with self._argon2:
                # Guesses queued while this address fell into back-off wait like new ones:
                # parallel requests do not buy an attacker extra tries.
                wait = self.backoff.wait(address, time.monotonic())
                if wait > 0:
                    return Failure(429, "back-off", counts=False, remember=False,
                                   retry_after=wait)
                self.argon2_runs += 1
                ok = await asyncio.to_thread(users.verify_password, user, password)
        finally:
            self._argon2_waiting -= 1
        if not ok or user is None:
            # A name typed into the password field must not reach the log: unknown
            # names are not printed.
            log.info("auth: failed login for %s", repr(name) if user else "an unknown user")
            return Failure(401, "invalid user name or password", counts=True)
        return Verified(Principal(user.name, user.role, "basic"), generation=generation)

    async def _check_bearer(self, token: str) -> Verified | Failure:
        assert self.keys is not None
        settings = self.settings
        try:
            header = bearer.split_token(token)
            bearer.acceptable_alg(header, None, settings.algorithms)  # before any fetch
            kid = header.get("kid")
            key = await self.keys.key(kid if isinstance(kid, str) else None)
            if key is None:
                raise bearer.TokenRejected("the token is signed by an unknown key",
                                           counts=False)
            alg = bearer.acceptable_alg(header, key, settings.algorithms)
            claims = bearer.verify(token, key, alg, settings)
            principal = bearer.principal_of(claims, token, settings)
        except bearer.KeysUnavailable as exc:
            log.warning("auth: bearer token not checked: %s", exc)
            return Failure(503, "the identity provider's signing keys are not available yet",
                           counts=False, remember=False)
        except bearer.TokenRejected as exc:
            log.info("auth: bearer token refused: %s", exc.description)
            status = 403 if exc.error == "insufficient_scope" else 401
            # Only a forgery stays refused for a while: a token not valid *yet*, or signed
            # by a key published a moment from now (rotation), may pass soon.
            return Failure(status, exc.description, counts=exc.counts, error=exc.error,
                           remember=exc.counts)
        return Verified(principal, expires=float(claims["exp"]))

    # per-study decisions
    async def authorize(self, request: web.Request, verified: Verified) -> web.Response | None:
        """``None`` when the authorization service grants the request, else the answer.

        A search (QIDO-RS at the top level) is not decided here but per result
        (:meth:`filter_search`).
        """
        assert self.authorizer is not None
        principal = verified.principal
        try:
            target = target_of(request.path, request.query, request.match_info)
            if not isinstance(target, Lookup) and target.level == SEARCH:
                return None
            decision = await self.authorizer.decide(principal, target, verified.expires)
        except Refused as exc:
            return json_error(400, "bad request", str(exc))
        except AuthorizationUnavailable:  # the cause is logged by the authorizer
            return _undecided()
        except (UpstreamError, NotFoundUpstream) as exc:
            return error_answer(exc)
        if not decision.granted:
            what = (f"study {decision.target.dicom_uid}" if decision.target.level == "study"
                    else decision.target.uri)
            log.info("auth: %s denied %s by the authorization service", principal.name, what)
            return json_error(403, "forbidden",
                              f"access to {what} is not granted to {principal.name}")
        if decision.target.level == "study":
            request[AUTHORIZED_STUDY] = decision.target.dicom_uid
        return None

    async def filter_search(self, request: web.Request, verified: Verified,
                            answer: web.StreamResponse) -> web.StreamResponse:
        """A QIDO-RS answer with only the results whose study the service grants.

        The answer was asked without ``If-None-Match`` and ``Accept-Encoding`` (so it
        is whole, plain JSON); the filtered one gets an ``ETag`` of its own.  Errors
        pass unchanged; an answer that cannot be read as a JSON list is refused (502),
        never passed on unfiltered.
        """
        assert self.authorizer is not None
        if answer.status >= 300 or answer.status == 204:
            return answer
        body = answer.body if isinstance(answer, web.Response) else None
        try:
            if not isinstance(body, bytes):
                raise ValueError("not a whole answer")
            results = json.loads(body)
            if not isinstance(results, list):
                raise ValueError("not a JSON list")
        except ValueError:
            return json_error(502, "bad gateway", "the search answer could not be checked "
                                                  "against the authorization service")
        studies = {study_of_result(r) for r in results}
        studies.discard(None)
        try:
            granted = await self.authorizer.granted_studies(
                verified.principal, {s for s in studies if s is not None}, verified.expires)
        except Refused as exc:
            return json_error(400, "bad request", str(exc))
        except AuthorizationUnavailable:
            return _undecided()
        kept = [r for r in results if study_of_result(r) in granted]
        filtered = json.dumps(kept, separators=(",", ":")).encode()
        etag = '"q-' + hashlib.sha256(filtered).hexdigest()[:32] + '"'
        headers = {hdrs.CACHE_CONTROL: "private, no-cache", hdrs.ETAG: etag}
        if etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
            return web.Response(status=304, headers=headers)
        headers[hdrs.CONTENT_TYPE] = answer.headers.get(hdrs.CONTENT_TYPE,
                                                        "application/dicom+json")
        return web.Response(body=filtered, headers=headers)

    def status(self, settings: Settings) -> dict[str, Any]:
        # Whether "none" would have been refused without allow_anonymous_network.
        strict = dataclasses.replace(self.settings, allow_anonymous_network=False)
        out: dict[str, Any] = {
            "mode": self.settings.mode,
            "anonymous_network": exposure_problem(settings.server, strict) is not None,
            "authorization": self.settings.authorization_url is not None,
            "failing_addresses": len(self.backoff),
        }
        if self.users_file is not None:
            out["users"] = len(self.users_file.users)
            out["users_error"] = self.users_file.error
        if self.keys is not None:
            out["keys"] = self.keys.status()
        return out


AUTH = web.AppKey("authenticator", Authenticator)
BUDGET = web.AppKey("prefetch_budget", PrincipalBudget)
#: Set when every check passed; the study granted by the authorization service, if any.
AUTHORIZED = web.RequestKey("authorized", bool)
AUTHORIZED_STUDY = web.RequestKey("authorized_study", str)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate, check the role, ask the authorization service; then the handler.

    ``request[PRINCIPAL]`` is set on every request, refused ones included (then
    ``UNAUTHENTICATED``), so whatever runs around this middleware knows who asked.
    """
    auth = request.app[AUTH]
    route = route_of(request)
    role = required_role(request.method, request.path, route)
    if role is None:
        request[PRINCIPAL] = ANONYMOUS if auth.settings.mode == "none" else UNAUTHENTICATED
        return await handler(request)
    request[PRINCIPAL] = UNAUTHENTICATED
    verified = await auth.authenticate(request)
    if isinstance(verified, web.StreamResponse):
        return verified
    principal = verified.principal
    request[PRINCIPAL] = principal
    if not principal.may(role):
        reason = f"{request.path} needs the {role} role; {principal.name} is a {principal.role}"
        response = json_error(403, "forbidden", reason)
        if auth.settings.mode == "bearer":
            response.headers[hdrs.WWW_AUTHENTICATE] = challenge(
                auth.settings, "insufficient_scope", reason)
        return response
    search = role == VIEWER and auth.authorizer is not None and route in SEARCH_ROUTES
    if role == VIEWER and auth.authorizer is not None:
        refused = await auth.authorize(request, verified)
        if refused is not None:
            return refused
        if search and not accepts_json(request.headers.get(hdrs.ACCEPT)):
            return json_error(406, "not acceptable",
                              "with per-study authorization, searches are answered in "
                              "JSON only (Accept: application/dicom+json)")
    request[AUTHORIZED] = True
    if not search:
        return await handler(request)
    # The whole plain answer, filtered afterwards (a conditional or gzipped one could
    # not be filtered).
    headers = request.headers.copy()
    for name in (hdrs.IF_NONE_MATCH, hdrs.IF_MODIFIED_SINCE, hdrs.ACCEPT_ENCODING):
        headers.popall(name, None)
    answer = await handler(request.clone(headers=headers))
    return await auth.filter_search(request, verified, answer)


def _undecided() -> web.Response:
    response = json_error(503, "authorization unavailable",
                          "the authorization service cannot decide; access is refused "
                          "until it can")
    response.headers[hdrs.RETRY_AFTER] = "5"
    return response


def may_prefetch(request: web.Request, study: str) -> bool:
    """Whether a touch of ``study`` by this request may start or steer a prefetch: it
    passed every check (and the service granted this very study), and its principal
    is within its budget of distinct studies."""
    if not request.get(AUTHORIZED):
        return False
    auth = request.app.get(AUTH)
    if auth is not None and auth.authorizer is not None \
            and request.get(AUTHORIZED_STUDY) != study:
        return False
    principal = request.get(PRINCIPAL)
    budget = request.app.get(BUDGET)
    if principal is None or budget is None:
        return False
    who = f"{principal.method}:{principal.name}"
    if principal.method == "none":  # no accounts: each client address is one principal
        who = f"none:{client_key(request.remote)}"
    return budget.allow(who, study, time.monotonic())


# --- lifecycle ------------------------------------------------------------------------------

def setup(app: web.Application) -> None:
    """The authenticator as a long-lived resource (after the store and upstream)."""
    app.cleanup_ctx.append(_auth_ctx)


async def _auth_ctx(app: web.Application) -> AsyncIterator[None]:
    settings: Settings = app[SETTINGS]
    auth_settings = settings.auth
    prefetch = settings.prefetch
    app[BUDGET] = PrincipalBudget(prefetch.max_studies_per_principal, prefetch.principal_window)
    needs_session = auth_settings.mode == "bearer" or auth_settings.authorization_url
    session = None
    if needs_session:  # the house TLS policy; reading the system CAs is file I/O
        ssl_context = await asyncio.to_thread(tls.client_context)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=16),
            timeout=aiohttp.ClientTimeout(total=max(bearer.FETCH_TIMEOUT,
                                                    auth_settings.authorization_timeout)),
            trust_env=False)
    users_file = keys = authorizer = None
    tasks: list[asyncio.Task[None]] = []
    try:
        if auth_settings.mode == "basic":
            assert auth_settings.users_file is not None
            users_file = UsersFile(auth_settings.users_file)
            await users_file.load()
            if users_file.error is not None:
                raise RuntimeError(users_file.error)
        if auth_settings.mode == "bearer":
            assert session is not None
            keys = bearer.KeySet(auth_settings, session,
                                 settings.cache.directory / "auth-jwks.json")
            await keys.start()
        if auth_settings.authorization_url:
            assert session is not None
            authorizer = Authorizer(auth_settings, session, app[CLIENT], app[STORE])
        auth = Authenticator(auth_settings, users_file=users_file, keys=keys,
                             authorizer=authorizer)
        app[AUTH] = auth
        if users_file is not None:
            reload_now = asyncio.Event()
            tasks.append(asyncio.create_task(_watch_users(auth, users_file, reload_now),
                                             name="auth users file"))

            async def reload_users() -> None:  # SIGHUP (http/listeners.py)
                reload_now.set()

            app.setdefault(RELOADERS, []).append(reload_users)
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if keys is not None:
            await keys.stop()
        if session is not None:
            await session.close()


async def _watch_users(auth: Authenticator, users_file: UsersFile,
                       reload_now: asyncio.Event) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(USERS_POLL):
                await reload_now.wait()
        forced = reload_now.is_set()
        reload_now.clear()
        try:
            if (forced or await users_file.changed()) and await users_file.load():
                auth.forget()
        except Exception:
            log.exception("auth: reloading %s failed", users_file.path)

