"""``[auth] mode = "bearer"``: OIDC/OAuth2 access tokens (JWT), as OHIF sends them.

A token is accepted when it is signed by one of the issuer's public keys (its JWKS)
with an allowed public-key algorithm, names the configured issuer and audience, is
within its validity (``exp``/``nbf``/``iat``, with a small leeway) and carries a role
claim value listed as viewer or admin.

The keys (:class:`KeySet`) are fetched from ``jwks_url`` or found by OIDC discovery,
kept in memory and on disk, refreshed hourly, and kept when the identity provider
cannot be reached: a WAN outage does not log the clinic out.  A token naming a key
not yet known causes at most one refetch a minute.  What is fetched is bounded.

The decisions (which keys are usable, which header is acceptable, which role a set of
claims gives) are pure functions, table-tested in ``tests/http/test_bearer.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuerError,
    MissingRequiredClaimError,
    PyJWTError,
)

from dicomcache.config import AuthSettings, is_loopback_host
from dicomcache.durable import write_durably
from dicomcache.principal import ADMIN, VIEWER, Principal
from dicomcache.singleflight import SingleFlight

log = logging.getLogger(__name__)

DISCOVERY = "/.well-known/openid-configuration"
#: Most bytes read from the identity provider in one answer (a JWKS is a few KiB).
MAX_DOCUMENT = 256 << 10
#: Most keys kept from a JWKS (providers publish two or three).
MAX_KEYS = 32
#: The keys are fetched again this often (seconds), whether or not a token asks.
REFRESH_EVERY = 3600.0
#: A token with an unknown key id makes at most one refetch per this many seconds.
REFETCH_AT_MOST_EVERY = 60.0
#: Seconds one fetch from the identity provider may take.
FETCH_TIMEOUT = 10.0
#: Longest token looked at (a header line is at most 8 KiB anyway).
MAX_TOKEN = 8192

#: The key type (and curve) each accepted algorithm needs.
_KEY_FOR_ALG: dict[str, tuple[str, str | None]] = {
    **{f"{family}{bits}": ("RSA", None) for family in ("RS", "PS") for bits in (256, 384, 512)},
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
_JWT_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
_NAME_RE = re.compile(r"^[\x21-\x7e]{1,256}$")


class TokenRejected(Exception):
    """A token that is not accepted: RFC 6750 ``error`` and a description for the client.

    ``counts``: whether this is a guess (bad signature, forged header, wrong
    audience) for the brute-force back-off; a token that merely aged (expired) or
    whose key is not known yet is not.
    """

    def __init__(self, description: str, *, counts: bool,
                 error: str = "invalid_token") -> None:
        super().__init__(description)
        self.description = description
        self.counts = counts
        self.error = error


class KeysUnavailable(Exception):
    """No signing key has ever been obtained: tokens cannot be checked (fail closed)."""


# --- pure decisions ---------------------------------------------------------------------

def usable_keys(jwks: Any) -> dict[str, dict[str, Any]]:
    """The signing keys of a JWKS document, by ``kid``: public, asymmetric, for signatures.

    Symmetric (``oct``) keys, private keys, encryption keys and keys without a
    ``kid`` are left out; so is anything past :data:`MAX_KEYS`.
    """
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        if not isinstance(key, dict) or len(out) >= MAX_KEYS:
            continue
        kid, kty = key.get("kid"), key.get("kty")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            continue
        if kty not in ("RSA", "EC", "OKP") or "d" in key:  # never symmetric, never private
            continue
        if key.get("use", "sig") != "sig":
            continue
        if "key_ops" in key and "verify" not in (key.get("key_ops") or []):
            continue
        out.setdefault(kid, key)
    return out


def acceptable_alg(header: Mapping[str, Any], key: Mapping[str, Any] | None,
                   allowed: tuple[str, ...]) -> str:
    """The token's ``alg`` if it is allowed and fits the key, else :class:`TokenRejected`.

    ``none`` and ``HS*`` are never allowed (config refuses them too); the key's own
    ``alg``, when it has one, must be the token's; the key's type (and curve) must be
    the one the algorithm needs, so an RSA key is never used as an HMAC secret.
    """
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed or alg not in _KEY_FOR_ALG:
        raise TokenRejected(f"signing algorithm {str(alg)[:20]!r} is not accepted", counts=True)
    if key is None:
        return alg
    kty, crv = _KEY_FOR_ALG[alg]
    if key.get("kty") != kty or (crv is not None and key.get("crv") != crv):
        raise TokenRejected(f"signing algorithm {alg} does not fit the key", counts=True)
    if "alg" in key and key["alg"] != alg:
        raise TokenRejected(f"the key is for {str(key['alg'])[:20]}, not {alg}", counts=True)
    return alg


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted claim path (``realm_access.roles``), or ``None``."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def role_of(claims: Mapping[str, Any], settings: AuthSettings) -> str | None:
    """The role a token's claims give: admin, viewer, or ``None`` (no dicomcache role)."""
    raw = claim_at(claims, settings.roles_claim)
    if isinstance(raw, str):
        values = set(raw.split())
    elif isinstance(raw, list):
        values = {v for v in raw if isinstance(v, str)}
    else:
        values = set()
    if values & set(settings.admin_roles):
        return ADMIN
    if "*" in settings.viewer_roles or values & set(settings.viewer_roles):
        return VIEWER
    return None


def principal_of(claims: Mapping[str, Any], token: str, settings: AuthSettings) -> Principal:
    """The principal of verified claims; :class:`TokenRejected` without a name or role."""
    name = claims.get(settings.name_claim)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TokenRejected(f"the token has no usable {settings.name_claim!r} claim",
                            counts=False)
    role = role_of(claims, settings)
    if role is None:
        raise TokenRejected(
            f"the token carries no dicomcache role in {settings.roles_claim!r}",
            counts=False, error="insufficient_scope")
    return Principal(name, role, "bearer", token)


def split_token(token: str) -> dict[str, Any]:
    """The unverified header of a compact JWS, or :class:`TokenRejected` (malformed)."""
    if len(token) > MAX_TOKEN or not _JWT_RE.match(token):
        raise TokenRejected("the bearer token is not a signed JWT", counts=True)
    try:
        header = jwt.get_unverified_header(token)
    except PyJWTError:
        raise TokenRejected("the bearer token is not a signed JWT", counts=True) from None
    return header


def verify(token: str, key: Mapping[str, Any], alg: str,
           settings: AuthSettings) -> dict[str, Any]:
    """The claims of ``token`` signed by ``key`` with ``alg``, every check made.

    Raises :class:`TokenRejected` naming the first check that failed.
    """
    try:
        pyjwk = jwt.PyJWK(dict(key), algorithm=alg)
        claims: dict[str, Any] = jwt.decode(
            token, key=pyjwk, algorithms=[alg], audience=settings.audience,
            issuer=settings.issuer, leeway=settings.leeway,
            options={"require": ["exp", "iss", "aud"]})
    except ExpiredSignatureError:
        raise TokenRejected("the token has expired", counts=False) from None
    except ImmatureSignatureError:
        raise TokenRejected("the token is not valid yet", counts=False) from None
    except InvalidAudienceError:
        raise TokenRejected("the token is for another audience", counts=True) from None
    except InvalidIssuerError:
        raise TokenRejected("the token is from another issuer", counts=True) from None
    except MissingRequiredClaimError as exc:
        raise TokenRejected(f"the token lacks the {exc.claim!r} claim", counts=True) from None
    except PyJWTError:
        # Bad signature, undecodable parts, unusable key: one message, no detail to probe.
        raise TokenRejected("the token signature does not verify", counts=True) from None
    return claims


def secure_url(url: str) -> bool:
    """https, or http towards this machine only (tests, a local identity provider)."""
    split = urlsplit(url)
    host = split.hostname
    return host is not None and (
        split.scheme == "https" or (split.scheme == "http" and is_loopback_host(host)))


# --- the key set --------------------------------------------------------------------------

@dataclass(slots=True)
class _Fetched:
    keys: dict[str, dict[str, Any]]
    document: dict[str, Any]


class KeySet:
    """The issuer's signing keys: fetched, refreshed, and kept across outages."""

    def __init__(self, settings: AuthSettings, session: aiohttp.ClientSession,
                 cache_file: Path | None, *, refetch_every: float | None = None) -> None:
        self.settings = settings
        self.refetch_every = (REFETCH_AT_MOST_EVERY if refetch_every is None
                              else refetch_every)
        self.session = session
        self.cache_file = cache_file
        self.keys: dict[str, dict[str, Any]] = {}
        self.fetched_at: float | None = None
        self.last_error: str | None = None
        self._last_attempt = float("-inf")
        self._flight: SingleFlight[bool] = SingleFlight()
        self._task: asyncio.Task[None] | None = None

    # lifecycle
    async def start(self) -> None:
        """Load the copy kept on disk, fetch fresh keys (an outage is not fatal), and keep
        them fresh in the background."""
        if self.cache_file is not None:
            saved = await asyncio.to_thread(_read_saved, self.cache_file, self._source())
            if saved:
                self.keys = saved
                log.info("auth: %d signing key(s) of %s loaded from %s", len(saved),
                         self.settings.issuer, self.cache_file)
        await self.refetch()
        self._task = asyncio.create_task(self._refresh_loop(), name="auth jwks refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _refresh_loop(self) -> None:
        while True:
            # Sooner while no key was ever obtained: the first one matters most.
            await asyncio.sleep(REFRESH_EVERY if self.keys else self.refetch_every)
            await self.refetch()

    # lookups
    async def key(self, kid: str | None) -> dict[str, Any] | None:
        """The key ``kid``; an unknown one causes a refetch at most once a minute.

        Raises :class:`KeysUnavailable` while no key was ever obtained.
        """
        if kid is not None and kid in self.keys:
            return self.keys[kid]
        if time.monotonic() - self._last_attempt >= self.refetch_every:
            await self.refetch()
        if not self.keys:
            raise KeysUnavailable(self.last_error or "no signing keys obtained yet")
        if kid is None and len(self.keys) == 1:  # a provider with one key may omit kid
            return next(iter(self.keys.values()))
        return self.keys.get(kid) if kid is not None else None

    async def refetch(self) -> bool:
        """Fetch the keys now (one fetch however many ask); the old ones stay on failure."""
        return await self._flight.run("jwks", self._refetch)

    async def _refetch(self) -> bool:
        self._last_attempt = time.monotonic()
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                fetched = await self._fetch()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.last_error = f"cannot fetch the signing keys: {_describe(exc)}"
            log.warning("auth: %s; %s", self.last_error,
                        f"keeping the {len(self.keys)} known key(s)" if self.keys
                        else "bearer tokens are refused until it works")
            return False
        changed = set(fetched.keys) != set(self.keys)
        self.keys = fetched.keys
        self.fetched_at = time.time()
        self.last_error = None
        if changed:
            log.info("auth: %d signing key(s) of %s: %s", len(self.keys), self.settings.issuer,
                     ", ".join(sorted(self.keys)))
            if self.cache_file is not None:
                try:
                    await asyncio.to_thread(_save, self.cache_file, fetched.document)
                except OSError as exc:
                    log.warning("auth: cannot keep the signing keys in %s: %s",
                                self.cache_file, exc.strerror)
        return True

    async def _fetch(self) -> _Fetched:
        url = self.settings.jwks_url or await self._discover()
        document = await self._get_json(url)
        keys = usable_keys(document)
        if not keys:
            raise ValueError(f"{url} holds no usable signing key")
        return _Fetched(keys, {"keys": list(keys.values()), "source": self._source()})

    def _source(self) -> str:
        """Whose keys these are: kept with the saved copy, which is used only for the
        same issuer and key URL (a changed configuration never trusts old keys)."""
        return f"{self.settings.issuer} {self.settings.jwks_url or DISCOVERY}"

    async def _discover(self) -> str:
        issuer = self.settings.issuer or ""
        # OpenID Connect Discovery 1.0 §4: the issuer without its trailing slash, then
        # the well-known path; the document must name the issuer exactly (§4.3).
        document = await self._get_json(issuer.rstrip("/") + DISCOVERY)
        if document.get("issuer") != issuer:
            raise ValueError(f"the discovery document names issuer "
                             f"{str(document.get('issuer'))[:200]!r}, not {issuer!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not secure_url(jwks_uri):
            raise ValueError(f"the discovery document's jwks_uri {str(jwks_uri)[:200]!r} "
                             "is not an https URL")
        return jwks_uri

    async def _get_json(self, url: str) -> dict[str, Any]:
        async with self.session.get(url, allow_redirects=False,
                                    headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise ValueError(f"GET {url} answered {resp.status}")
            if (resp.content_length or 0) > MAX_DOCUMENT:
                raise ValueError(f"GET {url}: {resp.content_length} bytes is too large")
            try:
                body = await read_limited(resp, MAX_DOCUMENT)
            except ValueError as exc:
                raise ValueError(f"GET {url}: {exc}") from None
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"GET {url}: not JSON ({exc})") from None
        if not isinstance(document, dict):
            raise ValueError(f"GET {url}: not a JSON object")
        return document

    def status(self) -> dict[str, Any]:
        return {"issuer": self.settings.issuer, "keys": sorted(self.keys),
                "fetched": self.fetched_at, "error": self.last_error}


async def read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of ``resp``, or ``ValueError`` past ``limit`` bytes.

    (``content.read(n)`` returns what has arrived so far, not the whole body: an
    answer crossing a WAN in several pieces would be cut.)
    """
    body = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 14):
        body += chunk
        if len(body) > limit:
            raise ValueError(f"more than {limit} bytes")
    return bytes(body)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _read_saved(path: Path, source: str) -> dict[str, dict[str, Any]]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict) or document.get("source") != source:
        return {}
    return usable_keys(document)


def _save(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, json.dumps(document).encode())
