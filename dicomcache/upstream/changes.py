"""Follow Orthanc's ``/changes`` feed: tell subscribers which studies changed, pre-warm new ones.

On by default (``[changes] enabled``).  Every ``poll_interval`` seconds (at once
again while Orthanc says the feed is not ``Done``) the watcher reads
``/changes?since=CURSOR&limit=BATCH`` and:

* tells its **listener** (the store's coherence,
  :mod:`dicomcache.cache.coherence`) of every change, so a stored instance that
  got new content is compared with Orthanc at once, and of every **gap**: changes
  gone from Orthanc's history (deleting a resource removes its changes), a new
  history (Orthanc's database replaced), or a restart of dicomcache
  (:func:`feed_gap`);
* resolves each changed resource (new instance, series, study, stable
  series/study, modification) to its StudyInstanceUID and calls every **study
  hook** once per study and batch with a :class:`StudyEvent`.  Hooks are async
  callables in a list the application owns (always present, even when the
  watcher is off): cached metadata subscribes there to revalidate what a new
  instance made stale, and to drop what a purge removed.
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
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dicomcache.config import ChangesSettings, PrewarmRule
from dicomcache.durable import write_durably
from dicomcache.errors import NotFoundUpstream, UpstreamError
from dicomcache.metrics import Metrics
from dicomcache.upstream.client import OrthancClient

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class StudyEvent:
    """What a study-changed hook is told."""

    #: The study (``None``: every study, e.g. after a gap in the feed).
    study_uid: str | None
    #: Content was deleted or replaced: what was derived from it must be dropped, not
    #: only revalidated (revalidation alone may keep serving it while Orthanc is away).
    removed: bool = False


StudyHook = Callable[[StudyEvent], Awaitable[None]]


class ChangeListener(Protocol):
    """Told of every change the feed reports, and of gaps in it (the store's coherence)."""

    async def changed(self, kind: str, level: str, resource: str) -> None: ...

    async def gap(self, why: str) -> None: ...


async def notify(hooks: list[StudyHook], event: StudyEvent) -> None:
    """Run every hook for ``event``; a failing hook is logged, never raised."""
    results = await asyncio.gather(*(hook(event) for hook in list(hooks)),
                                   return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            log.error("changes: study hook failed for %s: %r", event.study_uid, result)

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


def feed_gap(cursor: int, changes: list[dict[str, Any]], last: object, *,
             restarted: bool) -> str | None:
    """Why changes may have been missed since ``cursor``, or ``None`` (pure).

    Orthanc removes the changes of a deleted resource from its history, and keeps
    a bounded history: a first change beyond ``cursor + 1`` means some were lost.
    A ``Last`` below the cursor is a new history (Orthanc's database replaced).  A
    restart of dicomcache is a gap too: Orthanc may have deleted what it stores
    while it was down, and deletions leave no change.
    """
    if isinstance(last, int) and last < cursor:
        return f"Orthanc's change history restarted (last change {last}, ours {cursor})"
    if restarted:
        return "dicomcache restarted; what Orthanc deleted meanwhile left no change"
    expected = cursor + 1
    for change in changes:
        seq = change.get("Seq")
        if not isinstance(seq, int):
            continue
        if seq > expected:
            return f"changes {expected}–{seq - 1} are gone from Orthanc's history"
        expected = seq + 1
    return None


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
                 warm: Callable[[str], None] | None = None,
                 listener: ChangeListener | None = None) -> None:
        self.settings = settings
        self.listener = listener
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
        self._restarted = False
        #: The cursor could not be saved lately (logged once until it can).
        self._unsaved = False

    async def start(self) -> None:
        self.cursor = await asyncio.to_thread(read_cursor, self.cursor_file, self.client.base)
        self._restarted = self.cursor is not None
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
            data = await self.client.get_json("/changes?last", expect=dict)
            await self._save(int(data.get("Last", 0)))
            log.info("changes: starting after Orthanc's current last change %d", self.cursor)
            return True
        data = await self.client.get_json(
            f"/changes?since={self.cursor}&limit={self.settings.batch}", expect=dict)
        changes = data.get("Changes") or []
        why = feed_gap(self.cursor, changes, data.get("Last"), restarted=self._restarted)
        self._restarted = False
        if why is not None:
            await self._gap(why)
            last = data.get("Last")
            if isinstance(last, int) and last < self.cursor:  # a new history: follow it
                await self._save(last)
                return True
        for change in changes:
            if self.listener is not None:
                await self.listener.changed(str(change.get("ChangeType")),
                                            str(change.get("ResourceType")),
                                            str(change.get("ID")))
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

    async def _gap(self, why: str) -> None:
        """Changes may have been missed: the listener confirms again, every study's
        answers are revalidated."""
        if self.listener is not None:
            await self.listener.gap(why)
        await self._notify(None)

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
            with contextlib.suppress(OSError):
                await write
            self.cursor = last
            raise
        except OSError as exc:
            # A full or read-only disk (the cache degraded): the feed is still followed,
            # from memory; only a restart resumes from the last cursor that was saved.
            if not self._unsaved:
                log.warning("changes: cannot save the cursor in %s (%s): following the feed "
                            "from memory; a restart resumes from the last cursor saved",
                            self.cursor_file, exc)
            self._unsaved = True
        else:
            if self._unsaved:
                log.info("changes: the cursor is saved again in %s", self.cursor_file)
            self._unsaved = False
        self.cursor = last

    async def _study_id(self, level: str, resource: str) -> str | None:
        """The Orthanc study ID of a changed resource (its UID learned); None if gone."""
        path = _PATHS.get(level)
        if path is None:
            return None
        if level == "Study" and resource in self._uids:
            return resource
        try:
            study = await self.client.get_json(path.format(resource), expect=dict)
        except NotFoundUpstream:  # deleted meanwhile
            return None
        study_id = str(study.get("ID", resource))
        uid = study.get("MainDicomTags", {}).get("StudyInstanceUID")
        if uid:
            if len(self._uids) > 100_000:
                self._uids.clear()
            self._uids[study_id] = uid
        return study_id

    async def _notify(self, study_uid: str | None, *, removed: bool = False) -> None:
        await notify(self.hooks, StudyEvent(study_uid, removed))

    async def _maybe_warm(self, study_id: str) -> None:
        study = await self.client.get_json(f"/studies/{study_id}", expect=dict)
        series = await self.client.get_json(f"/studies/{study_id}/series", expect=list,
                                            of=dict)
        modalities = {str(s.get("MainDicomTags", {}).get("Modality", "")).upper()
                      for s in series}
        tags = {**study.get("PatientMainDicomTags", {}), **study.get("MainDicomTags", {})}
        if any(r.tag and r.tag not in tags for r in self.settings.prewarm):
            shared = await self.client.get_json(f"/studies/{study_id}/shared-tags?simplify",
                                                expect=dict)
            tags = {**{k: str(v) for k, v in shared.items() if isinstance(v, str)}, **tags}
        uid = tags.get("StudyInstanceUID")
        if uid and any(rule_matches(r, study, modalities, tags) for r in self.settings.prewarm):
            log.info("changes: pre-warming new study %s", uid)
            self.warmed.append(uid)
            assert self.warm is not None
            self.warm(uid)

