"""Prometheus metrics: one :class:`Metrics` object with its own registry.

A private ``CollectorRegistry`` (not the global one) keeps tests independent
and lets one process hold several apps.  Names follow Prometheus conventions:
``dicomcache_`` prefix, base units, ``_total`` for counters.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.aiohttp import make_aiohttp_handler

from dicomcache import __version__
from dicomcache.errors import Cause, StoreFull, StoreTrouble, StoreUnavailable

# State changes are logged where they are recorded (here), so the upstream
# client, the readiness probe and the health loop log them the same way, once.
_upstream_log = logging.getLogger("dicomcache.upstream.client")

# Hits are sub-millisecond, misses over a WAN take seconds: cover both.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)

#: The ``cause`` label values of failed requests to Orthanc: :class:`Cause`, the one list
#: (dashboards and alerts use these values), less dicomcache's own states.
FAILURE_CAUSES = tuple(c.value for c in Cause
                       if c not in (Cause.STALE, Cause.CIRCUIT_OPEN, Cause.READ_ERROR))
#: The ``cause`` labels of verification failures (a subset of ``FAILURE_CAUSES``).
INTEGRITY_CAUSES = tuple(c.value for c in Cause if c.integrity)
#: Why stored instances are purged (``dicomcache_cache_purged_total``).
PURGE_CAUSES = ("deleted_upstream", "replaced", "operator")
#: API families whose instance requests are served from the store.
INSTANCE_FAMILIES = ("orthanc", "wado_uri", "dicomweb")
#: Families of viewer requests (the read-through too), for failures.
REQUEST_FAMILIES = (*INSTANCE_FAMILIES, "passthrough")
#: Why a viewer's request failed (``dicomcache_http_failed_requests_total``): Orthanc or
#: the link failed (502, 504); Orthanc's body failed verification (502); the circuit was
#: open (503, failing fast); an answer was broken off after it started; any other 5xx.
REQUEST_FAILURES = ("upstream", "corrupt", "unavailable", "cut", "other")
#: Outcomes of requests answered by the answer cache (metadata, searches, rendered).
ANSWER_OUTCOMES = ("hit", "miss", "stale")
#: How many recent integrity failures the status page shows.
RECENT_FAILURES = 20
#: The ``cause`` labels of instances that could not be cached (served uncached); degraded:
#: not even tried, the cache was degraded (``dicomcache_cache_degraded`` says why).
UNCACHED_CAUSES = ("disk_full", "io_error", "degraded")
#: Why the cache is degraded (``dicomcache_cache_degraded``).
DEGRADED_CAUSES = tuple(t.value for t in StoreTrouble)
#: Where audit records go, why they are lost, why the file could not be written, and which
#: side refused an access because of it (``dicomcache_audit_*``).
AUDIT_SINKS = ("file", "syslog")
AUDIT_DROP_CAUSES = ("queue_full", "shutdown", "too_large")
AUDIT_WRITE_CAUSES = ("disk_full", "io_error")
AUDIT_SIDES = ("http", "relay", "cli")


@dataclass(frozen=True, slots=True)
class IntegrityEvent:
    """One body rejected by verification, for the status page."""

    time: float
    cause: str
    #: What was being fetched, e.g. ``instance 079d74f5-…``.
    instance: str
    reason: str


class Metrics:
    """Every metric dicomcache exports, registered in ``self.registry``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # --- HTTP side -------------------------------------------------------------
        self.request_seconds = Histogram(
            "dicomcache_http_request_duration_seconds",
            "Time to answer a viewer request, by API family and outcome.",
            ["family", "outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        self.client_limited = Counter(
            "dicomcache_client_limited_total",
            "Viewer requests answered 429 (limit rate or in_flight), or connections "
            "closed (limit connections), by a per-client limit.",
            ["limit"], registry=r)
        self.cache_hits = Counter(
            "dicomcache_cache_hits_total", "Instance requests served from the local store.",
            ["family"], registry=r)
        self.cache_misses = Counter(
            "dicomcache_cache_misses_total", "Instance requests that needed Orthanc.",
            ["family"], registry=r)
        self.served_bytes = Counter(
            "dicomcache_served_bytes_total",
            "Instance bytes sent to viewers (whole files and WADO-RS parts).",
            registry=r)
        self.fetched_bytes = Counter(
            "dicomcache_upstream_fetched_bytes_total",
            "Verified instance bytes downloaded from Orthanc.", registry=r)
        self.cache_entries = Gauge(
            "dicomcache_cache_entries", "Instances in the local store.", registry=r)
        self.cache_size = Gauge(
            "dicomcache_cache_size_bytes", "Bytes used by the local store.", registry=r)
        self.cache_max = Gauge(
            "dicomcache_cache_max_bytes", "Configured size bound of the local store.", registry=r)
        self.evictions = Counter(
            "dicomcache_cache_evictions_total", "Instances evicted to stay under max_size.",
            registry=r)
        self.uncached = Counter(
            "dicomcache_cache_write_failures_total",
            "Verified instances that could not be cached (sent to viewers uncached), by cause.",
            ["cause"], registry=r)
        self.cache_degraded = Gauge(
            "dicomcache_cache_degraded",
            "1 (for its cause) while the cache cannot cache: instances are served verified "
            "from Orthanc without being kept (disk_full, min_free, read_only, missing, "
            "index_unusable, io_error); 0 while it caches.", ["cause"], registry=r)
        self.cache_disk_free = Gauge(
            "dicomcache_cache_disk_free_bytes",
            "Free bytes on the file system of cache.directory (as the service may use them).",
            registry=r)
        self.cache_min_free = Gauge(
            "dicomcache_cache_min_free_bytes",
            "Configured cache.min_free: the free space the cache leaves on its file system.",
            registry=r)
        self.bad_files = Counter(
            "dicomcache_cache_bad_files_total",
            "Stored files found not to be the bytes recorded (bit rot, a hand edit), by who "
            "found them (open: before serving; scrub: the background pass); each quarantined "
            "and fetched again.", ["found_by"], registry=r)
        self.scrubbed_bytes = Counter(
            "dicomcache_cache_scrubbed_bytes_total",
            "Stored bytes re-verified by the background scrubber.", registry=r)
        self.purged = Counter(
            "dicomcache_cache_purged_total",
            "Stored instances removed because Orthanc no longer has them (deleted_upstream), "
            "has other content under their identity (replaced), or an operator purged them.",
            ["cause"], registry=r)
        self.revalidations = Counter(
            "dicomcache_revalidations_total",
            "Checks of stored copies against Orthanc (a series' instance list, or an "
            "instance's MD5), by outcome: confirmed, changed (something purged), "
            "unreachable (served unconfirmed).", ["outcome"], registry=r)
        self.unconfirmed = Counter(
            "dicomcache_cache_unconfirmed_served_total",
            "Stored instances served without a recent confirmation because Orthanc could "
            "not be asked (stale-if-error).", registry=r)
        self.feed_gaps = Counter(
            "dicomcache_changes_feed_gaps_total",
            "Times Orthanc's change feed could not be followed without a gap (changes gone "
            "from its history, a reset, a restart): every stored series is confirmed again.",
            registry=r)
        self.coalesced = Counter(
            "dicomcache_coalesced_requests_total",
            "Misses that waited for a download already in flight instead of starting one.",
            registry=r)
        self.upstream_seconds = Histogram(
            "dicomcache_upstream_request_duration_seconds",
            "Time of one request to Orthanc, by kind (instance, md5, lookup, passthrough, "
            "series: a whole series stream, md5_lookups: all MD5 lookups of one, warm: a "
            "connection opened ahead of a viewer's requests).",
            ["kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_retries = Counter(
            "dicomcache_upstream_retries_total", "Requests to Orthanc retried, by cause.",
            ["cause"], registry=r)
        self.upstream_failures = Counter(
            "dicomcache_upstream_failures_total",
            "Failed attempts to get a usable answer from Orthanc, by cause.", ["cause"],
            registry=r)
        self.integrity_failures = Counter(
            "dicomcache_integrity_failures_total",
            "Downloaded instances rejected by verification (each one a buffer overrun "
            "or wrong image prevented), by cause.", ["cause"], registry=r)
        self.upstream_up = Gauge(
            "dicomcache_upstream_up",
            "1 when Orthanc is reachable; 0 after a request failed on every attempt for a "
            "link-level reason (timeout, reset, refused, 502/503/504, credentials).",
            registry=r)
        self.prefetch_queue = Gauge(
            "dicomcache_prefetch_queue_depth", "Instances waiting to be prefetched.", registry=r)
        self.prefetched = Counter(
            "dicomcache_prefetch_instances_total", "Instances fetched ahead of viewers.",
            ["outcome"], registry=r)
        self.failed_requests = Counter(
            "dicomcache_http_failed_requests_total",
            "Viewer requests that failed, by API family and reason: upstream (Orthanc or the "
            "link failed: 502/504), corrupt (Orthanc's body failed verification: 502), "
            "unavailable (503 while the circuit breaker is open), cut (an answer broken off "
            "after it started), other (any other 5xx).", ["family", "reason"], registry=r)
        self.answers = Counter(
            "dicomcache_dicomweb_answers_total",
            "DICOMweb metadata, QIDO-RS and rendered requests by outcome: hit (from memory), "
            "miss (asked Orthanc), stale (kept copy served while Orthanc was unreachable). "
            "Not instance requests: not in the hit ratio.", ["outcome"], registry=r)
        # --- DIMSE relay -----------------------------------------------------------
        self.relay_associations = Counter(
            "dicomcache_relay_associations_total",
            "DIMSE associations, by direction (inbound/outbound) and outcome.",
            ["direction", "outcome"], registry=r)
        self.relay_received = Counter(
            "dicomcache_relay_received_total",
            "C-STOREs received from modalities, by DICOM status (hex).", ["status"], registry=r)
        self.relay_forwarded = Counter(
            "dicomcache_relay_forwarded_total",
            "Instances forwarded, by destination and outcome (delivered/retry/quarantined).",
            ["destination", "outcome"], registry=r)
        self.relay_forwarder_failures = Counter(
            "dicomcache_relay_forwarder_failures_total",
            "Times a destination's forwarder paused because the spool failed it (a full "
            "disk, an I/O error), by destination.", ["destination"], registry=r)
        self.relay_attempts = Counter(
            "dicomcache_relay_forward_attempts_total",
            "Association attempts made to forward instances, by destination.",
            ["destination"], registry=r)
        self.relay_strategy = Counter(
            "dicomcache_relay_strategy_used_total",
            "Delivered instances by destination, negotiation strategy and transfer syntax sent.",
            ["destination", "strategy", "transfer_syntax"], registry=r)
        self.relay_forward_seconds = Histogram(
            "dicomcache_relay_forward_duration_seconds",
            "Time to forward one instance (C-STORE round trip, transcoding included).",
            ["destination"], buckets=_LATENCY_BUCKETS, registry=r)
        self.relay_queue_depth = Gauge(
            "dicomcache_relay_queue_depth", "Instances waiting for delivery, by destination.",
            ["destination"], registry=r)
        self.relay_oldest_age = Gauge(
            "dicomcache_relay_queue_oldest_age_seconds",
            "Age of the oldest undelivered instance, by destination.", ["destination"],
            registry=r)
        self.relay_receive_seconds = Histogram(
            "dicomcache_relay_receive_duration_seconds",
            "Time to check and durably spool one received C-STORE (the modality waits for it).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.relay_transcoded = Counter(
            "dicomcache_relay_transcoded_total",
            "Instances re-encoded before forwarding, by source and target transfer syntax.",
            ["source", "target"], registry=r)
        self.relay_spooled = Gauge(
            "dicomcache_relay_spool_instances",
            "Instances in the spool not yet delivered to every destination.", registry=r)
        self.relay_refused = Counter(
            "dicomcache_relay_refused_total",
            "C-STOREs answered 0xA700 before anything was written, by reason: min_free "
            "(relay.min_free reached), disk_full (the spool's reserve in use), "
            "spool_unavailable (its database could not be opened).", ["reason"], registry=r)
        self.relay_spool_free = Gauge(
            "dicomcache_relay_spool_free_bytes",
            "Bytes free for the service on the spool's file system.", registry=r)
        self.relay_received_with_problems = Counter(
            "dicomcache_relay_received_with_problems_total",
            "C-STOREs acknowledged 0x0000 although a strict reading found problems (stored "
            "and forwarded as received; also in dicomcache_relay_received_total).", registry=r)
        self.relay_superseded = Counter(
            "dicomcache_relay_superseded_total",
            "Older copies of an instance a newer copy replaced before they were sent, by "
            "destination (never sent there).", ["destination"], registry=r)

        # --- audit trail ----------------------------------------------------------
        self.audit_records = Counter(
            "dicomcache_audit_records_total",
            "Audit records of accesses to patient data made durable in the audit file "
            "(sink=file) or sent to the syslog collector (sink=syslog).", ["sink"], registry=r)
        self.audit_dropped = Counter(
            "dicomcache_audit_dropped_total",
            "Audit records lost, by sink and cause: queue_full (more waiting than "
            "[audit] max_queue), shutdown (still unwritten when the process stopped), "
            "too_large (a message UDP syslog cannot carry).",
            ["sink", "cause"], registry=r)
        self.audit_write_errors = Counter(
            "dicomcache_audit_write_errors_total",
            "Failed attempts to write audit records to the file, by cause (disk_full, "
            "io_error); the records are kept in memory and written again.", ["cause"],
            registry=r)
        self.audit_refused = Counter(
            "dicomcache_audit_refused_total",
            "Accesses to patient data refused because their audit record could not be "
            "written ([audit] required), by side (http, relay, cli).", ["side"], registry=r)
        self.audit_syslog_failures = Counter(
            "dicomcache_audit_syslog_failures_total",
            "Failed attempts to send audit messages to the syslog collector (refused, "
            "unreachable, TLS failure); the messages wait and are sent again.", registry=r)
        self.audit_queue = Gauge(
            "dicomcache_audit_queue_depth", "Audit records waiting to be written, by sink.",
            ["sink"], registry=r)
        self.audit_up = Gauge(
            "dicomcache_audit_up",
            "1 while the audit file takes records; 0 while it cannot be written.", registry=r)

        # --- process --------------------------------------------------------------
        self.build_info = Gauge(
            "dicomcache_build_info", "Always 1; the version is a label.", ["version"],
            registry=r)
        self.build_info.labels(__version__).set(1)
        self.start_time = Gauge(
            "dicomcache_start_time_seconds", "When this process started (Unix time).",
            registry=r)
        self.start_time.set(time.time())
        # upstream.compression: what instance bodies are asked as, and why (``auto``).
        self.upstream_body_encoding = Gauge(
            "dicomcache_upstream_body_encoding",
            "1 for the Content-Encoding dicomcache asks Orthanc for on the next instance "
            "body a viewer waits for (upstream.compression; with auto, as measured).",
            ["encoding"], registry=r)
        self.upstream_link_rate = Gauge(
            "dicomcache_upstream_link_throughput_bytes",
            "Estimated bytes per second one instance body gets from the link to Orthanc "
            "(median over the recent bodies); 0: none in the last two minutes.",
            registry=r)
        self.upstream_bodies = Counter(
            "dicomcache_upstream_instance_bodies_total",
            "Instance bodies received from Orthanc, by Content-Encoding on the link.",
            ["encoding"], registry=r)
        ProcessCollector(registry=r)  # process_* (memory, CPU, open fds) on Linux
        # Children for every known label value exist from the start, so rate() and
        # dashboards see 0 instead of "no data" until the first event.
        for family in INSTANCE_FAMILIES:
            self.cache_hits.labels(family)
            self.cache_misses.labels(family)
        for family in REQUEST_FAMILIES:
            for reason in REQUEST_FAILURES:
                self.failed_requests.labels(family, reason)
        for outcome in ANSWER_OUTCOMES:
            self.answers.labels(outcome)
        for cause in FAILURE_CAUSES:
            self.upstream_failures.labels(cause)
            self.upstream_retries.labels(cause)
        for cause in INTEGRITY_CAUSES:
            self.integrity_failures.labels(cause)
        for encoding in ("gzip", "identity"):
            self.upstream_bodies.labels(encoding)
        for cause in UNCACHED_CAUSES:
            self.uncached.labels(cause)
        for trouble in DEGRADED_CAUSES:
            self.cache_degraded.labels(trouble)
        for found_by in ("open", "scrub"):
            self.bad_files.labels(found_by)
        for purge_cause in PURGE_CAUSES:
            self.purged.labels(purge_cause)
        for outcome in ("confirmed", "changed", "unreachable"):
            self.revalidations.labels(outcome)
        for sink in AUDIT_SINKS:
            self.audit_records.labels(sink)
            self.audit_queue.labels(sink)
            for drop_cause in AUDIT_DROP_CAUSES:
                self.audit_dropped.labels(sink, drop_cause)
        for write_cause in AUDIT_WRITE_CAUSES:
            self.audit_write_errors.labels(write_cause)
        for side in AUDIT_SIDES:
            self.audit_refused.labels(side)
        # --- state for the status page (not exported) ------------------------------
        self.recent_integrity: deque[IntegrityEvent] = deque(maxlen=RECENT_FAILURES)
        #: ``None`` until the first answer (or failure) from Orthanc.
        self.upstream_state: bool | None = None
        self.upstream_since: float | None = None
        self.upstream_checked: float | None = None
        self.upstream_detail = ""
        #: When Orthanc was last found unreachable (``upstream_detail`` says why), kept
        #: after it recovers so the status page can show the error as past.
        self.upstream_error_at: float | None = None
        #: The last instance that could not be cached: (time, instance, reason).
        self.last_uncached: tuple[float, str, str] | None = None

    def note_uncached(self, instance: str, exc: OSError) -> None:
        """Count an instance the store could not keep.  Not logged: the store logs once
        when it becomes degraded (every failed write degrades it), not per instance."""
        cause = ("degraded" if isinstance(exc, StoreUnavailable)
                 else "disk_full" if isinstance(exc, StoreFull) else "io_error")
        self.uncached.labels(cause).inc()
        self.last_uncached = (time.time(), instance, str(exc))

    def note_cache_degraded(self, trouble: str | None) -> None:
        """The cache is degraded for ``trouble`` (``None``: it caches)."""
        for cause in DEGRADED_CAUSES:
            self.cache_degraded.labels(cause).set(1 if cause == trouble else 0)

    def note_integrity_failure(self, cause: str, instance: str, reason: str) -> None:
        """Count a body rejected by verification and keep it for the status page."""
        self.integrity_failures.labels(cause).inc()
        self.recent_integrity.append(IntegrityEvent(time.time(), cause, instance, reason))

    def note_upstream(self, up: bool, where: str, detail: str = "") -> bool:
        """Record whether Orthanc is reachable; logs (once) and returns True on a change."""
        now = time.time()
        self.upstream_up.set(1 if up else 0)
        self.upstream_checked = now
        if not up:
            self.upstream_detail, self.upstream_error_at = detail, now
        if self.upstream_state is up:
            return False
        previous, self.upstream_state, self.upstream_since = self.upstream_state, up, now
        if not up:
            _upstream_log.error("upstream %s is DOWN: %s", where, detail)
        elif previous is None:
            _upstream_log.info("upstream %s is reachable", where)
        else:
            _upstream_log.warning("upstream %s is UP again", where)
        return True

    def handler(self) -> Handler:
        """An aiohttp handler exposing this registry (prometheus-client's own)."""
        return make_aiohttp_handler(self.registry)
