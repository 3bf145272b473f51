"""What every API family shares: identifier checks, app keys, serving an instance."""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

from aiohttp import hdrs, web

from ..config import Settings
from ..fetch import Fetched, Fetcher
from ..metrics import Metrics
from ..store import AsyncStore, Entry
from ..upstream import OrthancClient

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", AsyncStore)
CLIENT = web.AppKey("client", OrthancClient)
FETCHER = web.AppKey("fetcher", Fetcher)
#: API family (orthanc, wado_uri, dicomweb, passthrough) and outcome (hit, miss, …) of a request.
FAMILY = web.RequestKey("family", str)
OUTCOME = web.RequestKey("outcome", str)

#: Instance bodies never change: let browsers keep them.
IMMUTABLE = "private, max-age=31536000, immutable"
DICOM = "application/dicom"

_ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(?:-[0-9a-f]{8}){4}$")
_UID = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")


class BadRequest(web.HTTPBadRequest):
    """A malformed identifier or path; the JSON body names the problem."""

    def __init__(self, reason: str) -> None:
        super().__init__(text=json_text("bad request", reason), content_type="application/json")


def json_text(error: str, reason: str, **extra: Any) -> str:
    import json
    return json.dumps({"error": error, "reason": reason, **extra})


def json_error(status: int, error: str, reason: str, **extra: Any) -> web.Response:
    return web.Response(status=status, text=json_text(error, reason, **extra),
                        content_type="application/json")


def orthanc_id(value: str, what: str = "instance ID") -> str:
    """Validate an Orthanc resource ID (SHA-1 based: 5 groups of 8 hex digits)."""
    if not _ORTHANC_ID.match(value):
        raise BadRequest(f"{value[:80]!r} is not an Orthanc {what} (like 079d74f5-e5b0bb07-…)")
    return value


def dicom_uid(value: str | None, what: str) -> str:
    """Validate a DICOM UID: digits and dots, at most 64 characters, no empty component."""
    if not value:
        raise BadRequest(f"{what} is missing")
    if len(value) > 64:
        raise BadRequest(f"{what} is longer than 64 characters")
    if not _UID.match(value):
        raise BadRequest(f"{what} {value[:80]!r} is not a DICOM UID (digits and dots)")
    return value


def family_of(request: web.Request, family: str, outcome: str | None = None) -> None:
    """Label the request for the latency histogram (read by the app's middleware)."""
    request[FAMILY] = family
    if outcome is not None:
        request[OUTCOME] = outcome


def _matches(request: web.Request, etag: str) -> bool:
    header = request.headers.get(hdrs.IF_NONE_MATCH)
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


def _instance_headers(etag: str, filename: str | None) -> dict[str, str]:
    headers = {hdrs.CACHE_CONTROL: IMMUTABLE, hdrs.ETAG: etag}
    if filename:
        headers[hdrs.CONTENT_DISPOSITION] = f'filename="{filename}"'
    return headers


class InstanceFileResponse(web.FileResponse):
    """aiohttp's FileResponse (sendfile, Range, HEAD), validated by the instance MD5.

    FileResponse derives its ETag from mtime and size; instance bodies are
    identified by content, so the MD5 tag set by us is kept instead.
    """

    def __init__(self, entry: Entry, headers: dict[str, str], store: AsyncStore) -> None:
        super().__init__(entry.path, headers=headers)
        self._md5_etag = entry.etag
        self._entry = entry
        self._store = store
        self.content_type = DICOM

    def _make_response(self, request: Any, accept_encoding: str) -> Any:
        # Runs in aiohttp's executor.  A file that vanished (deleted by hand)
        # is dropped from the store so the next request fetches it again.
        try:
            return super()._make_response(request, accept_encoding)
        except FileNotFoundError:
            self._store.sync.forget(self._entry.sop_uid)
            raise

    @property  # type: ignore[override]
    def etag(self) -> Any:
        return super().etag

    @etag.setter
    def etag(self, value: Any) -> None:
        # Ignore aiohttp's mtime-based validator; the content's MD5 is the identity.
        self._headers[hdrs.ETAG] = self._md5_etag


async def serve_instance(request: web.Request, found: Entry | Fetched, *,
                         filename: str | None = None) -> web.StreamResponse:
    """Answer with one instance body: from the store by sendfile, else from memory.

    Conditional requests are judged against the MD5 ETag here; ``Range`` and
    ``HEAD`` are aiohttp's FileResponse's own.
    """
    entry = found if isinstance(found, Entry) else found.entry
    etag = entry.etag if entry is not None else f'"{found.md5}"'  # type: ignore[union-attr]
    headers = _instance_headers(etag, filename)
    if _matches(request, etag):
        return web.Response(status=304, headers=headers)
    if_match = request.headers.get(hdrs.IF_MATCH)
    if if_match is not None:
        tags = {t.strip() for t in if_match.split(",")}
        if "*" not in tags and etag not in tags:
            return web.Response(status=412, headers=headers)
    size = entry.size if entry is not None else len(found.data or b"")  # type: ignore[union-attr]
    request.app[METRICS].served_bytes.inc(size)
    if entry is not None and if_match is None:
        return InstanceFileResponse(entry, headers, request.app[STORE])
    # If-Match passed (FileResponse would test it against its own mtime tag),
    # or the body is only in memory: a plain response.
    return web.Response(body=await read_instance(found), content_type=DICOM, headers=headers)


def boundary() -> str:
    return secrets.token_hex(16)


async def read_instance(found: Entry | Fetched) -> bytes:
    """The instance bytes (for framing in a multipart body)."""
    entry = found if isinstance(found, Entry) else found.entry
    if entry is not None:
        return await asyncio.to_thread(entry.path.read_bytes)
    assert isinstance(found, Fetched) and found.data is not None
    return found.data
