"""The Orthanc client: one pooled session, timeouts, retries with backoff and jitter.

Everything dicomcache asks Orthanc goes through :class:`OrthancClient`, so the
choices below hold everywhere:

* Credentials are dicomcache's own (HTTP basic from the config); a viewer's
  ``Authorization`` is never forwarded and Orthanc's auth challenges are never
  passed back.
* ``Accept-Encoding: identity`` and no automatic decompression: what Orthanc
  sends is what we verify and store, whatever the viewer's headers say (Orthanc
  would otherwise gzip DICOM on the fly, slowly and without ``Vary``).
* Retries (``retries`` after the first attempt) only for idempotent requests and
  only on connection errors, timeouts, 5xx, 429 and failed integrity checks;
  never on other 4xx.  Backoff is exponential with full jitter, and honours a
  ``Retry-After`` up to ``backoff_max``.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import logging
import random
import socket
import ssl
import time
from urllib.parse import urlsplit
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from contextlib import suppress
from typing import BinaryIO, TypeVar

import aiohttp
from multidict import CIMultiDict

from dicomcache.upstream.breaker import CircuitBreaker
from dicomcache.config import UpstreamSettings
from dicomcache.errors import IntegrityError, NotFoundUpstream, UpstreamError, UpstreamTimeout
from dicomcache.metrics import Metrics, link_down

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Request headers a viewer may pass through to Orthanc (everything else is dropped,
#: notably Authorization, Cookie, Accept-Encoding and hop-by-hop headers).
FORWARDED_REQUEST_HEADERS = ("Accept", "Accept-Language", "Content-Type",
                             "If-None-Match", "If-Modified-Since")


#: Failures that another attempt cannot fix.
FINAL_CAUSES = frozenset({"auth"})

#: Requests written at once by :meth:`BlockingConnection.get_all` (small enough
#: that neither side's socket buffers fill while the other is not reading).
PIPELINE_WINDOW = 64
#: Largest answer :meth:`BlockingConnection.get_all` accepts.
MAX_SMALL = 1 << 20


class OrthancClient:
    """Async client for one Orthanc; create inside a running loop, ``await close()`` after."""

    def __init__(self, settings: UpstreamSettings, metrics: Metrics) -> None:
        if settings.url is None:
            raise ValueError("upstream.url is not set")
        self.settings = settings
        self.metrics = metrics
        self.base = settings.url
        headers = {"Accept-Encoding": "identity", "User-Agent": "dicomcache"}
        if settings.username:
            headers["Authorization"] = aiohttp.encode_basic_auth(
                settings.username, settings.password or "")
        #: What every request carries (those of :class:`BlockingConnection` too).
        self.headers: Mapping[str, str] = dict(headers)
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=settings.connect_timeout,
                sock_read=settings.read_timeout),
            connector=aiohttp.TCPConnector(
                limit=settings.max_connections,
                # Orthanc closes idle keep-alive connections after ~1 s; recycle ours sooner
                # than that to avoid racing its close on a reused socket.
                keepalive_timeout=0.8),
            auto_decompress=False,
            headers=headers,
            raise_for_status=False,
        )
        self._rng = random.Random()
        # Opens after repeated link-level failures; ``retrying`` then fails fast.
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_probe_interval,
                                      self.probe, metrics, self.base)

    async def close(self) -> None:
        await self.breaker.close()
        await self.session.close()

    async def probe(self) -> bool:
        """One cheap ``GET /system``: True when Orthanc answers at all."""
        try:
            async with asyncio.timeout(min(self.settings.connect_timeout, 10.0) + 5.0):
                await self.get("/system", kind="probe")
        except NotFoundUpstream:
            return True
        except (UpstreamError, TimeoutError):
            return False
        return True

    # --- retries -------------------------------------------------------------------------
    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based): full jitter."""
        s = self.settings
        cap = min(s.backoff_max, s.backoff_base * (2 ** (attempt - 1)))
        delay = self._rng.uniform(cap / 2, cap)
        if retry_after is not None:
            delay = max(delay, min(retry_after, s.backoff_max))
        return delay

    async def retrying(self, op: Callable[[int], Awaitable[T]], *, what: str) -> T:
        """Run ``op(attempt)`` until it succeeds or the retries are spent.

        ``op`` raises :class:`UpstreamError` or :class:`IntegrityError` for a
        retryable failure, :class:`NotFoundUpstream` for a final one.  The error
        after the last attempt is re-raised as :class:`UpstreamError` carrying
        ``attempts``.
        """
        attempts = self.settings.retries + 1
        for attempt in range(1, attempts + 1):
            self.breaker.check(what)  # open circuit: fail fast, even between retries
            try:
                result = await op(attempt)
            except NotFoundUpstream:
                self.breaker.success()  # Orthanc answered: the link works
                raise
            except (UpstreamError, IntegrityError) as exc:
                cause = exc.cause
                self.metrics.upstream_failures.labels(cause).inc()
                if isinstance(exc, IntegrityError):
                    self.metrics.note_integrity_failure(cause, what, exc.reason)
                if attempt == attempts or cause in FINAL_CAUSES:
                    log.warning("%s failed after %d attempt(s): %s", what, attempt, exc)
                    if link_down(cause, getattr(exc, "status", None)):
                        self.metrics.note_upstream(False, self.base, str(exc))
                        if cause != "auth":  # refused credentials are not a dead link
                            self.breaker.failure(str(exc))
                    kind = UpstreamTimeout if cause == "timeout" else UpstreamError
                    raise kind(cause, exc.reason, attempts=attempt,
                               status=getattr(exc, "status", None)) from exc
                delay = self.backoff(attempt, getattr(exc, "retry_after", None))
                log.info("%s attempt %d failed (%s); retrying in %.2f s", what, attempt, exc, delay)
                self.metrics.upstream_retries.labels(cause).inc()
                await asyncio.sleep(delay)
            else:
                self.metrics.note_upstream(True, self.base)
                self.breaker.success()
                return result
        raise AssertionError("unreachable")

    # --- single requests -------------------------------------------------------------
    async def _request(self, method: str, path: str, *, kind: str, body: bytes | None = None,
                       headers: Mapping[str, str] | None = None,
                       params: Mapping[str, str] | None = None) -> tuple[int, CIMultiDict[str], bytes]:
        """One request, whole body read; network trouble becomes :class:`UpstreamError`."""
        started = time.monotonic()
        try:
            async with self.session.request(method, self.base + path, data=body,
                                            headers=headers, params=params) as resp:
                data = await resp.read()
                return resp.status, CIMultiDict(resp.headers), data
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamError("short_body", f"{method} {path}: body cut short ({exc})") from exc
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamError("timeout", f"{method} {path}: no answer in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError("connect", f"{method} {path}: cannot connect ({exc.os_error})") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamError("reset", f"{method} {path}: connection lost ({exc!r})") from exc
        finally:
            self.metrics.upstream_seconds.labels(kind).observe(time.monotonic() - started)

    async def get(self, path: str, *, kind: str, headers: Mapping[str, str] | None = None,
                  params: Mapping[str, str] | None = None,
                  method: str = "GET", body: bytes | None = None) -> tuple[CIMultiDict[str], bytes]:
        """One attempt at a request that must answer 2xx; classifies the status."""
        status, resp_headers, data = await self._request(
            method, path, kind=kind, headers=headers, params=params, body=body)
        check_status(status, resp_headers, f"{method} {path}", data)
        return resp_headers, data

    async def get_retrying(self, path: str, *, kind: str, method: str = "GET",
                           body: bytes | None = None) -> tuple[CIMultiDict[str], bytes]:
        return await self.retrying(
            lambda _attempt: self.get(path, kind=kind, method=method, body=body),
            what=f"{method} {path}")

    async def instance_md5(self, orthanc_id: str) -> str | None:
        """The MD5 Orthanc stored for the instance's DICOM attachment (``None``: it has none)."""
        try:
            _, data = await self.get(md5_path(orthanc_id), kind="md5")
        except NotFoundUpstream:
            return None
        return parse_md5(data, orthanc_id)

    async def lookup_instance(self, sop_uid: str) -> str | None:
        """Orthanc instance ID for a SOPInstanceUID (``POST /tools/lookup``), or ``None``."""
        import json
        _, data = await self.retrying(
            lambda _a: self.get("/tools/lookup", kind="lookup", method="POST",
                                body=sop_uid.encode()),
            what=f"lookup {sop_uid}")
        for item in json.loads(data):
            if item.get("Type") == "Instance":
                return str(item["ID"])
        return None

    def stream(self, method: str, path: str, *, headers: Mapping[str, str],
               params: Mapping[str, str] | None = None,
               body: bytes | None = None) -> aiohttp.client._RequestContextManager:
        """A streaming request for pass-through (caller reads and closes the response)."""
        return self.session.request(method, self.base + path, headers=headers, params=params,
                                    data=body)


def md5_path(orthanc_id: str) -> str:
    return f"/instances/{orthanc_id}/attachments/dicom/md5"


def parse_md5(data: bytes, orthanc_id: str) -> str:
    """Orthanc's answer to :func:`md5_path`, checked: 32 lower-case hex digits."""
    text = data.decode("ascii", "replace").strip().strip('"').lower()
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        # A damaged answer is not "no MD5": trusting the parse alone would let
        # corrupted pixels through.  Retried like any integrity failure.
        raise IntegrityError("md5_mismatch", f"Orthanc's MD5 answer for {orthanc_id} "
                             f"is malformed: {text[:40]!r}")
    return text


class BlockingConnection:
    """One keep-alive HTTP connection to Orthanc for a thread of its own (``http.client``).

    A whole-series stream and its two hundred MD5 lookups are read outside the
    event loop: on it, a hundred megabytes cost a copy and a callback per socket
    read, and the lookups a task each, and the loop is what every viewer waits
    for.  Same base URL, credentials, headers and timeouts as
    :class:`OrthancClient`; no retries (the caller falls back to the client's
    retried requests).  :meth:`abort` may be called from another thread: it
    wakes a blocked read, which then fails.
    """

    def __init__(self, client: OrthancClient) -> None:
        self.settings = client.settings
        self.headers = client.headers
        self.url = urlsplit(client.base)
        self._conn: http.client.HTTPConnection | None = None
        # Kept apart from the connection: http.client hands the socket over to a
        # response that ends with the connection ("Connection: close", as a
        # DICOMweb retrieve does), and then ``conn.sock`` is None.
        self._sock: socket.socket | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._aborted = False

    def _connect(self) -> http.client.HTTPConnection:
        if self._aborted:
            raise ConnectionAbortedError("stopped")
        url, timeout = self.url, self.settings.connect_timeout
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(url.hostname or "", url.port, timeout=timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self.settings.read_timeout)
        self._sock = conn.sock
        return conn

    def get(self, path: str, headers: Mapping[str, str] | None = None
            ) -> http.client.HTTPResponse:
        """``GET path``; the response must be read whole before the next request."""
        for attempt in (1, 2):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.request("GET", self.url.path.rstrip("/") + path,
                                   headers={**self.headers, **(headers or {})})
                if self._aborted:
                    raise ConnectionAbortedError("stopped")
                self._resp = self._conn.getresponse()
                if self._resp.will_close:  # the socket now belongs to the response
                    self._conn = None
                return self._resp
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if not reused or attempt == 2:  # a kept-alive socket Orthanc had closed: once more
                    raise
        raise AssertionError("unreachable")

    def get_all(self, paths: Sequence[str], window: int = PIPELINE_WINDOW
                ) -> Generator[tuple[str, int, bytes], None, None]:
        """``(path, status, body)`` of a ``GET`` of each path, in order, pipelined.

        For many small answers (Orthanc's MD5s): ``window`` requests are written
        at once (HTTP/1.1 pipelining), then their answers read, so a lookup costs
        neither a round trip nor a system call of its own (200 MD5s: 17 ms
        against 51 ms one by one, on a loaded machine 56 ms against 430).  Every
        answer must carry a ``Content-Length`` of at most :data:`MAX_SMALL`.  A
        server that ends the connection before answering all it was sent
        (keep-alive off, a proxy that does not pipeline) is asked the rest again
        on a new connection; one that answers nothing at all raises.  It uses
        connections of its own and closes them, and any kept by :meth:`get`.
        """
        todo = collections.deque(paths)
        while todo:
            conn = self._connect()
            fp = self._sock.makefile("rb") if self._sock is not None else None
            assert fp is not None
            answered = 0
            try:
                while todo:
                    batch = [todo[i] for i in range(min(window, len(todo)))]
                    conn.send(b"".join(self._request_head(p) for p in batch))
                    for path in batch:
                        status, body, close = _read_small(fp)
                        todo.popleft()
                        answered += 1
                        yield path, status, body
                        if close:
                            raise _ConnectionEnded("the server closed the connection")
            except (_ConnectionEnded, ConnectionError) as exc:
                if not answered:
                    raise ConnectionResetError(f"no answer to a pipelined request: {exc}") from exc
            finally:
                fp.close()
                conn.close()
                self.close()

    def _request_head(self, path: str) -> bytes:
        host = self.url.hostname or ""
        if self.url.port is not None:
            host = f"{host}:{self.url.port}"
        lines = [f"GET {self.url.path.rstrip('/')}{path} HTTP/1.1", f"Host: {host}",
                 *(f"{k}: {v}" for k, v in self.headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def abort(self) -> None:
        """End the connection from another thread: a blocked read fails at once."""
        self._aborted = True
        sock = self._sock
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the connection and the last response, read whole or not."""
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _ConnectionEnded(Exception):
    """The server said ``Connection: close``: the rest goes on a new connection."""


def _read_small(fp: BinaryIO) -> tuple[int, bytes, bool]:
    """One answer from a pipelined connection: status, body, and whether it ends there."""
    line = fp.readline(8192)
    if not line:
        raise ConnectionResetError("connection closed before the answer")
    words = line.split(None, 2)
    if len(words) < 2 or not words[0].startswith(b"HTTP/1.") or not words[1].isdigit():
        raise http.client.BadStatusLine(line.decode("latin-1", "replace"))
    # Only two headers matter; http.client.parse_headers (the email parser) would
    # cost this thread, and the GIL, ten times more per answer.
    declared, close = b"", words[0] == b"HTTP/1.0"
    for _ in range(100):
        header = fp.readline(8192)
        if header in (b"\r\n", b"\n"):
            break
        if not header.endswith(b"\n"):
            raise ConnectionResetError("connection closed inside an answer's headers")
        name, _, value = header.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            declared = value.strip()
        elif name == b"connection":
            close = close or b"close" in value.lower()
    else:
        raise http.client.HTTPException("a pipelined answer with too many headers")
    if not declared.isdigit() or int(declared) > MAX_SMALL:
        raise http.client.HTTPException(f"a pipelined answer without a usable Content-Length "
                                        f"({declared[:20]!r})")
    body = fp.read(int(declared))
    if len(body) != int(declared):
        raise ConnectionResetError("connection closed inside an answer")
    return int(words[1]), body, close


def check_status(status: int, headers: Mapping[str, str], what: str, body: bytes = b"") -> None:
    """Raise the right error for a non-2xx upstream status (retryable or not)."""
    if 200 <= status < 300:
        return
    snippet = body[:200].decode("utf-8", "replace").strip()
    if status == 429 or status >= 500:
        err = UpstreamError("http_429" if status == 429 else "http_5xx",
                            f"{what}: Orthanc answered {status} {snippet}".strip(), status=status)
        err.retry_after = _retry_after(headers.get("Retry-After"))  # type: ignore[attr-defined]
        raise err
    if status in (401, 403):
        # Our own credentials were refused: the viewer can do nothing about it.
        raise UpstreamError("auth", f"{what}: Orthanc refused dicomcache's credentials "
                            f"({status}); check upstream.username/password", status=status)
    raise NotFoundUpstream(status, f"{what}: Orthanc answered {status} {snippet}".strip())


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
