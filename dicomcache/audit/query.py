"""Reading the trail back: "who looked at this patient?" (``dicomcache audit``).

The current file and every rotated one (gzipped ones too) are read line by
line, oldest first, with bounded memory: a line is read at most
:data:`MAX_LINE` bytes at a time, and only what a query needs is kept.

Many records name no patient: a metadata or QIDO request names a study or a
query, a passthrough names Orthanc's ID.  For ``--patient`` the files are
therefore read twice: the first pass learns which studies (and which Orthanc
IDs) the records that *do* name the patient belong to; the second matches
records by the patient ID, by one of those studies or IDs (a record naming
another patient never matches), or by a search for that Patient ID (the
query's ``PatientID``/``00100020`` parameter).  Each match says why.
"""

from __future__ import annotations

import fnmatch
import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import parse_qsl

from dicomcache.audit.record import decode
from dicomcache.dicom.uids import (
    orthanc_instance_id,
    orthanc_patient_id,
    orthanc_series_id,
    orthanc_study_id,
)

#: Longest line read whole; a longer one (not a record) is skipped.
MAX_LINE = 1 << 20
#: Most studies and Orthanc IDs remembered for one patient (more: said, and not learnt).
MAX_ASSOCIATED = 200_000
_PATIENT_KEYS = ("patientid", "00100020")


_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, *, end: bool = False, now: datetime | None = None) -> datetime:
    """``2026-12-01``, an ISO 8601 time (``2026-12-01T08:00``, ``…+01:00``) or a time
    ago (``90m``, ``2h``, ``7d``, ``2w``) as UTC.

    A time without an offset is UTC (as the records).  A date alone with ``end``
    is the end of that day (``--until 2026-12-31`` includes the 31st).
    """
    ago = _AGO.fullmatch(text.strip())
    if ago:
        return (now or datetime.now(UTC)) - timedelta(
            seconds=float(ago.group(1)) * _UNITS[ago.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a date or time such as 2026-12-01 or "
                         "2026-12-01T08:00+01:00") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if end and len(text.strip()) == 10:
        when += timedelta(days=1)
    return when.astimezone(UTC)


def stamp(when: datetime) -> str:
    """The record ``time`` format (fixed width: strings compare as times)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _open(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


def read_records(files: list[Path | IO[bytes]], bad: list[int] | None = None
                 ) -> Iterator[dict[str, Any]]:
    """Every record of ``files`` (paths, or binary files opened already), in order.

    Lines that are not records (cut by a crash, too long) are skipped and counted
    in ``bad[0]``.  A file deleted meanwhile (rotated out) is skipped.
    """
    for item in files:
        try:
            f = _open(item) if isinstance(item, Path) else item
        except FileNotFoundError:
            continue
        try:
            if not isinstance(item, Path):
                f.seek(0)
            yield from _records(f, bad)
        finally:
            if isinstance(item, Path):
                f.close()


def _records(f: IO[bytes], bad: list[int] | None) -> Iterator[dict[str, Any]]:
    while line := f.readline(MAX_LINE):
        if len(line) >= MAX_LINE and not line.endswith(b"\n"):
            while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass  # too long to be a record: skipped whole
            rec = None
        elif not line.strip():
            continue
        else:
            rec = decode(line)
        if rec is None:
            if bad is not None:
                bad[0] += 1
            continue
        yield rec


@dataclass
class Query:
    """What ``dicomcache audit`` asks; :meth:`matches` says why a record matches (or None)."""

    patient: str | None = None
    study: str | None = None
    principal: str | None = None
    since: str | None = None
    until: str | None = None
    #: Learnt in the first pass (see the module docstring).
    studies: set[str] = field(default_factory=set)
    orthanc_ids: set[str] = field(default_factory=set)
    #: The first pass stopped learning (more than :data:`MAX_ASSOCIATED`).
    overflow: bool = False

    @property
    def needs_first_pass(self) -> bool:
        return self.patient is not None

    def learn(self, rec: dict[str, Any]) -> None:
        """First pass: remember the studies and Orthanc IDs of the patient's records."""
        if self.patient is None or rec.get("patient_id") != self.patient:
            return
        if len(self.studies) + len(self.orthanc_ids) >= MAX_ASSOCIATED:
            self.overflow = True
            return
        study, series, sop = rec.get("study_uid"), rec.get("series_uid"), rec.get("sop_uid")
        if isinstance(rec.get("orthanc_id"), str):
            self.orthanc_ids.add(rec["orthanc_id"])
        if isinstance(study, str):
            self.studies.add(study)
            self.orthanc_ids.add(orthanc_study_id(self.patient, study))
            if isinstance(series, str):
                self.orthanc_ids.add(orthanc_series_id(self.patient, study, series))
                if isinstance(sop, str):
                    self.orthanc_ids.add(orthanc_instance_id(self.patient, study, series, sop))

    def matches(self, rec: dict[str, Any]) -> str | None:
        """Why ``rec`` answers the query (``patient``, ``study``, ``orthanc id``,
        ``query``, or ``match`` without ``--patient``), or ``None``."""
        when = rec.get("time", "")
        if (self.since and when < self.since) or (self.until and when >= self.until):
            return None
        if self.principal is not None and rec.get("principal") != self.principal:
            return None
        if self.study is not None and rec.get("study_uid") != self.study and not (
                self.patient is not None and rec.get("orthanc_id") ==
                orthanc_study_id(self.patient, self.study)):
            return None
        if self.patient is None:
            return "match"
        return self._patient_reason(rec)

    def _patient_reason(self, rec: dict[str, Any]) -> str | None:
        assert self.patient is not None
        named = rec.get("patient_id")
        if named is not None:
            return "patient" if named == self.patient else None
        if rec.get("study_uid") in self.studies:
            return "study"
        oid = rec.get("orthanc_id")
        if oid is not None and (oid in self.orthanc_ids
                                or oid == orthanc_patient_id(self.patient)):
            return "orthanc id"
        if rec.get("action") == "query" and self._asks_for_patient(rec.get("query") or ""):
            return "query"
        return None

    def _asks_for_patient(self, query: str) -> bool:
        assert self.patient is not None
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name.lower() in _PATIENT_KEYS and value.strip("*?") \
                    and fnmatch.fnmatchcase(self.patient, value):
                return True
        return False


def search(query: Query, files: list[Path], bad: list[int] | None = None
           ) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of ``files`` that ``query`` matches, with why, oldest first.

    The current file (the last one) is opened once, before the first pass, so a
    rotation during the search changes nothing read.
    """
    opened: list[Path | IO[bytes]] = list(files)
    current: IO[bytes] | None = None
    if files and not files[-1].name.endswith(".gz"):
        try:
            current = open(files[-1], "rb")  # noqa: SIM115 (closed below)
            opened[-1] = current
        except FileNotFoundError:
            opened.pop()
    try:
        if query.needs_first_pass:
            for rec in read_records(opened):
                query.learn(rec)
        for rec in read_records(opened, bad):
            why = query.matches(rec)
            if why is not None:
                yield why, rec
    finally:
        if current is not None:
            current.close()
