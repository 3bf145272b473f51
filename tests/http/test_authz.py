"""Per-study authorization (http/authz.py): what a request is decided on, the service's
answers, the request it is sent (the Orthanc authorization plugin's shape), and the TTL
cache, against a small authorization service on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from dicomcache.config import AuthSettings
from dicomcache.http.authz import (
    MAX_SEARCH_STUDIES,
    SEARCH,
    AuthorizationUnavailable,
    Authorizer,
    Lookup,
    Refused,
    Target,
    parse_decision,
    payload,
    principal_key,
    study_of_result,
    target_of,
)
from dicomcache.principal import ADMIN, VIEWER, Principal
from tests.http.auth_support import AuthzService

OID = "079d74f5-e5b0bb07-ae470350-6c9ad2ab-ee1995b1"


@pytest.mark.parametrize(("path", "query", "match", "target"), [
    ("/dicom-web/studies/1.2.3", {}, {"study": "1.2.3"}, Target("study", dicom_uid="1.2.3")),
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1", {},
     {"study": "1.2.3", "series": "4.5", "sop": "6.7", "frames": "1"},
     Target("study", dicom_uid="1.2.3")),
    ("/dicom-web/studies/1.2.3/series", {"StudyInstanceUID": "9.9"}, {"study": "1.2.3"},
     Target("study", dicom_uid="1.2.3")),  # the path's study (results are filtered too)
    # read through (no match info): the path still names the study
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/bulk/7FE00010", {}, {"tail": "x"},
     Target("study", dicom_uid="1.2.3")),
    # searches: decided per result, whatever the query says
    ("/dicom-web/studies", {}, {}, Target(SEARCH, uri="/dicom-web/studies")),
    ("/dicom-web/studies", {"StudyInstanceUID": "1.2.3"}, {},
     Target(SEARCH, uri="/dicom-web/studies")),
    ("/dicom-web/series", {"studyinstanceuid": "1.2.3"}, {},
     Target(SEARCH, uri="/dicom-web/series")),
    ("/dicom-web/instances", {}, {}, Target(SEARCH, uri="/dicom-web/instances")),
    # WADO-URI: the studyUID it names (Orthanc checks the object belongs to it)
    ("/wado", {"requestType": "WADO", "studyUID": "1.2.3", "objectUID": "6.7"}, {},
     Target("study", dicom_uid="1.2.3")),
    # Orthanc resources: the study is looked up first
    (f"/instances/{OID}/file", {}, {"id": OID}, Lookup("instances", OID)),
    (f"/series/{OID}/instances", {}, {}, Lookup("series", OID)),
    (f"/studies/{OID}", {}, {}, Lookup("studies", OID)),
    # no single study: a system decision on the path, as the plugin makes it
    (f"/patients/{OID}/studies", {}, {}, Target("system", uri=f"/patients/{OID}/studies")),
    ("/dicom-web/studies/not-a-uid/series", {}, {},
     Target("system", uri="/dicom-web/studies/not-a-uid/series")),
])
def test_target_of(path: str, query: dict[str, str], match: dict[str, str],
                   target: Target | Lookup) -> None:
    assert target_of(path, query, match) == target


@pytest.mark.parametrize("query", [
    {"requestType": "WADO", "objectUID": "6.7"},
    {"requestType": "WADO", "studyUID": "1.2.*", "objectUID": "6.7"},
    {"requestType": "WADO", "studyUID": "", "objectUID": "6.7"},
])
def test_wado_without_a_valid_study_is_refused(query: dict[str, str]) -> None:
    with pytest.raises(Refused):
        target_of("/wado", query, {})


@pytest.mark.parametrize(("data", "result"), [
    (b'{"granted": true, "validity": 60}', (True, 60)),
    (b'{"granted": false, "validity": 5}', (False, 5)),
    (b'{"granted": true}', (True, 0)),
    (b'{"granted": true, "validity": 999999}', (True, 3600)),  # bounded
    (b'{"granted": true, "validity": 0, "extra": [1]}', (True, 0)),
    (b'{"granted": "true"}', ValueError),
    (b'{"granted": 1}', ValueError),
    (b'{"validity": 5}', ValueError),
    (b'{"granted": true, "validity": -1}', ValueError),
    (b'{"granted": true, "validity": 1.5}', ValueError),
    (b'{"granted": true, "validity": true}', ValueError),
    (b'[true]', ValueError),
    (b'granted', ValueError),
    (b'', ValueError),
])
def test_parse_decision(data: bytes, result: Any) -> None:
    if result is ValueError:
        with pytest.raises(ValueError):
            parse_decision(data)
    else:
        assert parse_decision(data) == result


@pytest.mark.parametrize(("result", "study"), [
    ({"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}, "1.2.3"),
    ({"0020000D": {"vr": "UI", "Value": ["1.2.3", "1.2.4"]}}, None),
    ({"0020000D": {"vr": "UI", "Value": ["1.2.*"]}}, None),
    ({"0020000D": {"vr": "UI"}}, None),
    ({"0020000D": {"vr": "UI", "Value": [5]}}, None),
    ({"0020000d": {"vr": "UI", "Value": ["1.2.3"]}}, None),
    ({}, None),
    ("1.2.3", None),
])
def test_study_of_result(result: Any, study: str | None) -> None:
    assert study_of_result(result) == study


def test_payload_has_the_plugin_shape() -> None:
    token = "eyJhbGciOi.eyJzdWIi.c2ln"
    alice = Principal("alice", VIEWER, "bearer", token)
    assert payload(Target("study", dicom_uid="1.2.3", orthanc_id=OID), alice, "clinic-1") == {
        "method": "get", "level": "study", "orthanc-id": OID, "dicom-uid": "1.2.3",
        "token-key": "Authorization", "token-value": f"Bearer {token}",
        "server-id": "clinic-1", "user": "alice", "role": "viewer"}
    bob = Principal("bob", ADMIN, "basic")
    assert payload(Target("system", uri="/patients/x"), bob, None) == {
        "method": "get", "level": "system", "uri": "/patients/x",
        "token-key": "dicomcache-user", "token-value": "bob", "server-id": None,
        "user": "bob", "role": "admin"}


def test_principal_key_never_holds_the_token() -> None:
    token = "header.claims.signature"
    key = principal_key(Principal("alice", VIEWER, "bearer", token))
    assert token not in key and key.startswith("token:")
    assert principal_key(Principal("bob", VIEWER, "basic")) == "basic:bob"


# --- against a service --------------------------------------------------------------------

@pytest.fixture
async def service() -> AsyncIterator[AuthzService]:
    svc = AuthzService(denied={"1.2.9"}, restricted={"vera"})
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
async def authorizer(service: AuthzService) -> AsyncIterator[Authorizer]:
    settings = AuthSettings(authorization_url=service.url, authorization_timeout=2,
                            authorization_server_id="clinic-1")
    async with aiohttp.ClientSession() as session:
        # Study lookups of Orthanc resources are tested through the app (test_auth_app).
        yield Authorizer(settings, session, None, None)  # type: ignore[arg-type]


VERA = Principal("vera", VIEWER, "basic")


async def test_decisions_are_kept_for_their_validity(authorizer: Authorizer,
                                                     service: AuthzService) -> None:
    service.validity = 1
    study = Target("study", dicom_uid="1.2.3")
    for _ in range(5):
        assert (await authorizer.decide(VERA, study)).granted
    assert service.studies_asked() == ["1.2.3"]  # kept: asked once
    denied = await authorizer.decide(VERA, Target("study", dicom_uid="1.2.9"))
    assert not denied.granted
    assert not (await authorizer.decide(VERA, Target("study", dicom_uid="1.2.9"))).granted
    assert service.studies_asked() == ["1.2.3", "1.2.9"]  # denials are kept too
    other = Principal("otto", VIEWER, "basic")
    assert (await authorizer.decide(other, Target("study", dicom_uid="1.2.9"))).granted
    assert len(service.asked) == 3  # per principal

    await asyncio.sleep(1.1)  # the validity ends: asked again
    await authorizer.decide(VERA, study)
    assert service.studies_asked().count("1.2.3") == 2


async def test_validity_zero_is_not_kept(authorizer: Authorizer,
                                         service: AuthzService) -> None:
    service.validity = 0
    for _ in range(3):
        await authorizer.decide(VERA, Target("study", dicom_uid="1.2.3"))
    assert len(service.asked) == 3


async def test_never_kept_past_the_token(authorizer: Authorizer,
                                         service: AuthzService) -> None:
    import time
    token_principal = Principal("alice", VIEWER, "bearer", "a.b.c")
    decision = await authorizer.decide(token_principal, Target("study", dicom_uid="1.2.3"),
                                       token_expires=time.time() + 2)
    assert decision.expires - time.monotonic() <= 2.01


async def test_concurrent_asks_are_one_request(authorizer: Authorizer,
                                               service: AuthzService) -> None:
    await asyncio.gather(*(authorizer.decide(VERA, Target("study", dicom_uid="1.2.3"))
                           for _ in range(20)))
    assert len(service.asked) == 1


async def test_a_failing_service_refuses(authorizer: Authorizer,
                                         service: AuthzService) -> None:
    service.broken = True
    with pytest.raises(AuthorizationUnavailable):
        await authorizer.decide(VERA, Target("study", dicom_uid="1.2.3"))
    await service.stop()
    with pytest.raises(AuthorizationUnavailable):
        await authorizer.decide(VERA, Target("study", dicom_uid="1.2.4"))


async def test_search_results_are_granted_per_study(authorizer: Authorizer,
                                                    service: AuthzService) -> None:
    granted = await authorizer.granted_studies(VERA, {"1.2.3", "1.2.9", "1.2.4"})
    assert granted == {"1.2.3", "1.2.4"}
    with pytest.raises(Refused):
        await authorizer.granted_studies(
            VERA, {f"1.2.{i}" for i in range(MAX_SEARCH_STUDIES + 1)})


async def test_an_answer_arriving_in_pieces_is_read_whole(authorizer: Authorizer,
                                                         service: AuthzService) -> None:
    service.split = True
    assert (await authorizer.decide(VERA, Target("study", dicom_uid="1.2.3"))).granted
    assert not (await authorizer.decide(VERA, Target("study", dicom_uid="1.2.9"))).granted
