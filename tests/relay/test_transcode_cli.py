"""Transcoding (pure) and the ``relay status`` / ``relay send`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicomcache.cli import main as cli
from dicomcache.devtools.samples import encode, make_ct_series
from dicomcache.dicom import syntaxes
from dicomcache.relay.transcode import TranscodeError, transcode, transcode_bytes
from tests.relay.conftest import needs_dcmtk, read_quiet, source_path

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _values(ds: object) -> list[tuple[str, object]]:
    out = []
    for elem in ds.iterall():  # type: ignore[attr-defined]
        if elem.VR != "SQ" and elem.tag != 0x7FE00010:
            out.append((str(elem.tag), elem.value))
    return out


@pytest.mark.parametrize("src", syntaxes.UNCOMPRESSED)
@pytest.mark.parametrize("dst", syntaxes.UNCOMPRESSED)
def test_uncompressed_round_trips_keep_nested_sequences_and_pixels(src: str, dst: str) -> None:
    ds = make_ct_series(1, rows=32, columns=32, seed=7)[0]
    data = encode(ds, src)
    out = transcode(data, dst)
    assert out.file_meta.TransferSyntaxUID == dst
    original = read_quiet(data)
    assert _values(out) == _values(original)  # nested sequences included
    assert np.array_equal(out.pixel_array, original.pixel_array)
    assert out.SOPInstanceUID == original.SOPInstanceUID


@pytest.mark.parametrize("src", [syntaxes.DEFLATED_LE, syntaxes.RLE_LOSSLESS,
                                 syntaxes.JPEG_LOSSLESS_SV1, syntaxes.JPEG_LS_LOSSLESS,
                                 syntaxes.JPEG_2000_LOSSLESS])
def test_lossless_sources_decompress_to_identical_pixels(src: str) -> None:
    data = source_path(src).read_bytes()
    original = read_quiet(data)
    out = transcode(data, syntaxes.IMPLICIT_LE)
    assert np.array_equal(out.pixel_array, original.pixel_array)
    assert out.SOPInstanceUID == original.SOPInstanceUID  # generate_instance_uid=False
    assert out.get("LossyImageCompression") in (None, "00")


@pytest.mark.parametrize("src", [syntaxes.JPEG_BASELINE, syntaxes.JPEG_2000,
                                 syntaxes.JPEG_LS_NEAR_LOSSLESS])
def test_lossy_sources_keep_lossy_image_compression(src: str) -> None:
    data = source_path(src).read_bytes()
    out = transcode(data, syntaxes.EXPLICIT_LE)
    assert out.LossyImageCompression == "01"
    assert out.SOPInstanceUID == read_quiet(data).SOPInstanceUID


def test_lossy_recompression_only_when_allowed() -> None:
    data = encode(make_ct_series(1, rows=32, columns=32)[0], syntaxes.EXPLICIT_LE)
    with pytest.raises(TranscodeError):
        transcode_bytes(data, syntaxes.JPEG_2000)
    out = transcode(data, syntaxes.JPEG_2000, allow_lossy=True)
    assert out.LossyImageCompression == "01"
    assert "ISO_15444_1" in out.LossyImageCompressionMethod


def test_jpeg_lossless_encoding_is_lossless() -> None:
    data = encode(make_ct_series(1, rows=64, columns=64)[0], syntaxes.EXPLICIT_BE)
    out = transcode(data, syntaxes.JPEG_LOSSLESS_SV1)
    assert np.array_equal(out.pixel_array, read_quiet(data).pixel_array)


def test_garbage_pixels_raise_transcode_error_not_a_codec_error() -> None:
    ds = read_quiet(source_path(syntaxes.JPEG_BASELINE))
    from pydicom.encaps import encapsulate
    ds.PixelData = encapsulate([b"\xff\xd8 not a jpeg \xff\xd9"])
    import io
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(TranscodeError):
        transcode_bytes(buf.getvalue(), syntaxes.IMPLICIT_LE)


@needs_dcmtk
def test_relay_send_and_status(tmp_path: Path, storescp, capsys: pytest.CaptureFixture[str],
                               accelerate: bool) -> None:
    pacs = storescp("implicit")
    config = tmp_path / "c.toml"
    config.write_text(f"""
[relay]
spool_directory = "{tmp_path / 'spool'}"
accelerate = {str(accelerate).lower()}
[[relay.destinations]]
name = "PACS"
remote_ae_title = "PACS"
remote_host = "127.0.0.1"
remote_port = {pacs.port}
""")
    files = [source_path(ts) for ts in (syntaxes.EXPLICIT_LE, syntaxes.JPEG_2000_LOSSLESS)]
    bad = tmp_path / "not-dicom.dcm"
    bad.write_bytes(b"hello")
    rc = cli.main(["relay", "send", "--config", str(config), "--destination", "PACS",
                   "--no-progress", *map(str, files)])
    out = capsys.readouterr()
    assert rc == 0, out
    assert "sent 2/2" in out.out and "strategy_used: conservative" in out.out
    assert len(pacs.files()) == 2
    rc = cli.main(["relay", "send", "--config", str(config), "--host", "127.0.0.1", "--port",
                   str(pacs.port), "--aet", "PACS", "--no-progress", str(bad)])
    assert rc == 1 and "skipped" in capsys.readouterr().err
    # status without a spool yet: says so
    assert cli.main(["relay", "status", "--config", str(config)]) == 1
    from dicomcache.relay.spool import Spool
    spool = Spool(tmp_path / "spool", ["PACS"])
    spool.open()
    spool.update_destination("PACS", configured_strategy="conservative",
                             learned_strategy="universal", last_error="boom", last_error_time=1.0)
    spool.close()
    capsys.readouterr()
    rc = cli.main(["relay", "status", "--config", str(config), "--json"])
    snap = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert snap["destinations"]["PACS"]["learned_strategy"] == "universal"
    assert snap["destinations"]["PACS"]["queue_depth"] == 0
    rc = cli.main(["relay", "status", "--config", str(config)])
    text = capsys.readouterr().out
    assert "learned universal" in text and "boom" in text
