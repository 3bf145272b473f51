"""The Orthanc client: one pooled session, one request path, retries with backoff.

Everything dicomcache asks Orthanc goes through :class:`OrthancClient`, so the
choices below hold everywhere:

* Credentials are dicomcache's own (HTTP basic from the config); a viewer's
  ``Authorization`` is never forwarded and Orthanc's auth challenges are never
  passed back.
* ``Accept-Encoding: identity`` and no automatic decompression unless a caller
  asks (JSON; instance bodies as :meth:`OrthancClient.body_encoding` says, from
  ``upstream.compression``): what Orthanc sends is decoded, verified and stored,
  whatever the viewer's headers say (Orthanc would otherwise gzip DICOM on the
  fly, slowly and without ``Vary``).
* One request path, :meth:`OrthancClient.open`: every request, whole or
  streamed, is timed in the same metric and has its connection trouble turned
  into :class:`UpstreamError` with a :class:`~dicomcache.errors.Cause`.
* Retries (:meth:`OrthancClient.retrying`, ``retries`` after the first
  attempt) only on connection errors, timeouts, 5xx, 429 and failed integrity
  checks; never on other 4xx.  The delays are
  :func:`~dicomcache.upstream.policy.backoff_delay` (exponential, equal
  jitter, ``Retry-After`` honoured up to ``backoff_max``).
* Every JSON answer is parsed defensively (:meth:`OrthancClient.get_json`): a
  cut or malformed listing is retried like a corrupt instance.
* No redirect is ever followed (:attr:`Cause.REDIRECT`, final): the credentials go
  to ``upstream.url`` and nowhere else.  The read-through alone sees Orthanc's
  redirects, to pass those that stay on Orthanc to the viewer as paths of ours.
* ``https://`` upstreams are verified (the system's CAs, or ``upstream.ca_file``;
  the host name is checked); a failed handshake is :attr:`Cause.TLS`, final.
* Errors are described without the request they carried: aiohttp's exceptions
  hold its headers, ``Authorization`` included, in their ``repr``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
from multidict import CIMultiDict
from yarl import URL

import dicomcache.tls as tls
from dicomcache.config import UpstreamSettings
from dicomcache.errors import (
    Cause,
    IntegrityError,
    NotFoundUpstream,
    UpstreamError,
    UpstreamTimeout,
)
from dicomcache.metrics import Metrics
from dicomcache.upstream import policy
from dicomcache.upstream.breaker import CircuitBreaker
from dicomcache.upstream.link import ENCODINGS, Encoding, LinkMeter

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Request headers a viewer may pass through to Orthanc (everything else is dropped,
#: notably Authorization, Cookie, Accept-Encoding and hop-by-hop headers).
FORWARDED_REQUEST_HEADERS = ("Accept", "Accept-Language", "Content-Type",
                             "If-None-Match", "If-Modified-Since")
#: Ask for gzip (JSON answers; instances as :meth:`OrthancClient.body_encoding` says).
GZIP = {"Accept-Encoding": "gzip"}
#: The requests that start a viewer's burst (a search, a series opened, frames read
#: through): more follow at once, each wanting a connection (:meth:`OrthancClient.warm_up`).
WARMING_KINDS = frozenset({"passthrough", "metadata", "frames"})
#: At most one warm-up this often (seconds): what it opened is then in use or idle
#: (Orthanc closes an idle connection after ~1 s, and so do we, sooner).
WARM_EVERY = 1.0


class OrthancClient:
    """Async client for one Orthanc; create inside a running loop, ``await close()`` after."""

    def __init__(self, settings: UpstreamSettings, metrics: Metrics, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if settings.url is None:
            raise ValueError("upstream.url is not set")
        self.settings = settings
        self.metrics = metrics
        self.base = settings.url
        if ssl_context is None and self.base.startswith("https:"):
            ssl_context = upstream_tls(settings)  # reads files: prefer :meth:`create`
        #: Verified TLS towards an https:// upstream.
        self.ssl_context = ssl_context
        headers = {"Accept-Encoding": "identity", "User-Agent": "dicomcache"}
        if settings.username:
            headers["Authorization"] = aiohttp.encode_basic_auth(
                settings.username, settings.password or "")
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=settings.connect_timeout,
                sock_read=settings.read_timeout),
            connector=aiohttp.TCPConnector(
                limit=settings.max_connections,
                # Orthanc closes idle keep-alive connections after ~1 s; recycle ours sooner
                # than that to avoid racing its close on a reused socket.
                keepalive_timeout=0.8,
                ssl=self.ssl_context if self.ssl_context is not None else True),
            auto_decompress=False,
            headers=headers,
            raise_for_status=False,
        )
        self._rng = random.Random()
        #: When connections were last opened ahead (:meth:`warm_up`), and those requests.
        self._warmed_at = -WARM_EVERY
        self._warming: set[asyncio.Task[None]] = set()
        #: Connections the read-through may hold (``read_through_connections``): the
        #: rest of the pool stays free for viewers' misses and metadata.
        self.read_through_slots = asyncio.Semaphore(settings.read_through_connections)
        # Opens after repeated link-level failures; ``retrying`` then fails fast.
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_probe_interval,
                                      self.probe, metrics, self.base)
        #: The instance bodies of this link, measured (``upstream.compression = "auto"``
        #: decides from them; the other modes are measured too, for the status page).
        self.link = LinkMeter()
        # Read when scraped: an idle link's figures age out without any traffic.
        metrics.upstream_link_rate.set_function(lambda: self.link.figures().rate or 0.0)
        for encoding in ENCODINGS:
            metrics.upstream_body_encoding.labels(encoding).set_function(
                functools.partial(self._is_body_choice, encoding))

    def body_choice(self) -> Encoding:
        """What the next instance body a viewer waits for is asked as."""
        mode = self.settings.compression
        if mode == "auto":
            return self.link.choice()
        return "gzip" if mode == "all" else "identity"

    def _is_body_choice(self, encoding: Encoding) -> float:
        return float(self.body_choice() == encoding)

    def body_encoding(self, *, background: bool) -> Encoding:
        """The encoding to ask for one instance body (``background``: no viewer waits
        for it, so ``auto`` may measure the other encoding with it)."""
        if self.settings.compression == "auto":
            return self.link.encoding_for(background=background)
        return self.body_choice()

    @classmethod
    async def create(cls, settings: UpstreamSettings, metrics: Metrics) -> OrthancClient:
        """A client whose TLS context (CA files read from disk) is built off the loop."""
        ctx = await asyncio.to_thread(upstream_tls, settings)
        return cls(settings, metrics, ssl_context=ctx)

    async def close(self) -> None:
        for task in list(self._warming):
            task.cancel()
        await asyncio.gather(*self._warming, return_exceptions=True)
        await self.breaker.close()
        await self.session.close()

    def warm_up(self) -> None:
        """Have ``upstream.warm_connections`` connections to Orthanc ready, in the
        background: a viewer's search or series is followed at once by more requests
        (OHIF: each series' metadata, then six frames, each a body and its MD5), each
        on a new connection when the pool has none idle, one round trip more (two
        over TLS) than on an open one.  A browser straight to Orthanc opens them as
        it goes; dicomcache knows they are coming.

        Each is a ``GET /system`` (an idle connection is reused, so afterwards at
        least that many are open).  Not more than once per :data:`WARM_EVERY`, not
        while the circuit is open; its failures are nobody's (the requests that
        follow judge the link)."""
        n = self.settings.warm_connections
        now = time.monotonic()
        if n <= 0 or now - self._warmed_at < WARM_EVERY or self.breaker.is_open:
            return
        self._warmed_at = now
        for _ in range(n):
            task = asyncio.get_running_loop().create_task(self._warm_one())
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

    async def _warm_one(self) -> None:
        try:
            async with asyncio.timeout(self.settings.connect_timeout + self.settings.read_timeout):
                async with self.open("GET", "/system", kind="warm") as resp:
                    await resp.read()
        except (UpstreamError, TimeoutError):
            pass

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
        """Seconds to wait before retry number ``attempt`` (see :func:`policy.backoff_delay`)."""
        s = self.settings
        return policy.backoff_delay(attempt, s.backoff_base, s.backoff_max, self._rng.random(),
                                    retry_after)

    async def retrying(self, op: Callable[[int], Awaitable[T]], *, what: str,
                       judges_link: bool = True) -> T:
        """Run ``op(attempt)`` until it succeeds or the retries are spent.

        ``op`` raises :class:`UpstreamError` or :class:`IntegrityError` for a
        retryable failure, :class:`NotFoundUpstream` for a final one.  The error
        after the last attempt is re-raised as :class:`UpstreamError` carrying
        ``attempts``.  ``judges_link=False`` (requests whose path a viewer chose: the
        read-through) keeps their failures out of the circuit breaker and the
        upstream state: one viewer's slow or failing resource is that resource's
        problem, never a reason to fail every other viewer fast.
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
                status = exc.status if isinstance(exc, UpstreamError) else None
                self.metrics.upstream_failures.labels(cause).inc()
                if isinstance(exc, IntegrityError):
                    self.metrics.note_integrity_failure(cause, what, exc.reason)
                if attempt == attempts or cause.final:
                    log.warning("%s failed after %d attempt(s): %s", what, attempt, exc)
                    if judges_link and policy.upstream_unusable(cause, status):
                        self.metrics.note_upstream(False, self.base, str(exc))
                    if judges_link and policy.link_down(cause):
                        self.breaker.failure(str(exc))
                    kind = UpstreamTimeout if cause is Cause.TIMEOUT else UpstreamError
                    raise kind(cause, exc.reason, attempts=attempt, status=status) from exc
                retry_after = exc.retry_after if isinstance(exc, UpstreamError) else None
                delay = self.backoff(attempt, retry_after)
                log.info("%s attempt %d failed (%s); retrying in %.2f s", what, attempt, exc, delay)
                self.metrics.upstream_retries.labels(cause).inc()
                await asyncio.sleep(delay)
            else:
                self.metrics.note_upstream(True, self.base)
                self.breaker.success()
                return result
        raise AssertionError("unreachable")

    # --- the request path ------------------------------------------------------------------
    def url(self, path: str, *, encoded: bool = False) -> URL:
        """Orthanc's URL for ``path`` (``encoded``: a viewer's raw path, passed as it is)."""
        return URL(self.base + path, encoded=encoded)

    @asynccontextmanager
    async def open(self, method: str, path: str, *, kind: str,
                   headers: Mapping[str, str] | None = None,
                   params: Mapping[str, str] | None = None, body: bytes | None = None,
                   encoded: bool = False,
                   redirects: bool = False) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request; the response is read by the caller inside the ``async with``.

        Connection trouble, while connecting or while the caller reads the body,
        becomes :class:`UpstreamError`; the status is the caller's to judge
        (:func:`check_status`).  A redirect is never followed: it is a
        :attr:`Cause.REDIRECT` error, unless the caller takes redirects
        (``redirects``: the read-through, which passes them on as paths of ours).
        The time until the caller is done is recorded under ``kind``.
        """
        started = time.monotonic()
        what = f"{method} {path.split('?', 1)[0]}"
        url = self.url(path, encoded=encoded)
        if kind in WARMING_KINDS:
            # Its tasks start after this request has taken an idle connection, if any.
            self.warm_up()
        try:
            async with self.session.request(method, url, data=body, headers=headers,
                                            params=params, allow_redirects=False) as resp:
                if resp.status in policy.REDIRECT_STATUSES and not redirects:
                    raise redirect_error(what, resp.status, str(url),
                                         resp.headers.get("Location", ""))
                yield resp
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamError(Cause.SHORT_BODY, f"{what}: body cut short ({exc})") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamError(Cause.TIMEOUT, f"{what}: no answer in time") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise UpstreamError(Cause.TLS, f"{what}: the certificate of {self.base} is not "
                                f"trusted ({_verify_message(exc)}); upstream.ca_file names the "
                                "CA that signed it") from exc
        except aiohttp.ClientSSLError as exc:
            raise UpstreamError(Cause.TLS, f"{what}: TLS with {self.base} failed "
                                f"({describe_error(exc)})") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(Cause.CONNECT, f"{what}: cannot connect ({exc.os_error})") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(Cause.RESET,
                                f"{what}: connection lost ({describe_error(exc)})") from exc
        finally:
            self.metrics.upstream_seconds.labels(kind).observe(time.monotonic() - started)

    async def get(self, path: str, *, kind: str, headers: Mapping[str, str] | None = None,
                  params: Mapping[str, str] | None = None, method: str = "GET",
                  body: bytes | None = None) -> tuple[CIMultiDict[str], bytes]:
        """One attempt at a request that must answer 2xx: its headers and whole body."""
        async with self.open(method, path, kind=kind, headers=headers, params=params,
                             body=body) as resp:
            data = await resp.read()
            check_status(resp.status, resp.headers, f"{method} {path}", data)
            return CIMultiDict(resp.headers), data

    async def get_json(self, path: str, *, method: str = "GET", body: bytes | None = None,
                       kind: str = "listing", retry: bool = True, expect: type = object,
                       of: type = object) -> Any:
        """A JSON answer, gzipped on the link unless ``upstream.compression = "none"``.

        A body that does not decompress or parse (a WAN that cut it, an
        intermediary that mangled it), or is not an ``expect`` (of ``of`` items, for
        a list), is a :attr:`Cause.BAD_JSON` failure, retried like any other with
        ``retry``: the callers index what they asked for without a 500 in sight.
        """
        headers = GZIP if self.settings.compression != "none" else None

        async def attempt(_attempt: int) -> Any:
            got, data = await self.get(path, kind=kind, method=method, body=body,
                                       headers=headers)
            doc = parse_json(data, got.get("Content-Encoding"), f"{method} {path}")
            return check_shape(doc, expect, of, f"{method} {path}")

        if not retry:
            return await attempt(1)
        return await self.retrying(attempt, what=f"{method} {path}")

    async def lookup(self, uid: str, level: str, *, retry: bool = True) -> str:
        """The Orthanc ID of the ``level`` (Study, Series, Instance) with this DICOM UID.

        ``POST /tools/lookup``.  :class:`NotFoundUpstream` when Orthanc has none, or
        several (the same UID under several patients: Orthanc's DICOMweb answers 404
        then, and a cache must never pick one of them).
        """
        found = await self.get_json("/tools/lookup", method="POST", body=uid.encode(),
                                    kind="lookup", retry=retry, expect=list, of=dict)
        ids = [str(item["ID"]) for item in (found if isinstance(found, list) else ())
               if isinstance(item, dict) and item.get("Type") == level
               and isinstance(item.get("ID"), str)]
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise NotFoundUpstream(404, f"Orthanc has no {level.lower()} with UID {uid}")
        raise NotFoundUpstream(404, f"UID {uid} names {len(ids)} {level.lower()} resources "
                               "in Orthanc (the same UID under several patients)")

    async def find_instances(self, sop_uid: str, study_uid: str | None = None,
                             series_uid: str | None = None) -> list[str]:
        """Every Orthanc instance with these UIDs (``POST /tools/find``), as Orthanc's own
        WADO-URI and DICOMweb resolve a request naming them."""
        query = {"SOPInstanceUID": sop_uid}
        if study_uid:
            query["StudyInstanceUID"] = study_uid
        if series_uid:
            query["SeriesInstanceUID"] = series_uid
        found = await self.get_json("/tools/find", method="POST", kind="lookup", body=json.dumps(
            {"Level": "Instance", "Query": query}).encode(), expect=list, of=str)
        return [str(i) for i in found]

    async def instance_md5(self, orthanc_id: str) -> str | None:
        """The MD5 Orthanc stored for the instance's DICOM attachment (``None``: it has none)."""
        try:
            _, data = await self.get(md5_path(orthanc_id), kind="md5")
        except NotFoundUpstream:
            return None
        return parse_md5(data, orthanc_id)


def upstream_tls(settings: UpstreamSettings) -> ssl.SSLContext | None:
    """The verifying client context for an ``https://`` upstream (``ca_file`` or the
    system's CAs); ``None`` for plain HTTP.  Blocking: it reads the CA files."""
    if settings.url is None or not settings.url.startswith("https:"):
        return None
    return tls.client_context(settings.ca_file)


def describe_error(exc: BaseException) -> str:
    """An aiohttp error for logs and answers: its type and message, never its ``repr``.

    A :class:`aiohttp.ClientResponseError` (a redirect loop, a malformed answer…)
    carries the request it answers, headers included, and its ``repr`` prints
    them: ``'Authorization': 'Basic …'`` would reach the viewer's 502, the
    status page, ``/readyz`` and the logs.
    """
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}: {exc.status} {exc.message}".strip()
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{type(exc).__name__}: {exc.os_error}"
    return f"{type(exc).__name__}: {exc}"


def _verify_message(exc: aiohttp.ClientConnectorCertificateError) -> str:
    err = exc.certificate_error
    return str(getattr(err, "verify_message", "") or err)


def redirect_error(what: str, status: int, request_url: str, location: str,
                   why: str = "dicomcache follows no redirect") -> UpstreamError:
    """The error for a redirect of Orthanc's: where it pointed (no credentials, no query)."""
    where = policy.describe_location(request_url, location) if location else "nowhere"
    return UpstreamError(Cause.REDIRECT, f"{what}: Orthanc answered {status}, a redirect to "
                         f"{where}; {why} (upstream.url must be the address that answers)",
                         status=status)


def decoded(data: bytes, encoding: str | None, what: str) -> bytes:
    """A JSON body with Orthanc's gzip or deflate undone; :class:`UpstreamError` with
    :attr:`Cause.BAD_JSON` when the compressed stream is cut or damaged."""
    if (encoding or "identity").lower() not in ("gzip", "deflate"):
        return data
    try:
        inflater = zlib.decompressobj(47)  # gzip or zlib, auto-detected
        out = inflater.decompress(data)
    except zlib.error as exc:
        raise UpstreamError(Cause.BAD_JSON, f"{what}: Orthanc's JSON answer is cut or "
                            f"malformed (its compression: {exc})") from exc
    if not inflater.eof:
        raise UpstreamError(Cause.BAD_JSON, f"{what}: Orthanc's JSON answer is cut or "
                            "malformed (its compressed stream ends early)")
    return out


def parse_json(data: bytes, encoding: str | None, what: str) -> Any:
    """A JSON body as Orthanc sent it (gzip or deflate undone); :class:`UpstreamError`
    with :attr:`Cause.BAD_JSON` when it is cut or malformed."""
    data = decoded(data, encoding, what)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise UpstreamError(Cause.BAD_JSON, f"{what}: Orthanc's JSON answer is cut or "
                            f"malformed ({exc})") from exc


def check_shape(doc: Any, expect: type, of: type, what: str) -> Any:
    """``doc`` when it is an ``expect`` (a list: of ``of`` items); else
    :class:`UpstreamError` with :attr:`Cause.BAD_JSON` (pure)."""
    good = isinstance(doc, expect) and (
        not isinstance(doc, list) or all(isinstance(item, of) for item in doc))
    if not good:
        raise UpstreamError(Cause.BAD_JSON, f"{what}: Orthanc's JSON answer is not the "
                            f"{expect.__name__} expected ({str(doc)[:80]!r})")
    return doc


def md5_path(orthanc_id: str) -> str:
    return f"/instances/{orthanc_id}/attachments/dicom/md5"


def parse_md5(data: bytes, orthanc_id: str) -> str:
    """Orthanc's answer to :func:`md5_path`, checked: 32 lower-case hex digits."""
    text = data.decode("ascii", "replace").strip().strip('"').lower()
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        # A damaged answer is not "no MD5": trusting the parse alone would let
        # corrupted pixels through.  Retried like any integrity failure.
        raise IntegrityError(Cause.MD5_MISMATCH, f"Orthanc's MD5 answer for {orthanc_id} "
                             f"is malformed: {text[:40]!r}")
    return text


def check_status(status: int, headers: Mapping[str, str], what: str, body: bytes = b"") -> None:
    """Raise the right error for a non-2xx upstream status (retryable or not)."""
    if 200 <= status < 300:
        return
    snippet = body[:200].decode("utf-8", "replace").strip()
    cause = policy.status_error_cause(status)
    if cause is Cause.AUTH:
        # Our own credentials were refused: the viewer can do nothing about it.
        raise UpstreamError(cause, f"{what}: Orthanc refused dicomcache's credentials "
                            f"({status}); check upstream.username/password", status=status)
    if cause is not None:
        raise UpstreamError(cause, f"{what}: Orthanc answered {status} {snippet}".strip(),
                            status=status,
                            retry_after=policy.parse_retry_after(headers.get("Retry-After")))
    raise NotFoundUpstream(status, f"{what}: Orthanc answered {status} {snippet}".strip())
