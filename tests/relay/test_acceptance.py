"""The decisions of :mod:`dicomcache.relay.acceptance` and the storage SOP classes the SCP
accepts: tables, no sockets (the comparison with real PACS is test_lenient_e2e.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts

from dicomcache.relay import negotiation as neg
from dicomcache.relay.acceptance import (
    CANNOT_UNDERSTAND,
    INSTANCE_MISMATCH,
    SOP_CLASS_MISMATCH,
    SUCCESS,
    SendDecision,
    Verdict,
    judge_received,
    judge_send,
)
from dicomcache.relay.scp import storage_sop_classes
from dicomcache.relay.spool import InstanceInfo

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
GOOD = InstanceInfo("1.2.3", CT, "1.2.3.4", "1.2.840.10008.1.2.1")
SHORT = replace(GOOD, problems=("Pixel Data (7FE0,0010) at offset 900 has 510 bytes",))
NO_CLASS = replace(GOOD, sop_class_in_dataset=False)


@pytest.mark.parametrize(("want_class", "want_instance", "parsed", "verdict"), [
    (CT, "1.2.3.4", GOOD, Verdict(SUCCESS)),
    (CT, "1.2.3.4", SHORT, Verdict(SUCCESS, None, SHORT.problems)),
    (CT, "1.2.3.4", "element (0010,0010) at offset 300 declares 65520 bytes",
     Verdict(CANNOT_UNDERSTAND,
             "unparseable data set: element (0010,0010) at offset 300 declares 65520 bytes")),
    (CT, "1.2.3.4", NO_CLASS, Verdict(CANNOT_UNDERSTAND,
                                      "data set has no SOP Class UID (0008,0016)")),
    (MR, "1.2.3.4", SHORT, Verdict(SOP_CLASS_MISMATCH,
                                   f"SOP Class UID {CT} in the data set but {MR} in the request")),
    (CT, "1.2.3.5", GOOD, Verdict(INSTANCE_MISMATCH,
                                  "SOP Instance UID 1.2.3.4 in the data set but 1.2.3.5 in "
                                  "the request")),
], ids=["clean", "strict problems: stored, warned", "unreadable", "no SOP Class in the data set",
        "another SOP class", "another instance"])
def test_what_the_scp_stores(want_class: str, want_instance: str, parsed: InstanceInfo | str,
                             verdict: Verdict) -> None:
    assert judge_received(want_class, want_instance, parsed) == verdict
    assert verdict.stored is (verdict.status == SUCCESS)


@pytest.mark.parametrize(("parsed", "quarantined", "release", "decision"), [
    (GOOD, None, False, SendDecision(True)),
    (SHORT, None, False, SendDecision(True, "sent with problems: " + SHORT.problems[0])),
    (GOOD, "refused by PACS", False,
     SendDecision(False, "in quarantine (refused by PACS); check it, then send it with "
                         "--release")),
    (GOOD, "refused by PACS", True, SendDecision(True)),
    (SHORT, "unparseable data set", True,
     SendDecision(True, "sent with problems: " + SHORT.problems[0])),
    ("truncated", "unparseable data set", True, SendDecision(False, "cannot be sent: truncated")),
    (NO_CLASS, None, True,
     SendDecision(False, "cannot be sent: data set has no SOP Class UID (0008,0016)")),
], ids=["clean", "strict problems", "quarantined", "quarantined, released",
        "quarantined with problems, released", "unreadable, released", "no SOP Class, released"])
def test_what_relay_send_sends(parsed: InstanceInfo | str, quarantined: str | None,
                               release: bool, decision: SendDecision) -> None:
    assert judge_send(parsed, quarantined, release) == decision


def test_extra_storage_classes_are_the_standard_ones_pynetdicom_lacks() -> None:
    pynetdicom_has = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    for uid, keyword in neg.EXTRA_STORAGE_SOP_CLASSES.items():
        assert uid not in pynetdicom_has
        assert UID(uid).keyword == keyword and "Storage" in UID(uid).name, uid
    retired = {u for u in neg.EXTRA_STORAGE_SOP_CLASSES if UID(u).is_retired}
    # The ones the issue saw refused: retired US, US multi-frame and NM.
    assert {"1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3",
            "1.2.840.10008.5.1.4.1.1.5"} <= retired


def test_the_scp_accepts_pynetdicoms_storage_classes_and_the_extra_ones() -> None:
    accepted = storage_sop_classes()
    assert len(set(accepted)) == len(accepted)
    assert set(accepted) == {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts} \
        | set(neg.EXTRA_STORAGE_SOP_CLASSES)
