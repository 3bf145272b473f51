"""Prefetch decisions, pure (no I/O): which study a request touched, in what order to
fetch a study's instances, how a viewer's new position reorders a running job.

The order is the viewer's: the series it looks at, from the slice it has outwards (the
next, the previous, the one after, …: where it goes whichever way it scrolls, and the
order OHIF loads a stack in), then the other series.

Table-tested in ``tests/prefetch/test_plan.py``; :mod:`.scheduler` carries them out.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dicomcache.audit.record import Actor
from dicomcache.cache.instance import Instance
from dicomcache.dicom.uids import is_uid

#: One touch: (StudyInstanceUID, SeriesInstanceUID or None, SOPInstanceUID or None).
Touch = tuple[str, str | None, str | None]


def touch_of(path: str, query: Mapping[str, str],
             by_orthanc_id: Callable[[str], Instance | None],
             by_sop: Callable[[str], Instance | None]) -> Touch | None:
    """The study a successful viewer GET touched, or ``None`` (pure; lookups are injected).

    ``/instances/{id}/file`` and WADO-URI without ``studyUID`` are resolved
    through the store (the instance was just served, so it is known).  UIDs that
    do not follow the UI grammar (from data, or a path) are never a touch, nor are
    searches (QIDO-RS): a viewer lists a study's series before it opens one, and a
    study download started then competes with its first image for the link.
    """
    touched = _touch_of(path, query, by_orthanc_id, by_sop)
    if touched is None or not all(u is None or is_uid(u) for u in touched):
        return None
    return touched


def _touch_of(path: str, query: Mapping[str, str],
              by_orthanc_id: Callable[[str], Instance | None],
              by_sop: Callable[[str], Instance | None]) -> Touch | None:
    parts = path.strip("/").split("/")
    if len(parts) == 3 and parts[0] == "instances" and parts[2] == "file":
        entry = by_orthanc_id(parts[1])
        return (entry.study_uid, entry.series_uid, entry.sop_uid) if entry and entry.study_uid \
            else None
    if parts == ["wado"]:
        sop = query.get("objectUID")
        study = query.get("studyUID")
        if study:
            return study, query.get("seriesUID"), sop
        entry = by_sop(sop) if sop else None
        return (entry.study_uid, entry.series_uid, entry.sop_uid) if entry and entry.study_uid \
            else None
    if len(parts) >= 3 and parts[0] == "dicom-web" and parts[1] == "studies":
        if parts[-1] in ("series", "instances"):
            return None  # a search (QIDO-RS): the viewer has not chosen what to look at
        study = parts[2]
        series = parts[4] if len(parts) >= 5 and parts[3] == "series" else None
        sop = parts[6] if series and len(parts) >= 7 and parts[5] == "instances" else None
        return study, series, sop
    return None


@dataclass(slots=True)
class Item:
    """One instance of a listing, in fetch order."""

    orthanc_id: str
    sop_uid: str
    series_uid: str
    size: int
    order: tuple[int, int]
    #: Its place in its series (0, 1, …, in ``order``).
    rank: int = 0


def around(items: Iterable[Item], rank: int) -> list[Item]:
    """``items`` of one series nearest the slice at ``rank`` first: that slice, the next,
    the previous, the one after the next, …"""
    return sorted(items, key=lambda it: (abs(it.rank - rank), it.rank < rank))


@dataclass(slots=True)
class Job:
    study_uid: str
    series_uid: str | None
    sop_uid: str | None
    mode: str
    items: collections.deque[Item] = field(default_factory=collections.deque)
    #: Whose touch queued it: its downloads are audited as theirs (``None``: the system's).
    actor: Actor | None = None
    #: A touch named an image: the viewer has its first one (or none is coming: a
    #: change-feed pre-warm), so downloads may start.
    opened: bool = False
    #: SOP Instance UID → (series, rank) of every listed instance: where a touch is,
    #: also once that instance has left the queue.
    places: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """What a job covers: ``study`` or ``study/series``."""
        if self.mode == "series" and self.series_uid:
            return f"{self.study_uid}/{self.series_uid}"
        return self.study_uid

    def listed(self, items: list[Item]) -> None:
        """The queue, in fetch order (:func:`order_items`)."""
        self.items = collections.deque(items)
        self.places = {it.sop_uid: (it.series_uid, it.rank) for it in items}

    def focus(self, series_uid: str | None, sop_uid: str | None) -> None:
        """Move the queue to the viewer: ``sop_uid``'s series from that slice outwards
        (:func:`around`), or that series, first.  Before the listing is in, the viewer's
        place is kept for it."""
        if series_uid is None and sop_uid is None:
            return
        self.opened |= sop_uid is not None
        if not self.places:  # still being listed: the listing orders from here
            self.series_uid = series_uid or self.series_uid
            self.sop_uid = sop_uid
            return
        place = self.places.get(sop_uid or "")
        series, rank = place if place is not None else (series_uid, None)
        items = list(self.items)
        mine = [it for it in items if it.series_uid == series]
        if not mine:
            return
        if rank is not None:
            mine = around(mine, rank)
        self.items = collections.deque(mine + [it for it in items if it.series_uid != series])


def order_items(series_list: list[dict[str, Any]], instances: list[dict[str, Any]],
                first_series: str | None, at_sop: str | None) -> list[Item]:
    """Fetch order (pure): the touched series from the touched slice outwards (in slice
    order without one), then the other series in slice order.

    ``series_list`` and ``instances`` are Orthanc's ``/studies/{id}/series`` and
    ``/studies/{id}/instances`` answers (or a series' own instances).
    """
    uid_of = {s["ID"]: s.get("MainDicomTags", {}).get("SeriesInstanceUID", s["ID"])
              for s in series_list}
    items: list[Item] = []
    for inst in instances:
        tags = inst.get("MainDicomTags", {})
        sop = tags.get("SOPInstanceUID")
        if not sop:
            continue
        try:
            number = int(str(tags.get("InstanceNumber", "")).strip() or 0)
        except ValueError:
            number = 0
        index = inst.get("IndexInSeries")
        items.append(Item(inst["ID"], sop, uid_of.get(inst.get("ParentSeries"), ""),
                          int(inst.get("FileSize") or 0),
                          (int(index) if isinstance(index, int) else number, number)))
    items.sort(key=lambda it: (it.series_uid != first_series, it.series_uid, it.order))
    for i in range(1, len(items)):
        if items[i - 1].series_uid == items[i].series_uid:
            items[i].rank = items[i - 1].rank + 1
    at = next((it for it in items if it.series_uid == first_series and it.sop_uid == at_sop),
              None) if at_sop else None
    if at is not None:
        first = around((it for it in items if it.series_uid == first_series), at.rank)
        items = first + [it for it in items if it.series_uid != first_series]
    return items
