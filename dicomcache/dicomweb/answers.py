"""A revalidating in-memory cache for DICOMweb answers that can change.

Metadata, QIDO-RS and rendered answers are small next to instance bodies but
slow for Orthanc to produce (series metadata for 200 slices: ~3 s), and a study
can grow while it is read.  :class:`AnswerCache` keeps them in memory (LRU,
bounded in bytes) with a freshness lifetime per answer:

* *fresh*: served without asking Orthanc;
* *stale*: revalidated on the next request (one flight per key, however many
  ask); a loader may confirm the old answer cheaply (same validator) instead of
  downloading it again;
* *stale and Orthanc unreachable*: served for up to ``stale_if_error`` seconds
  after it went stale, and the route marks it with ``Warning: 110``.

Every answer derives from one study, or (searches) may list any: a change to a
study makes its answers and every search stale at once (:meth:`AnswerCache.expire`,
one-shot: the next revalidation makes them fresh for their usual time); a study
deleted or replaced in Orthanc has them dropped, in memory and on disk
(:meth:`AnswerCache.forget`), so no copy of it stands in, even while Orthanc is
unreachable.

Links are the other concern.  Orthanc writes absolute ``BulkDataURI`` and
``RetrieveURL`` (0008,1190) links from its ``DicomWeb.Host`` setting or the
request's ``Host``/``Forwarded`` header.  :func:`normalise_json` rewrites every
such link to a placeholder base once, when an answer is stored, and
:func:`with_base` substitutes the base the viewer used per request: a plain
byte replacement, cheap even for megabytes of series metadata.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dicomcache.dicom import multipart
from dicomcache.dicom.uids import is_uid, orthanc_instance_id
from dicomcache.errors import Cause, IntegrityError, NotFoundUpstream, UpstreamError
from dicomcache.singleflight import SingleFlight

log = logging.getLogger(__name__)

#: Stands for ``{scheme}://{host}/dicom-web`` in stored answers.  Not a valid URL
#: prefix, so it cannot occur in real metadata by accident.
PLACEHOLDER = "\u2063dicomcache-base\u2063"
_PLACEHOLDER_JSON = json.dumps(PLACEHOLDER).strip('"').encode()  # its escaped form in JSON
#: The attribute holding links in QIDO answers and metadata (Retrieve URL, UR).
RETRIEVE_URL = "00081190"
#: Bodies at least this long are gzipped for clients that accept it.
GZIP_MIN = 1024
#: zlib level of the viewer's gzip.  Level 1 (zlib's fast deflate) costs a fifth of
#: level 5 on series metadata (120 instances, 458 KB compact: 1.2 against 6.1 ms, here)
#: for the same size within 1% (13.5 against 13.4 KB): on the viewer's side of the cache
#: (a LAN) the time is worth more than the bytes.
GZIP_LEVEL = 1


def link_path(url: str) -> str | None:
    """The DICOMweb resource path of an Orthanc link (from ``/studies/``), or ``None``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    idx = parts.path.find("/studies/")
    if idx < 0:
        return None
    path = parts.path[idx:]
    return f"{path}?{parts.query}" if parts.query else path


def _rewrite(url: Any) -> Any:
    if not isinstance(url, str):
        return url
    path = link_path(url)
    return url if path is None else PLACEHOLDER + path


def rewrite_links(doc: Any) -> int:
    """Rewrite, in place, every link of a DICOM JSON document to the placeholder base.

    Walks datasets (dicts of tag → attribute), sequences (``Value`` lists of
    datasets) and top-level lists; returns how many links were rewritten.
    """
    count = 0
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for tag, attr in node.items():
            if not isinstance(attr, dict):
                continue
            if "BulkDataURI" in attr:
                new = _rewrite(attr["BulkDataURI"])
                count += new is not attr["BulkDataURI"]
                attr["BulkDataURI"] = new
            value = attr.get("Value")
            if not isinstance(value, list):
                continue
            if tag.upper() == RETRIEVE_URL:
                for i, item in enumerate(value):
                    new = _rewrite(item)
                    count += new is not item
                    value[i] = new
            elif attr.get("vr") == "SQ":
                stack.extend(value)
    return count


def normalise_json(body: bytes) -> bytes:
    """Orthanc's DICOM JSON with links on the placeholder base, compact.

    ``ValueError`` when it is not JSON."""
    return normalised(json.loads(body))


#: A ``BulkDataURI`` link as Orthanc writes it: the value's part from the path's first
#: ``/studies/`` on (with its query), as :func:`link_path` reads it.  No escapes, no
#: fragment: anything else is left to the parsed path (:func:`relinked_bulk_data`).
_BULK_LINK = re.compile(
    rb'("BulkDataURI"\s*:\s*")https?://[^"\\/?#]*(?:/[^"\\?#]*?)?(/studies/[^"\\#]*)"')
_PLACEHOLDER_BYTES = PLACEHOLDER.encode()


def relinked_bulk_data(text: bytes) -> bytes | None:
    """:func:`normalised` of a metadata answer without the parse and the walk, or ``None``.

    Series metadata (120 instances: ~700 KB) costs dicomcache ~20-70 ms of CPU walked
    and dumped again, time the viewer waits for.  Orthanc's metadata links are only
    ``BulkDataURI`` values, so they are rewritten in the text: exactly when every
    ``"BulkDataURI"`` of the text was one such link and no Retrieve URL is there (else
    ``None``: the caller walks the parsed document).  ``text`` must have been parsed as
    JSON already (so no raw tab or line break is inside a string: they are dropped,
    Orthanc's indentation).  Parsed back, the result equals :func:`normalised`'s.
    """
    if RETRIEVE_URL.encode() in text:
        return None
    out, count = _BULK_LINK.subn(rb"\1" + _PLACEHOLDER_BYTES.replace(b"\\", b"\\\\")
                                 + rb'\2"', text)
    if count != text.count(b'"BulkDataURI"'):
        return None
    return out.translate(None, b"\n\t\r")


def normalised(doc: Any) -> bytes:
    """A parsed DICOM JSON document, its links rewritten in place, as compact JSON."""
    rewrite_links(doc)
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


#: What names an instance in Orthanc: Patient ID, Study, Series and SOP Instance UIDs.
_IDENTITY = ("00100020", "0020000D", "0020000E", "00080018")


def _first_text(dataset: dict[str, Any], tag: str) -> str:
    attr = dataset.get(tag)
    value = attr.get("Value") if isinstance(attr, dict) else None
    first = value[0] if isinstance(value, list) and value else ""
    return first if isinstance(first, str) else ""


def named_instances(doc: Any) -> dict[tuple[str, str, str], list[str]]:
    """What a metadata answer says each instance it lists is in Orthanc (pure):
    ``(SOP, Study, Series UID)`` → Orthanc instance IDs (the hash of the Patient ID and
    the three UIDs; two when one SOP Instance UID is there under two patients).

    Data sets without the three UIDs, or with UIDs that do not follow the UI grammar,
    name nothing: UIDs from data are never used as names unchecked."""
    named: dict[tuple[str, str, str], list[str]] = {}
    for dataset in doc if isinstance(doc, list) else ():
        if not isinstance(dataset, dict):
            continue
        patient, study, series, sop = (_first_text(dataset, tag) for tag in _IDENTITY)
        if all(is_uid(u) for u in (study, series, sop)):
            oid = orthanc_instance_id(patient.strip(), study, series, sop)
            oids = named.setdefault((sop, study, series), [])
            if oid not in oids:
                oids.append(oid)
    return named


#: Instance Number (IS): the order a viewer stacks a series' slices in.
_INSTANCE_NUMBER = "00200013"


def _number(dataset: dict[str, Any], tag: str) -> float | None:
    """The first value of an IS/DS attribute (a JSON number, or a string as some
    servers write them); ``None`` when absent or not a finite number."""
    attr = dataset.get(tag)
    value = attr.get("Value") if isinstance(attr, dict) else None
    first = value[0] if isinstance(value, list) and value else None
    if isinstance(first, bool) or not isinstance(first, int | float | str):
        return None
    try:
        number = float(first)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def middle_instances(doc: Any) -> list[tuple[str, str, str]]:
    """The ``(SOP, Study, Series UID)`` of the instance in the middle of a series
    metadata answer, in Instance Number order (pure): where OHIF opens a series, as
    its first image or as its thumbnail, right after this answer (index ``n // 2``
    of ``n``).  One, not both middles of an even count: on a slow link a second
    download takes half of it from the viewer's.  None when any data set lacks a
    number or valid UIDs (no guess from incomplete data)."""
    numbered: list[tuple[float, str, str, str, str]] = []
    for dataset in doc if isinstance(doc, list) else ():
        if not isinstance(dataset, dict):
            return []
        _patient, study, series, sop = (_first_text(dataset, tag) for tag in _IDENTITY)
        number = _number(dataset, _INSTANCE_NUMBER)
        if number is None or not all(is_uid(u) for u in (study, series, sop)):
            return []
        numbered.append((number, sop, sop, study, series))
    numbered.sort()
    return [numbered[len(numbered) // 2][2:]] if numbered else []


def relink_parts(body: bytes, content_type: str, base: str) -> bytes:
    """A complete multipart answer with each part's ``Content-Location`` on ``base``.

    Everything else is kept byte for byte.  :class:`IntegrityError` when the body
    is not a complete multipart (a cut answer is never passed on).
    """
    try:
        parts = multipart.split(body, content_type)
    except multipart.MultipartError as exc:
        raise IntegrityError(Cause.SHORT_BODY, f"multipart answer: {exc}") from exc
    boundary = multipart.boundary_of(content_type)
    assert boundary is not None
    relinked = []
    for part in parts:
        fields = []
        for name, value in part.fields:
            path = link_path(value) if name.lower() == "content-location" else None
            fields.append((name, f"{base}{path}" if path is not None else value))
        relinked.append(multipart.Part(tuple(fields), part.body))
    return multipart.rewrite(boundary, relinked)


def with_base(body: bytes, base: str) -> bytes:
    """A stored answer with its links on ``base`` (``http://host:port/dicom-web``)."""
    if _PLACEHOLDER_JSON not in body and PLACEHOLDER.encode() not in body:
        return body
    b = base.encode()
    return body.replace(PLACEHOLDER.encode(), b).replace(_PLACEHOLDER_JSON, b)


def gzips(body: bytes, accepted: bool) -> bool:
    """Whether a JSON answer is sent gzipped: the viewer takes gzip and it is long enough."""
    return accepted and len(body) >= GZIP_MIN


def for_viewer(body: bytes, has_links: bool, base: str, gzipped: bool) -> bytes:
    """A stored body as a viewer gets it: links on ``base``, gzipped (:data:`GZIP_LEVEL`,
    no time stamp: the same answer is the same bytes, cold or warm)."""
    out = with_base(body, base) if has_links else body
    return gzip.compress(out, GZIP_LEVEL, mtime=0) if gzipped else out


@dataclass(slots=True)
class Cached:
    """One cached answer (or instance list, in ``value``)."""

    body: bytes
    content_type: str
    #: ``time.monotonic()`` when Orthanc last confirmed it.
    validated_at: float
    #: Seconds it stays fresh after ``validated_at`` (``math.inf``: never revalidated).
    fresh_for: float
    #: What a loader compares to decide the answer is unchanged (e.g. instance IDs).
    validator: Any = None
    #: Loader-specific payload (instance lists).
    value: Any = None
    #: The body holds placeholder links and needs :func:`with_base`.
    has_links: bool = False
    digest: str = ""
    #: ``clock()`` when a change in Orthanc made it stale before its time; cleared by the
    #: next revalidation (:meth:`revalidated`), so freshness then comes back.
    expired_at: float | None = None
    _variants: OrderedDict[tuple[str, bool], bytes] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = self.digest_of(self.body)

    @staticmethod
    def digest_of(body: bytes) -> str:
        """What names a body in its ETags (may be made beforehand, in a worker thread)."""
        return hashlib.md5(body, usedforsecurity=False).hexdigest()[:20]

    @property
    def variant_budget(self) -> int:
        """Bytes the variants :meth:`render` memoises may hold together: a quarter more
        than the body (one site's host with its gzip fits; a second host's copy replaces
        the first rather than adding to memory nobody counted)."""
        return len(self.body) + len(self.body) // 4

    @property
    def size(self) -> int:
        """Bytes charged to the cache: the body and :attr:`variant_budget` (the variants
        are made after it is stored, and never hold more)."""
        return len(self.body) + self.variant_budget + 256

    def stale_from(self) -> float:
        """When it went (or goes) stale: at the end of its lifetime, or when expired."""
        end = self.validated_at + self.fresh_for
        return end if self.expired_at is None else min(end, self.expired_at)

    def fresh(self, now: float) -> bool:
        return now < self.stale_from()

    def stale_for(self, now: float) -> float:
        """Seconds since it went stale (0 while fresh)."""
        return max(0.0, now - self.stale_from())

    def expire(self, now: float) -> None:
        """Stale from ``now`` (or from earlier, if it already was) until revalidated."""
        if self.expired_at is None or now < self.expired_at:
            self.expired_at = now

    def revalidated(self, now: float, validator: Any = None, value: Any = None) -> Cached:
        """The same answer, confirmed by Orthanc at ``now`` (fresh again, not expired)."""
        return replace(self, validated_at=now, expired_at=None,
                       validator=self.validator if validator is None else validator,
                       value=self.value if value is None else value,
                       _variants=self._variants)

    def etag(self, base: str, gzipped: bool) -> str:
        tag = hashlib.md5(f"{self.digest}|{base}".encode(), usedforsecurity=False).hexdigest()[:24]
        return f'"{tag}{"-gz" if gzipped else ""}"'

    async def render(self, base: str, gzipped: bool) -> bytes:
        """The body as this viewer gets it (links on ``base``, maybe gzipped), memoised."""
        key = (base if self.has_links else "", gzipped)
        out = self._variants.get(key)
        if out is not None:
            self._variants.move_to_end(key)
            return out
        if gzipped and len(self.body) > 1 << 20:  # zlib lets go of the GIL: worth a hop
            body = await asyncio.to_thread(for_viewer, self.body, self.has_links, base, True)
        else:
            body = for_viewer(self.body, self.has_links, base, gzipped)
        self.keep(base, gzipped, body)
        return body

    def keep(self, base: str, gzipped: bool, body: bytes) -> None:
        """Memoise ``body`` as :meth:`render`'s answer for ``base`` and ``gzipped``
        (made beforehand, e.g. with the download: :func:`for_viewer`)."""
        key = (base if self.has_links else "", gzipped)
        if (self.has_links or gzipped) and len(body) <= self.variant_budget:
            self._variants[key] = body
            held = sum(len(v) for v in self._variants.values())
            while held > self.variant_budget or len(self._variants) > 4:
                _, dropped = self._variants.popitem(last=False)  # least recently used
                held -= len(dropped)


Loader = Callable[[Cached | None], Awaitable[Cached]]


def plain(value: Any) -> Any:
    """``value`` as it comes back from JSON (tuples become lists): validators compare
    equal before and after a restart."""
    return json.loads(json.dumps(value))


#: The disk group of answers that may list any study (searches): a removal of any
#: study drops it.  Not a hash, so it cannot be a study's group.
SEARCHES = "_"


def affected(changed: str | None, study: str | None) -> bool:
    """Whether a change to study ``changed`` (``None``: every study) touches an answer
    derived from ``study`` (``None``: a search, which may list any study)."""
    return changed is None or study is None or study == changed


def _remove(path: Path) -> None:
    """Remove a file or a directory tree (not following links); gone already is fine."""
    with suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class DiskCopies:
    """Answers also kept on disk, so that after a restart with Orthanc unreachable the
    viewer still gets (stale, marked) metadata for the studies it has cached.

    One file per key: a JSON header line, then the body.  Laid out by study,
    ``<directory>/<hash of the study UID>/<hash of the key>`` (searches, which
    may list any study, under ``<directory>/_/``), so a study removed in Orthanc
    loses every copy with one directory removal, never a scan of every file;
    names are hashes, never data.  Written atomically (temp file, rename; no
    fsync: a lost copy is fetched again).  Bounded to ``max_bytes``, oldest files
    dropped first by :meth:`prune`.  Every method does disk I/O: call them in a
    worker thread.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.saves = 0
        #: The copies on disk, once :meth:`prune` has listed them (``None`` before): a
        #: key with none is a miss without a thread hop and a failed ``open`` first.
        #: Only this process writes copies; one removed behind its back is a failed
        #: :meth:`load`, as without the list.
        self.held: set[Path] | None = None

    def may_hold(self, key: str, study: str | None) -> bool:
        """Whether ``key`` may have a copy (no I/O: safe on the event loop)."""
        return self.held is None or self.path(key, study) in self.held

    def group(self, study: str | None) -> Path:
        """The directory of the copies derived from ``study`` (``None``: searches)."""
        if study is None:
            return self.directory / SEARCHES
        return self.directory / hashlib.sha256(study.encode()).hexdigest()[:32]

    def path(self, key: str, study: str | None) -> Path:
        return self.group(study) / hashlib.sha256(key.encode()).hexdigest()[:40]

    def save(self, key: str, study: str | None, entry: Cached, wall_now: float,
             mono_now: float) -> None:
        header = {"key": key, "study": study, "content_type": entry.content_type,
                  "validated": wall_now - (mono_now - entry.validated_at),
                  "fresh_for": None if entry.fresh_for == math.inf else entry.fresh_for,
                  "validator": entry.validator, "value": entry.value,
                  "has_links": entry.has_links}
        target = self.path(key, study)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            f.write(entry.body)
        os.replace(tmp, target)
        if self.held is not None:
            self.held.add(target)
        self.saves += 1
        if self.saves % 200 == 0:
            self.prune()

    def load(self, key: str, study: str | None, wall_now: float,
             mono_now: float) -> Cached | None:
        try:
            raw = self.path(key, study).read_bytes()
            head, _, body = raw.partition(b"\n")
            header = json.loads(head)
            if not isinstance(header, dict) or header.get("key") != key \
                    or header.get("study") != study:
                return None
            fresh = header["fresh_for"]
            return Cached(body, str(header["content_type"]),
                          mono_now - (wall_now - float(header["validated"])),
                          math.inf if fresh is None else float(fresh),
                          validator=header.get("validator"), value=header.get("value"),
                          has_links=bool(header.get("has_links")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable DICOMweb copy for %s: %s", key, exc)
            return None

    def discard(self, key: str, study: str | None) -> None:
        """Remove one copy (Orthanc said the resource is gone)."""
        path = self.path(key, study)
        path.unlink(missing_ok=True)
        if self.held is not None:
            self.held.discard(path)

    def forget(self, study: str | None) -> None:
        """Remove every copy derived from ``study`` and every search (``None``: every copy).

        Also for a purge while the daemon is not running: it needs only the directory.
        """
        if study is not None:
            for group in (self.group(study), self.group(None)):
                _remove(group)
                if self.held is not None:
                    self.held.difference_update([p for p in self.held if p.parent == group])
            return
        with suppress(FileNotFoundError):
            for child in list(self.directory.iterdir()):
                _remove(child)
        if self.held is not None:
            self.held.clear()

    def prune(self) -> int:
        """Drop the oldest copies beyond ``max_bytes``, temp leftovers, and files outside
        the layout (the flat one of earlier versions: never read, and possibly holding a
        study since removed); returns how many."""
        try:
            children = list(os.scandir(self.directory))
        except FileNotFoundError:
            self.held = set()
            return 0
        removed = 0
        files: list[tuple[os.stat_result, Path]] = []
        groups: list[Path] = []
        for child in children:
            if not child.is_dir(follow_symlinks=False):
                _remove(Path(child.path))
                removed += 1
                continue
            groups.append(Path(child.path))
            with os.scandir(child.path) as entries:
                for item in entries:
                    if item.is_file(follow_symlinks=False):
                        files.append((item.stat(follow_symlinks=False), Path(item.path)))
                    else:
                        _remove(Path(item.path))
                        removed += 1
        files.sort(key=lambda sp: sp[0].st_mtime, reverse=True)
        total = 0
        held = set()
        for st, path in files:
            total += st.st_size
            if total > self.max_bytes or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                removed += 1
            else:
                held.add(path)
        self.held = held
        for group in groups:
            with suppress(OSError):  # still holding copies: kept
                group.rmdir()
        return removed


@dataclass(eq=False, slots=True)
class _Load:
    """A load (from Orthanc or from disk) in progress, and what happened to its study
    meanwhile: an answer asked before a change is not kept as if asked after it."""

    study: str | None
    expired: bool = False
    removed: bool = False


class AnswerCache:
    """LRU of :class:`Cached` answers bounded in bytes, with single-flight revalidation.

    Each answer is filed under the study it derives from (``None``: a search, which
    may list any study) for :meth:`expire` and :meth:`forget`.
    """

    def __init__(self, max_bytes: int, stale_if_error: float,
                 clock: Callable[[], float] = time.monotonic,
                 disk: DiskCopies | None = None,
                 persist: Callable[[str], bool] = lambda key: True) -> None:
        self.max_bytes = max_bytes
        self.stale_if_error = stale_if_error
        self.clock = clock
        self.disk = disk
        self.persist = persist
        self._entries: OrderedDict[str, Cached] = OrderedDict()
        self._study: dict[str, str | None] = {}
        self._bytes = 0
        self._flights: SingleFlight[Cached] = SingleFlight()
        self._loads: set[_Load] = set()
        #: Removals so far: part of a flight's key, so a request after a removal never
        #: joins a load that started before it.
        self._removals = 0
        #: Disk writes and removals one at a time: a removal waits for a write in
        #: progress, and a write after it sees that its study was removed.
        self._disk_lock = asyncio.Lock()
        #: Disk copies cannot be written lately (a full or read-only cache disk): said
        #: once, not once per answer.
        self._disk_failing = False
        #: Disk copies being written after their answer went out (:meth:`flush`).
        self._saving: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def peek(self, key: str) -> Cached | None:
        return self._entries.get(key)

    def put(self, key: str, entry: Cached, study: str | None = None) -> None:
        self.drop(key)
        if entry.size > self.max_bytes // 4:
            return  # too big to be worth keeping: served once, not cached
        self._entries[key] = entry
        self._study[key] = study
        self._bytes += entry.size
        while self._bytes > self.max_bytes and self._entries:
            self.drop(next(iter(self._entries)))

    def drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
            del self._study[key]

    def expire(self, study: str | None) -> int:
        """Make every answer derived from ``study``, and every search, stale now
        (``None``: every answer); kept for stale-if-error, fresh again once revalidated.
        Returns how many."""
        now = self.clock()
        for load in self._loads:
            load.expired |= affected(study, load.study)
        count = 0
        for key, entry in self._entries.items():
            if affected(study, self._study[key]):
                entry.expire(now)
                count += 1
        return count

    async def forget(self, study: str | None) -> int:
        """Drop every answer derived from ``study``, and every search (``None``: every
        answer), in memory and on disk: never served again, not even stale.  Loads in
        progress still answer who asked, but are not kept.  Returns how many were in
        memory."""
        self._removals += 1
        for load in self._loads:
            load.removed |= affected(study, load.study)
        keys = [key for key in self._entries if affected(study, self._study[key])]
        for key in keys:
            self.drop(key)
        if self.disk is not None:
            async with self._disk_lock:
                try:
                    await asyncio.to_thread(self.disk.forget, study)
                except OSError as exc:
                    log.error("cannot remove the DICOMweb disk copies of %s: %s",
                              study or "every study", exc)
        return len(keys)

    @contextmanager
    def _watch(self, study: str | None) -> Iterator[_Load]:
        load = _Load(study)
        self._loads.add(load)
        try:
            yield load
        finally:
            self._loads.discard(load)

    async def flush(self) -> None:
        """Wait for the disk copies still being written (shutdown, tests)."""
        while self._saving:
            await asyncio.gather(*self._saving, return_exceptions=True)

    async def get(self, key: str, load: Loader, *,
                  study: str | None = None) -> tuple[Cached, bool]:
        """The answer for ``key`` (derived from ``study``; ``None``: a search) and whether
        it is a stale copy served because Orthanc failed.

        ``load(old)`` fetches (or confirms) the answer; it raises
        :class:`UpstreamError` when Orthanc is unreachable and
        :class:`NotFoundUpstream` when the resource is gone (the copy is dropped,
        on disk too).
        """
        entry = self._entries.get(key)
        if entry is not None and entry.fresh(self.clock()):  # the hit path
            self._entries.move_to_end(key)
            return entry, False
        with self._watch(study) as watch:
            if entry is None and self.disk is not None and self.persist(key) \
                    and self.disk.may_hold(key, study):
                entry = await self._from_disk(key, study, watch)
                if entry is not None and entry.fresh(self.clock()):
                    return entry, False
            try:
                new = await self._single_flight(key, study, lambda: load(entry))
            except NotFoundUpstream:
                self.drop(key)
                await self._discard(key, study)
                raise
            except UpstreamError:
                if (entry is not None and not watch.removed and self.stale_if_error > 0
                        and entry.stale_for(self.clock()) <= self.stale_if_error):
                    return entry, True
                raise
            return new, False

    async def refresh(self, key: str, load: Loader, *, study: str | None = None) -> None:
        """Load the answer in hand for ``key`` again now (``load(old)``), while that copy
        stays served: nobody waits for it.  Gone in Orthanc: dropped, as by :meth:`get`;
        Orthanc unreachable: the copy is kept, for :meth:`get` to revalidate in time."""
        old = self._entries.get(key)
        if old is None:
            return
        try:
            await self._single_flight(key, study, lambda: load(old))
        except NotFoundUpstream:
            self.drop(key)
            await self._discard(key, study)
        except UpstreamError as exc:
            log.info("%s not confirmed ahead of time: %s", key, exc)

    async def _from_disk(self, key: str, study: str | None, watch: _Load) -> Cached | None:
        assert self.disk is not None
        entry = await asyncio.to_thread(self.disk.load, key, study, time.time(), self.clock())
        if entry is None or watch.removed:
            return None
        if watch.expired:
            entry.expire(self.clock())
        if key not in self._entries:
            self.put(key, entry, study)
        return entry

    async def _discard(self, key: str, study: str | None) -> None:
        if self.disk is None or not self.persist(key):
            return
        async with self._disk_lock:
            try:
                await asyncio.to_thread(self.disk.discard, key, study)
            except OSError as exc:
                log.warning("cannot remove the disk copy of %s: %s", key, exc)

    async def _single_flight(self, key: str, study: str | None,
                             start: Callable[[], Awaitable[Cached]]) -> Cached:
        async def run() -> Cached:
            old = self._entries.get(key)
            watch = _Load(study)
            self._loads.add(watch)
            try:
                new = await start()
            except BaseException:
                self._loads.discard(watch)
                raise
            if watch.removed:  # asked before its study was removed: answered, not kept
                self._loads.discard(watch)
                return new
            if watch.expired:
                new.expire(self.clock())
            self.put(key, new, study)
            if (self.disk is not None and self.persist(key)
                    and (old is None or old.digest != new.digest
                         or old.validator != new.validator)):
                # Written after the answer goes out (a thread hop and a file write the
                # viewer need not wait for); the load stays watched until then, so a
                # removal meanwhile still keeps the copy off the disk (:meth:`_save`).
                task = asyncio.get_running_loop().create_task(
                    self._save(key, study, new, watch), name=f"save {key[:80]}")
                self._saving.add(task)
                task.add_done_callback(self._saving.discard)
            else:
                self._loads.discard(watch)
            return new
        return await self._flights.run((key, self._removals), run)

    async def _save(self, key: str, study: str | None, entry: Cached, watch: _Load) -> None:
        try:
            await self._write(key, study, entry, watch)
        finally:
            self._loads.discard(watch)

    async def _write(self, key: str, study: str | None, entry: Cached, watch: _Load) -> None:
        assert self.disk is not None
        async with self._disk_lock:
            if watch.removed:  # removed while this waited: the copy must not be written
                return
            try:
                await asyncio.to_thread(self.disk.save, key, study, entry, time.time(),
                                        self.clock())
            except OSError as exc:
                log.log(logging.DEBUG if self._disk_failing else logging.WARNING,
                        "cannot keep a disk copy of %s (kept in memory only, until disk "
                        "copies can be written again): %s", key, exc)
                self._disk_failing = True
            else:
                if self._disk_failing:
                    log.info("DICOMweb answers are kept on disk again")
                self._disk_failing = False
