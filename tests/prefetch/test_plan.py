"""Prefetch decisions (dicomcache.prefetch.plan): touches and fetch order, no I/O."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from dicomcache.cache.instance import Instance
from dicomcache.prefetch.plan import Job, order_items, touch_of


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


def _listing(counts: dict[str, int]) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Orthanc's answers for series ``A``, ``B``… (UIDs ``1.1``, ``1.2``…) of ``n`` slices
    each, instances listed out of order."""
    series = [{"ID": s, "MainDicomTags": {"SeriesInstanceUID": f"1.{i}"}}
              for i, s in enumerate(counts, start=1)]
    instances = [{"ID": f"{s}{n}", "ParentSeries": s, "FileSize": 10, "IndexInSeries": n,
                  "MainDicomTags": {"SOPInstanceUID": f"{s}.{n}", "InstanceNumber": str(n)}}
                 for s, count in reversed(counts.items()) for n in reversed(range(1, count + 1))]
    return series, instances


@pytest.mark.parametrize(("first", "at", "expected"), [
    # From the touched slice outwards (next, previous, …), then the other series in order.
    ("1.2", "B.3", ["B3", "B4", "B2", "B5", "B1", "A1", "A2"]),
    ("1.2", "B.5", ["B5", "B4", "B3", "B2", "B1", "A1", "A2"]),
    ("1.2", "B.1", ["B1", "B2", "B3", "B4", "B5", "A1", "A2"]),
    # No slice named (series metadata): the series in slice order.
    ("1.1", None, ["A1", "A2", "B1", "B2", "B3", "B4", "B5"]),
    # A slice the listing does not have: as if none was named.
    ("1.2", "X.9", ["B1", "B2", "B3", "B4", "B5", "A1", "A2"]),
])
def test_order_items_from_the_touched_slice_outwards_series_first(
        first: str, at: str | None, expected: list[str]) -> None:
    items = order_items(*_listing({"A": 2, "B": 5}), first, at)
    assert [it.orthanc_id for it in items] == expected
    assert [it.rank for it in items if it.series_uid == "1.2"] == [
        int(oid[1:]) - 1 for oid in expected if oid[0] == "B"]


@pytest.mark.parametrize(("gone", "touches", "expected"), [
    # A slice: its series from there outwards, ahead of the rest.
    ((), [("1.1", "A.4")], ["A4", "A5", "A3", "A6", "A2", "A1", "B1", "B2"]),
    # A slice that has left the queue (fetched): its neighbours still come first.
    (("A3",), [("1.1", "A.3")], ["A4", "A2", "A5", "A1", "A6", "B1", "B2"]),
    # Another series' slice, then back: the viewer's last place wins.
    ((), [("1.2", "B.2"), ("1.1", "A.5")], ["A5", "A6", "A4", "A3", "A2", "A1", "B2", "B1"]),
    # A series without a slice: that series first, in the order it had.
    ((), [("1.2", None)], ["B1", "B2", "A1", "A2", "A3", "A4", "A5", "A6"]),
    ((), [(None, None)], ["A1", "A2", "A3", "A4", "A5", "A6", "B1", "B2"]),
])
def test_focus_moves_the_queue_to_the_viewer(
        gone: tuple[str, ...], touches: list[tuple[str | None, str | None]],
        expected: list[str]) -> None:
    job = Job("1", "1.1", None, "study")
    job.listed(order_items(*_listing({"A": 6, "B": 2}), "1.1", None))
    job.items = collections.deque(it for it in job.items if it.orthanc_id not in gone)
    for series, sop in touches:
        job.focus(series, sop)
    assert [it.orthanc_id for it in job.items] == expected
    # A touch that names an image: the viewer has its first one.
    assert job.opened is any(sop is not None for _, sop in touches)


def test_a_touch_while_the_study_is_listed_orders_the_listing() -> None:
    job = Job("1", "1.1", None, "study")
    job.focus("1.2", "B.2")  # the viewer's first image came before the listing
    assert job.opened
    items = order_items(*_listing({"A": 2, "B": 3}), job.series_uid, job.sop_uid)
    assert [it.orthanc_id for it in items] == ["B2", "B3", "B1", "A1", "A2"]
