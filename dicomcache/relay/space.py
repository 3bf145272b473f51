"""Whether the relay takes a new C-STORE, from the room its spool has (pure).

The spool keeps a *reserve* (a file of :data:`RESERVE_SIZE` bytes) on its file
system.  When the disk fills anyway (another program, ``min_free = 0``), the
reserve is released so that the spool's database can still open and record
what the forwarders deliver, which deletes delivered files and frees space:
the relay drains itself instead of waiting for an operator.  New C-STOREs are
taken only while the reserve is in place and ``min_free`` stays free after
them; everything else is answered ``0xA700`` (out of resources: the modality
keeps the instance and sends it again later).
"""

from __future__ import annotations

from dataclasses import dataclass

from dicomcache.config import format_size

#: Bytes the spool keeps aside for its own database (see the module docstring).
RESERVE_SIZE = 1 << 20

#: Metric labels of :class:`Refusal` (``dicomcache_relay_refused_total{reason}``).
SPOOL_UNAVAILABLE = "spool_unavailable"
DISK_FULL = "disk_full"
MIN_FREE = "min_free"


@dataclass(frozen=True, slots=True)
class Room:
    """What the spool knows about its file system right now."""

    #: The spool's database is open (it could not be, on a full disk at start-up).
    spool_open: bool
    #: The reserve file is in place (released: the disk filled up).
    reserve_held: bool
    #: Bytes the service may still write there (``None``: unknown, e.g. statvfs failed).
    free: int | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a C-STORE is answered ``0xA700`` before anything is written."""

    reason: str
    message: str


def refusal(room: Room, size: int, min_free: int) -> Refusal | None:
    """Why a C-STORE of ``size`` bytes must be refused, or ``None`` to take it."""
    if not room.spool_open:
        return Refusal(SPOOL_UNAVAILABLE, "the spool's database cannot be opened (its file "
                                          "system is full); it is retried every few seconds")
    if not room.reserve_held:
        return Refusal(DISK_FULL, "the spool's file system filled up and its reserve is in "
                                  "use; new instances are taken again once "
                                  f"{format_size(2 * RESERVE_SIZE)} are free")
    if room.free is None or min_free == 0:
        return None  # the write itself will tell (ENOSPC is answered 0xA700 too)
    if room.free - size < min_free:
        return Refusal(MIN_FREE, f"{format_size(room.free)} free on the spool's file system, "
                                 f"relay.min_free is {format_size(min_free)}")
    return None


def reserve_due(free: int | None) -> bool:
    """Whether to (re)create the reserve: only with as much again to spare, so that
    releasing and re-creating it cannot alternate on a disk that stays nearly full."""
    return free is not None and free >= 2 * RESERVE_SIZE
