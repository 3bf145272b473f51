"""A drain request does not outlive its purpose: the running relay withdraws one older
than its ``--timeout`` plus :data:`drain.EXPIRY_GRACE` itself, and says so in its log.

Before, a successful drain (exit 0) left the request standing, and the relay rejected
every modality until the service stopped or someone ran ``relay drain --cancel``: an
upgrade abandoned after the drain left the clinic's modalities refused for days."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomcache.relay import drain
from dicomcache.relay.spool import Spool

pytestmark = pytest.mark.blocking_allowed(reason="a real spool's sqlite, no event loop")

NOW = 1_000_000.0
GRACE = drain.EXPIRY_GRACE


@pytest.mark.parametrize(("request_", "expired"), [
    ({"id": "a", "time": NOW, "timeout": 600}, False),                # just made
    ({"id": "a", "time": NOW - 600, "timeout": 600}, False),          # its own timeout
    ({"id": "a", "time": NOW - 600 - GRACE, "timeout": 600}, False),  # the last moment
    ({"id": "a", "time": NOW - 601 - GRACE, "timeout": 600}, True),
    ({"id": "a", "time": NOW - 3000 - GRACE, "timeout": 3600}, False),  # a longer --timeout
    # no timeout in it (an earlier version's request): the command's default, 600 s
    ({"id": "a", "time": NOW - 601 - GRACE}, True),
    ({"id": "a", "time": NOW - 599 - GRACE}, False),
    # a clock set back far: the age cannot be trusted, the request cannot be kept forever
    ({"id": "a", "time": NOW + GRACE + 1, "timeout": 600}, True),
    ({"id": "a", "time": NOW + 60, "timeout": 600}, False),
    # unreadable: withdrawn (what would otherwise refuse modalities for ever)
    ({"id": "a"}, True),
    ({"id": "a", "time": "yesterday", "timeout": 600}, True),
    ({"id": "a", "time": NOW, "timeout": None}, False),
    ({"id": "a", "time": float("nan"), "timeout": 600}, True),
])
def test_expired(request_: dict[str, Any], expired: bool) -> None:
    assert drain.expired(request_, NOW) is expired


def test_a_new_request_carries_its_timeout() -> None:
    request = drain.new_request(900.0)
    assert request["timeout"] == 900.0 and abs(request["time"] - time.time()) < 60
    assert not drain.expired(request, request["time"] + 900.0 + GRACE)
    assert drain.expired(request, request["time"] + 901.0 + GRACE)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[tuple[Spool, Clock]]:
    clock = Clock()
    s = Spool(tmp_path / "spool", ["PACS"], clock=clock)
    s.open()
    yield s, clock
    s.close()


def test_the_running_relay_withdraws_an_expired_request(
        spool: tuple[Spool, Clock], caplog: pytest.LogCaptureFixture) -> None:
    s, clock = spool
    states: list[bool] = []
    s.set_control(drain.REQUEST, {"id": "r1", "time": NOW, "pid": 1, "timeout": 600.0})
    # While the request stands (the drain succeeded, the service not stopped yet): refused.
    clock.now = NOW + 600 + GRACE
    assert drain.answer(s, lambda: 0, states.append) is True
    assert states[-1] is True and s.control(drain.ANSWER) is not None
    # Past its timeout and the grace: withdrawn by the relay, which takes associations again.
    clock.now = NOW + 601 + GRACE
    with caplog.at_level(logging.WARNING, logger="dicomcache.relay.drain"):
        assert drain.answer(s, lambda: 0, states.append) is False
    assert states[-1] is False
    assert s.control(drain.REQUEST) is None and s.control(drain.ANSWER) is None
    (record,) = [r for r in caplog.records if "expired" in r.getMessage()]
    assert "r1" in record.getMessage() and "associations" in record.getMessage()
    # Nothing to withdraw any more: quiet.
    caplog.clear()
    assert drain.answer(s, lambda: 0, states.append) is False
    assert caplog.records == []


def test_a_newer_request_replacing_it_is_kept(spool: tuple[Spool, Clock]) -> None:
    """Another drain started meanwhile is a new request, with its own time."""
    s, clock = spool
    clock.now = NOW + 10_000
    s.set_control(drain.REQUEST, {"id": "r2", "time": clock.now - 5, "timeout": 600.0})
    assert drain.answer(s, lambda: 0, lambda _: None) is True
    assert s.control(drain.REQUEST) == {"id": "r2", "time": clock.now - 5, "timeout": 600.0}
