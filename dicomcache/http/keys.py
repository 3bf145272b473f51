"""The keys of the HTTP application's shared state (``app[KEY]``) and per-request labels.

Each long-lived component is created by one ``cleanup_ctx`` of :mod:`.app` and
found by the routes here; nothing else is global.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from dicomcache.audit.trail import AuditLog
from dicomcache.cache.coherence import Coherence
from dicomcache.cache.fetch import Fetcher
from dicomcache.cache.instance import Instance
from dicomcache.cache.scrubber import Scrubber
from dicomcache.cache.store import AsyncStore
from dicomcache.config import Settings
from dicomcache.dicomweb.state import DicomWeb
from dicomcache.metrics import Metrics
from dicomcache.prefetch.scheduler import Prefetcher
from dicomcache.principal import Principal
from dicomcache.tls import ServerTLS
from dicomcache.upstream.changes import ChangeWatcher, StudyHook
from dicomcache.upstream.client import OrthancClient


class RelayStatusSource(Protocol):
    """What the status page needs of the relay (wired by ``dicomcache serve``)."""

    def status(self) -> dict[str, Any]: ...


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", AsyncStore)
CLIENT = web.AppKey("client", OrthancClient)
FETCHER = web.AppKey("fetcher", Fetcher)
DICOMWEB = web.AppKey("dicomweb", DicomWeb)
PREFETCHER = web.AppKey("prefetcher", Prefetcher)
SCRUBBER = web.AppKey("scrubber", Scrubber)
CHANGES = web.AppKey("change_watcher", ChangeWatcher)
COHERENCE = web.AppKey("coherence", Coherence)
#: Async callbacks ``hook(StudyEvent)`` run when Orthanc reports a change in a study.
STUDY_CHANGED: web.AppKey[list[StudyHook]] = web.AppKey("study_changed_hooks")
RELAY: web.AppKey[RelayStatusSource] = web.AppKey("relay")

#: API family (orthanc, wado_uri, dicomweb, passthrough) and outcome (hit, miss, …) of a request.
FAMILY = web.RequestKey("family", str)
OUTCOME = web.RequestKey("outcome", str)
#: Set on requests whose hit or miss is of the answer cache (metadata, searches, rendered
#: images kept in memory), not of the instance store: they stay out of the hit ratio.
ANSWER = web.RequestKey("answer", bool)
#: The ``Host:`` names this service answers to (:func:`~.middleware.host_names`).
HOST_NAMES = web.AppKey("host_names", frozenset)
#: Who the request acts for (set by authentication before any handler runs).
PRINCIPAL = web.RequestKey("principal", Principal)
#: The viewer listener's certificate when it speaks TLS (set by ``dicomcache serve``).
SERVER_TLS = web.AppKey("server_tls", ServerTLS)
#: What SIGHUP re-reads (certificates, users file…): async callables, run in order.
RELOADERS: web.AppKey[list[Callable[[], Awaitable[object]]]] = web.AppKey("reloaders")
#: Listening sockets ``dicomcache serve`` opened before starting (so that a port in use
#: is one clear line, not a traceback); absent: the sites bind their own.
ADMIN_SOCKETS: web.AppKey[list[socket.socket]] = web.AppKey("admin_sockets")
REDIRECT_SOCKETS: web.AppKey[list[socket.socket]] = web.AppKey("redirect_sockets")
#: The process's audit trail (``[audit]``), and per request: the instances a route served
#: (who the access was about) and the response whose bytes the record counts.
AUDIT = web.AppKey("audit", AuditLog)
SERVED: web.RequestKey[list[Instance]] = web.RequestKey("served")
AUDIT_RESPONSE = web.RequestKey("audit_response", web.StreamResponse)
