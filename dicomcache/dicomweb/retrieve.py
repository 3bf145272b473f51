"""WADO-RS retrieves of a series or study: where each part comes from, in order.

No HTTP here: :mod:`dicomcache.http.wado_rs` writes what this plans.  Each part
is a verified :class:`~dicomcache.cache.instance.Instance` — stored (its file is
opened and sent by ``sendfile``), in memory (being committed), fed by one
upstream :class:`~dicomcache.dicomweb.series_stream.SeriesStream`, or downloaded
on its own — or, when the viewer asks for another transfer syntax than the
stored one, the instance as Orthanc transcodes it (bounds-checked first).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
from contextlib import suppress
from dataclasses import dataclass
from typing import BinaryIO

from dicomcache.cache.instance import Instance
from dicomcache.cache.store import AsyncStore, Store
from dicomcache.dicom import multipart
from dicomcache.dicom.accept import DICOM
from dicomcache.dicomweb.answers import Cached
from dicomcache.dicomweb.series_stream import SeriesStream
from dicomcache.dicomweb.state import DicomWeb

#: Missing instances from which a cold retrieve asks Orthanc for the whole series at once.
STREAM_MIN_MISSING = 2
#: Stored files opened per thread hop (a hop per file costs its wake-ups on both sides).
OPEN_BATCH = 16


@dataclass(slots=True)
class Part:
    """One part ready to send: its bytes, or an open stored file of ``size`` bytes."""

    size: int
    data: bytes | None = None
    file: BinaryIO | None = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def serves(stored: str, wanted: str | None) -> bool:
    """Whether the stored bytes are what the viewer asked for (``*`` or that syntax)."""
    return wanted in ("*", stored)


async def open_part(store: Store, found: Instance) -> Part:
    """The instance bytes when in memory, or for a stored one its open (checked) file."""
    if found.path is not None:
        fd, _st = await asyncio.to_thread(store.open_checked, found)
        return Part(found.size, file=os.fdopen(fd, "rb"))
    return Part(found.size, data=await found.read())


async def refetched_part(dw: DicomWeb, found: Instance) -> Part:
    """The part of an instance whose stored file vanished, or was found bad and
    quarantined, since it was looked up: its entry dropped, the instance fetched again."""
    if found.stored:
        await asyncio.to_thread(dw.store.sync.forget, found.orthanc_id)
    return await open_part(dw.store.sync, await dw.fetcher.by_orthanc_id(found.orthanc_id))


Opened = Part | OSError


async def _open_files(store: Store, entries: list[Instance]) -> list[Opened]:
    """Stored files opened (and checked) in one thread hop; an entry whose file fails gets
    its error."""
    def work() -> list[Opened]:
        out: list[Opened] = []
        for e in entries:
            try:
                fd, _st = store.open_checked(e)
                out.append(Part(e.size, file=os.fdopen(fd, "rb")))
            except OSError as exc:
                out.append(exc)
        return out
    return await asyncio.to_thread(work)


async def claim(batch: asyncio.Future[list[Opened]], k: int) -> Opened:
    """File ``k`` of a batch (or its error); cancelled while the batch still opens
    (the retrieve given up), the file is closed once it is open."""
    try:
        return (await asyncio.shield(batch))[k]
    except asyncio.CancelledError:
        batch.add_done_callback(functools.partial(_close_opened, k))
        raise


def _close_opened(k: int, batch: asyncio.Future[list[Opened]]) -> None:
    if not batch.cancelled() and batch.exception() is None:
        got = batch.result()[k]
        if isinstance(got, Part):
            got.close()


@dataclass
class Plan:
    """What a series/study retrieve sends: where each part comes from, and its length."""

    #: Each instance as known before the first byte: stored, in memory, or None (missing).
    known: list[Instance | None]
    #: Each part's size and the whole body's length, when they can be announced.
    sizes: list[int] | None = None
    length: int | None = None
    #: One upstream retrieve of the series feeding the missing instances.
    stream: SeriesStream | None = None
    #: Stored instances of the listing were found deleted or replaced in Orthanc: the
    #: listing is older than that change (see :func:`dicomcache.http.wado_rs.retrieve`).
    outdated: bool = False

    @property
    def hit(self) -> bool:
        """Every part from the store (or memory), sent as stored: its length is known
        without asking Orthanc (a stream's sizes come from Orthanc)."""
        return self.stream is None and self.length is not None


async def known_instances(store: AsyncStore, oids: list[str]) -> list[Instance | None]:
    """Each instance from the hot map, from memory (being committed), else the index."""
    known: list[Instance | None] = [store.sync.peek(oid) for oid in oids]
    for i, oid in enumerate(oids):  # a retrieve just sent them: still in memory
        if known[i] is None:
            known[i] = store.pending_body(oid)
    unknown = [i for i, e in enumerate(known) if e is None]
    if unknown:  # not in the hot map (e.g. after a restart): one thread hop, not one each
        def look_up() -> list[Instance | None]:
            return [store.sync.get(oids[i]) for i in unknown]
        for i, e in zip(unknown, await asyncio.to_thread(look_up), strict=True):
            known[i] = e
    return known


async def plan(dw: DicomWeb, listing: Cached, boundary: str, wanted: str, study: str,
               series: str | None) -> Plan:
    """Where each part of a retrieve comes from, and the answer's length when known."""
    oids: list[str] = listing.value[1]
    # Stored ones only while Orthanc still holds them as they are (one check per series).
    known = await known_instances(dw.store, oids)
    found = Plan(await dw.fetcher.confirmed(known))
    newer = dw.fetcher.coherence.listed_since(listing.value[0], listing.validated_at) \
        if series is not None and dw.fetcher.coherence is not None else None
    found.outdated = any(k is not None and c is None
                         for k, c in zip(known, found.known, strict=True)) \
        or (newer is not None and newer != set(oids))
    if all(e is not None and serves(e.transfer_syntax, wanted) for e in found.known):
        found.sizes = [e.size for e in found.known if e]  # all stored, sent as stored
        found.length = multipart.body_length(boundary, DICOM, found.sizes)
    # Several instances missing and the stored bytes wanted: one upstream retrieve of
    # the whole series feeds them (verified part by part; single downloads for the rest).
    missing = [oid for oid, e in zip(oids, found.known, strict=True) if e is None]
    if wanted == "*" and len(missing) >= STREAM_MIN_MISSING and 2 * len(missing) >= len(oids):
        found.stream = dw.series_stream(study, series, missing)
        # Orthanc's sizes, asked while the stream starts, announce the length.
        stored = await dw.file_sizes(listing.value[0], "Series" if series else "Study")
        if stored is not None and all(oid in stored for oid in missing):
            found.sizes = [e.size if e else stored[oid]
                           for oid, e in zip(oids, found.known, strict=True)]
            found.length = multipart.body_length(boundary, DICOM, found.sizes)
    return found


class Parts:
    """The parts of one retrieve in order, up to ``window`` of them read or fetched ahead.

    Runs of stored parts are opened :data:`OPEN_BATCH` files per thread hop.
    """

    def __init__(self, dw: DicomWeb, oids: list[str], plan: Plan, accept: str | None,
                 wanted: str, study: str, series: str | None) -> None:
        self.dw, self.oids, self.plan = dw, oids, plan
        self.accept, self.wanted, self.study, self.series = accept, wanted, study, series
        self.window = dw.settings.retrieve_concurrency
        self.pending: collections.deque[asyncio.Future[Part]] = collections.deque()
        self.ahead = 0
        #: What the listing taught of UIDs never resolved before (:meth:`remember`).
        self.learned: list[tuple[str, str | None, str | None, list[str]]] = []
        self._launch()

    async def next(self) -> Part | None:
        """The next part (its file open, or its bytes); ``None`` after the last."""
        if not self.pending:
            return None
        part = await self.pending.popleft()
        self._launch()
        return part

    async def abandon(self) -> None:
        """Cancel what is ahead and close the files opened for parts never sent."""
        for task in self.pending:
            task.cancel()
        with suppress(BaseException):
            await asyncio.gather(*self.pending, return_exceptions=True)
        for task in self.pending:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()

    def _learn(self, found: Instance) -> None:
        """Note which instance this part's UIDs name: the listing came from a study or
        series Orthanc resolved uniquely, so within it the UIDs name only this one."""
        sop, series = found.sop_uid, found.series_uid
        if self.dw.store.sync.peek_resolution(sop, self.study, series) is None:
            self.learned.append((sop, self.study, series, [found.orthanc_id]))

    async def remember(self) -> None:
        """Keep what :meth:`_learn` noted, so that frames and single instances of this
        series are found without asking Orthanc again (one transaction)."""
        learned, self.learned = self.learned, []
        await self.dw.store.resolve_many(learned)

    def _stored_run(self, i: int) -> list[Instance]:
        """Stored instances sent as stored, from part ``i`` on (one open batch)."""
        run: list[Instance] = []
        while i < len(self.oids) and len(run) < OPEN_BATCH:
            e = self.plan.known[i]
            if e is None or not e.stored or not serves(e.transfer_syntax, self.wanted):
                break
            run.append(e)
            i += 1
        return run

    def _launch(self) -> None:
        while len(self.pending) < self.window and self.ahead < len(self.oids):
            run = self._stored_run(self.ahead)
            if len(run) < 2:
                self.pending.append(asyncio.ensure_future(self._part(self.ahead)))
                self.ahead += 1
                continue
            batch = asyncio.ensure_future(_open_files(self.dw.store.sync, run))
            self.pending.extend(asyncio.ensure_future(self._part(self.ahead + k, batch, k))
                                for k in range(len(run)))
            self.ahead += len(run)

    async def _part(self, i: int, batch: asyncio.Future[list[Opened]] | None = None,
                    k: int = 0) -> Part:
        """Part ``i``; ``batch`` holds its stored file (index ``k``) when opened in a batch."""
        oid, known, stream = self.oids[i], self.plan.known[i], self.plan.stream
        opened = await claim(batch, k) if batch is not None else None
        streamed = stream.take(oid) if stream is not None else None
        fetcher = self.dw.fetcher
        found: Instance | None = None
        try:
            if known is not None:
                found = known
            elif streamed is not None:
                found = await asyncio.shield(streamed)
            else:
                found = await fetcher.by_orthanc_id(oid)
            found.check_in(self.study, self.series)
            self._learn(found)
            if not serves(found.transfer_syntax, self.wanted):
                data = await self.dw.transcoded(
                    found, self.accept or f'multipart/related; type="{DICOM}"')
                return Part(len(data), data=data)
            if isinstance(opened, OSError):
                raise opened
            return opened or await open_part(self.dw.store.sync, found)
        except FileNotFoundError:  # evicted, deleted or quarantined since the lookup
            if found is None:
                raise
            return await refetched_part(self.dw, found)
        except BaseException:
            if isinstance(opened, Part):
                opened.close()
            raise
