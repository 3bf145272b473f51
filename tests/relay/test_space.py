"""Whether a C-STORE is taken, from the room the spool has (pure: no disk)."""

from __future__ import annotations

import pytest

from dicomcache.relay.space import (
    DISK_FULL,
    MIN_FREE,
    RESERVE_SIZE,
    SPOOL_UNAVAILABLE,
    Room,
    refusal,
    reserve_due,
)

MiB = 1 << 20
GiB = 1 << 30


@pytest.mark.parametrize(("room", "size", "min_free", "reason"), [
    # taken
    (Room(True, True, 10 * GiB), 10 * MiB, GiB, None),
    (Room(True, True, GiB + 10 * MiB), 10 * MiB, GiB, None),      # exactly min_free left
    (Room(True, True, None), 10 * MiB, GiB, None),                # unknown: the write tells
    (Room(True, True, 5 * MiB), 10 * MiB, 0, None),               # guard off: ENOSPC tells
    # refused
    (Room(True, True, GiB + 10 * MiB - 1), 10 * MiB, GiB, MIN_FREE),
    (Room(True, True, 100 * MiB), 0, GiB, MIN_FREE),              # the status question
    (Room(True, False, 10 * GiB), 10 * MiB, GiB, DISK_FULL),      # reserve in use
    (Room(True, False, 10 * GiB), 10 * MiB, 0, DISK_FULL),
    (Room(False, True, 10 * GiB), 10 * MiB, 0, SPOOL_UNAVAILABLE),
    (Room(False, False, None), 10 * MiB, GiB, SPOOL_UNAVAILABLE),
])
def test_refusal(room: Room, size: int, min_free: int, reason: str | None) -> None:
    got = refusal(room, size, min_free)
    assert (got.reason if got else None) == reason
    if got is not None:
        assert got.message


def test_min_free_message_names_the_key_and_both_sizes() -> None:
    got = refusal(Room(True, True, 300 * MiB), MiB, 2 * GiB)
    assert got is not None
    assert got.message == ("300.0 MiB free on the spool's file system, relay.min_free is "
                           "2.0 GiB")


@pytest.mark.parametrize(("free", "due"), [
    (None, False),
    (0, False),
    (2 * RESERVE_SIZE - 1, False),          # as much again to spare: no release/re-create loop
    (2 * RESERVE_SIZE, True),
    (GiB, True),
])
def test_reserve_due(free: int | None, due: bool) -> None:
    assert reserve_due(free) is due
