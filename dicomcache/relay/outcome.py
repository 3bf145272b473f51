"""What became of one instance sent to one destination: the relay's one result type.

:class:`Outcome` is what :class:`~.scu.StoreSCU` reports for each instance,
what the forwarder counts and logs, and what :meth:`~.spool.Spool.record`
stores.  Its ``outcome`` is one of:

* ``delivered``: the peer stored it (success or a warning status);
* ``retry``: transient (the peer is short of resources, the association
  broke, the outcome is unknown): send it again later;
* ``quarantined``: permanent: the destination will never take it as it is.

:func:`classify` maps a C-STORE response status to one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

DELIVERED, RETRY, QUARANTINED = "delivered", "retry", "quarantined"

#: Failure statuses worth a resend (PS3.7 C.5.5, C.5.7, C.5.2): duplicate
#: invocation, resource limitation, cancel.
_TRANSIENT = frozenset({0x0210, 0x0213, 0xFE00})


def classify(status: int | None) -> str:
    """``delivered``, ``retry`` or ``quarantined`` for a C-STORE response status.

    PS3.4 B.2.3 / PS3.7 C: success ``0x0000`` and warnings ``0xBxxx`` (coercion,
    elements discarded, data set does not match the SOP class) are stored, so
    delivered; ``0xA7xx`` out of resources, ``0x0210``, ``0x0213``, ``0xFE00``
    and no status at all (abort, timeout: outcome unknown) are transient;
    everything else (``0xA9xx``, ``0xCxxx``, ``0x0122``, ``0x0117`` …) is
    permanent.
    """
    if status is None:
        return RETRY
    if status == 0x0000 or 0xB000 <= status <= 0xBFFF:
        return DELIVERED
    if 0xA700 <= status <= 0xA7FF or status in _TRANSIENT:
        return RETRY
    return QUARANTINED


@dataclass(slots=True)
class Outcome:
    """What happened to one instance (``strategy_used``, ``attempts_made`` and
    ``transfer_syntax`` are the seed's result fields).

    ``key`` identifies the instance to the caller (the spool's instance id for
    the forwarder).  ``status`` is the peer's C-STORE status when it answered;
    ``reason`` says why it was not delivered; ``transcoded``: it was sent in
    another syntax than its own.
    """

    key: int
    outcome: str
    status: int | None = None
    reason: str = ""
    strategy_used: str | None = None
    attempts_made: int = 0
    transfer_syntax: str | None = None
    seconds: float = 0.0
    transcoded: bool = False
