"""Table tests of the retry delays and the retry limit (relay/backoff.py).

docs/relay.md, "Failures": a destination that is down, rejects or aborts backs off
``retry_backoff_base`` doubling to ``retry_backoff_max``, jitter 50-100 %; so
does a study whose instance got a transient status, and after
``max_instance_retries`` refusals of the same instance it is quarantined.
"""

from __future__ import annotations

import random

import pytest

from dicomcache.relay import backoff


@pytest.mark.parametrize("failures, expected", [
    (1, 2.0), (2, 4.0), (3, 8.0), (8, 256.0),
    (9, 300.0),     # 512 > retry_backoff_max
    (50, 300.0),
    (1025, 300.0),  # a PACS down for days: 2.0 ** 1024 would overflow
    (10**9, 300.0),
])
def test_exponential(failures: int, expected: float) -> None:
    assert backoff.exponential(failures, 2.0, 300.0) == expected


@pytest.mark.parametrize("delay, draw, expected", [
    (10.0, 0.0, 5.0),      # half at least
    (10.0, 0.5, 7.5),
    (10.0, 1.0, 10.0),     # all at most (random() never quite reaches 1)
    (0.0, 0.7, 0.0),
])
def test_jittered(delay: float, draw: float, expected: float) -> None:
    assert backoff.jittered(delay, draw) == expected


def test_retry_delay_is_the_jittered_exponential() -> None:
    rng = random.Random(7)
    for failures in range(1, 20):
        draw = rng.random()
        delay = backoff.retry_delay(failures, 0.2, 1.0, draw)
        assert delay == backoff.jittered(backoff.exponential(failures, 0.2, 1.0), draw)
        assert 0.5 * min(1.0, 0.2 * 2 ** (failures - 1)) <= delay <= 1.0


@pytest.mark.parametrize("status, refusals_before, expected", [
    (0xA700, 0, False),
    (0xA700, 18, False),
    (0xA700, 19, True),     # the 20th refusal (max_instance_retries = 20)
    (0xA700, 25, True),
    (None, 19, False),      # no status (abort, timeout): says nothing about the instance
])
def test_refused_too_often(status: int | None, refusals_before: int, expected: bool) -> None:
    assert backoff.refused_too_often(status, refusals_before, 20) is expected
