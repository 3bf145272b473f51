"""DICOMweb answers from the answer cache: metadata, QIDO-RS, rendered images.

* Metadata (study, series and instance) is fresh for ``dicomweb.metadata_fresh``
  seconds, then revalidated against the instance list of its series or study (an
  instance can be deleted or replaced in Orthanc); QIDO-RS for
  ``dicomweb.qido_fresh``; rendered/thumbnails for ``dicomweb.rendered_fresh``
  (an instance's, then revalidated like its metadata).  Stale copies are served
  with ``Warning: 110`` while Orthanc is unreachable
  (:class:`~dicomcache.dicomweb.answers.AnswerCache`).
* Browsers are told ``private, no-cache``: keep it, revalidate every use (the
  ``ETag``; a 304 costs no Orthanc request while the answer is fresh here).
* Every link points at dicomcache, on the host name the viewer used.
* JSON answers are gzipped for clients that accept it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from aiohttp import hdrs, web

from dicomcache.dicom.accept import accepts_gzip, accepts_json
from dicomcache.dicomweb.answers import Cached, gzips
from dicomcache.http import audit, auth
from dicomcache.http.keys import DICOMWEB, OUTCOME, PREFETCHER, SETTINGS
from dicomcache.http.params import dicom_uid, dicomweb_uids, family_of
from dicomcache.http.passthrough import check_path, passthrough
from dicomcache.http.respond import REVALIDATE, BadRequest

#: ``Warning`` on a stale copy served because Orthanc could not be asked (RFC 7234 §5.5.1).
STALE_WARNING = '110 dicomcache "Response is Stale"'
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")
_BAD_QUERY = re.compile(r"%0[0ad]|[\x00-\x1f]", re.IGNORECASE)


def public_base(request: web.Request) -> str:
    """``{scheme}://{host}/dicom-web`` as the viewer reached dicomcache.

    ``dicomweb.public_url`` wins; otherwise, like Orthanc, the first element of a
    ``Forwarded`` header, else ``Host``.  A host that is not a host name
    (injection into JSON, header splitting) is a 400.
    """
    configured = request.app[SETTINGS].dicomweb.public_url
    if configured:
        return configured + "/dicom-web"
    host = request.headers.get(hdrs.HOST) or request.host
    proto = request.scheme
    forwarded = request.headers.get(hdrs.FORWARDED)
    if forwarded:
        for pair in forwarded.split(",")[0].split(";"):
            key, _, value = pair.strip().partition("=")
            value = value.strip().strip('"')
            if key.strip().lower() == "host" and value:
                host = value
            elif key.strip().lower() == "proto" and value.lower() in ("http", "https"):
                proto = value.lower()
    if not _HOST_RE.match(host):
        raise BadRequest(f"Host {host[:80]!r} is not a host name (with an optional port)")
    return f"{proto}://{host}/dicom-web"


# --- answers from the answer cache -----------------------------------------------------------

def _viewer(request: web.Request) -> tuple[str, bool]:
    """The viewer's base URL (:func:`public_base`) and whether it takes gzip."""
    return public_base(request), accepts_gzip(request.headers.get(hdrs.ACCEPT_ENCODING))


async def _answer(request: web.Request, entry: Cached, stale: bool, *,
                  json_body: bool) -> web.Response:
    base = public_base(request) if entry.has_links else ""
    gz = json_body and gzips(entry.body, accepts_gzip(request.headers.get(hdrs.ACCEPT_ENCODING)))
    etag = entry.etag(base, gz)
    headers = {hdrs.CACHE_CONTROL: REVALIDATE, hdrs.ETAG: etag,
               hdrs.CONTENT_TYPE: entry.content_type}
    if json_body:
        headers[hdrs.VARY] = "Accept-Encoding"
    if stale:
        headers[hdrs.WARNING] = STALE_WARNING
        headers[hdrs.AGE] = str(int(time.monotonic() - entry.validated_at))
        request[OUTCOME] = "stale"
    if etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers=headers)
    body = await entry.render(base, gz)
    if gz:
        headers[hdrs.CONTENT_ENCODING] = "gzip"
    resp = web.Response(body=body, headers=headers)
    return resp


def _first_images(request: web.Request,
                  study: str) -> Callable[[tuple[str, ...]], None] | None:
    """What to do with the middle instance a cold series metadata names: have the
    prefetcher download it now (it is this viewer's next request), when this request
    may start a prefetch of ``study`` (:func:`~dicomcache.http.auth.may_prefetch`)."""
    prefetcher = request.app.get(PREFETCHER)
    if prefetcher is None or not prefetcher.enabled:
        return None

    def ahead(oids: tuple[str, ...]) -> None:
        if auth.may_prefetch(request, study):
            prefetcher.first_images(oids, audit.actor_of(request))
    return ahead


async def metadata(request: web.Request) -> web.StreamResponse:
    """Study, series or instance metadata (DICOM JSON) with links on dicomcache."""
    study, series, sop = dicomweb_uids(request)
    if not accepts_json(request.headers.get(hdrs.ACCEPT)):
        return await passthrough(request)
    _check_raw(request)
    family_of(request, "dicomweb", answer=True)
    dw = request.app[DICOMWEB]
    path = request.raw_path  # a query (includefield…) is part of what is asked
    hit_before = dw.cache.peek(f"json:{path}")
    entry, stale = await dw.json_answer(f"json:{path}", path, dw.settings.metadata_fresh,
                                        study=study, listing=(study, series),
                                        viewer=_viewer(request),
                                        ahead=_first_images(request, study)
                                        if series is not None and sop is None else None)
    request[OUTCOME] = "hit" if hit_before is entry else "miss"
    return await _answer(request, entry, stale, json_body=True)


async def qido(request: web.Request) -> web.StreamResponse:
    """QIDO-RS searches: read through once, then cached briefly; links on dicomcache."""
    mi = request.match_info
    for name, what in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID")):
        if name in mi:
            dicom_uid(mi[name], what)
    if not accepts_json(request.headers.get(hdrs.ACCEPT)):
        return await passthrough(request)
    _check_raw(request)
    family_of(request, "dicomweb", answer=True)
    dw = request.app[DICOMWEB]
    key = f"qido:{request.raw_path}"
    before = dw.cache.peek(key)
    # Filed under no study: a search may list any, so any study's removal drops it.
    entry, stale = await dw.json_answer(key, request.raw_path, dw.settings.qido_fresh,
                                        study=None, viewer=_viewer(request))
    request[OUTCOME] = "hit" if before is entry else "miss"
    return await _answer(request, entry, stale, json_body=True)


async def rendered(request: web.Request) -> web.StreamResponse:
    """Rendered images and thumbnails: cached as Orthanc renders them; an instance's
    (or its frames') confirmed against its series' instance list once stale."""
    study, series, sop = dicomweb_uids(request)
    _check_raw(request)
    family_of(request, "dicomweb", answer=True)
    dw = request.app[DICOMWEB]
    accept = request.headers.get(hdrs.ACCEPT)
    key = f"raw:{request.raw_path}|{accept or ''}"
    before = dw.cache.peek(key)
    entry, stale = await dw.raw_answer(key, request.raw_path, accept, dw.settings.rendered_fresh,
                                       study=study,
                                       listing=(study, series) if sop is not None else None)
    request[OUTCOME] = "hit" if before is entry else "miss"
    return await _answer(request, entry, stale, json_body=False)


def _check_raw(request: web.Request) -> None:
    """The read-through path checks, and no NUL or line breaks hidden in the query."""
    check_path(request.raw_path)
    query = request.raw_path.partition("?")[2]
    if _BAD_QUERY.search(query):
        raise BadRequest("NUL, CR and LF are not allowed in queries")
