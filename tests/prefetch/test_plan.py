"""Prefetch decisions (dicomcache.prefetch.plan): touches and fetch order, no I/O."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dicomcache.cache.instance import Instance
from dicomcache.prefetch.plan import order_items, touch_of


def _entry(sop: str) -> Instance:
    return Instance(sop_uid=sop, path=Path("/x"), size=1, md5="0" * 32, transfer_syntax="1.2",
                    study_uid="1.1", series_uid="1.1.1", orthanc_id="oid", patient_id="P",
                    stored_at=0.0)


@pytest.mark.parametrize(("path", "query", "expected"), [
    ("/instances/aaaaaaaa-bbbbbbbb-cccccccc-dddddddd-eeeeeeee/file", {}, ("1.1", "1.1.1", "9")),
    ("/wado", {"studyUID": "1.2", "seriesUID": "1.2.3", "objectUID": "1.2.3.4"},
     ("1.2", "1.2.3", "1.2.3.4")),
    ("/wado", {"objectUID": "9"}, ("1.1", "1.1.1", "9")),
    ("/dicom-web/studies/1.2/metadata", {}, ("1.2", None, None)),
    ("/dicom-web/studies/1.2/series/1.2.3/metadata", {}, ("1.2", "1.2.3", None)),
    ("/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4/frames/1", {},
     ("1.2", "1.2.3", "1.2.3.4")),
    ("/dicom-web/studies", {}, None),
    # Searches (QIDO-RS) are not a touch: OHIF searches the series of a study before
    # it asks for anything, and a study download then raced its first image.
    ("/dicom-web/studies/1.2/series", {}, None),
    ("/dicom-web/studies/1.2/instances", {}, None),
    ("/dicom-web/studies/1.2/series/1.2.3/instances", {}, None),
    ("/dicom-web/studies/1.2/series/1.2.3/rendered", {}, ("1.2", "1.2.3", None)),
    ("/dicom-web/studies/1.2/series/1.2.3", {}, ("1.2", "1.2.3", None)),
    ("/dicom-web/studies/1.2", {}, ("1.2", None, None)),
    ("/patients", {}, None),
    ("/instances/x/tags", {}, None),
])
def test_touch_of(path: str, query: dict[str, str], expected: tuple[str, ...] | None) -> None:
    assert touch_of(path, query, lambda _oid: _entry("9"), lambda sop: _entry(sop)) == expected


def test_order_items_starts_after_the_touched_slice_series_first() -> None:
    series = [{"ID": "A", "MainDicomTags": {"SeriesInstanceUID": "1.1"}},
              {"ID": "B", "MainDicomTags": {"SeriesInstanceUID": "1.2"}}]
    instances = [{"ID": f"{s}{n}", "ParentSeries": s, "FileSize": 10, "IndexInSeries": n,
                  "MainDicomTags": {"SOPInstanceUID": f"{s}.{n}", "InstanceNumber": str(n)}}
                 for s in "BA" for n in (3, 1, 2)]
    items = order_items(series, instances, "1.2", "B.2")
    assert [it.orthanc_id for it in items] == ["B3", "B1", "B2", "A1", "A2", "A3"]
    items = order_items(series, instances, "1.1", None)
    assert [dataclasses.astuple(it)[0] for it in items] == ["A1", "A2", "A3", "B1", "B2", "B3"]
