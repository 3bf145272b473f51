"""``make_app(settings)``: wires the components and maps errors to HTTP answers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .config import Settings
from .errors import IntegrityError, NotFoundUpstream, UpstreamError
from .fetch import Fetcher
from .metrics import Metrics
from .routes import dicomweb, orthanc, passthrough, wado_uri
from .routes.common import (CLIENT, FAMILY, FETCHER, METRICS, OUTCOME, SETTINGS, STORE,
                            json_error)
from .routes.serve import OPEN_FILES, OpenFiles
from .store import AsyncStore, Store
from .upstream import OrthancClient

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One place mapping errors to statuses, and timing every request."""
    started = time.monotonic()
    try:
        response = await handler(request)
    except UpstreamError as exc:
        request[OUTCOME] = "error"
        status = 504 if exc.cause == "timeout" else 502
        if exc.cause in ("short_body", "length_mismatch", "md5_mismatch", "parse_failure"):
            error = "upstream sent a corrupt or incomplete instance"
        else:
            error = "upstream unavailable"
        response = json_error(status, error, exc.reason, attempts=exc.attempts)
    except IntegrityError as exc:  # only reachable outside the retry loop
        request[OUTCOME] = "error"
        response = json_error(502, "upstream sent a corrupt or incomplete instance",
                              exc.reason, attempts=1)
    except NotFoundUpstream as exc:
        request[OUTCOME] = "error"
        response = json_error(exc.status if 400 <= exc.status < 500 else 404,
                              "not found", exc.reason)
    except web.HTTPException as exc:
        request.setdefault(OUTCOME, "error")
        raise exc
    finally:
        metrics = request.app[METRICS]
        family = request.get(FAMILY)
        if family is not None:
            metrics.request_seconds.labels(family, request.get(OUTCOME, "error")).observe(
                time.monotonic() - started)
            if request.get(OUTCOME) == "hit":
                metrics.cache_hits.labels(family).inc()
            elif request.get(OUTCOME) == "miss":
                metrics.cache_misses.labels(family).inc()
    return response


def make_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """The HTTP application; long-lived resources start and stop in ``cleanup_ctx``."""
    app = web.Application(middlewares=[errors_and_metrics], client_max_size=64 << 20)
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    if settings.relay.enabled:
        app.cleanup_ctx.append(_relay_ctx)
    if settings.server.metrics_port is None:
        app.router.add_get("/metrics", app[METRICS].handler())
    app.router.add_get("/healthz", healthz)
    orthanc.add_routes(app)
    wado_uri.add_routes(app)
    dicomweb.add_routes(app)
    passthrough.add_routes(app)  # last: the catch-all
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    cache = app[SETTINGS].cache
    store = await asyncio.to_thread(Store, cache.directory, cache.max_size)
    app[STORE] = AsyncStore(store)
    app[OPEN_FILES] = OpenFiles()
    metrics = app[METRICS]
    metrics.cache_max.set(cache.max_size)
    sweep = asyncio.create_task(asyncio.to_thread(store.sweep), name="store sweep")
    gauges = asyncio.create_task(_store_gauges(app[STORE], metrics), name="store gauges")
    yield
    gauges.cancel()
    await asyncio.gather(sweep, gauges, return_exceptions=True)
    await app[STORE].flush_touches()
    app[OPEN_FILES].close()
    await asyncio.to_thread(store.close)


async def _store_gauges(store: AsyncStore, metrics: Metrics) -> None:
    """Every second: write hits' recency to the index; refresh gauges and evictions."""
    seen = 0
    while True:
        await store.flush_touches()
        stats = await store.stats()
        metrics.cache_entries.set(stats["entries"])
        metrics.cache_size.set(stats["size_bytes"])
        if stats["evictions"] > seen:
            metrics.evictions.inc(stats["evictions"] - seen)
            log.info("evicted %d instance(s) to stay under cache.max_size",
                     stats["evictions"] - seen)
            seen = stats["evictions"]
        await asyncio.sleep(1)


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = OrthancClient(settings.upstream, app[METRICS])
    app[CLIENT] = client
    app[FETCHER] = Fetcher(client, app[STORE], app[METRICS])
    yield
    await client.close()


async def _relay_ctx(app: web.Application) -> AsyncIterator[None]:
    from .relay.service import Relay  # the HTTP side never imports the relay otherwise

    settings = app[SETTINGS]
    relay = Relay(settings.relay, app[METRICS])
    await relay.start()
    yield
    await relay.stop(settings.server.shutdown_timeout)
