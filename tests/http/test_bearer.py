"""``[auth] mode = "bearer"``: the pure decisions (keys, algorithms, roles) as tables,
then tokens signed by test keys and checked through the app against a JWKS served by a
local aiohttp endpoint, with a real Orthanc behind."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from dicomcache.config import AuthSettings
from dicomcache.http import bearer as bearer_mod
from dicomcache.http.app import make_app
from dicomcache.http.bearer import (
    TokenRejected,
    acceptable_alg,
    claim_at,
    role_of,
    secure_url,
    usable_keys,
)
from dicomcache.principal import ADMIN, VIEWER
from tests.conftest import Sample, SettingsFactory
from tests.http.auth_support import (
    AUDIENCE,
    ISSUER,
    Jwks,
    SigningKey,
    b64,
    bearer,
    claims,
    unsigned,
)

RSA = {"kty": "RSA", "kid": "r", "n": "x", "e": "AQAB"}
EC = {"kty": "EC", "kid": "e", "crv": "P-256", "x": "x", "y": "y"}


# --- pure decisions ----------------------------------------------------------------------

@pytest.mark.parametrize(("header", "key", "allowed", "result"), [
    ({"alg": "RS256"}, RSA, ("RS256",), "RS256"),
    ({"alg": "RS256"}, None, ("RS256",), "RS256"),  # before the key is known
    ({"alg": "ES256"}, EC, ("RS256", "ES256"), "ES256"),
    ({"alg": "none"}, RSA, ("RS256",), None),
    ({"alg": "None"}, RSA, ("RS256",), None),
    ({}, RSA, ("RS256",), None),
    ({"alg": ["RS256"]}, RSA, ("RS256",), None),
    # the HMAC confusion: an RSA public key used as an HMAC secret
    ({"alg": "HS256"}, RSA, ("RS256",), None),
    ({"alg": "HS256"}, RSA, ("RS256", "HS256"), None),  # even if listed
    ({"alg": "RS384"}, RSA, ("RS256",), None),  # not configured
    ({"alg": "ES256"}, RSA, ("RS256", "ES256"), None),  # the key's type must fit
    ({"alg": "RS256"}, EC, ("RS256", "ES256"), None),
    ({"alg": "ES384"}, EC, ("ES384",), None),  # the curve must fit
    ({"alg": "RS256"}, {**RSA, "alg": "RS512"}, ("RS256", "RS512"), None),  # key's alg
])
def test_acceptable_alg(header: dict[str, Any], key: dict[str, Any] | None,
                        allowed: tuple[str, ...], result: str | None) -> None:
    if result is None:
        with pytest.raises(TokenRejected) as caught:
            acceptable_alg(header, key, allowed)
        assert caught.value.counts  # a forged header is a guess
    else:
        assert acceptable_alg(header, key, allowed) == result


def test_usable_keys_keeps_public_signing_keys_only() -> None:
    jwks = {"keys": [
        RSA, EC,
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},  # symmetric: never
        {**RSA, "kid": "private", "d": "x"},  # a private key published by mistake
        {**RSA, "kid": "enc", "use": "enc"},
        {**RSA, "kid": "ops", "key_ops": ["encrypt"]},
        {**RSA, "kid": ""}, {k: v for k, v in RSA.items() if k != "kid"},
        {**RSA, "kid": "x" * 300},
        "garbage", {**RSA, "kid": "r"},  # a duplicate kid: the first one stays
    ]}
    assert usable_keys(jwks) == {"r": RSA, "e": EC}
    assert usable_keys({"keys": [{**RSA, "kid": str(i)} for i in range(100)]}).keys() \
        == {str(i) for i in range(bearer_mod.MAX_KEYS)}
    for nonsense in (None, [], {"keys": "x"}, {"keys": None}, "keys"):
        assert usable_keys(nonsense) == {}


KC = AuthSettings(mode="bearer", issuer=ISSUER, audience=AUDIENCE,
                  viewer_roles=("dicomcache-viewer",), admin_roles=("dicomcache-admin",))


@pytest.mark.parametrize(("settings", "token_claims", "role"), [
    (KC, {"realm_access": {"roles": ["dicomcache-viewer"]}}, VIEWER),
    (KC, {"realm_access": {"roles": ["offline_access", "dicomcache-admin"]}}, ADMIN),
    (KC, {"realm_access": {"roles": ["dicomcache-admin", "dicomcache-viewer"]}}, ADMIN),
    (KC, {"realm_access": {"roles": ["offline_access"]}}, None),
    (KC, {"realm_access": {"roles": "dicomcache-viewer"}}, VIEWER),  # a string
    (KC, {"realm_access": {"roles": [1, None, {"x": 1}]}}, None),
    (KC, {"realm_access": "dicomcache-admin"}, None),  # not at the path
    (KC, {}, None),
    (KC, {"roles": ["dicomcache-admin"]}, None),  # another claim
    (AuthSettings(roles_claim="scope", viewer_roles=("pacs.read",), admin_roles=("pacs",)),
     {"scope": "openid pacs.read profile"}, VIEWER),
    (AuthSettings(roles_claim="resource_access.ohif.roles", viewer_roles=("*",)),
     {"resource_access": {"ohif": {"roles": []}}}, VIEWER),  # "*": any token
    (AuthSettings(roles_claim="groups", viewer_roles=("*",), admin_roles=("it",)),
     {"groups": ["it"]}, ADMIN),
])
def test_role_of(settings: AuthSettings, token_claims: dict[str, Any],
                 role: str | None) -> None:
    assert role_of(token_claims, settings) == role


def test_claim_at() -> None:
    assert claim_at({"a": {"b": {"c": 1}}}, "a.b.c") == 1
    assert claim_at({"a": {"b": 1}}, "a.b.c") is None
    assert claim_at({"a.b": 1}, "a.b") is None
    assert claim_at({}, "a") is None


@pytest.mark.parametrize(("url", "ok"), [
    ("https://idp.example/jwks", True),
    ("http://127.0.0.1:8080/jwks", True),
    ("http://localhost/jwks", True),
    ("http://idp.example/jwks", False),
    ("ftp://idp.example/jwks", False),
    ("https:///jwks", False),
])
def test_secure_url(url: str, ok: bool) -> None:
    assert secure_url(url) is ok


# --- tokens through the app ----------------------------------------------------------------

@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {"k1": SigningKey.rsa("k1"), "k2": SigningKey.rsa("k2"),
            "ec": SigningKey.ec("ec")}


@pytest.fixture
async def jwks(keys: dict[str, SigningKey]) -> AsyncIterator[Jwks]:
    server = Jwks([keys["k1"], keys["ec"]])
    await server.start()
    yield server
    await server.stop()


def bearer_settings(make_settings: SettingsFactory, jwks: Jwks, **over: Any) -> Any:
    auth = {"mode": "bearer", "issuer": ISSUER, "audience": AUDIENCE, "jwks_url": jwks.url,
            "viewer_roles": ["dicomcache-viewer"], "admin_roles": ["dicomcache-admin"],
            "algorithms": ["RS256", "ES256"], "leeway": 5, **over}
    return make_settings(auth=auth)


@pytest.fixture
async def client(aiohttp_client: Any, make_settings: SettingsFactory,
                 jwks: Jwks) -> TestClient:
    return await aiohttp_client(make_app(bearer_settings(make_settings, jwks)))


def file_of(samples: dict[str, list[Sample]]) -> str:
    return f"/instances/{samples['explicit'][0].orthanc_id}/file"


async def status_of(client: TestClient, path: str, token: str | None) -> tuple[int, Any]:
    resp = await client.get(path, headers=bearer(token) if token is not None else {})
    body = await resp.read()
    return resp.status, (resp.headers.get("WWW-Authenticate"), body)


async def test_valid_tokens_give_their_roles(client: TestClient, keys: dict[str, SigningKey],
                                             samples: dict[str, list[Sample]]) -> None:
    sample = samples["explicit"][0]
    viewer = keys["k1"].sign(claims("alice"))
    resp = await client.get(file_of(samples), headers=bearer(viewer))
    assert resp.status == 200
    assert await resp.read() == sample.data
    assert (await client.get("/status.json", headers=bearer(viewer))).status == 403

    admin = keys["ec"].sign(claims("bob", roles=("dicomcache-admin",)))  # ES256 works too
    assert (await client.get("/status.json", headers=bearer(admin))).status == 200
    assert (await client.get(file_of(samples), headers=bearer(admin))).status == 200

    nobody = keys["k1"].sign(claims("carol", roles=("offline_access",)))
    resp = await client.get(file_of(samples), headers=bearer(nobody))
    assert resp.status == 403
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]


@pytest.mark.parametrize("case", [
    "expired", "not-yet-valid", "issued-in-the-future", "wrong-audience", "wrong-issuer",
    "issuer-with-slash", "no-exp", "unknown-kid", "no-kid-two-keys", "alg-none",
    "alg-none-signed", "hs256-public-pem", "hs256-public-jwk", "tampered", "other-key",
    "not-a-jwt", "garbage",
])
async def test_bad_tokens_are_refused(client: TestClient, keys: dict[str, SigningKey],
                                      samples: dict[str, list[Sample]], case: str) -> None:
    k1 = keys["k1"]
    now = int(time.time())
    good = claims("mallory")
    token = {
        "expired": lambda: k1.sign(claims(exp=now - 60, iat=now - 400, nbf=now - 400)),
        "not-yet-valid": lambda: k1.sign(claims(nbf=now + 120)),
        "issued-in-the-future": lambda: k1.sign(claims(iat=now + 120, nbf=now)),
        "wrong-audience": lambda: k1.sign(claims(aud="another-app")),
        "wrong-issuer": lambda: k1.sign(claims(iss="https://evil.example/realms/clinic")),
        "issuer-with-slash": lambda: k1.sign(claims(iss=ISSUER + "/")),
        "no-exp": lambda: k1.sign({k: v for k, v in good.items() if k != "exp"}),
        "unknown-kid": lambda: SigningKey.rsa("k9").sign(good),
        "no-kid-two-keys": lambda: k1.sign(good, kid=None),
        "alg-none": lambda: unsigned({"alg": "none", "kid": "k1"}, good),
        "alg-none-signed": lambda: unsigned({"alg": "none", "kid": "k1"}, good, b"x" * 32),
        "hs256-public-pem": lambda: _hmac_forgery(k1.public_pem(), good),
        "hs256-public-jwk": lambda: _hmac_forgery(k1.jwk()["n"].encode(), good),
        "tampered": lambda: _tampered(k1.sign(good)),
        "other-key": lambda: keys["k2"].sign(good, kid="k1"),  # kid of a known key
        "not-a-jwt": lambda: "abc.def",
        "garbage": lambda: "\u00e9\u00e9.\u20ac.%%",
    }[case]()
    resp = await client.get(file_of(samples), headers=bearer(token))
    assert resp.status == 401, await resp.text()
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="dicomcache", error="invalid_token"')
    body = await resp.text()
    assert token not in body and token not in challenge  # never echoed


def _hmac_forgery(secret: bytes, body: dict[str, Any]) -> str:
    """An HS256 token keyed with the public key: what anyone can make from the JWKS."""
    import hashlib
    import hmac

    signing_input = unsigned({"alg": "HS256", "kid": "k1", "typ": "JWT"}, body)[:-1]
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + b64(signature)


def _tampered(token: str) -> str:
    header, _body, signature = token.split(".")
    forged = b64(b'{"sub":"mallory","realm_access":{"roles":["dicomcache-admin"]},' +
                 f'"iss":"{ISSUER}","aud":"{AUDIENCE}","exp":{int(time.time()) + 300}}}'
                 .encode())
    return f"{header}.{forged}.{signature}"


async def test_missing_or_other_scheme_is_a_plain_challenge(
        client: TestClient, samples: dict[str, list[Sample]]) -> None:
    for headers in ({}, {"Authorization": "Basic YWxpY2U6cHc="}, {"Authorization": "Bearer"},
                    {"Authorization": "Bearer   "}):
        resp = await client.get(file_of(samples), headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="dicomcache"'


async def test_leeway_tolerates_small_skew(client: TestClient, keys: dict[str, SigningKey],
                                           samples: dict[str, list[Sample]]) -> None:
    now = int(time.time())
    skewed = keys["k1"].sign(claims(nbf=now + 3, iat=now + 3, exp=now + 300))  # leeway 5
    assert (await client.get(file_of(samples), headers=bearer(skewed))).status == 200
    just_expired = keys["k1"].sign(claims(exp=now - 2, iat=now - 300, nbf=now - 300))
    assert (await client.get(file_of(samples), headers=bearer(just_expired))).status == 200


async def test_keys_survive_an_outage(client: TestClient, jwks: Jwks,
                                      keys: dict[str, SigningKey],
                                      samples: dict[str, list[Sample]],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """While the identity provider is down, the keys already fetched keep working, and a
    token with an unknown key cannot trigger more than the rate-limited refetches."""
    monkeypatch.setattr(bearer_mod, "REFETCH_AT_MOST_EVERY", 0.0)
    jwks.down = True
    before = jwks.fetches
    token = keys["k1"].sign(claims("alice", jti="outage"))
    assert (await client.get(file_of(samples), headers=bearer(token))).status == 200
    unknown = SigningKey.rsa("k7").sign(claims())
    assert (await client.get(file_of(samples), headers=bearer(unknown))).status == 401
    assert jwks.fetches <= before + 1  # the app's KeySet was made before the patch: 60 s


async def test_unknown_kid_refetches_at_most_once_a_minute(
        client: TestClient, jwks: Jwks, samples: dict[str, list[Sample]]) -> None:
    before = jwks.fetches
    for i in range(20):
        forged = SigningKey.rsa(f"random-{i}") if i < 2 else None
        token = (forged.sign(claims()) if forged else
                 unsigned({"alg": "RS256", "kid": f"kid-{i}"}, claims(), b"x" * 256))
        assert (await client.get(file_of(samples), headers=bearer(token))).status == 401
    assert jwks.fetches - before <= 1


async def test_key_rotation(aiohttp_client: Any, make_settings: SettingsFactory, jwks: Jwks,
                            keys: dict[str, SigningKey], samples: dict[str, list[Sample]],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider publishes a new key and signs with it: the first token naming it makes
    dicomcache fetch the keys again (within the refetch limit), and it is accepted."""
    monkeypatch.setattr(bearer_mod, "REFETCH_AT_MOST_EVERY", 0.2)
    client = await aiohttp_client(make_app(bearer_settings(make_settings, jwks)))
    token = keys["k2"].sign(claims("alice", jti="rotated"))
    # Signed with a key not published yet (the provider's clock is ahead of its JWKS):
    # refused now, but not remembered as refused.
    assert (await client.get(file_of(samples), headers=bearer(token))).status == 401
    jwks.keys = [keys["k1"], keys["k2"]]

    import asyncio
    await asyncio.sleep(0.25)  # past the refetch limit
    assert (await client.get(file_of(samples), headers=bearer(token))).status == 200
    # The old key is withdrawn: it stops working once the keys are fetched again.
    jwks.keys = [keys["k2"]]
    await asyncio.sleep(0.25)
    unknown = SigningKey.rsa("k3").sign(claims())  # makes it refetch
    assert (await client.get(file_of(samples), headers=bearer(unknown))).status == 401
    old = keys["k1"].sign(claims("alice", jti="old-key"))
    assert (await client.get(file_of(samples), headers=bearer(old))).status == 401


async def test_a_restart_during_an_outage_uses_the_saved_keys(
        aiohttp_client: Any, make_settings: SettingsFactory, jwks: Jwks,
        keys: dict[str, SigningKey], samples: dict[str, list[Sample]]) -> None:
    settings = bearer_settings(make_settings, jwks)
    first = await aiohttp_client(make_app(settings))
    token = keys["k1"].sign(claims("alice", jti="saved"))
    assert (await first.get(file_of(samples), headers=bearer(token))).status == 200
    await first.close()

    jwks.down = True
    second = await aiohttp_client(make_app(settings))  # same cache directory
    assert (await second.get(file_of(samples), headers=bearer(token))).status == 200
    status = await second.get("/status.json",
                              headers=bearer(keys["k1"].sign(claims(roles=("dicomcache-admin",)))))
    auth = (await status.json())["auth"]
    assert auth["keys"]["keys"] == ["ec", "k1"]
    assert "503" in auth["keys"]["error"]


async def test_saved_keys_of_another_issuer_are_not_used(
        aiohttp_client: Any, make_settings: SettingsFactory, jwks: Jwks,
        keys: dict[str, SigningKey], samples: dict[str, list[Sample]]) -> None:
    first = await aiohttp_client(make_app(bearer_settings(make_settings, jwks)))
    await first.close()
    jwks.down = True
    other = "https://other-idp.example/realms/clinic"
    second = await aiohttp_client(make_app(bearer_settings(make_settings, jwks, issuer=other)))
    token = keys["k1"].sign(claims(iss=other))
    resp = await second.get(file_of(samples), headers=bearer(token))
    assert resp.status == 503  # fail closed: no key of this issuer was ever obtained
    assert "Retry-After" in resp.headers
    assert "127.0.0.1" not in await resp.text()  # the cause is logged, not told


async def test_token_never_logged(client: TestClient, keys: dict[str, SigningKey],
                                  samples: dict[str, list[Sample]],
                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    good = keys["k1"].sign(claims("alice", jti="logged?"))
    bad = keys["k1"].sign(claims(aud="other", jti="bad"))
    await client.get(file_of(samples), headers=bearer(good))
    await client.get(file_of(samples), headers=bearer(bad))
    for token in (good, bad):
        for part in token.split("."):
            assert part not in caplog.text


async def test_keys_arriving_in_pieces_are_read_whole(
        aiohttp_client: Any, make_settings: SettingsFactory, jwks: Jwks,
        keys: dict[str, SigningKey], samples: dict[str, list[Sample]]) -> None:
    jwks.split = True
    client = await aiohttp_client(make_app(bearer_settings(make_settings, jwks)))
    token = keys["k1"].sign(claims("alice", jti="pieces"))
    assert (await client.get(file_of(samples), headers=bearer(token))).status == 200
