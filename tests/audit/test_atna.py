"""Records as DICOM audit messages (PS3.15 A.5): the shape the schema asks for, per action."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

import pytest

from dicomcache.audit import record as r
from dicomcache.audit.atna import outcome_indicator, to_xml, xml_safe
from dicomcache.audit.record import Actor, Record, Subject

VIEWER = Actor("alice", "viewer", "bearer", "10.0.0.5")
MODALITY = Actor("CT_ROOM_2", "modality", "dimse", "10.0.1.9")
FULL = Subject(patient_id="PX", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5",
               sop_class="1.2.840.10008.5.1.4.1.1.2")


def check_shape(xml: str) -> ET.Element:
    """The elements and attributes PS3.15 A.5.1 / the DICOM audit schema require."""
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    assert root[0].tag == "EventIdentification"
    ev = root.find("EventIdentification")
    assert ev is not None
    assert ev.get("EventActionCode") in ("C", "R", "U", "D", "E")
    assert ev.get("EventDateTime", "").endswith("Z")
    assert ev.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
    event_id = ev.find("EventID")
    assert event_id is not None and event_id.get("codeSystemName") == "DCM"
    assert event_id.get("csd-code") and event_id.get("originalText")
    participants = root.findall("ActiveParticipant")
    assert len(participants) >= 2
    assert sum(p.get("UserIsRequestor") == "true" for p in participants) == 1
    for p in participants:
        assert p.get("UserID") and p.get("UserIsRequestor") in ("true", "false")
        if p.get("NetworkAccessPointID"):
            assert p.get("NetworkAccessPointTypeCode") in ("1", "2")
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID")
    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID")
        assert obj.get("ParticipantObjectTypeCode") in ("1", "2", "3", "4")
        assert obj.find("ParticipantObjectIDTypeCode") is not None
    return root


@pytest.mark.parametrize(("action", "actor", "event", "code"), [
    (r.RETRIEVE, VIEWER, "110104", "R"),
    (r.PREFETCH, VIEWER, "110104", "R"),
    (r.RELAY_RECEIVE, MODALITY, "110104", "C"),
    (r.RELAY_FORWARD, Actor("DICOMCACHE", "relay", "dimse"), "110104", "R"),
    (r.QUERY, VIEWER, "110112", "E"),
    (r.PURGE, Actor("root", "admin", "os"), "110105", "D"),
])
def test_every_action_is_a_valid_audit_message(action: str, actor: Actor, event: str,
                                               code: str) -> None:
    rec = Record(action, actor, FULL if action != r.QUERY else Subject(query="PatientID=PX"),
                 r.SUCCESS, destination="PACS PACS@10.0.0.1:104", path="/dicom-web/studies")
    root = check_shape(to_xml(rec, source_id="dicomcache@box", host="box", pid=7))
    ev = root.find("EventIdentification")
    assert ev is not None and ev.get("EventActionCode") == code
    assert ev.find("EventID").get("csd-code") == event  # type: ignore[union-attr]
    users = {p.get("UserID"): p for p in root.findall("ActiveParticipant")}
    requestor = next(u for u, p in users.items() if p.get("UserIsRequestor") == "true")
    assert requestor == ("dicomcache@box" if action == r.RELAY_FORWARD else actor.principal)
    objects = {o.get("ParticipantObjectTypeCode"): o
               for o in root.findall("ParticipantObjectIdentification")}
    if action == r.QUERY:
        q = objects["2"].find("ParticipantObjectQuery")
        assert q is not None and base64.b64decode(q.text or "") == \
            b"/dicom-web/studies?PatientID=PX"
    else:
        assert objects["1"].get("ParticipantObjectID") == "PX"
        assert objects["1"].get("ParticipantObjectTypeCodeRole") == "1"
        assert objects["2"].get("ParticipantObjectID") == "1.2.3"
        sop = objects["2"].find("ParticipantObjectDescription/SOPClass/Instance")
        assert sop is not None and sop.get("UID") == "1.2.3.4.5"


@pytest.mark.parametrize(("outcome", "indicator"), [
    (r.SUCCESS, "0"), (r.DENIED, "4"), (r.FAILED, "4"), (r.ABORTED, "8"), (r.REFUSED, "8")])
def test_outcome_indicator(outcome: str, indicator: str) -> None:
    assert outcome_indicator(outcome) == indicator


def test_anything_from_outside_still_parses() -> None:
    nasty = "P\x00\x01<&>\"'\ud800\ufffe]]>"
    rec = Record(r.RETRIEVE, Actor(nasty, "viewer", "basic", nasty),
                 Subject(patient_id=nasty, study_uid=nasty), r.FAILED, detail=nasty, status=500)
    root = check_shape(to_xml(rec, source_id=nasty, host="box", pid=1))
    assert root.find("EventIdentification/EventOutcomeDescription") is not None
    assert xml_safe("a\x00b") == "a\ufffdb"
