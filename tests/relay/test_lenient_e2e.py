"""The relay takes in what a PACS takes in: compared, file by file, with a real DCMTK
storescp and a real Orthanc receiving the same data set from the same modality.

The modality is DCMTK's storescu where it sends the file as it is, and pynetdicom
sending the file's bytes unparsed where storescu would not (it sorts tags out of
order before sending, and refuses a file without a SOP Class or Instance UID).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmwrite
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from dicomcache.cli import main as cli
from dicomcache.devtools.orthanc import OrthancProcess, free_port, loopback_env
from dicomcache.devtools.samples import make_ct_series
from dicomcache.dicom import syntaxes
from tests.relay.conftest import StoreSCP, needs_dcmtk, relay_settings, wait_until

pytestmark = [
    needs_dcmtk,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

CT = "1.2.840.10008.5.1.4.1.1.2"
RETIRED = {"us_retired": "1.2.840.10008.5.1.4.1.1.6",
           "us_multiframe_retired": "1.2.840.10008.5.1.4.1.1.3",
           "nm_retired": "1.2.840.10008.5.1.4.1.1.5"}
#: Cases storescu cannot send as they are (see the module docstring).
RAW_ONLY = {"tags_out_of_order", "no_sop_instance", "no_sop_class", "instance_mismatch",
            "truncated_mid_element"}


@pytest.fixture(autouse=True)
def raw_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set as it is, unparsed (see :func:`send_raw`)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


# --- the data sets ---------------------------------------------------------------------------
def _top_level(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(tag, start, end) of the leading defined-length elements of an explicit VR LE
    Part-10 file (File Meta included), up to the first undefined length."""
    long_vrs = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
    pos = 132
    while pos < len(data):
        group, elem, vr, length = struct.unpack_from("<HH2sH", data, pos)
        if vr in long_vrs:
            length = struct.unpack_from("<I", data, pos + 8)[0]
            if length == 0xFFFFFFFF:
                return
            end = pos + 12 + length
        else:
            end = pos + 8 + length
        yield group << 16 | elem, pos, end
        pos = end


def make_case(kind: str, directory: Path) -> Path:
    """One data set of ``kind`` as a Part-10 file (a 16x16 CT unless said otherwise)."""
    directory.mkdir(parents=True, exist_ok=True)
    ds: Dataset = make_ct_series(1, rows=16, columns=16, seed=len(kind),
                                 patient_id=f"LENIENT-{kind}")[0]
    if kind == "pixels_two_bytes_more":
        ds.PixelData = ds.PixelData + b"\0\0"
    elif kind == "pixels_two_bytes_less":
        ds.PixelData = ds.PixelData[:-2]
    elif kind == "ct_without_pixel_data":
        del ds.PixelData
    elif kind in RETIRED:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RETIRED[kind]
        ds.Modality = "NM" if kind.startswith("nm") else "US"
    elif kind == "no_sop_instance":
        del ds.SOPInstanceUID
    elif kind == "no_sop_class":
        del ds.SOPClassUID
    path = directory / f"{kind}.dcm"
    dcmwrite(path, ds, enforce_file_format=True)
    data = path.read_bytes()
    if kind == "instance_mismatch":
        # The C-STORE request names the File Meta's UID (pydicom writes the data set's
        # there): its last digit changed, the length kept.
        _, start, end = next(t for t in _top_level(data) if t[0] == 0x00020003)
        value = data[start + 8:end].rstrip(b"\0")
        other = value[:-1] + (b"1" if value[-1:] != b"1" else b"2")
        path.write_bytes(data[:start + 8] + other + data[start + 8 + len(other):])
    elif kind == "tags_out_of_order":  # the two elements after SOP Instance UID swapped
        tags = list(_top_level(data))
        i = next(n for n, (tag, _, _) in enumerate(tags) if tag == 0x00080018)
        (_, a1, b1), (_, a2, b2) = tags[i + 1], tags[i + 2]
        path.write_bytes(data[:a1] + data[a2:b2] + data[a1:b1] + data[b2:])
    elif kind == "truncated_mid_element":
        # Cut inside the element after SOP Instance UID, which claims more than is left.
        tags = list(_top_level(data))
        i = next(n for n, (tag, _, _) in enumerate(tags) if tag == 0x00080018)
        pos = tags[i + 1][1]
        path.write_bytes(data[:pos + 6] + struct.pack("<H", 0xFFF0) + data[pos + 8:pos + 40])
    elif kind not in RAW_ONLY:
        # Written the way storescu encodes a data set (it re-encodes what it reads),
        # so what it sends is this file's data set, byte for byte.
        subprocess.run(["dcmconv", str(path), str(path)], check=True, env=loopback_env(),
                       capture_output=True, timeout=60)
    return path


def dataset_bytes(data: bytes) -> bytes:
    """The data set of a Part-10 file: what follows its File Meta group (whose Group
    Length comes first, as pydicom, DCMTK and the relay write it)."""
    assert data[132:136] == b"\x02\x00\x00\x00", "File Meta Group Length first"
    return data[144 + struct.unpack_from("<I", data, 140)[0]:]


def dataset_uid(path: Path) -> str:
    """The data set's own SOP Instance UID (not the File Meta's)."""
    data = path.read_bytes()
    value = next((data[start + 8:end] for tag, start, end in _top_level(data)
                  if tag == 0x00080018), b"")
    return value.rstrip(b"\0 ").decode()


# --- the modality ----------------------------------------------------------------------------
def send_storescu(path: Path, port: int, called: str) -> int | None:
    """storescu proposing only the file's own SOP class (-R: retired ones included);
    the status it reports, or None when it sent nothing."""
    res = subprocess.run(["storescu", "-v", "-R", "-aet", "MODALITY", "-aec", called,
                          "127.0.0.1", str(port), str(path)],
                         capture_output=True, text=True, env=loopback_env(), timeout=120,
                         check=False)
    out = res.stdout + res.stderr
    if "Received Store Response (Success)" in out:
        return 0x0000
    found = re.search(r"Status: ([0-9A-F]{4})H", out) or \
        re.search(r"Received Store Response \(.*?([0-9A-F]{4})H", out)
    return int(found.group(1), 16) if found else None


def send_raw(path: Path, port: int, called: str, sop_class: str = CT) -> int | None:
    """pynetdicom sending the file's data set unparsed (the request's UIDs: its File Meta)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(sop_class, syntaxes.EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


def send(kind: str, path: Path, port: int, called: str) -> int | None:
    return send_raw(path, port, called) if kind in RAW_ONLY else \
        send_storescu(path, port, called)


# --- the PACS to compare with ---------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    """storescp accepting every storage class and syntax (+xa): the first PACS."""
    scp = StoreSCP(free_port(), "PACS", tmp_path_factory.mktemp("reference") / "pacs", ["+xa"])
    scp.start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def dicom_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """A real Orthanc with its DICOM port open (the session ``orthanc`` has none): the
    second PACS."""
    proc = OrthancProcess(tmp_path_factory.mktemp("orthanc-dicom"), dicom=True, aet="ORTHANC",
                          overrides={"DicomCheckCalledAet": False})
    proc.start()
    yield proc
    proc.stop()


def orthanc_has(orthanc: OrthancProcess, sop_uid: str) -> bool:
    found = orthanc.json("POST", "/tools/find", json.dumps(
        {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}).encode())
    return bool(found)


def stored_file(scp: StoreSCP, sop_uid: str) -> Path | None:
    """The file storescp wrote for ``sop_uid`` (it names files MODALITY.SOPInstanceUID)."""
    return next((p for p in scp.files() if p.name.endswith("." + sop_uid)), None)


def spooled(spool: Path, sop_uid: str) -> bytes:
    with sqlite3.connect(spool / "state.sqlite") as db:
        (name,) = db.execute("SELECT name FROM instances WHERE sop_instance=?",
                             (sop_uid,)).fetchone()
    return (spool / "objects" / name).read_bytes()


LENIENT = ["pixels_two_bytes_more", "pixels_two_bytes_less", "ct_without_pixel_data",
           "tags_out_of_order", "us_retired", "us_multiframe_retired", "nm_retired"]
#: What the strict reading objects to, per case (retired classes: nothing).
PROBLEM = {"pixels_two_bytes_more": "has 514 bytes but 16x16x1 samples",
           "pixels_two_bytes_less": "has 510 bytes but 16x16x1 samples",
           "ct_without_pixel_data": "but no Pixel Data",
           "tags_out_of_order": "is out of order"}


@pytest.mark.parametrize("kind", LENIENT)
async def test_what_storescp_and_orthanc_store_the_relay_stores_keeps_and_forwards(
        kind: str, tmp_path: Path, storescp, relay_factory, reference_storescp: StoreSCP,
        dicom_orthanc: OrthancProcess, caplog: pytest.LogCaptureFixture) -> None:
    path = await asyncio.to_thread(make_case, kind, tmp_path / "modality")
    sop = await asyncio.to_thread(dataset_uid, path)
    # The references: both PACS acknowledge it with success and keep it.
    assert await asyncio.to_thread(send, kind, path, reference_storescp.port, "PACS") == 0
    direct = await asyncio.to_thread(stored_file, reference_storescp, sop)
    assert direct is not None
    assert await asyncio.to_thread(send, kind, path, dicom_orthanc.dicom_port, "ORTHANC") == 0
    assert await asyncio.to_thread(orthanc_has, dicom_orthanc, sop)

    pacs = storescp("all")
    spool = tmp_path / "spool"
    r = await relay_factory(relay_settings(spool, [pacs.destination("PACS")], retention=3600.0))
    caplog.set_level(logging.WARNING, logger="dicomcache.relay.scp")
    assert await asyncio.to_thread(send, kind, path, r.port, "DICOMCACHE") == 0x0000
    # Kept exactly as received: storescu sends these files' data sets unchanged.
    kept = await asyncio.to_thread(spooled, spool, sop)
    assert dataset_bytes(kept) == dataset_bytes(await asyncio.to_thread(path.read_bytes))
    # Forwarded: the PACS behind the relay holds what the PACS in front of the modality
    # holds, byte for byte.
    await wait_until(lambda: stored_file(pacs, sop) is not None, what="forwarded")
    via_relay = await asyncio.to_thread(stored_file, pacs, sop)
    assert via_relay is not None
    assert dataset_bytes(await asyncio.to_thread(via_relay.read_bytes)) == \
        dataset_bytes(await asyncio.to_thread(direct.read_bytes))
    # The strict problems are on record, not a refusal.
    snapshot = await asyncio.to_thread(r.relay.spool.snapshot, ["PACS"])
    warnings = snapshot["recent_receive_warnings"]
    if kind in PROBLEM:
        assert [w["sop_instance_uid"] for w in warnings] == [sop]
        assert PROBLEM[kind] in warnings[0]["message"]
        assert any(PROBLEM[kind] in rec.getMessage() and sop in rec.getMessage()
                   for rec in caplog.records)
    else:
        assert warnings == []
    assert snapshot["recent_receive_errors"] == []
    assert not await asyncio.to_thread(lambda: list((spool / "quarantine").iterdir()))


async def test_an_instance_with_problems_is_relabelled_for_a_pacs_that_needs_it(
        tmp_path: Path, storescp, relay_factory) -> None:
    """A CT without Pixel Data sent in Explicit VR LE reaches an Implicit-VR-only PACS:
    re-encoding keeps the problem it came with, and adds none."""
    path = await asyncio.to_thread(make_case, "ct_without_pixel_data", tmp_path / "modality")
    sop = await asyncio.to_thread(dataset_uid, path)
    pacs = storescp("implicit")
    spool = tmp_path / "spool"
    r = await relay_factory(relay_settings(spool, [pacs.destination("PACS")]))
    assert await asyncio.to_thread(send_storescu, path, r.port, "DICOMCACHE") == 0x0000
    await wait_until(lambda: stored_file(pacs, sop) is not None, what="forwarded")
    assert not await asyncio.to_thread(lambda: list((spool / "quarantine").iterdir()))


UNUSABLE = {
    # kind: (what storescp and Orthanc answer (None: they abort the association),
    #        the relay's status, words of its reason)
    "no_sop_instance": ((0xC000, 0xC000), 0xC000, "no SOP Instance UID"),
    "no_sop_class": ((0xC000, 0xC000), 0xC000, "no SOP Class UID"),
    "truncated_mid_element": ((None, None), 0xC000, "declares"),
    "instance_mismatch": ((0xA900, 0xA900), 0xA900, "in the data set but"),
}


@pytest.mark.parametrize("kind", list(UNUSABLE))
async def test_what_cannot_be_identified_stays_refused_with_its_reason(
        kind: str, tmp_path: Path, relay_factory, reference_storescp: StoreSCP,
        dicom_orthanc: OrthancProcess) -> None:
    (storescp_status, orthanc_status), relay_status, words = UNUSABLE[kind]
    path = await asyncio.to_thread(make_case, kind, tmp_path / "modality")
    assert await asyncio.to_thread(send_raw, path, reference_storescp.port,
                                   "PACS") == storescp_status
    assert await asyncio.to_thread(send_raw, path, dicom_orthanc.dicom_port,
                                   "ORTHANC") == orthanc_status
    spool = tmp_path / "spool"
    r = await relay_factory(relay_settings(spool, []))
    assert await asyncio.to_thread(send_raw, path, r.port, "DICOMCACHE") == relay_status
    await asyncio.to_thread(_quarantined_as_received, spool, path, relay_status, words)


def _quarantined_as_received(spool: Path, path: Path, status: int, words: str) -> None:
    reasons = list((spool / "quarantine").glob("*.reason.json"))
    assert len(reasons) == 1
    reason = json.loads(reasons[0].read_text())
    assert reason["status"] == f"0x{status:04X}" and words in reason["reason"]
    kept = reasons[0].with_name(reasons[0].name.replace(".reason.json", ".dcm"))
    assert dataset_bytes(kept.read_bytes()) == dataset_bytes(path.read_bytes())
    assert not list((spool / "objects").iterdir())


# --- relay send, and the operator's release from quarantine ----------------------------------
def _config(tmp_path: Path, pacs: StoreSCP) -> Path:
    config = tmp_path / "c.toml"
    config.write_text(f"""
[relay]
spool_directory = "{tmp_path / 'spool'}"
[[relay.destinations]]
name = "PACS"
remote_ae_title = "{pacs.aet}"
remote_host = "127.0.0.1"
remote_port = {pacs.port}
""")
    return config


def test_relay_send_sends_what_a_pacs_stores_and_says_what_is_wrong(
        tmp_path: Path, storescp, capsys: pytest.CaptureFixture[str]) -> None:
    pacs = storescp("all")
    files = [make_case(k, tmp_path / "files") for k in
             ("pixels_two_bytes_more", "ct_without_pixel_data", "us_retired")]
    rc = cli.main(["relay", "send", "--config", str(_config(tmp_path, pacs)),
                   "--destination", "PACS", "--no-progress", *map(str, files)])
    out = capsys.readouterr()
    assert rc == 0, out
    assert "sent 3/3" in out.out
    assert "sent with problems" in out.err and "has 514 bytes" in out.err
    assert {dataset_uid(f) for f in files} <= {p.name.split(".", 1)[1] for p in pacs.files()}


def test_relay_send_releases_a_quarantined_file_only_on_the_operators_word(
        tmp_path: Path, storescp, capsys: pytest.CaptureFixture[str]) -> None:
    pacs = storescp("all")
    config = _config(tmp_path, pacs)
    # What an earlier relay quarantined at reception (it refused Pixel Data 2 bytes
    # short with 0xC000), as it left it: the file and its reason.
    quarantine = tmp_path / "spool" / "quarantine"
    quarantine.mkdir(parents=True)
    original = make_case("pixels_two_bytes_less", tmp_path / "files")
    held = quarantine / "1733300000000000000-123-000001.dcm"
    held.write_bytes(original.read_bytes())
    held.with_name(held.stem + ".reason.json").write_text(json.dumps(
        {"reason": "unparseable data set: Pixel Data (7FE0,0010) at offset 1000 has 510 "
                   "bytes but 16x16x1 samples x 16 bits x 1 frames need 512",
         "status": "0xC000", "destination": None}))
    nothing = make_case("no_sop_class", tmp_path / "files")
    args = ["relay", "send", "--config", str(config), "--destination", "PACS", "--no-progress"]

    assert cli.main([*args, str(quarantine), str(nothing)]) == 1
    err = capsys.readouterr().err
    assert "in quarantine (unparseable data set: Pixel Data" in err and "--release" in err
    assert "no SOP Class UID" in err
    assert pacs.files() == []

    assert cli.main([*args, "--release", str(quarantine), str(nothing)]) == 1
    out = capsys.readouterr()
    assert "sent 1/1" in out.out and "skipped 1" in out.out
    assert "no SOP Class UID" in out.err  # never sendable, released or not
    (stored,) = pacs.files()
    assert stored.name.endswith(dataset_uid(original))
