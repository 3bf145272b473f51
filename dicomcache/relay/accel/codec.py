"""DIMSE messages as bytes, without pydicom: C-STORE command sets, PDUs; a file's meta UIDs.

pynetdicom builds every DIMSE message as a pydicom Dataset from its primitive,
validating each UID again, and encodes the command set twice (once for its
group length); it turns each PDU into a primitive, an object and an
``encode``; it reads a file's meta group into a Dataset to send the file.
These functions give the same bytes directly (each is
tested for byte equality with pynetdicom and pydicom); :mod:`.fastdul` uses
them when it is installed, and anything they do not handle (a message type
other than C-STORE, a value only pydicom should encode) returns ``None`` so
that the caller takes pynetdicom's way.  The other way round,
:func:`decode_store_command` reads a received C-STORE command set (pydicom's
decode and pynetdicom's check of every UID again were the largest Python cost
of the SCP's DUL thread per C-STORE; the forwarder reads a response per
instance), tested against pydicom's own decoding.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

#: Largest block of encoded PDUs handed to the DUL at once (a big multi-frame file
#: is read and sent block by block, so memory stays bounded).
RAW_BLOCK = 4 << 20
#: P-DATA-TF PDU header with its single PDV item header (PS3.8 9.3.5):
#: type 0x04, reserved, PDU length; item length, presentation context ID,
#: message control header (bit 0: command, bit 1: last fragment).
_PDV_HEAD = struct.Struct(">BBIIBB")


_ELEMENT_HEAD = struct.Struct("<HHI")
_INT_FORMATS = {"UL": "I", "US": "H", "SL": "i", "SS": "h"}
#: String VRs padded with a space (UI: with NUL), as pydicom writes them.
_TEXT_VRS = frozenset({"AE", "CS", "LO", "SH", "ST", "LT", "DA", "TM", "DT", "IS", "DS"})


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    return [value]


def _element_value(vr: str, value: Any) -> bytes | None:
    """The encoded value of one command element; None when only pydicom should do it."""
    values = _values(value)
    if vr in _INT_FORMATS:
        if not all(isinstance(v, int) for v in values):
            return None
        return struct.pack(f"<{len(values)}{_INT_FORMATS[vr]}", *values)
    if vr == "AT":
        if not all(isinstance(v, int) for v in values):
            return None
        return b"".join(struct.pack("<HH", int(v) >> 16, int(v) & 0xFFFF) for v in values)
    if vr == "UI" or vr in _TEXT_VRS:
        if not all(isinstance(v, str) for v in values):
            return None
        try:
            raw = "\\".join(values).encode("ascii")
        except UnicodeEncodeError:  # a character set question: pydicom's
            return None
        if len(raw) % 2:
            raw += b"\x00" if vr == "UI" else b" "
        return raw
    return None


def encode_command(ds: Dataset) -> bytes | None:
    """A command set in Implicit VR Little Endian, as pydicom's ``encode`` gives it,
    or None when it holds something this does not handle (the caller uses pydicom)."""
    out = bytearray()
    for elem in ds:
        raw = _element_value(elem.VR, elem.value)
        if raw is None:
            return None
        tag = int(elem.tag)
        out += _ELEMENT_HEAD.pack(tag >> 16, tag & 0xFFFF, len(raw))
        out += raw
    return bytes(out)


def command_bytes(ds: Dataset) -> bytes:
    """A command set encoded by :func:`encode_command`, or by pydicom when it must be."""
    raw = encode_command(ds)
    return raw if raw is not None else bytes(encode(ds, True, True) or b"")


def _append_pdvs(out: bytearray, context_id: int, data: bytes | memoryview, fragment: int,
                 *, command: bool, last: bool) -> None:
    """Append ``data`` as P-DATA-TF PDUs of one PDV each, ``fragment`` bytes at most
    (0: one PDV); ``last``: its final fragment ends the command set or data set."""
    view = memoryview(data)
    size = len(view)
    step = fragment or size
    base = 0x01 if command else 0x00
    pos = 0
    while True:
        chunk = view[pos:pos + step]
        pos += len(chunk)
        end = pos >= size
        flags = base | (0x02 if end and last else 0x00)
        out += _PDV_HEAD.pack(0x04, 0x00, len(chunk) + 6, len(chunk) + 2, context_id, flags)
        out += chunk
        if end:
            return


def encode_message(msg: Any, context_id: int, max_pdu: int) -> Iterator[bytearray]:
    """The P-DATA-TF PDUs of a DIMSE message, in blocks of about :data:`RAW_BLOCK`.

    The same fragments as pynetdicom's ``DIMSEMessage.encode_msg``: command set,
    then the data set (in memory, or from a file from an offset), each cut at
    ``max_pdu - 6`` bytes (0: not cut).
    """
    data = msg.data_set.getvalue() if msg.data_set is not None else None
    path = msg._data_set_path if msg.data_set is None else None
    return encode_pdus(command_bytes(msg.command_set), data, path, context_id, max_pdu)


def encode_pdus(command: bytes, data: bytes | None, path: tuple[Any, int] | None,
                context_id: int, max_pdu: int) -> Iterator[bytearray]:
    """:func:`encode_message` from an encoded command set and the data set (bytes, or a
    file and the offset where the data set starts in it)."""
    # A peer may announce a maximum below what one PDV item needs (1-6 bytes): one data
    # byte per item is the least that can be sent at all (a negative size looped for ever).
    fragment = max(max_pdu - 6, 1) if max_pdu else 0
    out = bytearray()
    _append_pdvs(out, context_id, command, fragment, command=True, last=True)
    if data:
        _append_pdvs(out, context_id, data, fragment, command=False, last=True)
    elif data is None and path is not None:
        with open(path[0], "rb") as f:
            left = f.seek(0, os.SEEK_END) - f.seek(path[1])
            step = left if not fragment else max(fragment, RAW_BLOCK // fragment * fragment)
            while True:
                chunk = f.read(min(step, left))
                left -= len(chunk)
                last = left <= 0 or not chunk
                _append_pdvs(out, context_id, chunk, fragment, command=False, last=last)
                if last:
                    break
                if len(out) >= RAW_BLOCK:
                    yield out
                    out = bytearray()
    yield out


# C-STORE command sets, in tag order: (element, VR, primitive attribute or fixed value).
_STORE_RQ = ((0x0002, "UI", "AffectedSOPClassUID"), (0x0100, "US", 0x0001),
             (0x0110, "US", "MessageID"), (0x0700, "US", "Priority"),
             (0x0800, "US", None), (0x1000, "UI", "AffectedSOPInstanceUID"),
             (0x1030, "AE", "MoveOriginatorApplicationEntityTitle"),
             (0x1031, "US", "MoveOriginatorMessageID"))
_STORE_RSP = ((0x0002, "UI", "AffectedSOPClassUID"), (0x0100, "US", 0x8001),
              (0x0120, "US", "MessageIDBeingRespondedTo"), (0x0800, "US", 0x0101),
              (0x0900, "US", "Status"), (0x0901, "AT", "OffendingElement"),
              (0x0902, "LO", "ErrorComment"), (0x1000, "UI", "AffectedSOPInstanceUID"))


def store_command(primitive: Any) -> tuple[bytes, bytes | None, tuple[Any, int] | None] | None:
    """A C-STORE primitive's command set (as pynetdicom's ``primitive_to_message`` and
    pydicom would encode it) and its data set, without building a DIMSE message:
    that took most of a C-STORE's CPU on either side.  None: not a C-STORE, or a
    value only pydicom should encode."""
    if type(primitive) is not C_STORE:
        return None
    request = primitive.MessageIDBeingRespondedTo is None
    data: bytes | None = None
    path = None
    if request:
        dataset = primitive.DataSet
        path = getattr(primitive, "_dataset_path", None)
        data = dataset.getvalue() if dataset is not None else None
        kind = 0x0001 if dataset is not None or path else 0x0101
    out = bytearray()
    for element, vr, source in _STORE_RQ if request else _STORE_RSP:
        if source is None:
            value: Any = kind
        elif isinstance(source, int):
            value = source
        else:
            value = getattr(primitive, source)
            if value is None:  # not set: no element (pynetdicom deletes it)
                continue
        raw = _element_value(vr, value)
        if raw is None:
            return None
        out += _ELEMENT_HEAD.pack(0x0000, element, len(raw))
        out += raw
    command = _ELEMENT_HEAD.pack(0x0000, 0x0000, 4) + struct.pack("<I", len(out)) + out
    return command, data if request else None, path if request else None


#: Explicit VR with a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
#: The file meta elements pynetdicom's ``send_c_store`` reads from a file it sends.
_META_KEYWORDS = {0x0002: "MediaStorageSOPClassUID", 0x0003: "MediaStorageSOPInstanceUID",
                  0x0010: "TransferSyntaxUID"}
#: How much of a file :func:`read_file_meta` looks at (a meta group is far smaller).
_META_READ = 8192


class FileMetaUIDs:
    """What pynetdicom's ``send_c_store`` asks of a file's meta group (``kw in meta``,
    ``meta.kw``) for the UIDs it needs, as pydicom UIDs."""

    __slots__ = ("_uids",)

    def __init__(self, uids: dict[str, UID]) -> None:
        self._uids = uids

    def __contains__(self, keyword: object) -> bool:
        return keyword in self._uids

    def __getattr__(self, keyword: str) -> UID:
        try:
            return self._uids[keyword]
        except KeyError:
            raise AttributeError(keyword) from None


def read_file_meta(path: str | os.PathLike[str]) -> tuple[FileMetaUIDs, int] | None:
    """The SOP class, SOP instance and transfer syntax UIDs of a Part-10 file and the
    offset of its data set, as pynetdicom's ``split_dataset`` finds them (without
    reading the whole meta group into a pydicom Dataset).  None when the file is not
    laid out plainly (no preamble and
    ``DICM``, a meta group longer than 8 KiB, a UID element that is not UI): the
    caller then lets pydicom read it."""
    with open(path, "rb") as f:
        head = f.read(_META_READ)
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    pos = 132
    uids: dict[str, UID] = {}
    while True:
        if pos + 8 > len(head):
            # The buffer ran out inside the meta group, unless the file ended with it.
            return (FileMetaUIDs(uids), pos) if pos == len(head) < _META_READ else None
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return FileMetaUIDs(uids), pos
        vr = head[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                return None
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        end = start + length
        if end > len(head):
            return None
        keyword = _META_KEYWORDS.get(element)
        if keyword is not None:
            if vr != b"UI":
                return None
            uids[keyword] = UID(head[start:end].decode("ascii", "replace").rstrip("\0 "))
        pos = end


#: A conformant UID (PS3.5 9.1): what pynetdicom accepts without a word.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
#: The C-STORE command elements :func:`decode_store_command` reads, request and
#: response: element → (VR, the only length it takes; 0 for a UI of any length).
#: Anything else is pydicom's.
_STORE_RQ_ELEMENTS = {0x0000: ("UL", 4), 0x0002: ("UI", 0), 0x0100: ("US", 2),
                      0x0110: ("US", 2), 0x0700: ("US", 2), 0x0800: ("US", 2),
                      0x1000: ("UI", 0), 0x1031: ("US", 2)}
_STORE_RSP_ELEMENTS = {0x0000: ("UL", 4), 0x0002: ("UI", 0), 0x0100: ("US", 2),
                       0x0120: ("US", 2), 0x0800: ("US", 2), 0x0900: ("US", 2),
                       0x1000: ("UI", 0)}
#: Those a command set must hold for the quick way (the rest: pynetdicom decides).
_STORE_RQ_REQUIRED = frozenset({0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})
_STORE_RSP_REQUIRED = frozenset({0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000})
_US = struct.Struct("<H")
#: CommandField of a C-STORE-RQ and -RSP; CommandDataSetType "no data set" (PS3.7 E.1-1).
_C_STORE_RQ, _C_STORE_RSP, _NO_DATA_SET = 0x0001, 0x8001, 0x0101


@dataclass(frozen=True, slots=True)
class StoreCommand:
    """A C-STORE command set, decoded (:func:`decode_store_command`)."""

    #: A request (with a data set), or a response (with none).
    request: bool
    #: MessageID of a request, MessageIDBeingRespondedTo of a response.
    message_id: int
    sop_class: UID
    sop_instance: UID
    priority: int | None = None
    move_originator_message_id: int | None = None
    status: int | None = None


def _uid(raw: bytes) -> UID | None:
    """A UI value as pydicom decodes it (trailing NULs and spaces dropped), when it is one
    conformant UID; None otherwise (empty, several values, not ASCII, not conformant:
    pynetdicom's checks and messages apply)."""
    try:
        text = raw.decode("ascii").rstrip("\0 ")
    except UnicodeDecodeError:
        return None
    if not text or len(text) > 64 or _UID.fullmatch(text) is None:
        return None
    return UID(text)


def _elements(raw: bytes) -> dict[int, bytes] | None:
    """A command set's group 0000 elements (Implicit VR LE) → their values, when each
    is one of a C-STORE's (:data:`_STORE_RQ_ELEMENTS`, :data:`_STORE_RSP_ELEMENTS`) of
    its length, once and in order, and nothing follows the last; else None."""
    known = _STORE_RQ_ELEMENTS | _STORE_RSP_ELEMENTS
    values: dict[int, bytes] = {}
    pos, end, last = 0, len(raw), -1
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = _ELEMENT_HEAD.unpack_from(raw, pos)
        pos += 8
        spec = known.get(element)
        if group != 0 or spec is None or element <= last or pos + length > end:
            return None
        if spec[1] and length != spec[1]:
            return None
        values[element] = raw[pos:pos + length]
        pos += length
        last = element
    return values


def decode_store_command(raw: bytes) -> StoreCommand | None:
    """A C-STORE-RQ or -RSP command set (Implicit VR Little Endian) decoded without
    pydicom: what pynetdicom's ``decode`` and ``message_to_primitive`` make of it, for
    the plain case.  None (the caller uses pydicom) for anything else: another
    command, an element the command does not have or this does not read (a Move
    Originator AE Title, an Error Comment), one of the wrong length, repeated or out of
    order, a required one missing, a request without a data set or a response with
    one, a UID that is not one conformant UID, trailing bytes."""
    values = _elements(raw)
    if values is None or 0x0100 not in values:
        return None
    field = _US.unpack(values[0x0100])[0]
    if field == _C_STORE_RQ:
        allowed, required = _STORE_RQ_ELEMENTS, _STORE_RQ_REQUIRED
    elif field == _C_STORE_RSP:
        allowed, required = _STORE_RSP_ELEMENTS, _STORE_RSP_REQUIRED
    else:
        return None
    if not values.keys() >= required or not values.keys() <= allowed.keys():
        return None
    if (_US.unpack(values[0x0800])[0] == _NO_DATA_SET) == (field == _C_STORE_RQ):
        return None
    sop_class, sop_instance = _uid(values[0x0002]), _uid(values[0x1000])
    if sop_class is None or sop_instance is None:
        return None

    def us(element: int) -> int | None:
        value = values.get(element)
        return None if value is None else int(_US.unpack(value)[0])

    if field == _C_STORE_RSP:
        return StoreCommand(False, int(us(0x0120) or 0), sop_class, sop_instance,
                            status=us(0x0900))
    return StoreCommand(True, int(us(0x0110) or 0), sop_class, sop_instance,
                        priority=us(0x0700), move_originator_message_id=us(0x1031))


def store_primitive(command: StoreCommand) -> C_STORE:
    """The C_STORE primitive pynetdicom's ``message_to_primitive`` makes of the same
    command set (a request's data set, context and file attributes are the caller's).
    The UIDs go in as they are: :func:`decode_store_command` took only conformant
    ones, which pynetdicom's setters would accept unchanged and without a message."""
    primitive = C_STORE()
    if command.request:
        primitive.MessageID = command.message_id
        if command.priority is not None:  # (always: a request without one is pydicom's)
            primitive.Priority = command.priority
        if command.move_originator_message_id is not None:
            primitive.MoveOriginatorMessageID = command.move_originator_message_id
    else:
        primitive.MessageIDBeingRespondedTo = command.message_id
        primitive.Status = command.status
    primitive._affected_sop_class_uid = command.sop_class
    primitive._affected_sop_instance_uid = command.sop_instance
    return primitive
