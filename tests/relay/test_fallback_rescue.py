"""The fallback rescues (issue 17), with real DCMTK peers, counted at the receiving peer.

* a ``conservative`` destination in front of a PACS accepting JPEG Lossless only: the
  relay widens past the strategy (the peer answered "transfer syntaxes not supported",
  result 4, to every uncompressed context), transcodes losslessly, delivers everything;
* the quarantine reason names what the peer really answered (PS3.8 §9.3.3.2: result 3
  abstract syntax not supported, 4 transfer syntaxes not supported) and, in the
  seed's form, what it accepted.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.dicom import syntaxes
from tests.relay.conftest import (
    needs_dcmtk,
    queue_depth,
    read_quiet,
    relay_settings,
    storescu,
    wait_until,
)

pytestmark = [
    needs_dcmtk,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

PET = "1.2.840.10008.5.1.4.1.1.128"  # not among the restricted storescp profile's classes


def _quarantined(r, name: str) -> int:
    return int(r.relay.spool.snapshot([name])["destinations"][name]["quarantined"])


def _reasons(spool: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in (spool / "quarantine").glob("*.reason.json")]


async def test_conservative_destination_rescued_by_a_jpeg_lossless_only_peer(
        tmp_path: Path, storescp, relay_factory) -> None:
    pacs = storescp("jpeg-lossless")  # accepts JPEG Lossless SV1 only, every class
    spool = tmp_path / "spool"
    r = await relay_factory(relay_settings(
        spool, [pacs.destination("JPEG_LL_PACS", transfer_syntax_strategy="conservative")]))
    series = make_ct_series(4, rows=64, columns=64, seed=17)
    files = write_series(series, tmp_path / "modality")
    res = await asyncio.to_thread(storescu, files, r.port)
    assert res.returncode == 0, res.stderr
    # Ends either way: all four at the peer, or something quarantined (what main did).
    await wait_until(lambda: len(pacs.files()) == 4 or _quarantined(r, "JPEG_LL_PACS") > 0,
                     60, "delivery or quarantine")
    assert _reasons(spool) == []
    assert len(pacs.files()) == 4
    originals = {str(ds.SOPInstanceUID): ds for ds in series}
    for f in pacs.files():
        got = read_quiet(f)
        assert got.file_meta.TransferSyntaxUID == syntaxes.JPEG_LOSSLESS_SV1
        original = originals.pop(str(got.SOPInstanceUID))
        # Lossless: the decoded pixels are the original's, value for value.
        assert np.array_equal(got.pixel_array, original.pixel_array)
        assert "LossyImageCompression" not in got or got.LossyImageCompression != "01"
    assert originals == {}
    await wait_until(lambda: queue_depth(r.relay, "JPEG_LL_PACS") == 0, 20, "empty queue")


async def test_quarantine_reason_says_transfer_syntaxes_not_supported_and_what_it_accepts(
        tmp_path: Path, storescp, relay_factory) -> None:
    # The peer takes CT only as JPEG Baseline (lossy), which a lossless relay cannot make.
    pacs = storescp((syntaxes.JPEG_BASELINE,))
    spool = tmp_path / "spool"
    r = await relay_factory(relay_settings(spool, [pacs.destination("JPEG_PACS")]))
    files = write_series(make_ct_series(1, rows=32, columns=32, seed=3), tmp_path / "m")
    res = await asyncio.to_thread(storescu, files, r.port)
    assert res.returncode == 0
    await wait_until(lambda: _quarantined(r, "JPEG_PACS") == 1, 60, "quarantine")
    [info] = _reasons(spool)
    reason = str(info["reason"])
    assert reason.startswith(
        "No compatible presentation context for '1.2.840.10008.5.1.4.1.1.2'. "
        "Peer accepted transfer syntaxes: ['1.2.840.10008.1.2.4.50']\n"), reason
    assert "transfer syntaxes not supported (result 4)" in reason
    # No JPEG Baseline encoder here: the advice is about the peer, not a wider strategy.
    assert ("Recommendation: the peer takes SOP class '1.2.840.10008.5.1.4.1.1.2' (CT Image "
            "Storage) only in lossy syntaxes the relay cannot produce") in reason
    assert "check that the peer supports SOP class" not in reason
    assert pacs.files() == []


async def test_quarantine_reason_says_sop_class_not_supported(
        tmp_path: Path, storescp, relay_factory) -> None:
    pacs = storescp("explicit")  # Explicit VR LE, and only the profile's SOP classes
    spool = tmp_path / "spool"
    r = await relay_factory(relay_settings(spool, [pacs.destination("NO_PET")]))
    [ds] = make_ct_series(1, rows=32, columns=32, seed=4)
    ds.SOPClassUID = PET
    ds.file_meta.MediaStorageSOPClassUID = PET
    files = write_series([ds], tmp_path / "m")
    res = await asyncio.to_thread(storescu, files, r.port)
    assert res.returncode == 0, res.stdout + res.stderr
    await wait_until(lambda: _quarantined(r, "NO_PET") == 1, 60, "quarantine")
    [info] = _reasons(spool)
    reason = str(info["reason"])
    assert reason.startswith(f"No compatible presentation context for '{PET}'. "
                             "Peer accepted transfer syntaxes: []\n"), reason
    assert "abstract syntax (SOP class) not supported (result 3)" in reason
    assert "Positron Emission Tomography Image Storage" in reason
    assert "Recommendation: Use" not in reason
