"""A real DICOMweb client (``dicomweb-client`` from PyPI) reading through dicomcache."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pydicom
import pytest
from aiohttp.test_utils import TestClient

from dicomcache.devtools.orthanc import free_port
from dicomcache.http.app import make_app
from tests.conftest import Sample, SettingsFactory

dicomweb_client = pytest.importorskip("dicomweb_client")

ANY = (("application/dicom", "*"),)


@pytest.fixture
async def client(aiohttp_client, make_settings: SettingsFactory) -> TestClient:
    # dicomweb-client sends "Host: 127.0.0.1" without the port, and links follow the
    # Host a client sends (as Orthanc's do): dicomweb.public_url sets them instead.
    port = free_port()
    app = make_app(make_settings(dicomweb={"public_url": f"http://127.0.0.1:{port}"}))
    return await aiohttp_client(app, server_kwargs={"port": port})


def base_url(client: TestClient) -> str:
    return str(client.make_url("/dicom-web"))


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    # dicomweb-client is synchronous (requests): keep it off the server's loop.
    return await asyncio.to_thread(fn, *args, **kwargs)


async def test_search_retrieve_and_metadata(client: TestClient,
                                            samples: dict[str, list[Sample]]) -> None:
    dw = dicomweb_client.DICOMwebClient(url=base_url(client))
    s = samples["jpegls"][0]
    studies = await in_thread(dw.search_for_studies, search_filters={"PatientID": "PJPEGLS"})
    assert len(studies) == 1
    assert studies[0]["00081190"]["Value"][0].startswith(base_url(client))

    for media_types in (ANY, None):
        datasets = await in_thread(dw.retrieve_series, s.study, s.series, media_types=media_types)
        assert sorted(str(ds.SOPInstanceUID) for ds in datasets) == \
            sorted(x.sop for x in samples["jpegls"])
    stored = {x.sop: pydicom.dcmread(io.BytesIO(x.data)) for x in samples["jpegls"]}
    for ds in await in_thread(dw.retrieve_series, s.study, s.series, media_types=ANY):
        assert ds.PixelData == stored[str(ds.SOPInstanceUID)].PixelData

    study = await in_thread(dw.retrieve_study, s.study, media_types=ANY)
    assert len(study) == len(samples["jpegls"])

    metadata = await in_thread(dw.retrieve_series_metadata, s.study, s.series)
    assert len(metadata) == len(samples["jpegls"])
    e = samples["explicit"][0]
    metadata = await in_thread(dw.retrieve_series_metadata, e.study, e.series)
    uri = metadata[0]["7FE00010"]["BulkDataURI"]
    assert uri.startswith(base_url(client) + "/studies/")
    # (Orthanc refuses dicomweb-client's default type="*/*" for bulk data with a 400.)
    bulk = await in_thread(dw.retrieve_bulkdata, uri, media_types=("application/octet-stream",))
    assert bulk and bulk[0]

    one = await in_thread(dw.retrieve_instance_metadata, s.study, s.series, s.sop)
    assert one["00080018"]["Value"] == [s.sop]


async def test_frames(client: TestClient, samples: dict[str, list[Sample]]) -> None:
    dw = dicomweb_client.DICOMwebClient(url=base_url(client))
    s = samples["multiframe"][0]
    ds = pydicom.dcmread(io.BytesIO(s.data))
    size = ds.Rows * ds.Columns * ds.BitsAllocated // 8
    frames = await in_thread(dw.retrieve_instance_frames, s.study, s.series, s.sop,
                             frame_numbers=[1, 3])
    assert frames == [ds.PixelData[:size], ds.PixelData[2 * size:3 * size]]

    rle = samples["rle"][0]
    encapsulated = await in_thread(dw.retrieve_instance_frames, rle.study, rle.series, rle.sop,
                                   frame_numbers=[1],
                                   media_types=(("image/dicom-rle", "1.2.840.10008.1.2.5"),
                                                ("application/octet-stream", "*")))
    frags = list(pydicom.encaps.generate_frames(pydicom.dcmread(io.BytesIO(rle.data)).PixelData,
                                                number_of_frames=1))
    assert encapsulated == frags
