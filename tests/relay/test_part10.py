"""part10_header gives the bytes pynetdicom writes before a received data set."""

from __future__ import annotations

import pytest
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicomcache.relay.part10 import part10_header

CT = "1.2.840.10008.5.1.4.1.1.2"
SOP = "1.2.826.0.1.3680043.8.498.1234567890123456789"  # odd length: padded


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                    "1.2.840.10008.1.2.4.70"])
@pytest.mark.parametrize("sop", [SOP, SOP + "1"])
def test_part10_header_is_pynetdicoms_file_meta(syntax: str, sop: str) -> None:
    meta = create_file_meta(sop_class_uid=UID(CT), sop_instance_uid=UID(sop),
                            transfer_syntax=UID(syntax))
    assert part10_header(CT, sop, syntax) == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
