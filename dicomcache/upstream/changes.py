"""Follow Orthanc's ``/changes`` feed: tell subscribers which studies changed, pre-warm new ones.

Optional (``[changes] enabled``).  Every ``poll_interval`` seconds (at once
again while Orthanc says the feed is not ``Done``) the watcher reads
``/changes?since=CURSOR&limit=BATCH`` and:

* resolves each changed resource (new instance, series, study, stable
  series/study, modification) to its StudyInstanceUID and calls every
  **study-changed hook** once per study and batch.  Hooks are async callables
  ``hook(study_uid)`` in a list the application owns (always present, even when
  the watcher is off): cached metadata subscribes there to drop what a new
  instance made stale.  Instances themselves are immutable (keyed by
  SOPInstanceUID) and need no invalidation.
* for ``StableStudy``, checks the ``[[changes.prewarm]]`` rules (modality of
  any series, an Orthanc label, a main/shared DICOM tag value; all fields of a
  rule must match, any rule may) and queues the whole study for prefetch, so it
  is local before anyone asks.

The cursor (the last change seen) is written atomically to ``cursor_file``
after every batch, together with the upstream URL: a restart resumes where it
stopped; a cursor of another Orthanc is ignored.  Without a cursor the watcher
starts at Orthanc's current last change (history is not replayed).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dicomcache.config import ChangesSettings, PrewarmRule
from dicomcache.durable import write_durably
from dicomcache.errors import NotFoundUpstream, UpstreamError
from dicomcache.metrics import Metrics
from dicomcache.upstream.client import OrthancClient

log = logging.getLogger(__name__)

StudyHook = Callable[[str], Awaitable[None]]

#: Change types that mean "this study's content or metadata changed".
STUDY_CHANGES = frozenset({
    "NewInstance", "NewSeries", "NewStudy", "StableSeries", "StableStudy",
    "ModifiedStudy", "ModifiedSeries", "ModifiedInstance", "UpdatedAttachment",
    "UpdatedMetadata", "NewChildInstance"})
_PATHS = {"Study": "/studies/{}", "Series": "/series/{}/study", "Instance": "/instances/{}/study"}


def read_cursor(path: Path, upstream: str) -> int | None:
    """The persisted cursor, or ``None`` (missing, unreadable, or of another Orthanc)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("upstream") != upstream:
        return None
    last = data.get("last")
    return last if isinstance(last, int) and last >= 0 else None


def write_cursor(path: Path, upstream: str, last: int) -> None:
    """Durably replace the cursor file (:func:`~dicomcache.durable.write_durably`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, json.dumps({"upstream": upstream, "last": last}).encode())


def rule_matches(rule: PrewarmRule, study: dict[str, Any], modalities: set[str],
                 tags: dict[str, str]) -> bool:
    """Whether a study matches every field of a pre-warm rule (pure)."""
    if rule.modality and rule.modality.upper() not in modalities:
        return False
    if rule.label and rule.label not in (study.get("Labels") or []):
        return False
    if rule.tag:
        return str(tags.get(rule.tag, "")).strip() == (rule.value or "").strip()
    return True


class ChangeWatcher:
    """The ``/changes`` loop; see the module docstring."""

    def __init__(self, settings: ChangesSettings, client: OrthancClient, metrics: Metrics,
                 cursor_file: Path, hooks: list[StudyHook],
                 warm: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.client = client
        self.warm = warm
        self.metrics = metrics
        self.cursor_file = cursor_file
        self.hooks = hooks
        self.cursor: int | None = None
        self.warmed: list[str] = []
        #: Changes processed, by type (for status pages).
        self.seen: collections.Counter[str] = collections.Counter()
        self._uids: dict[str, str] = {}  # Orthanc study ID → StudyInstanceUID
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.cursor = await asyncio.to_thread(read_cursor, self.cursor_file, self.client.base)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="changes")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            done = True
            try:
                done = await self.poll_once()
            except asyncio.CancelledError:
                raise
            except (UpstreamError, NotFoundUpstream) as exc:
                log.warning("changes: cannot read Orthanc's /changes: %s", exc)
            except Exception:
                log.exception("changes: batch failed")
            if done:
                await asyncio.sleep(self.settings.poll_interval)

    async def poll_once(self) -> bool:
        """Read and handle one batch; True when Orthanc says the feed is done."""
        if self.cursor is None:
            data = await self.client.get_json("/changes?last")
            await self._save(int(data.get("Last", 0)))
            log.info("changes: starting after Orthanc's current last change %d", self.cursor)
            return True
        data = await self.client.get_json(
            f"/changes?since={self.cursor}&limit={self.settings.batch}")
        changes = data.get("Changes") or []
        studies: dict[str, str] = {}  # Orthanc study ID → why (for stable studies)
        stable: set[str] = set()
        for change in changes:
            kind = str(change.get("ChangeType"))
            self.seen[kind] += 1
            if kind not in STUDY_CHANGES:
                continue
            study_id = await self._study_id(str(change.get("ResourceType")), str(change.get("ID")))
            if study_id is None:
                continue
            studies.setdefault(study_id, kind)
            if kind == "StableStudy":
                stable.add(study_id)
        for study_id in studies:
            uid = self._uids.get(study_id)
            if uid is not None:
                await self._notify(uid)
        if self.warm is not None and self.settings.prewarm:
            for study_id in stable:
                await self._maybe_warm(study_id)
        await self._save(int(data.get("Last", self.cursor)))
        return bool(data.get("Done", True))

    async def _save(self, last: int) -> None:
        """Persist the cursor, then move it: what the file says is where the watcher stands.

        A stop during the write waits for it (a short fsync): returning while the
        thread still wrote left the file behind the cursor, or written after stop.
        """
        write = asyncio.ensure_future(
            asyncio.to_thread(write_cursor, self.cursor_file, self.client.base, last))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await write
            self.cursor = last
            raise
        self.cursor = last

    async def _study_id(self, level: str, resource: str) -> str | None:
        """The Orthanc study ID of a changed resource (its UID learned); None if gone."""
        path = _PATHS.get(level)
        if path is None:
            return None
        if level == "Study" and resource in self._uids:
            return resource
        try:
            study = await self.client.get_json(path.format(resource))
        except NotFoundUpstream:  # deleted meanwhile
            return None
        study_id = str(study.get("ID", resource))
        uid = study.get("MainDicomTags", {}).get("StudyInstanceUID")
        if uid:
            if len(self._uids) > 100_000:
                self._uids.clear()
            self._uids[study_id] = uid
        return study_id

    async def _notify(self, study_uid: str) -> None:
        results = await asyncio.gather(*(hook(study_uid) for hook in list(self.hooks)),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("changes: study-changed hook failed for %s: %r", study_uid, result)

    async def _maybe_warm(self, study_id: str) -> None:
        study = await self.client.get_json(f"/studies/{study_id}")
        series = await self.client.get_json(f"/studies/{study_id}/series")
        modalities = {str(s.get("MainDicomTags", {}).get("Modality", "")).upper()
                      for s in series}
        tags = {**study.get("PatientMainDicomTags", {}), **study.get("MainDicomTags", {})}
        if any(r.tag and r.tag not in tags for r in self.settings.prewarm):
            shared = await self.client.get_json(f"/studies/{study_id}/shared-tags?simplify")
            tags = {**{k: str(v) for k, v in shared.items() if isinstance(v, str)}, **tags}
        uid = tags.get("StudyInstanceUID")
        if uid and any(rule_matches(r, study, modalities, tags) for r in self.settings.prewarm):
            log.info("changes: pre-warming new study %s", uid)
            self.warmed.append(uid)
            assert self.warm is not None
            self.warm(uid)

