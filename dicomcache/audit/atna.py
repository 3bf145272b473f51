"""A record as a DICOM audit message (PS3.15 A.5, the XML of IHE ATNA), pure.

Which message each action is:

==================  ==================================  ===========
action              EventID (DCM)                       action code
==================  ==================================  ===========
``retrieve``        110104 DICOM Instances Transferred  R
``prefetch``        110104 DICOM Instances Transferred  R (to us)
``relay-receive``   110104 DICOM Instances Transferred  C (to us)
``relay-forward``   110104 DICOM Instances Transferred  R (from us)
``query``           110112 Query                        E
``purge``           110105 DICOM Study Deleted          D
``modify``          110103 DICOM Instances Accessed     U
``delete``          110103 DICOM Instances Accessed     D
==================  ==================================  ===========

The sender of the data has role 110153 (Source), its receiver 110152
(Destination); the person or modality the access is for is the requestor.
The patient (when known) and the study are participant objects; a query's
own text travels base64-encoded, as the schema wants.  Every value from
outside (a patient ID, a query) is stripped of characters XML 1.0 cannot
hold, so the message always parses.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

from dicomcache.audit import record as r
from dicomcache.audit.record import Record

_EVENTS: dict[str, tuple[str, str, str]] = {
    r.RETRIEVE: ("110104", "DICOM Instances Transferred", "R"),
    r.PREFETCH: ("110104", "DICOM Instances Transferred", "R"),
    r.RELAY_RECEIVE: ("110104", "DICOM Instances Transferred", "C"),
    r.RELAY_FORWARD: ("110104", "DICOM Instances Transferred", "R"),
    r.QUERY: ("110112", "Query", "E"),
    r.PURGE: ("110105", "DICOM Study Deleted", "D"),
    r.MODIFY: ("110103", "DICOM Instances Accessed", "U"),
    r.DELETE: ("110103", "DICOM Instances Accessed", "D"),
}
SOURCE_ROLE = ("110153", "Source Role ID")
DESTINATION_ROLE = ("110152", "Destination Role ID")
#: The SOP class a query names (Study Root Query/Retrieve Information Model - FIND).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_IP = re.compile(r"^[0-9.]+$|:")


def xml_safe(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot carry (replaced by U+FFFD)."""
    return _NOT_XML.sub("\ufffd", text)


def outcome_indicator(outcome: str) -> str:
    """EventOutcomeIndicator: 0 success; 4 minor failure (denied, not found: nothing
    was sent); 8 serious failure (cut short, refused, failed on our side)."""
    if outcome == r.SUCCESS:
        return "0"
    return "4" if outcome in (r.DENIED, r.FAILED) else "8"


def _code(parent: ET.Element, tag: str, code: str, system: str, text: str) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system,
                                       "originalText": text})


def _participant(root: ET.Element, user: str, *, requestor: bool, address: str | None,
                 role: tuple[str, str] | None, alternative: str | None = None) -> None:
    attrs = {"UserID": xml_safe(user or "-"), "UserIsRequestor": "true" if requestor else "false"}
    if alternative:
        attrs["AlternativeUserID"] = xml_safe(alternative)
    if address:
        attrs["NetworkAccessPointID"] = xml_safe(address)
        attrs["NetworkAccessPointTypeCode"] = "2" if _IP.search(address) else "1"
    el = ET.SubElement(root, "ActiveParticipant", attrs)
    if role is not None:
        _code(el, "RoleIDCode", role[0], "DCM", role[1])


def to_xml(rec: Record, *, source_id: str, host: str, pid: int, peer: str | None = None) -> str:
    """The audit message for ``rec`` (``source_id``: AuditSourceID, e.g. ``dicomcache@host``;
    ``peer``: the other system of a prefetch or a forward, e.g. the PACS)."""
    code, meaning, action = _EVENTS.get(rec.action, ("110103", "DICOM Instances Accessed", "R"))
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action, "EventDateTime": r.iso_time(rec.time),
        "EventOutcomeIndicator": outcome_indicator(rec.outcome)})
    _code(ev, "EventID", code, "DCM", meaning)
    if rec.outcome != r.SUCCESS or rec.detail:
        status = "" if rec.status is None else (
            f" status 0x{rec.status:04X}" if rec.dimse else f" status {rec.status}")
        description = ET.SubElement(ev, "EventOutcomeDescription")
        description.text = xml_safe(f"{rec.outcome}{status}" + (
            f": {r.clip(rec.detail, 512)}" if rec.detail else ""))
    actor = rec.actor
    us = f"dicomcache@{host}"
    who = actor.principal
    if rec.action in (r.RELAY_RECEIVE,):  # a modality sends to us
        _participant(root, actor.principal, requestor=True, address=actor.client or None,
                     role=SOURCE_ROLE)
        _participant(root, us, requestor=False, address=host, role=DESTINATION_ROLE,
                     alternative=str(pid))
    elif rec.action in (r.PREFETCH,):  # the PACS sends to us, for a viewer
        _participant(root, who, requestor=True, address=actor.client or None, role=None)
        _participant(root, peer or "pacs", requestor=False, address=None, role=SOURCE_ROLE)
        _participant(root, us, requestor=False, address=host, role=DESTINATION_ROLE,
                     alternative=str(pid))
    elif rec.action in (r.RELAY_FORWARD,):  # we send to a destination
        _participant(root, us, requestor=True, address=host, role=SOURCE_ROLE,
                     alternative=str(pid))
        _participant(root, rec.destination or peer or "-", requestor=False, address=None,
                     role=DESTINATION_ROLE)
    elif rec.action in (r.PURGE, r.MODIFY, r.DELETE):
        _participant(root, who, requestor=True, address=actor.client or None, role=None)
        _participant(root, us, requestor=False, address=host, role=None, alternative=str(pid))
    else:  # a viewer retrieves from us, or queries us
        _participant(root, us, requestor=False, address=host, role=SOURCE_ROLE,
                     alternative=str(pid))
        _participant(root, who, requestor=True, address=actor.client or None,
                     role=DESTINATION_ROLE)
    ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": xml_safe(source_id)})
    _objects(root, rec)
    return ET.tostring(root, encoding="unicode", xml_declaration=False)


def _objects(root: ET.Element, rec: Record) -> None:
    s = rec.subject
    if s.patient_id:
        patient = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": xml_safe(s.patient_id), "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})
        _code(patient, "ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number")
    if s.study_uid:
        study = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": xml_safe(s.study_uid), "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _code(study, "ParticipantObjectIDTypeCode", "110180", "DCM", "Study Instance UID")
        if s.sop_uid or s.instances:
            description = ET.SubElement(study, "ParticipantObjectDescription")
            attrs = {"NumberOfInstances": str(s.instances or 1)}
            if s.sop_class:
                attrs["UID"] = xml_safe(s.sop_class)
            sop_class = ET.SubElement(description, "SOPClass", attrs)
            if s.sop_uid:
                ET.SubElement(sop_class, "Instance", {"UID": xml_safe(s.sop_uid)})
    if rec.action == r.QUERY:
        query = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": STUDY_ROOT_FIND, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _code(query, "ParticipantObjectIDTypeCode", "110181", "DCM", "SOP Class UID")
        text = f"{rec.path or ''}?{s.query or ''}"
        q = ET.SubElement(query, "ParticipantObjectQuery")
        q.text = base64.b64encode(text.encode("utf-8")).decode("ascii")
        ET.SubElement(query, "ParticipantObjectDetail", {
            "type": "QueryEncoding", "value": base64.b64encode(b"UTF-8").decode("ascii")})
    elif not s.study_uid and (s.orthanc_id or rec.path):
        # A resource named only by Orthanc's ID (or a path): said as it was asked.
        ident = s.orthanc_id or rec.path or ""
        other = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": xml_safe(ident), "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "4"})
        _code(other, "ParticipantObjectIDTypeCode", "12", "RFC-3881", "URI")
