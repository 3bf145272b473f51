"""Which copy of a SOP Instance goes to a destination: the newest one (pure functions).

A modality that re-sends an instance (a corrected one: same SOP Instance UID,
other content; or the same bytes after a lost acknowledgement) must never see
its PACS end with the earlier copy.  A PACS keeps either the first copy it
stored (Orthanc's default) or the last one, so the relay sends the newest copy
and never an older one after it:

* :func:`superseded`: when a copy is queued for a destination, every *other*
  copy of the same SOP Instance UID still waiting for that destination, except
  the newest, is superseded: never sent.  "Newest" is the latest received (the
  spool's row order breaks ties): a file re-queued after a crash keeps the time
  it was received, not the time it was found.
* :func:`recorded_state`: a superseded copy that was already in the batch being
  sent when the newer one arrived finishes its C-STORE; its outcome is recorded
  without putting it back in the queue.  Delivered: it went *before* the newer
  copy (one forwarder per destination sends batch after batch, and the newer
  copy is queued behind it), so the PACS ends with the newer one either way.

The delivery states are the spool's (``deliveries.state``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dicomcache.relay.outcome import DELIVERED, QUARANTINED, RETRY

PENDING, DELIVERED_STATE, QUARANTINED_STATE, DROPPED, SUPERSEDED = (
    "pending", "delivered", "quarantined", "dropped", "superseded")


@dataclass(frozen=True, slots=True)
class Copy:
    """One received copy of a SOP Instance and its delivery state for one destination."""

    key: int
    received: float
    state: str


def superseded(copies: Iterable[Copy]) -> list[int]:
    """Keys of the copies to mark superseded: every waiting (``pending``) copy but the
    newest of all (whatever the newest's state: an older copy never goes after a newer
    one was delivered, refused or is waiting)."""
    listed = list(copies)
    if not listed:
        return []
    newest = max(listed, key=lambda c: (c.received, c.key))
    return sorted(c.key for c in listed if c.state == PENDING and c is not newest)


def recorded_state(current: str, outcome: str) -> str:
    """The delivery's state after the peer's ``outcome`` (``delivered``, ``retry`` or
    ``quarantined``) for a delivery now in state ``current``."""
    if outcome not in (DELIVERED, RETRY, QUARANTINED):
        raise ValueError(f"unknown outcome {outcome!r}")
    if outcome == DELIVERED:
        return DELIVERED_STATE  # stored by the peer, before any newer copy: say so
    if current in (SUPERSEDED, DROPPED):
        # Taken out of the queue while it was being sent (a newer copy replaces it, or an
        # operator moved it elsewhere): never put back, never quarantined here.
        return current
    return QUARANTINED_STATE if outcome == QUARANTINED else PENDING
