"""codec gives pynetdicom's and pydicom's bytes: command sets, PDUs; reads file meta as they do."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pynetdicom import dimse_primitives as prim
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from dicomcache.relay.accel import codec
from dicomcache.relay.part10 import part10_header

CT = "1.2.840.10008.5.1.4.1.1.2"
SOP = "1.2.826.0.1.3680043.8.498.1234567890123456789"  # odd length: padded


def _primitives() -> list[object]:
    store = prim.C_STORE()
    store.MessageID, store.AffectedSOPClassUID, store.AffectedSOPInstanceUID = 7, CT, SOP
    store.Priority = 2
    store.MoveOriginatorApplicationEntityTitle = "MOVER"
    store.MoveOriginatorMessageID = 3
    store_rsp = prim.C_STORE()
    store_rsp.MessageIDBeingRespondedTo, store_rsp.Status = 7, 0xA700
    store_rsp.AffectedSOPClassUID, store_rsp.AffectedSOPInstanceUID = CT, SOP
    store_rsp.ErrorComment = "out of resources (odd)"
    store_rsp.OffendingElement = [0x00100010, 0x7FE00010]
    echo = prim.C_ECHO()
    echo.MessageID, echo.AffectedSOPClassUID = 1, "1.2.840.10008.1.1"
    echo_rsp = prim.C_ECHO()
    echo_rsp.MessageIDBeingRespondedTo, echo_rsp.Status = 1, 0
    echo_rsp.AffectedSOPClassUID = "1.2.840.10008.1.1"
    move_rsp = prim.C_MOVE()
    move_rsp.MessageIDBeingRespondedTo, move_rsp.Status = 5, 0xFF00
    move_rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    move_rsp.NumberOfRemainingSuboperations = 10
    move_rsp.NumberOfCompletedSuboperations = 2
    move_rsp.NumberOfFailedSuboperations = 0
    move_rsp.NumberOfWarningSuboperations = 1
    return [store, store_rsp, echo, echo_rsp, move_rsp]


def _message(primitive: object) -> DIMSEMessage:
    from pynetdicom import dimse

    table = (dimse._RQ_TO_MESSAGE if primitive.MessageIDBeingRespondedTo is None  # type: ignore[attr-defined]
             else dimse._RSP_TO_MESSAGE)
    msg: DIMSEMessage = table[primitive.__class__]()  # type: ignore[index]
    msg.primitive_to_message(primitive)  # type: ignore[arg-type]
    return msg


@pytest.mark.parametrize("index", range(5))
def test_command_sets_encode_as_pydicom_does(index: int) -> None:
    msg = _message(_primitives()[index])
    raw = codec.encode_command(msg.command_set)
    assert raw is not None
    assert raw == encode(msg.command_set, True, True)
    # The group length is the length of what follows it (PS3.7 E.1).
    assert msg.command_set.CommandGroupLength == len(raw) - 12


def test_unhandled_values_fall_back_to_pydicom() -> None:
    msg = _message(_primitives()[1])
    msg.command_set.ErrorComment = "Ümlaut"  # not ASCII: a character set question
    assert codec.encode_command(msg.command_set) is None


def _pynetdicom_bytes(msg: DIMSEMessage, max_pdu: int) -> bytes:
    return b"".join(P_DATA_TF(p).encode() for p in DIMSEMessage.encode_msg(msg, 3, max_pdu))


@pytest.mark.parametrize("max_pdu", [0, 16384, 16384 + 6, 4096])
@pytest.mark.parametrize("size", [0, 1, 16378, 16378 * 3, 100_001])
def test_whole_pdus_match_pynetdicom_from_memory(max_pdu: int, size: int) -> None:
    msg = _message(_primitives()[0])
    msg.data_set = BytesIO(bytes(range(256)) * (size // 256) + b"\x07" * (size % 256))
    ours = b"".join(codec.encode_message(msg, 3, max_pdu))
    assert ours == _pynetdicom_bytes(msg, max_pdu)


@pytest.mark.parametrize("max_pdu", [0, 16384, 4096])
@pytest.mark.parametrize("size", [0, 5, 16378 * 2, 300_000])
def test_whole_pdus_match_pynetdicom_from_a_file(tmp_path: Path, max_pdu: int,
                                                 size: int) -> None:
    path = tmp_path / "ds.dcm"
    path.write_bytes(b"H" * 132 + bytes(i % 251 for i in range(size)))
    msg = _message(_primitives()[0])
    msg.data_set = None
    msg._data_set_path = (path, 132)
    ours = b"".join(codec.encode_message(msg, 3, max_pdu))
    assert ours == _pynetdicom_bytes(msg, max_pdu)


def test_a_big_file_goes_in_bounded_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setattr(codec, "RAW_BLOCK", 64 << 10)
    path = tmp_path / "big.dcm"
    path.write_bytes(bytes(i % 253 for i in range(1_000_000)))
    msg = _message(_primitives()[0])
    msg.data_set = None
    msg._data_set_path = (path, 0)
    blocks = list(codec.encode_message(msg, 3, 16384))
    assert len(blocks) > 10
    assert max(len(b) for b in blocks) <= (64 << 10) + 2 * 16384
    assert b"".join(blocks) == _pynetdicom_bytes(msg, 16384)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("payload", ["memory", "file", "none"])
def test_c_store_command_sets_straight_from_the_primitive(tmp_path: Path, index: int,
                                                          payload: str) -> None:
    primitive = _primitives()[index]
    if index == 0:
        primitive.DataSet = None  # type: ignore[attr-defined]
        if payload == "memory":
            primitive.DataSet = BytesIO(b"\x08\x00\x16\x00" * 5000)  # type: ignore[attr-defined]
        elif payload == "file":
            path = tmp_path / "ds.dcm"
            path.write_bytes(b"P" * 200 + bytes(range(256)) * 300)
            primitive._dataset_path = (path, 200)  # type: ignore[attr-defined]
    fast = codec.store_command(primitive)
    assert fast is not None
    for max_pdu in (0, 16384):
        ours = b"".join(codec.encode_pdus(*fast, 3, max_pdu))
        assert ours == _pynetdicom_bytes(_message(primitive), max_pdu)


def test_only_c_store_primitives_take_the_short_cut() -> None:
    assert codec.store_command(_primitives()[2]) is None  # C-ECHO
    rsp = _primitives()[1]
    rsp.ErrorComment = "Ümlaut"  # type: ignore[attr-defined]
    assert codec.store_command(rsp) is None


def _meta_files(tmp_path: Path) -> list[Path]:
    from pydicom.data import get_testdata_file

    from dicomcache.devtools.samples import encode, make_ct_series

    files = [Path(str(get_testdata_file(name))) for name in
             ("CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "SC_rgb_jpeg_gdcm.dcm",
              "JPGExtended.dcm", "MR_small_RLE.dcm")]
    for i, ds in enumerate(make_ct_series(2, rows=16, columns=16, seed=3)):
        path = tmp_path / f"ct{i}.dcm"
        path.write_bytes(encode(ds, "1.2.840.10008.1.2.1" if i else "1.2.840.10008.1.2"))
        files.append(path)
    spooled = tmp_path / "spooled.dcm"  # the relay's own files: our header + a data set
    spooled.write_bytes(part10_header(CT, SOP, "1.2.840.10008.1.2.1")
                        + b"\x08\x00\x16\x00UI\x02\x00a\x00")
    files.append(spooled)
    return files


def test_file_meta_as_pynetdicom_reads_it(tmp_path: Path) -> None:
    from pynetdicom.dsutils import split_dataset

    for path in _meta_files(tmp_path):
        found = codec.read_file_meta(path)
        assert found is not None, path
        ours, offset = found
        theirs, their_offset = split_dataset(path)
        assert offset == their_offset, path
        for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"):
            assert (kw in ours) == (kw in theirs)
            assert str(getattr(ours, kw)) == str(getattr(theirs, kw)), (path, kw)


def test_files_not_laid_out_plainly_are_left_to_pydicom(tmp_path: Path) -> None:
    no_preamble = tmp_path / "raw.dcm"
    no_preamble.write_bytes(b"\x08\x00\x16\x00UI\x02\x00a\x00")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(part10_header(CT, SOP, "1.2.840.10008.1.2.1")[:150])
    assert codec.read_file_meta(no_preamble) is None
    assert codec.read_file_meta(cut) is None
    empty_data_set = tmp_path / "meta-only.dcm"
    empty_data_set.write_bytes(part10_header(CT, SOP, "1.2.840.10008.1.2.1"))
    found = codec.read_file_meta(empty_data_set)
    assert found is not None and found[1] == empty_data_set.stat().st_size
    assert "SOPClassUID" not in found[0]
    with pytest.raises(AttributeError):
        found[0].SOPClassUID  # noqa: B018 - the attribute access is the test


@pytest.mark.parametrize("max_pdu", [1, 2, 5, 6, 7])
def test_a_peer_announcing_a_tiny_maximum_pdu_gets_one_byte_per_pdv(max_pdu: int) -> None:
    """Announced maxima of 1-6 bytes cannot carry a PDV item (they looped for ever on a
    negative fragment size): the least possible, one data byte per item, is sent."""
    command = b"C" * 40
    out = b"".join(codec.encode_pdus(command, b"D" * 30, None, 3, max_pdu))
    pdus = P_DATA_TF()
    items = 0
    offset = 0
    while offset < len(out):
        length = int.from_bytes(out[offset + 2:offset + 6], "big")
        pdus.decode(out[offset:offset + 6 + length])
        items += len(pdus.presentation_data_value_items)
        assert all(len(pdv.presentation_data_value) == 2 for pdv in
                   pdus.presentation_data_value_items)  # control header + one byte
        offset += 6 + length
    assert items == 70
