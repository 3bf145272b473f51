"""What the relay takes in, and what ``relay send`` sends: pure decisions, no I/O.

The relay answers a modality as a PACS would.  DCMTK's storescp and Orthanc
(measured with 3.6.7 and 1.10, tests/relay/test_acceptance.py) store, with
status 0x0000 and no warning, a data set whose Pixel Data is a few bytes longer
or shorter than its image attributes need, one whose tags are out of order, an
image without Pixel Data, and the retired storage SOP classes.  Refusing those
loses the study at the modality (it gives up, or an operator deletes the job),
so the relay stores them too, exactly as received, forwards them, and records
what a strict reading objects to as warnings (the log, the spool's record,
``relay status``, the audit record of the C-STORE).

What stays refused is what cannot be identified or routed, with the status
storescp and Orthanc answer (measured, same test): no SOP Instance UID, no SOP
Class UID in the data set (0xC000: a receiver that stored it could not tell
which instance it is); bytes whose layout cannot be followed — an element longer
than what remains, a missing delimiter (0xC000; storescp and Orthanc abort the
association); a data set that is not the instance or the class the C-STORE
request announced (0xA900, "data set does not match SOP class").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

SUCCESS = 0x0000
SOP_CLASS_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: As storescp and Orthanc answer (PS3.4 B.2.3 has no status of its own for it).
INSTANCE_MISMATCH = 0xA900


class Parsed(Protocol):
    """What the decisions need from a lenient parse (``spool.InstanceInfo``)."""

    @property
    def sop_class(self) -> str: ...
    @property
    def sop_instance(self) -> str: ...
    @property
    def problems(self) -> tuple[str, ...]: ...
    @property
    def sop_class_in_dataset(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to one C-STORE."""

    status: int
    #: Why it is refused (``None``: it is stored).
    refusal: str | None = None
    #: What a strict reading objects to, for an instance stored all the same.
    warnings: tuple[str, ...] = ()

    @property
    def stored(self) -> bool:
        return self.refusal is None


def judge_received(want_class: str, want_instance: str, parsed: Parsed | str) -> Verdict:
    """Store or refuse one received data set.

    ``want_class``/``want_instance``: the C-STORE request's Affected SOP Class /
    Instance UID; ``parsed``: the lenient parse of the data set, or why it failed.
    """
    if isinstance(parsed, str):
        return Verdict(CANNOT_UNDERSTAND, f"unparseable data set: {parsed}")
    if not parsed.sop_class_in_dataset:
        return Verdict(CANNOT_UNDERSTAND, "data set has no SOP Class UID (0008,0016)")
    if parsed.sop_class != want_class:
        return Verdict(SOP_CLASS_MISMATCH,
                       f"SOP Class UID {parsed.sop_class} in the data set but "
                       f"{want_class} in the request")
    if parsed.sop_instance != want_instance:
        return Verdict(INSTANCE_MISMATCH,
                       f"SOP Instance UID {parsed.sop_instance} in the data set but "
                       f"{want_instance} in the request")
    return Verdict(SUCCESS, None, parsed.problems)


@dataclass(frozen=True, slots=True)
class SendDecision:
    """Whether ``relay send`` sends one file, and what it tells the operator."""

    send: bool
    #: Why it is skipped, or the warnings of a file sent all the same.
    message: str | None = None


def judge_send(parsed: Parsed | str, quarantine_reason: str | None, release: bool
               ) -> SendDecision:
    """Send one file or skip it.

    ``parsed``: the lenient parse, or why it failed; ``quarantine_reason``: the
    reason the relay put the file in quarantine (its ``.reason.json``), ``None``
    for a file from elsewhere; ``release``: the operator gave ``--release``.

    A file the relay quarantined is sent only on the operator's word: it was set
    aside for a reason a person should read first.  What cannot be identified
    (no parse, no SOP Class UID) is never sent: no C-STORE can name it.
    """
    if isinstance(parsed, str):
        return SendDecision(False, f"cannot be sent: {parsed}")
    if not parsed.sop_class_in_dataset:
        return SendDecision(False, "cannot be sent: data set has no SOP Class UID (0008,0016)")
    if quarantine_reason is not None and not release:
        return SendDecision(False, f"in quarantine ({quarantine_reason}); check it, then "
                                   "send it with --release")
    if parsed.problems:
        return SendDecision(True, "sent with problems: " + "; ".join(parsed.problems))
    return SendDecision(True)
