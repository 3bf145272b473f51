"""Real parts for the authentication tests: an identity provider's JWKS endpoint and an
authorization service (small aiohttp servers on 127.0.0.1), signing keys, tokens, and
a users file."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from dicomcache.http import users

ISSUER = "https://idp.example/realms/clinic"
AUDIENCE = "dicomcache"


@dataclass
class SigningKey:
    kid: str
    private: Any
    alg: str = "RS256"

    @classmethod
    def rsa(cls, kid: str) -> SigningKey:
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")

    def jwk(self) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.alg.startswith("RS") else ECAlgorithm
        key: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        key.update(kid=self.kid, use="sig", alg=self.alg)
        return key

    def public_pem(self) -> bytes:
        return bytes(self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def sign(self, claims: dict[str, Any], *, kid: str | None = "same",
             alg: str | None = None) -> str:
        headers = {"kid": self.kid if kid == "same" else kid}
        if headers["kid"] is None:
            del headers["kid"]
        return jwt.encode(claims, self.private, algorithm=alg or self.alg, headers=headers)


def claims(sub: str = "alice", roles: tuple[str, ...] = ("dicomcache-viewer",),
           **over: Any) -> dict[str, Any]:
    """Claims as Keycloak puts them in an access token (realm roles)."""
    now = int(time.time())
    out: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now,
                           "nbf": now, "exp": now + 300,
                           "realm_access": {"roles": list(roles)}}
    out.update(over)
    return out


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    """A token put together by hand (forgeries: ``alg: none``, HMAC with a public key)."""
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(body).encode()),
                     b64(signature)))


async def in_two_pieces(request: web.Request, document: Any) -> web.StreamResponse:
    """A JSON answer sent in two writes with a pause between (as a WAN delivers it)."""
    body = json.dumps(document).encode()
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(body[:len(body) // 2])
    await asyncio.sleep(0.05)
    await resp.write(body[len(body) // 2:])
    await resp.write_eof()
    return resp


@dataclass
class Jwks:
    """The identity provider's key endpoint: its keys can change, it can go down."""

    keys: list[SigningKey]
    down: bool = False
    split: bool = False
    fetches: int = 0
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    async def handle(self, _request: web.Request) -> web.Response:
        self.fetches += 1
        if self.down:
            return web.Response(status=503, text="down for maintenance")
        document = {"keys": [k.jwk() for k in self.keys]}
        if self.split:
            return await in_two_pieces(_request, document)
        return web.json_response(document)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class AuthzService:
    """An authorization service speaking the Orthanc authorization plugin's protocol:
    grants every study but ``denied`` ones (for principals in ``restricted``)."""

    denied: set[str] = field(default_factory=set)
    restricted: set[str] = field(default_factory=set)
    validity: int = 60
    broken: bool = False
    split: bool = False
    asked: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/authorize"

    def studies_asked(self) -> list[str]:
        return [a.get("dicom-uid", "") for a in self.asked if a["level"] == "study"]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.asked.append(body)
        if self.broken:
            return web.Response(status=500, text="oops")
        granted = not (body["level"] == "study" and body.get("dicom-uid") in self.denied
                       and body.get("user") in self.restricted)
        answer = {"granted": granted, "validity": self.validity, "padding": "x" * 200}
        if self.split:
            return await in_two_pieces(request, answer)
        return web.json_response(answer)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/authorize", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def write_users(path: Path, entries: dict[str, tuple[str, str]]) -> Path:
    """A users file with ``{name: (role, password)}`` (hashed as the CLI does)."""
    users.write(path, [users.User(name, role, users.hash_password(password))
                       for name, (role, password) in entries.items()])
    return path


def basic(name: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
