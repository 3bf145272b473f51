"""``Instance``: one verified DICOM instance, stored on disk or held in memory.

Every route serves this one type.  An instance is *verified* (it passed
:mod:`dicomcache.dicom.verify`: length, Orthanc's MD5 when it has one, a full
bounds-checked parse) before an :class:`Instance` exists for it; its bytes are
either a durable file of the store (``path``) or, while it is being committed
or when the disk could not take it, in memory (``data``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dicomcache.dicom.uids import orthanc_series_id, orthanc_study_id
from dicomcache.dicom.verify import DicomSummary
from dicomcache.errors import NotFoundUpstream


@dataclass(frozen=True, slots=True)
class Instance:
    """A verified instance: who and what it is, its content's MD5, and where its bytes are.

    Its identity is Orthanc's: ``orthanc_id`` names one instance of one patient
    (the hash of the Patient ID and the three UIDs); the same SOP Instance UID
    under another patient is another :class:`Instance`.
    """

    orthanc_id: str
    patient_id: str
    study_uid: str | None
    series_uid: str | None
    sop_uid: str
    transfer_syntax: str
    #: MD5 of the Part-10 bytes (Orthanc's stored MD5 when it has one).
    md5: str
    size: int
    #: The store's durable file (``None`` while only in memory).
    path: Path | None = None
    #: The bytes, when not (yet) stored.
    data: bytes | None = dataclasses.field(default=None, repr=False, compare=False)
    #: When it was stored (Unix time; 0 while only in memory).
    stored_at: float = 0.0
    #: When Orthanc last confirmed its MD5 (Unix time; at first, when it was stored).
    confirmed_at: float = 0.0

    @property
    def series_oid(self) -> str:
        """Orthanc's ID of its series (the hash of Patient ID, Study and Series UIDs)."""
        return orthanc_series_id(self.patient_id, self.study_uid or "", self.series_uid or "")

    @property
    def study_oid(self) -> str:
        """Orthanc's ID of its study."""
        return orthanc_study_id(self.patient_id, self.study_uid or "")

    @classmethod
    def verified(cls, summary: DicomSummary, md5: str, data: bytes,
                 orthanc_id: str | None = None) -> Instance:
        """A body that just passed verification, held in memory.

        ``orthanc_id`` is the instance it was fetched as, when Orthanc confirmed it
        (a Patient ID in another character set hashes differently here); by
        default the one its identifiers give.
        """
        return cls(orthanc_id or summary.orthanc_id, summary.patient_id,
                   summary.study_instance_uid, summary.series_instance_uid,
                   summary.sop_instance_uid, summary.transfer_syntax_uid, md5, len(data),
                   data=data)

    @classmethod
    def verified_file(cls, summary: DicomSummary, md5: str, size: int,
                      orthanc_id: str | None = None) -> Instance:
        """A body that just passed verification in a temp file, about to be committed
        (:meth:`Store.commit` gives the stored entry): neither stored nor in memory yet."""
        return cls(orthanc_id or summary.orthanc_id, summary.patient_id,
                   summary.study_instance_uid, summary.series_instance_uid,
                   summary.sop_instance_uid, summary.transfer_syntax_uid, md5, size)

    @property
    def stored(self) -> bool:
        return self.path is not None

    @property
    def etag(self) -> str:
        """The strong validator of its bytes: their MD5."""
        return f'"{self.md5}"'

    def check_in(self, study: str | None, series: str | None) -> None:
        """:class:`NotFoundUpstream` unless it belongs to the study and series a URL names."""
        if study and self.study_uid and study != self.study_uid:
            raise NotFoundUpstream(404, f"instance {self.sop_uid} is not in study {study}")
        if series and self.series_uid and series != self.series_uid:
            raise NotFoundUpstream(404, f"instance {self.sop_uid} is not in series {series}")

    def content(self) -> bytes:
        """The instance bytes (blocking for a stored one: call from a worker thread)."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    async def read(self) -> bytes:
        """The instance bytes, read in a worker thread when stored."""
        if self.data is not None:
            return self.data
        return await asyncio.to_thread(self.content)
