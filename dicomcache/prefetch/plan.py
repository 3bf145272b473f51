"""Prefetch decisions, pure (no I/O): which study a request touched, in what order to
fetch a study's instances, how a viewer's new position reorders a running job.

Table-tested in ``tests/prefetch/test_plan.py``; :mod:`.scheduler` carries them out.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
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


@dataclass(slots=True)
class Job:
    study_uid: str
    series_uid: str | None
    sop_uid: str | None
    mode: str
    items: collections.deque[Item] = field(default_factory=collections.deque)
    #: Whose touch queued it: its downloads are audited as theirs (``None``: the system's).
    actor: Actor | None = None

    @property
    def key(self) -> str:
        """What a job covers: ``study`` or ``study/series``."""
        if self.mode == "series" and self.series_uid:
            return f"{self.study_uid}/{self.series_uid}"
        return self.study_uid

    def focus(self, series_uid: str | None, sop_uid: str | None) -> None:
        """Move the queue to the viewer: what follows ``sop_uid`` (or that series) first."""
        if not self.items or (series_uid is None and sop_uid is None):
            return
        items = list(self.items)
        at = next((i for i, it in enumerate(items) if sop_uid and it.sop_uid == sop_uid), None)
        if at is None:
            at = next((i for i, it in enumerate(items) if it.series_uid == series_uid), None)
        if at is None:
            return
        series = items[at].series_uid
        mine = [it for it in items[at:] if it.series_uid == series] + \
            [it for it in items[:at] if it.series_uid == series]
        rest = [it for it in items if it.series_uid != series]
        self.items = collections.deque(mine + rest)


def order_items(series_list: list[dict[str, Any]], instances: list[dict[str, Any]],
                first_series: str | None, after_sop: str | None) -> list[Item]:
    """Fetch order (pure): the touched series from just after the touched slice, then the rest.

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
    if after_sop:
        first = [it for it in items if it.series_uid == first_series]
        rest = [it for it in items if it.series_uid != first_series]
        at = next((i for i, it in enumerate(first) if it.sop_uid == after_sop), None)
        if at is not None:  # the viewer has the touched slice: start with the next one
            first = first[at + 1:] + first[:at + 1]
        items = first + rest
    return items
