"""The shared test helpers in conftest.py: a wait that cannot fail, or a metric read
that compares as ``None``, would let the tests using them pass vacuously."""

from __future__ import annotations

import pytest

from dicomcache.metrics import Metrics
from tests.conftest import eventually, eventually_sync, metric_value


async def test_eventually_returns_the_first_true_result() -> None:
    values = iter([0, None, "", "ok"])
    assert await eventually(lambda: next(values), interval=0) == "ok"


async def test_eventually_awaits_an_async_predicate() -> None:
    calls: list[int] = []

    async def third_time() -> bool:
        calls.append(1)
        return len(calls) == 3

    assert await eventually(third_time, interval=0) is True
    assert len(calls) == 3


async def test_eventually_fails_naming_what_it_waited_for() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"waited 0\.05 s for: the moon"):
        await eventually(lambda: False, timeout=0.05, what="the moon")


def test_eventually_sync_returns_or_fails() -> None:
    values = iter([False, 7])
    assert eventually_sync(lambda: next(values), interval=0) == 7
    with pytest.raises(pytest.fail.Exception, match=r"waited 0\.05 s for: the moon"):
        eventually_sync(lambda: False, timeout=0.05, what="the moon")


def test_metric_value_reads_a_sample_and_fails_on_a_missing_one() -> None:
    metrics = Metrics()
    metrics.cache_hits.labels("orthanc").inc(2)
    assert metric_value(metrics, "dicomcache_cache_hits_total", family="orthanc") == 2
    assert metric_value(metrics, "dicomcache_upstream_up") == 0
    with pytest.raises(AssertionError, match="no sample"):
        metric_value(metrics, "dicomcache_cache_hits_total", family="nowhere")
