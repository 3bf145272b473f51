"""The per-principal prefetch bound (prefetch/budget.py), as a table over time."""

from __future__ import annotations

from dicomcache.prefetch.budget import PrincipalBudget


def test_at_most_limit_distinct_studies_per_window() -> None:
    budget = PrincipalBudget(limit=2, window=100)
    assert budget.allow("alice", "s1", 0)
    assert budget.allow("alice", "s1", 1)  # the same study again costs nothing
    assert budget.allow("alice", "s2", 2)
    assert not budget.allow("alice", "s3", 3)  # spent
    assert budget.allow("alice", "s2", 50)  # still counted: steering it is free
    assert budget.allow("bob", "s3", 3)  # a budget per principal
    assert not budget.allow("alice", "s3", 99)
    assert budget.allow("alice", "s3", 100.5)  # s1 left the window
    assert not budget.allow("alice", "s4", 100.5)  # s2 (at 2) still in it
    assert budget.allow("alice", "s4", 102.5)


def test_principals_remembered_are_bounded() -> None:
    budget = PrincipalBudget(limit=1, window=3600, capacity=10)
    for i in range(1000):
        assert budget.allow(f"user-{i}", "s", float(i))
    assert len(budget) == 10
    # A forgotten principal starts afresh; a remembered one is still bounded.
    assert budget.allow("user-0", "other", 1000)
    assert not budget.allow("user-999", "other", 1000)
