"""Which copy of a SOP Instance goes to a destination (relay/versions.py), as tables."""

from __future__ import annotations

import pytest

from dicomcache.relay.outcome import DELIVERED, QUARANTINED, RETRY
from dicomcache.relay.versions import Copy, recorded_state, superseded

P, D, Q, X, S = "pending", "delivered", "quarantined", "dropped", "superseded"


@pytest.mark.parametrize(("copies", "expected"), [
    # (key, received, state) of each copy queued for one destination → keys superseded
    ([], []),
    ([(1, 10.0, P)], []),
    ([(1, 10.0, P), (2, 20.0, P)], [1]),                     # a corrected re-send
    ([(1, 10.0, P), (2, 20.0, P), (3, 30.0, P)], [1, 2]),    # re-sent twice
    ([(1, 10.0, S), (2, 20.0, P), (3, 30.0, P)], [2]),       # already superseded: unchanged
    ([(1, 10.0, D), (2, 20.0, P)], []),                      # the older one went first
    ([(1, 10.0, Q), (2, 20.0, P)], []),
    ([(1, 10.0, X), (2, 20.0, P)], []),
    # A file re-queued after a crash gets a later row but keeps its receive time: the
    # copy received later wins, whatever the row order…
    ([(5, 10.0, P), (2, 20.0, P)], [5]),
    # …whatever the newest copy's state: never an older copy after a newer one.
    ([(5, 10.0, P), (2, 20.0, D)], [5]),
    ([(5, 10.0, P), (2, 20.0, Q)], [5]),
    ([(5, 10.0, P), (2, 20.0, S)], [5]),
    # Received in the same clock tick: the later row is the later copy.
    ([(1, 10.0, P), (2, 10.0, P)], [1]),
])
def test_only_the_newest_copy_waits(copies: list[tuple[int, float, str]],
                                    expected: list[int]) -> None:
    assert superseded(Copy(*c) for c in copies) == expected


@pytest.mark.parametrize(("current", "outcome", "expected"), [
    (P, DELIVERED, D),
    (P, RETRY, P),
    (P, QUARANTINED, Q),
    # In the batch being sent when a newer copy came: its C-STORE finishes, before the
    # newer one (queued behind it); whatever the peer said, it is never sent again.
    (S, DELIVERED, D),
    (S, RETRY, S),
    (S, QUARANTINED, S),
    # Rerouted while in flight: not put back into the old destination's queue.
    (X, DELIVERED, D),
    (X, RETRY, X),
    (X, QUARANTINED, X),
])
def test_state_after_an_outcome(current: str, outcome: str, expected: str) -> None:
    assert recorded_state(current, outcome) == expected


def test_an_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown outcome"):
        recorded_state(P, "lost")
