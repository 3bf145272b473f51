"""The Part-10 header of a received data set: preamble, ``DICM``, File Meta Information.

The SCP writes each received data set as it came, behind this header
(:meth:`dicomcache.relay.scp.StoreSCP.handle_store`).  The bytes are exactly
those pynetdicom's ``Event.encoded_dataset(include_meta=True)`` writes
(tested), built directly instead of through pydicom's writer.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION


def _meta_element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian group 0002 element (UI padded with NUL, others
    with a space, as pydicom writes them)."""
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, group_elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, group_elem, vr, len(value)) + value


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information pynetdicom writes for a
    received data set (``Event.encoded_dataset``), byte for byte.

    Raises ``UnicodeEncodeError`` when a UID is not ASCII (so not a UID).
    """
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", sop_class.encode("ascii")),
        _meta_element(0x0003, b"UI", sop_instance.encode("ascii")),
        _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii")),
        _meta_element(0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii")),
        _meta_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")),
    ))
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body
