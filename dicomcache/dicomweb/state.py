"""The DICOMweb side's state: answer caches, instance listings and what else it asks Orthanc.

One :class:`DicomWeb` per app (``routes.common.DICOMWEB``).  It owns the
:class:`~dicomcache.dicomweb.answers.AnswerCache` (metadata, QIDO, rendered answers and
instance listings, with revalidation and stale copies), the series/study streams
in progress (:class:`~dicomcache.dicomweb.series_stream.SeriesStream`) and their shared
commit backlog, and the upstream calls the routes need besides instance
downloads (lookups, listings, stored sizes, one instance transcoded).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import mmap
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import hdrs

from dicomcache.cache.fetch import Fetcher
from dicomcache.cache.instance import Instance
from dicomcache.cache.store import AsyncStore, Store
from dicomcache.config import DicomwebSettings
from dicomcache.dicom import multipart
from dicomcache.dicom.uids import is_uid
from dicomcache.dicom.verify import PixelInfo, parse_dicom
from dicomcache.dicomweb.answers import (
    AnswerCache,
    Cached,
    DiskCopies,
    Loader,
    for_viewer,
    gzips,
    middle_instances,
    named_instances,
    normalised,
    plain,
    relinked_bulk_data,
)
from dicomcache.dicomweb.series_stream import COMMIT_BACKLOG, Budget, SeriesStream
from dicomcache.errors import Cause, IntegrityError, NotFoundUpstream, UpstreamError
from dicomcache.upstream.changes import StudyEvent
from dicomcache.upstream.client import GZIP, OrthancClient, decoded

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
#: First answers confirmed ahead of time at most at once (each costs Orthanc one more
#: metadata answer, so a burst of cold requests cannot make it many more).
MAX_CONFIRMATIONS = 64
#: Orthanc errors in a row after which frames are no longer asked transcoded.
FRAMES_REFUSED_AFTER = 3


class DicomWeb:
    """The DICOMweb caches and the upstream calls they need (one per app)."""

    def __init__(self, settings: DicomwebSettings, client: OrthancClient, store: AsyncStore,
                 fetcher: Fetcher, directory: Path | None = None) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.fetcher = fetcher
        # Metadata, searches and instance lists also go to disk (not rendered images), so
        # a restart while Orthanc is unreachable still has them to stand in.
        self.disk = DiskCopies(directory, settings.memory_size) if directory else None
        self.cache = AnswerCache(settings.memory_size, settings.stale_if_error, disk=self.disk,
                                 persist=lambda key: not key.startswith("raw:"))
        self._pixels: collections.OrderedDict[str, PixelInfo | None] = collections.OrderedDict()
        #: Upstream series/study streams in progress (cancelled at shutdown).
        self.streams: set[asyncio.Future[None]] = set()
        #: Verified stream parts not yet durable, all streams together.
        self.commit_backlog = Budget(COMMIT_BACKLOG)
        #: First answers waiting to be confirmed ahead of time (:meth:`json_answer`).
        self.confirmations: set[asyncio.Task[None]] = set()
        #: Orthanc refused ``upstream.frames_transfer_syntax`` (:meth:`frames_failed`).
        self.frames_refused = False
        self._frames_failures = 0

    def frames_failed(self, syntax: str, status: int, why: str) -> None:
        """Orthanc did not transcode frames to ``syntax``: a 4xx says it never will,
        :data:`FRAMES_REFUSED_AFTER` 500s in a row (Orthanc 1.10's answer for a syntax
        it has no encoder for) too.  Then it is not asked again until restart."""
        self._frames_failures = 0 if status == 200 else self._frames_failures + 1
        if status == 200 or self.frames_refused:
            return
        if status != 500 or self._frames_failures >= FRAMES_REFUSED_AFTER:
            log.warning("Orthanc does not transcode frames to %s (%s %s): viewers get the "
                        "stored syntax; unset upstream.frames_transfer_syntax or pick one "
                        "Orthanc makes", syntax, status, why)
            self.frames_refused = True

    async def stop(self) -> None:
        """Cancel the streams and confirmations in progress (shutdown), once the disk
        copies of the answers already given are written."""
        await self.cache.flush()
        tasks = [*self.streams, *self.confirmations]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def series_stream(self, study: str, series: str | None, oids: list[str]) -> SeriesStream:
        """One upstream retrieve of the series/study feeding the missing instances ``oids``."""
        path = f"/dicom-web/studies/{study}" + (f"/series/{series}" if series else "")
        stream = SeriesStream(self.fetcher, path, oids, self.commit_backlog)
        self.streams.add(stream.task)
        stream.task.add_done_callback(self.streams.discard)
        return stream

    async def file_sizes(self, oid: str, level: str) -> dict[str, int] | None:
        """Orthanc's size of each stored instance of a series or study (``None``: unknown).

        Lets a cold retrieve of instances as stored announce its Content-Length:
        a client reads a body of known length faster than a chunked one (the
        Python ``http.client`` of the benchmark spends half the CPU) and can show
        progress.  One attempt, no retries: without it the answer is chunked.
        """
        path = f"/{'series' if level == 'Series' else 'studies'}/{oid}/instances"
        try:
            listed = await self.client.get_json(path, retry=False, expect=list, of=dict)
            return {str(i["ID"]): int(i["FileSize"]) for i in listed}
        except (UpstreamError, NotFoundUpstream, ValueError, KeyError, TypeError) as exc:
            log.info("no instance sizes for %s (%s): the retrieve is sent chunked", oid, exc)
            return None

    # upstream calls: retried when no copy exists; one attempt when a stale copy can stand in
    async def _ask(self, op: Callable[[int], Awaitable[Any]], *, what: str, retry: bool) -> Any:
        if retry:
            return await self.client.retrying(op, what=what)
        return await op(1)

    async def listing(self, study: str, series: str | None) -> tuple[Cached, bool]:
        """Orthanc IDs of the instances of a series or study, in Orthanc's order.

        ``value`` is ``(orthanc id of the series/study, (instance ids…))``; the
        validator changes whenever an instance is added or the resource updated.
        """
        key = f"list:{study}/{series or ''}"
        return await self.cache.get(key, lambda old: self._load_listing(study, series, old),
                                    study=study)

    async def _load_listing(self, study: str, series: str | None, old: Cached | None) -> Cached:
        async def once(_attempt: int) -> Cached:
            if series is not None:
                if old is not None:
                    oid = old.value[0]
                    info = await self.client.get_json(f"/series/{oid}", retry=False,
                                                      expect=dict)
                else:
                    info = await self._find_series(study, series)
                    oid = str(info["ID"])
                ids = [str(i) for i in info.get("Instances", ())]
                validator: Any = [ids, info.get("LastUpdate")]
            else:
                oid = old.value[0] if old is not None else \
                    await self.client.lookup(study, "Study", retry=False)
                items = await self.client.get_json(f"/studies/{oid}/series", retry=False,
                                                   expect=list, of=dict)
                ids = [str(i) for s in items for i in s.get("Instances", ())]
                validator = plain([(s.get("ID"), s.get("LastUpdate"), len(s.get("Instances", ())))
                                   for s in items])
            if old is not None and old.validator == validator:
                return old.revalidated(time.monotonic())
            return Cached(b"", "", time.monotonic(), self.settings.metadata_fresh,
                          validator=validator, value=[oid, ids])

        try:
            result: Cached = await self._ask(once, what=f"instances of {series or study}",
                                             retry=old is None)
        except NotFoundUpstream:
            if old is None:
                raise
            # The cached Orthanc ID is gone (resource deleted, re-created): look up afresh.
            result = await self._load_listing(study, series, None)
        return result

    def _confirm_later(self, key: str, load: Loader, study: str | None, delay: float) -> None:
        """Revalidate a first answer (no validator yet) after ``delay`` seconds, off the
        viewer's path.  At most :data:`MAX_CONFIRMATIONS` wait: past that, an answer is
        revalidated when next asked for, as any stale copy."""
        if len(self.confirmations) >= MAX_CONFIRMATIONS:
            return

        async def confirm() -> None:
            await asyncio.sleep(delay)
            await self.cache.refresh(key, load, study=study)

        task = asyncio.get_running_loop().create_task(confirm(), name=f"confirm {key[:80]}")
        self.confirmations.add(task)
        task.add_done_callback(self.confirmations.discard)

    async def _find_series(self, study: str, series: str) -> dict[str, Any]:
        """The series with these UIDs as ``GET /series/{id}`` describes it, in one round
        trip (``/tools/find``, expanded: no lookups first).  :class:`NotFoundUpstream`
        when it is not in that study, or the UIDs name several (two patients)."""
        query = {"Level": "Series", "Expand": True,
                 "Query": {"StudyInstanceUID": study, "SeriesInstanceUID": series}}
        found = await self.client.get_json("/tools/find", method="POST", kind="lookup",
                                           retry=False, body=json.dumps(query).encode(),
                                           expect=list, of=dict)
        if len(found) != 1 or not isinstance(found[0].get("ID"), str):
            raise NotFoundUpstream(404, f"series {series} of study {study}: Orthanc has "
                                   f"{len(found)} such series")
        info: dict[str, Any] = found[0]
        return info

    async def _validator(self, listing: tuple[str, str | None] | None) -> Any:
        """What a stale answer is confirmed against: the validator of the instance list of
        ``listing`` (study, series), ``None`` without one.  :class:`UpstreamError` when
        the list itself is only a stale copy (the answer then stands in as it is)."""
        if listing is None:
            return None
        found, stale = await self.listing(*listing)
        if stale:
            raise UpstreamError(Cause.STALE, "the instance list could not be revalidated")
        return found.validator

    async def json_answer(self, key: str, path: str, fresh_for: float, *, study: str | None,
                          listing: tuple[str, str | None] | None = None,
                          viewer: tuple[str, bool] | None = None,
                          ahead: Callable[[tuple[str, ...]], None] | None = None
                          ) -> tuple[Cached, bool]:
        """A DICOM JSON answer (metadata or QIDO) from the cache, links normalised.

        Filed under ``study`` (``None``: a search, which may list any study).  With
        ``listing`` (study, series) a stale copy is confirmed against the instance
        list before it is downloaded again.  ``viewer`` (its base URL, whether it
        takes gzip): a download also makes that viewer's rendering of the answer
        (:meth:`Cached.render`), in the same step as its checks.  ``ahead``: the
        answer lists one series; a download of it tells ``ahead`` the Orthanc ID of
        its middle instance (:func:`middle_instances`), which a viewer opens next, as
        soon as it is checked.

        A first download is the answer alone, one request (what a viewer straight to
        Orthanc waits for), so it has no validator: halfway through its freshness it is
        downloaded again in the background, after the instance list that is then kept
        as its validator (:meth:`_confirm_later`), so the next opening confirms it
        cheaply.  A validator is only ever read before the answer it confirms: read
        after it (in parallel), a change in between would be taken for confirmed.
        """
        metadata = path.split("?", 1)[0].endswith("/metadata")

        async def load(old: Cached | None) -> Cached:
            validator = await self._validator(listing) if old is not None else None
            if old is not None and listing is not None and old.validator == validator:
                return old.revalidated(time.monotonic())

            async def once(_attempt: int) -> Cached:
                # Gzip on the link (JSON metadata shrinks ~50x), undone before the
                # answer is normalised and cached (viewers get their own gzip).
                ask = {"Accept": DICOM_JSON, **(
                    GZIP if self.client.settings.compression != "none" else {})}
                headers, data = await self.client.get(path, kind="metadata", headers=ask)
                encoding = headers.get(hdrs.CONTENT_ENCODING)
                checked = functools.partial(
                    self._checked, data, encoding, path, metadata=metadata, viewer=viewer,
                    middle=ahead is not None)
                # One step, after the last byte: nothing to overlap with the download
                # (Orthanc sends the body once made: 14 KB gzipped for 120 instances,
                # ~11 ms at 10 Mbit/s; its inflating is 1 ms, and the stdlib has no
                # incremental JSON parser).  In a thread when it has index
                # writes (the instances a metadata names) or much to inflate; else
                # here: json.loads, the bulk of the work, holds the GIL (the event loop
                # waits for it in a thread too), so a hop only pays for big answers.
                try:
                    prepared = await asyncio.to_thread(checked) \
                        if metadata or len(data) > 1 << 16 else checked()
                except ValueError as exc:
                    raise UpstreamError(Cause.BAD_JSON, f"{path}: Orthanc sent invalid JSON "
                                        f"({exc})") from exc
                if ahead is not None and prepared.middle:
                    ahead(prepared.middle)
                entry = Cached(prepared.body, headers.get(hdrs.CONTENT_TYPE, DICOM_JSON),
                               time.monotonic(), fresh_for, validator=validator,
                               has_links=True, digest=prepared.digest)
                if viewer is not None:
                    entry.keep(viewer[0], prepared.gzipped, prepared.rendered)
                return entry

            result: Cached = await self._ask(once, what=f"GET {path}", retry=old is None)
            if old is None and listing is not None:
                self._confirm_later(key, load, study, fresh_for / 2)
            return result

        return await self.cache.get(key, load, study=study)

    def _checked(self, data: bytes, encoding: str | None, path: str, *, metadata: bool,
                 viewer: tuple[str, bool] | None, middle: bool = False) -> Prepared:
        """Orthanc's JSON answer decoded, checked, normalised and, for ``viewer``,
        rendered; what a metadata answer names kept (:meth:`_resolve`); with ``middle``,
        the Orthanc IDs of its middle instance(s).  Blocking (index writes);
        ``ValueError`` or :class:`UpstreamError` when it is not whole JSON."""
        text = decoded(data, encoding, path)
        doc = json.loads(text)  # checked JSON, whichever way it is relinked
        fast = relinked_bulk_data(text) if metadata else None
        body = fast if fast is not None else normalised(doc)
        named = named_instances(doc) if metadata else {}
        if named:
            self._resolve(named)
        ahead = tuple(oids[0] for oids in (named.get(key, []) for key in middle_instances(doc))
                      if len(oids) == 1) if middle else ()
        digest = Cached.digest_of(body)
        if viewer is None:
            return Prepared(body, digest, middle=ahead)
        gzipped = gzips(body, viewer[1])
        return Prepared(body, digest, gzipped, for_viewer(body, True, viewer[0], gzipped),
                        middle=ahead)

    def _resolve(self, named: dict[tuple[str, str, str], list[str]]) -> None:
        """Keep which Orthanc instance each instance of a metadata answer is
        (:func:`~dicomcache.dicomweb.answers.named_instances`): the viewer's frames that
        follow need no ``/tools/find`` round trip before their download.  A name that
        turns out wrong (a Patient ID Orthanc reads differently) costs one 404, then the
        UIDs are resolved by Orthanc (:meth:`Fetcher.by_uids`); a body is verified to be
        the instance asked for whatever named it.  Blocking (an index write), before the
        answer goes out: the viewer's first frame request may follow at once."""
        if not named:
            return
        try:
            self.store.sync.resolve_many([(sop, study, series, oids)
                                          for (sop, study, series), oids in named.items()])
        except (OSError, sqlite3.Error) as exc:  # only a round trip is lost
            log.warning("cannot keep what a metadata answer names: %s", exc)

    async def raw_answer(self, key: str, path: str, accept: str | None, fresh_for: float, *,
                         study: str, listing: tuple[str, str | None] | None = None
                         ) -> tuple[Cached, bool]:
        """Any other small answer (rendered, thumbnail), cached as Orthanc sent it; with
        ``listing``, confirmed against the instance list as :meth:`json_answer` does."""
        async def load(old: Cached | None) -> Cached:
            validator = await self._validator(listing)
            if old is not None and listing is not None and old.validator == validator:
                return old.revalidated(time.monotonic())

            async def once(_attempt: int) -> Cached:
                headers, data = await self.client.get(
                    path, kind="rendered", headers={"Accept": accept} if accept else None)
                return Cached(data, headers.get(hdrs.CONTENT_TYPE, "application/octet-stream"),
                              time.monotonic(), fresh_for, validator=validator)
            result: Cached = await self._ask(once, what=f"GET {path}", retry=old is None)
            return result

        return await self.cache.get(key, load, study=study)

    async def study_changed(self, event: StudyEvent) -> None:
        """A change hook (``app[STUDY_CHANGED]``): what derives from the study follows Orthanc.

        * changed: its instance lists, metadata and rendered answers, and every
          search (any may list it), go stale now; they are revalidated on the next
          request (then fresh again for their usual time) and still stand in while
          Orthanc is unreachable;
        * removed (instances deleted or replaced): they are dropped, in memory and
          on disk, and never served again, not even as a stale copy;
        * ``study_uid`` ``None``: the same for every study.
        """
        if event.removed:
            count = await self.cache.forget(event.study_uid)
            log.info("DICOMweb answers of %s dropped (%d in memory): removed in Orthanc",
                     event.study_uid or "every study", count)
        else:
            self.cache.expire(event.study_uid)

    async def pixel_info(self, found: Instance) -> PixelInfo | None:
        """Where the pixel data of a verified instance lives (parsed once per content)."""
        if found.md5 in self._pixels:
            self._pixels.move_to_end(found.md5)
            return self._pixels[found.md5]
        if found.stored:
            pixel = await asyncio.to_thread(_pixel_of_file, self.store.sync, found)
        else:
            data = found.content()
            pixel = await asyncio.to_thread(lambda: parse_dicom(data).pixel)
        self._pixels[found.md5] = pixel
        while len(self._pixels) > 4096:
            self._pixels.popitem(last=False)
        return pixel

    async def transcoded(self, found: Instance, accept: str) -> bytes:
        """One instance as Orthanc transcodes it for ``accept``, bounds-checked before use.

        Its UIDs name it in the URL, so they must follow the UI grammar (they come
        from the instance's data: never used as a path otherwise).
        """
        if not all(is_uid(u or "") for u in (found.study_uid, found.series_uid, found.sop_uid)):
            raise IntegrityError(Cause.PARSE_FAILURE, f"instance {found.orthanc_id} has UIDs "
                                 "that are not DICOM UIDs: it cannot be named in a URL")
        path = (f"/dicom-web/studies/{found.study_uid}/series/{found.series_uid}"
                f"/instances/{found.sop_uid}")

        async def once(_attempt: int) -> bytes:
            headers, data = await self.client.get(path, kind="transcode",
                                                  headers={"Accept": accept})
            part = single_part(data, headers.get(hdrs.CONTENT_TYPE, ""))

            def check() -> None:
                summary = parse_dicom(part)
                ours = (found.patient_id, found.study_uid, found.series_uid, found.sop_uid)
                theirs = (summary.patient_id, summary.study_instance_uid,
                          summary.series_instance_uid, summary.sop_instance_uid)
                if theirs != ours:  # both read by verify: the same reading of one identity
                    raise IntegrityError(Cause.IDENTITY_MISMATCH, f"{path}: Orthanc sent "
                                         f"instance {summary.orthanc_id}, not {found.orthanc_id}")
            await asyncio.to_thread(check)
            return part

        result: bytes = await self.client.retrying(once, what=f"transcode {found.sop_uid}")
        return result


def _pixel_of_file(store: Store, found: Instance) -> PixelInfo | None:
    """Parse a stored file through a memory map (a big multi-frame file is not read whole);
    checked first (:meth:`Store.open_checked`): ``FileNotFoundError`` when gone or bad."""
    fd, st = store.open_checked(found)
    with os.fdopen(fd, "rb") as f:
        if st.st_size == 0:
            return parse_dicom(b"").pixel
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return parse_dicom(m).pixel
        finally:
            with suppress(BufferError):  # a view still alive: the map goes with it
                m.close()


@dataclass(frozen=True, slots=True)
class Prepared:
    """A JSON answer checked and normalised (:meth:`DicomWeb._checked`): the body to
    cache, its digest, and the rendering for the viewer who asked, if one did."""

    body: bytes
    digest: str
    gzipped: bool = False
    rendered: bytes = b""
    #: The Orthanc IDs of the series' middle instance(s), to fetch ahead.
    middle: tuple[str, ...] = ()


def single_part(body: bytes, content_type: str) -> bytes:
    """The body of a one-part multipart answer; :class:`IntegrityError` if it is not whole."""
    try:
        parts = multipart.split(body, content_type)
    except multipart.MultipartError as exc:
        raise IntegrityError(Cause.SHORT_BODY, f"multipart answer: {exc}") from exc
    if len(parts) != 1:
        raise IntegrityError(Cause.PARSE_FAILURE, f"{len(parts)} parts where one was asked")
    return parts[0].body
