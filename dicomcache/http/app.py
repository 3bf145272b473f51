"""``make_app(settings)``: the HTTP application, its components started and stopped in
``cleanup_ctx`` in dependency order (store, upstream, prefetch, change feed, DICOMweb).

The relay is not wired here (``dicomcache serve`` does it): the HTTP side never
imports the relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from dicomcache.audit.trail import AuditLog
from dicomcache.cache.coherence import Coherence
from dicomcache.cache.fetch import Fetcher
from dicomcache.cache.health import Degraded
from dicomcache.cache.index import EVERY_STUDY
from dicomcache.cache.instance import Instance
from dicomcache.cache.scrubber import Scrubber
from dicomcache.cache.store import RECHECK_EVERY, RECHECK_TIMEOUT, AsyncStore, Store
from dicomcache.config import Settings
from dicomcache.errors import StoreTrouble
from dicomcache.http import (
    audit,
    auth,
    cors,
    dicomweb,
    limits,
    orthanc_rest,
    passthrough,
    status,
    wado_uri,
)
from dicomcache.http.keys import (
    AUDIT,
    CHANGES,
    CLIENT,
    COHERENCE,
    FETCHER,
    HOST_NAMES,
    METRICS,
    PREFETCHER,
    SCRUBBER,
    SETTINGS,
    STORE,
    STUDY_CHANGED,
)
from dicomcache.http.middleware import (
    cache_status,
    canonical_path,
    errors_and_metrics,
    host_check,
    host_names,
)
from dicomcache.http.respond import OPEN_FILES, OpenFiles
from dicomcache.metrics import Metrics
from dicomcache.prefetch.plan import touch_of
from dicomcache.prefetch.scheduler import Prefetcher
from dicomcache.upstream.changes import ChangeWatcher, StudyEvent, StudyHook, notify
from dicomcache.upstream.client import OrthancClient

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """The HTTP application; long-lived resources start and stop in ``cleanup_ctx``."""
    # Host check, CORS preflights (answered without credentials), per-client limits
    # (http/limits.py), the canonical path;
    # the audit record (around authentication, so a refused request is recorded too);
    # then who asks, and may they (http/auth.py); then the error mapping.
    # First of all, a gated connection is marked in use until its answer is sent.
    app = web.Application(middlewares=[limits.connection_in_use, host_check,
                                       cors.cors_preflight, limits.client_limits,
                                       canonical_path, audit.audit_access, auth.guard,
                                       errors_and_metrics],
                          client_max_size=64 << 20)
    app.on_response_prepare.append(prefetch_touch)
    app.on_response_prepare.append(cache_status)
    app.on_response_prepare.append(audit.remember_response)
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app[audit.TRUSTED_PROXIES] = audit.TrustedProxies.parse(settings.audit.trusted_proxies)
    app.cleanup_ctx.append(_hosts_ctx)
    app.cleanup_ctx.append(_audit_ctx)  # first opened, last closed
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_prefetch_ctx)
    if settings.cache.scrub_period:
        app.cleanup_ctx.append(_scrub_ctx)
    app[STUDY_CHANGED] = []  # metadata caches subscribe here (see changes.py)
    if settings.changes.enabled:
        app.cleanup_ctx.append(_changes_ctx)
    limits.setup(app, settings)
    auth.setup(app)  # users file / signing keys / authorization service; before status
    status.setup(app)  # /, /healthz, /readyz, /metrics (or its own port); after upstream
    orthanc_rest.add_routes(app)
    wado_uri.add_routes(app)
    dicomweb.add_routes(app)  # also its cache context (after store and upstream)
    cors.setup(app, settings.cors)  # preflights answered locally; none allowed by default
    passthrough.add_routes(app)  # last: the catch-all
    return app


async def _hosts_ctx(app: web.Application) -> AsyncIterator[None]:
    """The ``Host:`` names to answer (this machine's names looked up once, off the loop)."""
    settings = app[SETTINGS]
    machine = await asyncio.to_thread(machine_names)
    app[HOST_NAMES] = host_names(settings.server, settings.dicomweb.public_url, machine)
    yield


def machine_names() -> set[str]:
    """This machine's host name, fully qualified name and their addresses (blocking)."""
    names = {socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        with contextlib.suppress(OSError):
            for *_, sockaddr in socket.getaddrinfo(name, None):
                address = str(sockaddr[0])
                names.add(f"[{address}]" if ":" in address else address)
    return names


async def _audit_ctx(app: web.Application) -> AsyncIterator[None]:
    """The audit trail (``[audit]``): opened before anything serves, closed after."""
    # Built off the loop: a syslog target resolves this host's name and reads TLS files.
    trail = await asyncio.to_thread(AuditLog, app[SETTINGS].audit, app[METRICS],
                                    source="serve")
    try:
        await asyncio.to_thread(trail.open)
    except OSError as exc:  # logged and shown by the trail; required: data refused (503)
        log.error("audit trail %s cannot be opened: %s", trail.settings.file, exc)
    trail.start()
    app[AUDIT] = trail
    yield
    await asyncio.to_thread(trail.close)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    """The store: degraded, never fatal, when its directory cannot be used (full,
    read-only, missing, an unusable index); re-checked every ``RECHECK_EVERY`` seconds."""
    cache = app[SETTINGS].cache
    store = await asyncio.to_thread(Store.for_serving, cache.directory, cache.max_size,
                                    cache.min_free)
    app[STORE] = AsyncStore(store)
    app[OPEN_FILES] = open_files = OpenFiles(store)
    loop = asyncio.get_running_loop()

    def removed(path: Path) -> None:  # in a worker thread: the descriptors are the loop's
        with contextlib.suppress(RuntimeError):  # the loop closed: nothing is open
            loop.call_soon_threadsafe(open_files.forget, path)
    store.removal_listeners.append(removed)
    metrics = app[METRICS]
    metrics.cache_max.set(cache.max_size)
    metrics.cache_min_free.set(cache.min_free)

    def tell(state: Degraded | None) -> None:
        metrics.note_cache_degraded(None if state is None else state.trouble)
    store.health.listeners.append(tell)
    tell(store.health.degraded)
    sweep = asyncio.create_task(asyncio.to_thread(store.sweep), name="store sweep")
    gauges = asyncio.create_task(_store_gauges(app[STORE], app[OPEN_FILES], metrics,
                                               app[STUDY_CHANGED]), name="store gauges")
    recheck = asyncio.create_task(_store_recheck(store), name="store re-check")
    yield
    gauges.cancel()
    recheck.cancel()
    await asyncio.gather(sweep, gauges, recheck, return_exceptions=True)
    # Verified bodies queued by cold streams are made durable before the index closes.
    await app[STORE].drain()
    await app[STORE].flush_touches()
    app[OPEN_FILES].close()
    await asyncio.to_thread(store.close)


async def _store_gauges(store: AsyncStore, open_files: OpenFiles, metrics: Metrics,
                        hooks: list[StudyHook]) -> None:
    """Every second: write hits' recency to the index; refresh gauges and evictions; forget
    what is held in memory when another process purged or quarantined entries, and drop
    what derives from the studies it purged."""
    seen = bad_seen = seen_for_space = 0
    while True:
        purged = await asyncio.to_thread(store.sync.refresh)
        if purged is not None:
            open_files.close()  # descriptors of files purged elsewhere are served no more
            log.info("entries were removed by another process (dicomcache purge/verify/"
                     "revalidate): cached lookups and open files dropped")
            metrics.purged.labels("operator").inc(sum(purged.values()))
            for study in sorted(purged):
                await notify(hooks, StudyEvent(None if study == EVERY_STUDY else study,
                                               removed=True))
        if store.sync.bad_found > bad_seen:
            metrics.bad_files.labels("open").inc(store.sync.bad_found - bad_seen)
            bad_seen = store.sync.bad_found
        await store.flush_touches()
        if store.sync.free_bytes is not None:
            metrics.cache_disk_free.set(store.sync.free_bytes)
        stats = await store.stats()
        metrics.cache_entries.set(stats["entries"])
        metrics.cache_size.set(stats["size_bytes"])
        if stats["evictions"] > seen:
            metrics.evictions.inc(stats["evictions"] - seen)
            log.info("evicted %d instance(s) to stay under cache.max_size",
                     stats["evictions"] - seen)
            seen = stats["evictions"]
        if stats["min_free_evictions"] > seen_for_space:
            metrics.evictions.inc(stats["min_free_evictions"] - seen_for_space)
            log.info("evicted %d instance(s) to keep cache.min_free free on the cache's "
                     "disk", stats["min_free_evictions"] - seen_for_space)
            seen_for_space = stats["min_free_evictions"]
        await asyncio.sleep(1)


async def _store_recheck(store: Store) -> None:
    """Every ``RECHECK_EVERY`` seconds: :meth:`Store.recheck` (attach, keep min_free, probe a
    write; the store caches again or stays degraded).  A check the disk does not answer
    within ``RECHECK_TIMEOUT`` degrades the store until it does."""
    while True:
        check = asyncio.ensure_future(asyncio.to_thread(store.recheck))
        done, _ = await asyncio.wait([check], timeout=RECHECK_TIMEOUT)
        if not done:
            store.health.degrade(StoreTrouble.IO_ERROR, f"the cache disk has not answered "
                                                        f"for {RECHECK_TIMEOUT:.0f} s")
            await asyncio.wait([check])
        if check.exception() is not None:
            log.error("store: the periodic re-check failed", exc_info=check.exception())
        await asyncio.sleep(RECHECK_EVERY)


async def _scrub_ctx(app: web.Application) -> AsyncIterator[None]:
    """The background re-verification of the store (``cache.scrub_period``)."""
    fetcher = app[FETCHER]
    scrubber = Scrubber(app[STORE], app[METRICS], app[SETTINGS].cache.scrub_period,
                        lambda oid: fetcher.by_orthanc_id(oid, viewer=False))
    app[SCRUBBER] = scrubber
    task = asyncio.create_task(scrubber.run(), name="store scrub")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = await OrthancClient.create(settings.upstream, app[METRICS])
    app[CLIENT] = client
    coherence = Coherence(settings.cache, client, app[STORE], app[METRICS], app[STUDY_CHANGED])
    app[COHERENCE] = coherence
    app[FETCHER] = Fetcher(client, app[STORE], app[METRICS], coherence,
                           stream_above=settings.cache.stream_above)
    coherence.start()
    yield
    await coherence.stop()
    await client.close()


async def prefetch_touch(request: web.Request, response: web.StreamResponse) -> None:
    """A successful viewer GET naming a study tells the prefetcher (it decides).

    An ``on_response_prepare`` hook, not a middleware: a streamed answer (a WADO-RS
    retrieve) is sent inside its handler, so a middleware told the prefetcher only
    after the viewer had the whole answer; this runs as its headers go out.
    """
    prefetcher = request.app.get(PREFETCHER)
    if prefetcher is not None and request.method == "GET" and response.status < 400:
        # (Entries known in memory, and bodies just served whose disk copy is under way.)
        store = request.app[STORE]

        def by_sop(sop: str) -> Instance | None:
            found = store.peek_uids(sop)
            return found[0] if len(found) == 1 else None
        touched = touch_of(request.path, request.query, store.peek, by_sop)
        # Only for requests that passed authentication and authorization, within the
        # principal's budget of studies: nobody makes the clinic download a history.
        if touched is not None and auth.may_prefetch(request, touched[0]):
            prefetcher.touch(*touched, actor=audit.actor_of(request))


async def _prefetch_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    prefetcher = Prefetcher(settings.prefetch, app[FETCHER], app[STORE], app[METRICS],
                            settings.cache.max_size, audit=app.get(AUDIT))
    app[PREFETCHER] = prefetcher
    prefetcher.start()
    yield
    await prefetcher.stop()


async def _changes_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    cursor = settings.changes.cursor_file or settings.cache.directory / "changes-cursor.json"
    watcher = ChangeWatcher(settings.changes, app[CLIENT], app[METRICS], cursor,
                            app[STUDY_CHANGED], warm=app[PREFETCHER].warm,
                            listener=app[COHERENCE])
    app[CHANGES] = watcher
    await watcher.start()
    yield
    await watcher.stop()
