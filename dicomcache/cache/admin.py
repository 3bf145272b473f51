"""Operations on a store for its administrators: check an entry, choose what to purge,
sum up use per study.  Used by ``dicomcache stats|purge|verify|pin`` (``cli/admin.py``),
with or without a running daemon (both see the same index)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dicomcache.cache.instance import Instance
from dicomcache.dicom.verify import verify_file
from dicomcache.errors import Cause, IntegrityError


def check_entry(entry: Instance) -> IntegrityError | None:
    """Re-verify one stored file: length, MD5 and a full parse; the error, or None if intact.

    ``FileNotFoundError`` propagates (a vanished file is not a bad one).
    """
    assert entry.path is not None, "only stored entries are checked"
    try:
        summary = verify_file(entry.path, expected_length=entry.size, expected_md5=entry.md5)
    except IntegrityError as exc:
        return exc
    except FileNotFoundError:
        raise
    except OSError as exc:  # EIO and friends: the disk itself is failing
        return IntegrityError(Cause.READ_ERROR, f"cannot read the file: {exc}")
    if summary.sop_instance_uid != entry.sop_uid:
        return IntegrityError(Cause.PARSE_FAILURE, f"the file holds SOPInstanceUID "
                              f"{summary.sop_instance_uid}, the index says {entry.sop_uid}")
    return None


@dataclass(frozen=True, slots=True)
class PurgeChoice:
    """What a purge takes, and how many instances of pinned studies it leaves."""

    entries: list[Instance]
    kept_pinned: int

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)


def choose_purge(entries: Iterable[Instance], pinned: Iterable[str], *, now: float,
                 study: str | None = None, patient: str | None = None,
                 instance: str | None = None, older_than: float | None = None,
                 include_pinned: bool = False) -> PurgeChoice:
    """The entries a purge takes (pure): one study's, one patient's or one instance's
    (an Orthanc ID or a SOP Instance UID; pinned or not), else every entry or those
    stored before ``now - older_than``, pinned studies only with ``include_pinned``."""
    pins = set(pinned)
    chosen: list[Instance] = []
    kept = 0
    for entry in entries:
        named = (study is not None and entry.study_uid == study,
                 patient is not None and entry.patient_id == patient,
                 instance is not None and instance in (entry.orthanc_id, entry.sop_uid))
        if study is not None or patient is not None or instance is not None:
            if any(named):
                chosen.append(entry)
            continue
        if older_than is not None and entry.stored_at >= now - older_than:
            continue
        if entry.study_uid in pins and not include_pinned:
            kept += 1
            continue
        chosen.append(entry)
    return PurgeChoice(chosen, kept)


@dataclass(slots=True)
class StudyUse:
    """One study's share of the store."""

    study_uid: str
    instances: int = 0
    size_bytes: int = 0
    last_used: float = 0.0
    pinned: bool = False


def study_use(listing: Iterable[tuple[Instance, float]], pinned: Iterable[str]
              ) -> dict[str, StudyUse]:
    """Instances, bytes and last use of every study in ``listing`` (entry, last use)."""
    pins = set(pinned)
    studies: dict[str, StudyUse] = {}
    for entry, last_used in listing:
        uid = entry.study_uid or "(unknown)"
        use = studies.setdefault(uid, StudyUse(uid, pinned=uid in pins))
        use.instances += 1
        use.size_bytes += entry.size
        use.last_used = max(use.last_used, last_used)
    return studies
