"""A received C-STORE command set read without pydicom gives pynetdicom's primitive.

Every command set of the table goes through the replaced ``decode_msg`` and
``message_to_primitive`` and through pynetdicom's own: the primitives must
agree (values and types), or both fail alike.  ``quick`` says whether
:func:`~dicomcache.relay.accel.codec.decode_store_command` takes it (else pydicom
does, as before), so the table shows which odd cases fall back.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pytest
from pynetdicom import _config as pynetdicom_config
from pynetdicom import dimse_primitives as prim
from pynetdicom import evt
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu_primitives import P_DATA

from dicomcache.relay.accel import codec, fastdul

CT = "1.2.840.10008.5.1.4.1.1.2"
SOP = "1.2.826.0.1.3680043.8.498.1234567890123456789"  # 45 characters: odd


def _el(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _us(element: int, value: int) -> bytes:
    return _el(element, struct.pack("<H", value))


def _ui(element: int, uid: str, pad: bytes = b"\0") -> bytes:
    raw = uid.encode("latin-1")
    return _el(element, raw + pad if len(raw) % 2 else raw)


def _command(*elements: bytes, group_length: bool = True) -> bytes:
    body = b"".join(elements)
    return (_el(0x0000, struct.pack("<I", len(body))) if group_length else b"") + body


def _store_rq(*, sop_class: bytes | None = None, sop_instance: bytes | None = None,
              field: int = 0x0001, message_id: int = 7, priority: int = 0,
              data_set_type: int = 0x0001, extra: tuple[tuple[int, bytes], ...] = (),
              drop: tuple[int, ...] = (), group_length: bool = True) -> bytes:
    """A C-STORE-RQ command set, elements in tag order; ``extra`` (element, encoded
    element) go in their place, ``drop`` leaves elements out."""
    parts = {0x0002: sop_class if sop_class is not None else _ui(0x0002, CT),
             0x0100: _us(0x0100, field), 0x0110: _us(0x0110, message_id),
             0x0700: _us(0x0700, priority), 0x0800: _us(0x0800, data_set_type),
             0x1000: sop_instance if sop_instance is not None else _ui(0x1000, SOP)}
    items = [(k, v) for k, v in parts.items() if k not in drop] + list(extra)
    return _command(*(v for _, v in sorted(items, key=lambda kv: kv[0])),
                    group_length=group_length)


#: (name, command set, taken by the quick way)
CASES: list[tuple[str, bytes, bool]] = [
    ("plain", _store_rq(), True),
    ("message id 0, priority high", _store_rq(message_id=0, priority=1), True),
    ("message id 65535, priority low", _store_rq(message_id=65535, priority=2), True),
    ("as pynetdicom encodes it", b"", True),  # filled in by _pynetdicom_encoded()
    ("odd-length UID without padding",
     _store_rq(sop_instance=_el(0x1000, SOP.encode())), True),
    ("odd-length UID padded with a space", _store_rq(sop_instance=_ui(0x1000, SOP, b" ")),
     True),
    ("even-length UID", _store_rq(sop_instance=_ui(0x1000, SOP + "1")), True),
    ("64-character UID", _store_rq(sop_instance=_ui(0x1000, "1." + "2" * 62)), True),
    ("no group length", _store_rq(group_length=False), True),
    ("move originator message id", _store_rq(extra=((0x1031, _us(0x1031, 9)),)), True),
    ("move originator AE title", _store_rq(extra=((0x1030, _el(0x1030, b"MOVER ")),
                                                  (0x1031, _us(0x1031, 9)))), False),
    ("unknown command element", _store_rq(extra=((0x0600, _el(0x0600, b"AE  ")),)), False),
    ("element of another group", _store_rq() + struct.pack("<HHI", 0x0008, 0x0016, 2) + b"12",
     False),
    ("elements out of order", _store_rq(drop=(0x1000,)).replace(
        _us(0x0110, 7), _ui(0x1000, SOP) + _us(0x0110, 7)), False),
    ("an element twice", _store_rq(extra=((0x0701, _us(0x0700, 1)),)), False),
    ("priority missing", _store_rq(drop=(0x0700,)), False),
    ("affected SOP instance missing", _store_rq(drop=(0x1000,)), False),
    ("message id of 4 bytes (VM 2)", _store_rq(drop=(0x0110,), extra=(
        (0x0110, _el(0x0110, struct.pack("<HH", 7, 8))),)), False),
    ("no data set", _store_rq(data_set_type=0x0101), False),
    ("not a C-STORE-RQ (C-ECHO-RQ)", _command(_ui(0x0002, "1.2.840.10008.1.1"),
                                              _us(0x0100, 0x0030), _us(0x0110, 1),
                                              _us(0x0800, 0x0101)), False),
    ("UID with a leading zero (non-conformant)",
     _store_rq(sop_instance=_ui(0x1000, "1.02.3")), False),
    ("UID of 65 characters", _store_rq(sop_instance=_ui(0x1000, "1." + "2" * 63)), False),
    ("two UIDs", _store_rq(sop_instance=_ui(0x1000, SOP + "\\1.2")), False),
    ("UID with a letter", _store_rq(sop_instance=_ui(0x1000, "1.2.a")), False),
    ("empty SOP class UID", _store_rq(sop_class=_el(0x0002, b"")), False),
    ("UID not ASCII", _store_rq(sop_instance=_ui(0x1000, "1.2.\xe9")), False),
]


def _store_rsp(*, status: int = 0x0000, data_set_type: int = 0x0101,
               extra: tuple[tuple[int, bytes], ...] = (), drop: tuple[int, ...] = ()) -> bytes:
    """A C-STORE-RSP command set (as :func:`_store_rq`)."""
    parts = {0x0002: _ui(0x0002, CT), 0x0100: _us(0x0100, 0x8001), 0x0120: _us(0x0120, 7),
             0x0800: _us(0x0800, data_set_type), 0x0900: _us(0x0900, status),
             0x1000: _ui(0x1000, SOP)}
    items = [(k, v) for k, v in parts.items() if k not in drop] + list(extra)
    return _command(*(v for _, v in sorted(items, key=lambda kv: kv[0])))


CASES += [
    ("response: success", _store_rsp(), True),
    ("response: out of resources", _store_rsp(status=0xA700), True),
    ("response: warning with an error comment",
     _store_rsp(status=0xB000, extra=((0x0902, _el(0x0902, b"coerced ")),)), False),
    ("response: offending element",
     _store_rsp(status=0xA900, extra=((0x0901, _el(0x0901, struct.pack("<HH", 8, 0x16))),)),
     False),
    ("response without SOP instance UID", _store_rsp(drop=(0x1000,)), False),
    ("response with a data set", _store_rsp(data_set_type=0x0001), False),
    ("response with a request's element", _store_rsp(extra=((0x0700, _us(0x0700, 1)),)),
     False),
]


def _pynetdicom_encoded() -> bytes:
    """A C-STORE-RQ command set as pynetdicom sends it (through pydicom)."""
    from pynetdicom import dimse

    store = prim.C_STORE()
    store.MessageID, store.AffectedSOPClassUID, store.AffectedSOPInstanceUID = 5, CT, SOP
    store.Priority = 2
    store.MoveOriginatorMessageID = 3
    store.DataSet = BytesIO(b"\x08\x00\x16\x00")
    msg = dimse._RQ_TO_MESSAGE[prim.C_STORE]()
    msg.primitive_to_message(store)
    out = BytesIO()
    for pdata in DIMSEMessage.encode_msg(msg, 1, 0):
        for _, pdv in pdata.presentation_data_value_list:
            if pdv[0] & 1:
                out.write(pdv[1:])
    return out.getvalue()


CASES[3] = (CASES[3][0], _pynetdicom_encoded(), True)


class _Assoc:
    """What ``decode_msg`` asks of the association: its handlers for an event."""

    def __init__(self, handlers: list[Any] | None = None) -> None:
        self.handlers = handlers or []

    def get_handlers(self, event: Any) -> list[Any]:
        return self.handlers if event == evt.EVT_DIMSE_RECV else []


def _pdata(command: bytes, data: bytes, fragment: int = 0) -> P_DATA:
    """The P-DATA of one message: the command set (cut into ``fragment``-byte pieces when
    given), then the data set."""
    pdata = P_DATA()
    step = fragment or max(len(command), 1)
    pieces = [command[i:i + step] for i in range(0, len(command), step)] or [b""]
    for i, piece in enumerate(pieces):
        pdata.presentation_data_value_list.append(
            (3, bytes([0x03 if i == len(pieces) - 1 else 0x01]) + piece))
    if data:
        pdata.presentation_data_value_list.append((3, b"\x00" + data[:10]))
        pdata.presentation_data_value_list.append((3, b"\x02" + data[10:]))
    return pdata


_ATTRS = ("MessageID", "MessageIDBeingRespondedTo", "AffectedSOPClassUID",
          "AffectedSOPInstanceUID", "Priority", "MoveOriginatorApplicationEntityTitle",
          "MoveOriginatorMessageID", "Status", "_context_id")


def _received(decode: Any, to_primitive: Any, pdata: P_DATA, assoc: _Assoc) -> Any:
    """What one way makes of ``pdata``: the primitive's attributes (value and type) and
    data set, or the exception's type."""
    msg = DIMSEMessage()
    try:
        complete = decode(msg, pdata, assoc)
        if not complete:
            return "incomplete"
        primitive = to_primitive(msg)
    except Exception as exc:  # both ways must fail alike
        return type(exc)
    out: dict[str, Any] = {"class": type(msg).__name__, "primitive": type(primitive).__name__}
    for name in _ATTRS:
        value = getattr(primitive, name, None)
        out[name] = (value, type(value).__name__)
    data = getattr(primitive, "DataSet", None)
    out["data"] = data.getvalue() if data is not None else None
    return out


@pytest.mark.parametrize(("name", "command", "quick"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("fragment", [0, 16])
def test_command_sets_decode_as_pynetdicom_does(name: str, command: bytes, quick: bool,
                                                fragment: int) -> None:
    assert (codec.decode_store_command(command) is not None) == quick
    response = name.startswith("response")
    data = b"" if response and "data set" not in name else bytes(range(40))
    pdata = _pdata(command, data, fragment)
    ours = _received(fastdul._decode_msg, fastdul._message_to_primitive, pdata, _Assoc())
    theirs = _received(fastdul._orig_decode_msg, fastdul._orig_message_to_primitive, pdata,
                       _Assoc())
    assert ours == theirs
    if quick:
        assert isinstance(ours, dict) and ours["data"] == (None if response else data)


def test_the_replacements_are_what_pynetdicom_runs() -> None:
    assert DIMSEMessage.decode_msg is fastdul._decode_msg
    assert DIMSEMessage.message_to_primitive is fastdul._message_to_primitive


@pytest.mark.parametrize("cut", [1, 7, 8, 20])
def test_cut_command_sets_are_left_to_pydicom(cut: int) -> None:
    raw = _store_rq()
    assert codec.decode_store_command(raw[:-cut]) is None
    assert codec.decode_store_command(raw + b"\x00" * cut) is None


def test_a_message_shown_to_a_receive_handler_is_pydicoms() -> None:
    """A handler of EVT_DIMSE_RECV sees the command set as a Dataset, as before."""
    msg = DIMSEMessage()
    assert fastdul._decode_msg(msg, _pdata(_store_rq(), b"\x08\x00"), _Assoc([object()]))
    assert msg.command_set.AffectedSOPInstanceUID == SOP
    assert "_dc_store_command" not in vars(msg)


def test_data_sets_received_into_files_are_pynetdicoms(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    monkeypatch.setattr(pynetdicom_config, "STORE_RECV_CHUNKED_DATASET", True)
    calls: list[object] = []
    monkeypatch.setattr(fastdul, "_orig_decode_msg",
                        lambda msg, primitive, assoc: calls.append(primitive) or False)
    pdata = _pdata(_store_rq(), b"\x08\x00")
    assert not fastdul._decode_msg(DIMSEMessage(), pdata, _Assoc())
    assert calls == [pdata]
