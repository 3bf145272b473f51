"""Health, readiness, the status page and the separate metrics port.

* ``GET /healthz``: the process answers (JSON, always 200).
* ``GET /readyz``: Orthanc is reachable (JSON; 503 with the reason when not).
  Orthanc's state comes from real traffic (:meth:`Metrics.note_upstream`); when
  that is older than ``PROBE_EVERY`` seconds, or down, a cheap ``GET /system``
  decides.  A degraded cache (its disk full, read-only, missing) is said, not a
  503: every instance is still served, verified, uncached.
* ``GET /``: one plain HTML page for people without Grafana (no script, no
  external assets, refreshes itself); ``GET /status.json`` is the same data.
* ``/metrics`` on the main port, or, when ``server.admin_port`` is set, on
  a site of its own (with ``/healthz`` and ``/readyz``) so viewers never see it.

The relay, when it runs, is seen only through ``RELAY`` (anything with a
``status() -> dict`` method): the HTTP side never imports the relay.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import Counter, Gauge

from dicomcache import __version__
from dicomcache.config import format_size, is_loopback_host
from dicomcache.errors import NotFoundUpstream, UpstreamError
from dicomcache.http import auth
from dicomcache.http.keys import (
    ADMIN_SOCKETS,
    AUDIT,
    CLIENT,
    COHERENCE,
    METRICS,
    RELAY,
    SERVER_TLS,
    SETTINGS,
    STORE,
)
from dicomcache.http.respond import json_error
from dicomcache.metrics import ANSWER_OUTCOMES, INSTANCE_FAMILIES, Metrics
from dicomcache.upstream import link
from dicomcache.upstream.client import OrthancClient

log = logging.getLogger(__name__)

#: Seconds after which Orthanc's state, if no request confirmed it, is probed again.
PROBE_EVERY = 15.0
#: A probe gets this long before Orthanc counts as down.
PROBE_TIMEOUT = 5.0
#: While Orthanc is down, probes (from readiness checks) are at least this far apart.
DOWN_RETRY = 1.0
#: The status page reloads itself this often (seconds).
REFRESH = 10


class UpstreamProbe:
    """A cheap ``GET /system``: one at a time, its answer reused while fresh."""

    def __init__(self, client: OrthancClient, metrics: Metrics) -> None:
        self.client = client
        self.metrics = metrics
        self._lock = asyncio.Lock()

    def fresh(self, max_age: float) -> bool:
        """Whether the known state is recent enough to answer without a probe."""
        m = self.metrics
        if m.upstream_state is None or m.upstream_checked is None:
            return False
        age = time.time() - m.upstream_checked
        return age < (max_age if m.upstream_state else min(max_age, DOWN_RETRY))

    async def check(self, max_age: float = PROBE_EVERY) -> bool:
        """Orthanc's state, probing first unless it is fresh; True when up."""
        breaker = getattr(self.client, "breaker", None)
        if breaker is not None and breaker.is_open:
            return False  # the circuit breaker probes by itself and records the outcome
        if not self.fresh(max_age):
            async with self._lock:
                if not self.fresh(max_age):  # another caller may have just probed
                    await self.probe()
        return self.metrics.upstream_state is True

    async def probe(self) -> None:
        where = self.client.base
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self.client.get("/system", kind="probe")
        except NotFoundUpstream:  # it answered: reachable, whatever it thinks of /system
            self.metrics.note_upstream(True, where)
        except UpstreamError as exc:
            self.metrics.note_upstream(False, where, f"probe GET /system: {exc}")
        except TimeoutError:
            self.metrics.note_upstream(
                False, where, f"probe GET /system: no answer in {PROBE_TIMEOUT:g} s")
        else:
            self.metrics.note_upstream(True, where)


PROBE = web.AppKey("upstream_probe", UpstreamProbe)
STARTED = web.AppKey("status_started", float)


def setup(app: web.Application) -> None:
    """Register health, readiness, status and metrics; call after the upstream context."""
    app[STARTED] = time.time()
    app.cleanup_ctx.append(_health_ctx)
    settings = app[SETTINGS].server
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", _bound(app, readiness))
    if settings.admin_port is None:
        app.router.add_get("/metrics", app[METRICS].handler())
        app.router.add_get("/status.json", status_json)
        app.router.add_get("/", status_page)
    else:
        app.cleanup_ctx.append(_admin_site_ctx)
        for path in ADMIN_PATHS:  # never read through to Orthanc by the catch-all either
            app.router.add_get(path, _admin_elsewhere)


def _bound(app: web.Application, handler: Callable[[web.Application], Awaitable[web.Response]]
           ) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler reading the main app's state, whichever site received the request."""
    async def handle(_request: web.Request) -> web.Response:
        return await handler(app)
    return handle


# --- background: keep Orthanc's state known even without traffic ----------------------
async def _health_ctx(app: web.Application) -> AsyncIterator[None]:
    probe = app[PROBE] = UpstreamProbe(app[CLIENT], app[METRICS])
    task = asyncio.create_task(_health_loop(probe), name="upstream health")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _health_loop(probe: UpstreamProbe) -> None:
    """Probe at once (so ``dicomcache_upstream_up`` is right from the start), then when stale."""
    while True:
        try:
            await probe.check(PROBE_EVERY)
        except Exception:
            log.exception("upstream health probe failed")
        await asyncio.sleep(PROBE_EVERY / 3)


#: What the admin port serves (and the viewer port then does not).
ADMIN_PATHS = ("/", "/status.json", "/metrics")


async def _admin_site_ctx(app: web.Application) -> AsyncIterator[None]:
    """The admin site: status page, status JSON, metrics, health, on ``admin_host``
    (loopback by default): reachable by the machine's operators and a local Prometheus,
    not by the clinic network."""
    server = app[SETTINGS].server
    assert server.admin_port is not None
    # The same checks as the main port: status and metrics are for admins, health open.
    site_app = web.Application(middlewares=[auth.guard])
    site_app[auth.AUTH] = app[auth.AUTH]
    site_app.router.add_get("/metrics", app[METRICS].handler())
    site_app.router.add_get("/healthz", healthz)
    site_app.router.add_get("/readyz", _bound(app, readiness))
    site_app.router.add_get("/status.json", _bound(app, _status_json))
    site_app.router.add_get("/", _bound(app, _status_page))
    runner = web.AppRunner(site_app, access_log=None, handle_signals=False)
    await runner.setup()
    # Loopback stays plain HTTP (a local Prometheus needs no certificate for it); beyond
    # it, the viewer port's TLS when it has one.
    server_tls = app.get(SERVER_TLS)
    ssl_context = (server_tls.context if server_tls is not None
                   and not is_loopback_host(server.admin_host) else None)
    bound = app.get(ADMIN_SOCKETS)
    sites: list[web.BaseSite] = (
        [web.SockSite(runner, sock, ssl_context=ssl_context) for sock in bound] if bound
        else [web.TCPSite(runner, server.admin_host, server.admin_port,
                          ssl_context=ssl_context)])
    for site in sites:
        await site.start()
    log.info("status page and metrics on %s://%s:%d/", "https" if ssl_context else "http",
             server.admin_host, server.admin_port)
    yield
    await runner.cleanup()


async def _admin_elsewhere(request: web.Request) -> web.Response:
    return json_error(404, "not found", "the status page and metrics are served on the "
                                        "admin port (server.admin_port) only")


# --- health and readiness ----------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    """200 ``{"status": "ok"}`` while the process can answer at all."""
    return web.json_response({"status": "ok"})


async def readiness(app: web.Application) -> web.Response:
    """200 when Orthanc is reachable, else 503; JSON says which.

    A degraded cache (full, read-only, missing, an unusable index) does not make it
    503: dicomcache still serves every instance, verified, without caching it; the
    body's ``store.status`` says ``cache degraded: <cause>: …``.
    """
    store = await _store_view(app)
    upstream_ok = await app[PROBE].check(PROBE_EVERY)
    upstream = _upstream_view(app[METRICS], app[CLIENT])
    circuit_open = upstream.get("circuit", {}).get("state") == "open"
    ready = upstream_ok and not circuit_open
    body = {"ready": ready, "store": store, "upstream": upstream}
    return web.json_response(body, status=200 if ready else 503)


async def _store_view(app: web.Application) -> dict[str, Any]:
    """The store's state (:meth:`Store.status`); its health alone when the stats do not
    come (a disk that does not answer)."""
    try:
        return await asyncio.wait_for(app[STORE].status(), PROBE_TIMEOUT)
    except Exception as exc:
        state = app[STORE].sync.health.degraded
        return {"ok": False, "degraded": None if state is None else str(state.trouble),
                "status": f"cache degraded: the store does not answer ({type(exc).__name__}: "
                          f"{exc})" if state is None else state.status,
                "error": f"{type(exc).__name__}: {exc}"}


def _upstream_view(m: Metrics, client: OrthancClient) -> dict[str, Any]:
    state = {None: "unknown", True: "up", False: "down"}[m.upstream_state]
    view = {"url": client.base, "state": state, "since": m.upstream_since,
            "checked": m.upstream_checked,
            "detail": m.upstream_detail if m.upstream_state is False else "",
            # Kept once Orthanc is back: shown as past, not as a current fault.
            "last_error": None if m.upstream_error_at is None else {
                "time": m.upstream_error_at, "detail": m.upstream_detail}}
    # The circuit breaker (when the client has one): open means misses fail fast.
    breaker = getattr(client, "breaker", None)
    if breaker is not None:
        view["circuit"] = breaker.status()
    if getattr(client, "link", None) is not None:
        view["compression"] = _compression_view(client)
    return view


def _compression_view(client: OrthancClient) -> dict[str, Any]:
    """upstream.compression: what instance bodies are asked as now, and the figures
    ``auto`` decided from (``None``: not measured in the window)."""
    figures = client.link.figures()
    return {"mode": client.settings.compression, "choice": client.body_choice(),
            "bytes_per_second": figures.rate, "gzip_ratio": figures.ratio,
            "gzip_seconds_per_mib": None if figures.cost is None else figures.cost * (1 << 20),
            "break_even_bytes_per_second": link.break_even(figures),
            "bodies": len(client.link.samples())}


# --- the status data ---------------------------------------------------------------------
def _total(metric: Counter | Gauge, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels`` (``_created`` left out)."""
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _by_label(metric: Counter | Gauge, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created") and label in sample.labels:
                key = sample.labels[label]
                out[key] = out.get(key, 0.0) + sample.value
    return out


async def snapshot(app: web.Application) -> dict[str, Any]:
    """Everything the status page shows, JSON-able."""
    m = app[METRICS]
    stats = await _store_view(app)
    try:
        stats["pinned_studies"] = len(await app[STORE].pinned())
    except Exception as exc:
        stats["error"] = f"{type(exc).__name__}: {exc}"
    hits = {f: int(_total(m.cache_hits, family=f)) for f in INSTANCE_FAMILIES}
    misses = {f: int(_total(m.cache_misses, family=f)) for f in INSTANCE_FAMILIES}
    nhits, nmisses = sum(hits.values()), sum(misses.values())
    failed = {k: int(v) for k, v in _by_label(m.failed_requests, "reason").items() if v}
    integrity = {k: int(v) for k, v in _by_label(m.integrity_failures, "cause").items()}
    failures = {k: int(v) for k, v in _by_label(m.upstream_failures, "cause").items() if v}
    return {
        "version": __version__,
        "time": time.time(),
        "started": app[STARTED],
        "upstream": {**_upstream_view(m, app[CLIENT]), "failures": failures,
                     "retries": int(_total(m.upstream_retries)),
                     "fetched_bytes": int(_total(m.fetched_bytes))},
        "cache": {**stats,
                  "hits": nhits, "misses": nmisses,
                  "hit_ratio": nhits / (nhits + nmisses) if nhits + nmisses else None,
                  "by_family": {f: {"hits": hits[f], "misses": misses[f]}
                                for f in INSTANCE_FAMILIES},
                  "answers": {o: int(_total(m.answers, outcome=o)) for o in ANSWER_OUTCOMES},
                  "served_bytes": int(_total(m.served_bytes)),
                  "write_failures": int(_total(m.uncached)),
                  "last_write_failure": None if m.last_uncached is None else {
                      "time": m.last_uncached[0], "instance": m.last_uncached[1],
                      "reason": m.last_uncached[2]},
                  "coalesced": int(_total(m.coalesced)),
                  "prefetch_queue": int(_total(m.prefetch_queue)),
                  "coherence": {
                      **app[COHERENCE].status(),
                      "purged": {k: int(v) for k, v in _by_label(m.purged, "cause").items()},
                      "unconfirmed_served": int(_total(m.unconfirmed)),
                      "feed_gaps": int(_total(m.feed_gaps))}},
        "requests": {"failed": sum(failed.values()), "failed_by_reason": failed},
        "integrity": {
            "total": integrity,
            "recent": [{"time": e.time, "cause": e.cause, "instance": e.instance,
                        "reason": e.reason} for e in reversed(m.recent_integrity)],
        },
        "relay": _relay_status(app),
        "tls": app[SERVER_TLS].status() if SERVER_TLS in app else None,
        "auth": app[auth.AUTH].status(app[SETTINGS]) if auth.AUTH in app else {},
        "audit": app[AUDIT].status() if AUDIT in app else None,
    }


def _relay_status(app: web.Application) -> dict[str, Any]:
    relay = app.get(RELAY)
    if relay is None:
        return {"enabled": False}
    try:
        return {"enabled": True, **relay.status()}
    except Exception as exc:
        return {"enabled": True, "error": f"{type(exc).__name__}: {exc}"}


async def status_json(request: web.Request) -> web.Response:
    """The status page's data as JSON."""
    return await _status_json(request.app)


async def status_page(request: web.Request) -> web.Response:
    """The status page: plain HTML rendered here, no script, no external assets."""
    return await _status_page(request.app)


async def _status_json(app: web.Application) -> web.Response:
    return web.json_response(await snapshot(app), headers={"Cache-Control": "no-store"})


async def _status_page(app: web.Application) -> web.Response:
    return web.Response(text=render(await snapshot(app)), content_type="text/html",
                        headers={"Cache-Control": "no-store"})


# --- rendering ---------------------------------------------------------------------------
def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _bytes(n: float | None) -> str:
    return "-" if n is None else format_size(n)


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    stamp = datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f'<span title="{stamp}">{_e(_ago(ts, now))}</span>'


def _ago(ts: float, now: float) -> str:
    secs = max(0.0, now - ts)
    if secs < 90:
        return f"{secs:.0f} s ago"
    if secs < 5400:
        return f"{secs / 60:.0f} min ago"
    if secs < 172800:
        return f"{secs / 3600:.1f} h ago"
    return f"{secs / 86400:.1f} days ago"


def _syntax_name(uid: str | None) -> str:
    if not uid:
        return "-"
    try:
        from pydicom.uid import UID
        name = UID(uid).name
    except Exception:
        return uid
    return name if name and name != uid else uid


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], empty: str) -> str:
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{_e(empty)}</p>'
    cols = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f"<table><thead><tr>{cols}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:20px;margin:0}header span{color:#b8c0cc}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:16px;padding:16px}
section{background:#fff;border-radius:8px;padding:12px 18px;box-shadow:0 1px 2px #0002;
overflow-x:auto}#integrity,#relay{grid-column:1/-1}td code,td:first-child{white-space:nowrap}
h2{font-size:17px;margin:4px 0 10px}dl{display:grid;grid-template-columns:max-content 1fr;
gap:4px 16px;margin:0}dt{color:#5b6475}dd{margin:0}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:3px 6px;
border-bottom:1px solid #e3e6ea;vertical-align:top}th{color:#5b6475;font-weight:600}
.badge{display:inline-block;padding:1px 10px;border-radius:10px;font-weight:700;color:#fff}
.up{background:#1f8a4c}.down{background:#c0392b}.unknown,.disabled{background:#7f8896}
.bar{background:#e3e6ea;border-radius:4px;height:12px;width:100%;overflow:hidden}
.bar div{height:100%;background:#2f6fd6}.bar .warn{background:#d68a2f}.bar .crit{background:#c0392b}
.alarm{background:#c0392b;color:#fff;padding:14px 24px;font-size:17px;font-weight:700}
.muted{color:#7f8896}.bad{color:#c0392b;font-weight:600}code{font-size:12px}
"""


def render(s: dict[str, Any]) -> str:
    """The status page for a :func:`snapshot`."""
    now = s["time"]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="refresh" content="{REFRESH}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>dicomcache status</title><style>{_CSS}</style></head><body>"
        f"<header><h1>dicomcache</h1><span>version {_e(s['version'])}</span>"
        f"<span>up since {_when(s['started'], now)}</span>"
        f"<span>page refreshes every {REFRESH} s</span></header>"
        + _render_auth_warning(s.get("auth") or {})
        + _render_cache_warning(s["cache"])
        + "<main>"
        + _render_upstream(s["upstream"], now)
        + _render_tls(s.get("tls"), now)
        + _render_cache(s["cache"], s.get("requests") or {})
        + _render_integrity(s["integrity"], now)
        + _render_relay(s["relay"], now)
        + _render_audit(s.get("audit"), now)
        + "</main></body></html>\n")


def _render_auth_warning(a: dict[str, Any]) -> str:
    """A banner nobody can miss while anyone on the network is an anonymous admin."""
    if not a.get("anonymous_network"):
        return ""
    return ('<div id="auth-warning" class="alarm">WARNING: no authentication '
            "(auth.mode = \"none\" with auth.allow_anonymous_network = true): anyone who "
            "can reach this address can read patient data and administer dicomcache. "
            "Only acceptable behind a proxy that authenticates every request.</div>")


def _render_audit(a: dict[str, Any] | None, now: float) -> str:
    """One line: whether access records are being kept, and where."""
    if a is None:
        return ""
    ok = a["state"] == "ok"
    badge = (f'<span id="audit-state" class="badge {"up" if ok else "down"}">'
             f'{"OK" if ok else "FAILING"}</span>')
    line = (f"{badge} {_e(a['file'])}: {a['written']} written, {a['queued']} waiting, "
            f"{a['dropped']} dropped, {a['refused']} refused")
    if not ok:
        then = "patient data refused (required)" if a["required"] else \
            "patient data served UNAUDITED (required = false)"
        line += (f'<br><span class="bad">failing since {_when(a["failing_since"], now)}: '
                 f'{_e(a["error"])}; {then}</span>')
    syslog = a.get("syslog")
    if syslog:
        line += (f"<br>syslog {_e(syslog['target'])}: {syslog['sent']} sent, "
                 f"{syslog['queued']} waiting, {syslog['dropped']} dropped"
                 + (f' <span class="bad">{_e(syslog["error"])}</span>' if syslog["error"]
                    else ""))
    return f'<section id="audit"><h2>Audit trail</h2><p>{line}</p></section>'



def _render_upstream(u: dict[str, Any], now: float) -> str:
    state = u.get("state", "unknown")
    failures = ", ".join(f"{_e(k)} {v}" for k, v in sorted(u["failures"].items())) or "none"
    detail = _last_error(u, now)
    circuit = u.get("circuit")
    if circuit is not None:
        if circuit.get("state") == "open":
            detail += ('<dt>circuit</dt><dd><span id="circuit-state" class="badge down">OPEN'
                       "</span> misses fail fast; next probe in "
                       f"{_e(circuit.get('retry_after'))} s</dd>")
        else:
            detail += ('<dt>circuit</dt><dd><span id="circuit-state">closed</span> '
                       f"({_e(circuit.get('consecutive_failures', 0))} of "
                       f"{_e(circuit.get('threshold', '-'))} failures to open)</dd>")
    return (
        '<section id="upstream"><h2>Upstream Orthanc</h2><dl>'
        f'<dt>state</dt><dd><span id="upstream-state" class="badge {_e(state)}">'
        f"{_e(state.upper())}</span> since {_when(u.get('since'), now)}</dd>"
        f"<dt>address</dt><dd><code>{_e(u.get('url', '-'))}</code></dd>{detail}"
        f"<dt>last confirmed</dt><dd>{_when(u.get('checked'), now)}</dd>"
        f"<dt>failed attempts</dt><dd>{failures}</dd>"
        f"<dt>retries</dt><dd>{u['retries']}</dd>"
        f"<dt>downloaded</dt><dd>{_bytes(u['fetched_bytes'])} verified</dd>"
        f"{_render_compression(u.get('compression'))}"
        "</dl></section>")


def _render_compression(c: dict[str, Any] | None) -> str:
    """Instance bodies gzipped or not, and (``auto``) the link figures behind it."""
    if not c:
        return ""
    rate = c["bytes_per_second"]
    measured = (f"link ≈ {_bytes(rate)}/s ({rate * 8 / 1e6:.1f} Mbit/s) over the last "
                f"{c['bodies']} bodies" if rate is not None
                else "link not measured yet (no recent bodies): gzip, as a browser gets")
    even = c["break_even_bytes_per_second"]
    why = (f"; gzip wins below ≈ {even * 8 / 1e6:.0f} Mbit/s" if c["mode"] == "auto" and even
           else "")
    return ('<dt>instance bodies</dt><dd><span id="body-encoding">'
            f"{_e(c['choice'])}</span> (upstream.compression = {_e(c['mode'])}; "
            f"{_e(measured)}{_e(why)})</dd>")


def _last_error(u: dict[str, Any], now: float) -> str:
    """While Orthanc is down, why (in red); once it is back, the last error as past."""
    if u.get("detail"):
        return f'<dt>last error</dt><dd class="bad">{_e(u["detail"])}</dd>'
    last = u.get("last_error")
    if not last or u.get("state") != "up":
        return ""
    return ('<dt>last error</dt><dd id="upstream-last-error" class="muted">'
            f"{_when(last['time'], now)}, recovered since {_when(u.get('since'), now)}: "
            f"{_e(last['detail'])}</dd>")


def _render_tls(t: dict[str, Any] | None, now: float) -> str:
    """The viewer listener's certificate: what an operator renews, and by when."""
    if not t:
        return ('<section id="tls"><h2>HTTPS</h2><p class="muted">off: viewers connect '
                "in plain HTTP (server.tls_certificate)</p></section>")
    days = (t["not_after"] - now) / 86400
    cls = "bad" if days < 14 else ""
    return (
        '<section id="tls"><h2>HTTPS</h2><dl>'
        f"<dt>certificate</dt><dd><code>{_e(t['certificate'])}</code></dd>"
        f"<dt>subject</dt><dd>{_e(t['subject'])}</dd>"
        f"<dt>names</dt><dd>{_e(', '.join(t['names']) or '-')}</dd>"
        f"<dt>issuer</dt><dd>{_e(t['issuer'])}</dd>"
        f'<dt>valid until</dt><dd id="tls-expiry" class="{cls}">'
        f"{datetime.fromtimestamp(t['not_after'], UTC):%Y-%m-%d %H:%M} UTC "
        f"({days:.0f} days)</dd></dl></section>")


def _render_cache_warning(c: dict[str, Any]) -> str:
    """A banner while the cache is degraded: viewers are served, nothing is cached."""
    if not c.get("degraded"):
        return ""
    served = ("Images it already holds are still served from it; the others are served, "
              "verified, from Orthanc, but not cached: each viewing of them crosses the WAN"
              if c.get("serving_cached") else "Images are still served, verified, from "
              "Orthanc, but not cached: every viewing crosses the WAN")
    return (f'<div id="cache-warning" class="alarm">{_e(c["status"])}. {served}. '
            "Caching resumes by itself once this is fixed.</div>")


def _cache_state(c: dict[str, Any], now: float) -> str:
    """Whether the store caches, and the room left on its file system."""
    if c.get("degraded"):
        state = (f'<span id="cache-state" class="badge down">DEGRADED</span> since '
                 f'{_when(c.get("degraded_since"), now)}: <span class="bad">'
                 f'{_e(c["status"])}</span>')
    else:
        state = '<span id="cache-state" class="badge up">CACHING</span>'
    free, disk, min_free = c.get("free_bytes"), c.get("disk_bytes"), c.get("min_free") or 0
    low = free is not None and free < min_free
    room = (f'<dt>disk free</dt><dd id="cache-disk-free"{" class=bad" if low else ""}>'
            f"{_bytes(free)} of {_bytes(disk)} "
            f"(kept free: {_bytes(min_free) if min_free else 'no min_free guard'})</dd>")
    return f"<dt>state</dt><dd>{state}</dd>{room}"


def _render_cache(c: dict[str, Any], r: dict[str, Any]) -> str:
    state = _cache_state(c, time.time())
    if "size_bytes" not in c:
        use = f'<dt>store</dt><dd class="bad">{_e(c.get("error", "-"))}</dd>'
    else:
        frac = c["size_bytes"] / c["max_bytes"] if c["max_bytes"] else 0.0
        level = "crit" if frac >= 0.95 else "warn" if frac >= 0.85 else ""
        use = (f"<dt>use</dt><dd><span id=\"cache-use\">{_bytes(c['size_bytes'])} of "
               f"{_bytes(c['max_bytes'])} ({frac:.0%})</span>"
               f'<div class="bar"><div class="{level}" style="width:{min(frac, 1):.1%}">'
               "</div></div></dd>"
               f"<dt>instances</dt><dd>{c['entries']}</dd>"
               f"<dt>pinned studies</dt><dd>{c.get('pinned_studies', '-')}</dd>"
               f"<dt>evictions</dt><dd>{c['evictions']} since start"
               + (f" (and {c['min_free_evictions']} to keep min_free free)"
                  if c.get("min_free_evictions") else "") + "</dd>")
    return (
        '<section id="cache"><h2>Cache</h2><dl>' + state + use + _hit_ratio(c) + _failed(r)
        + f"<dt>served</dt><dd>{_bytes(c['served_bytes'])}</dd>"
        + _write_failures(c)
        + f"<dt>coalesced misses</dt><dd>{c['coalesced']}</dd>"
        f"<dt>prefetch queue</dt><dd>{c['prefetch_queue']}</dd>"
        + _coherence(c["coherence"])
        + "</dl></section>")


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}es" if what.endswith("s") else f"{n} {what}s"


def _hit_ratio(c: dict[str, Any]) -> str:
    """Instance requests only (a file, a frame, a retrieve): what the store saves the WAN.
    Metadata and searches are a line of their own."""
    ratio = "-" if c["hit_ratio"] is None else f"{c['hit_ratio']:.1%}"
    fams = ", ".join(f"{_e(f)} {v['hits']}/{v['hits'] + v['misses']}"
                     for f, v in c["by_family"].items() if v["hits"] + v["misses"])
    a = c.get("answers") or {}
    answers = (f"<dt>metadata and searches</dt><dd>{a.get('hit', 0)} from memory, "
               f"{a.get('miss', 0)} from Orthanc, {a.get('stale', 0)} stale copies served "
               "while Orthanc was away</dd>" if any(a.values()) else "")
    return (f'<dt>hit ratio</dt><dd><span id="hit-ratio">{ratio}</span> of instance requests '
            f"({_count(c['hits'], 'hit')}, {_count(c['misses'], 'miss')}"
            f"{'; ' + fams if fams else ''})</dd>" + answers)


def _failed(r: dict[str, Any]) -> str:
    """Viewer requests answered with a failure: next to the hit ratio, which counts only
    the requests that were answered."""
    total = r.get("failed", 0)
    if not total:
        return '<dt>failed requests</dt><dd><span id="failed-requests">0</span></dd>'
    why = ", ".join(f"{_e(k)} {v}" for k, v in sorted(r["failed_by_reason"].items()))
    return (f'<dt>failed requests</dt><dd><span id="failed-requests" class="bad">{total}'
            f"</span> since start ({why})</dd>")


def _coherence(h: dict[str, Any]) -> str:
    """Whether stored copies are confirmed against Orthanc, and what it took back."""
    purged = ", ".join(f"{_e(k)} {v}" for k, v in sorted(h["purged"].items()) if v) or "none"
    if h.get("unconfirmed_since") is not None:
        state = (f'<span id="coherence-state" class="bad">UNCONFIRMED</span> since '
                 f"{_when(h['unconfirmed_since'], time.time())}: stored images are served "
                 "without Orthanc confirming them (they may have been deleted or corrected "
                 f"there): {_e(h.get('unconfirmed_reason', ''))}")
    elif h["confirm_interval"]:
        state = (f'<span id="coherence-state">confirmed</span> (each series in use every '
                 f"{_e(h['confirm_interval'])} s; {h['active_series']} in use)")
    else:
        state = ('<span id="coherence-state" class="bad">off</span> (cache.confirm_interval '
                 "= 0: what Orthanc deletes stays served)")
    return (f"<dt>against Orthanc</dt><dd>{state}</dd>"
            f"<dt>purged</dt><dd>{purged}; {h['feed_gaps']} change-feed gap(s)</dd>")


def _write_failures(c: dict[str, Any]) -> str:
    """Instances the store could not keep (disk full or failing); nothing when none."""
    last = c.get("last_write_failure")
    if not c.get("write_failures") or last is None:
        return ""
    return (f'<dt>not cached</dt><dd class="bad">{c["write_failures"]} instances since start, '
            f"served uncached; last {_when(last['time'], time.time())}: "
            f"{_e(last['reason'])}</dd>")


def _render_integrity(i: dict[str, Any], now: float) -> str:
    totals = ", ".join(f"{_e(k)} {v}" for k, v in sorted(i["total"].items()) if v)
    rows = ([_when(e["time"], now), f'<span class="bad">{_e(e["cause"])}</span>',
             f"<code>{_e(e['instance'])}</code>", _e(e["reason"])] for e in i["recent"])
    return (
        '<section id="integrity"><h2>Integrity failures</h2>'
        "<p>Bodies from Orthanc rejected by verification: each one a broken image "
        "or a viewer's &ldquo;buffer overrun&rdquo; prevented.</p>"
        f"<p>Since start: <b>{totals or 'none'}</b></p>"
        + _table(("when", "cause", "what", "detail"), rows, "No integrity failures recorded.")
        + "</section>")


def _render_intake(intake: dict[str, Any]) -> str:
    """Whether the relay takes C-STOREs (the spool's room: relay.min_free, a full disk)."""
    if not intake:
        return ""
    free = intake.get("free_bytes")
    room = (f"{_bytes(free)} free" if free is not None else "free space unknown") + (
        f", min_free {_bytes(intake.get('min_free', 0))}")
    if intake.get("accepting"):
        return f'<dt>intake</dt><dd id="relay-intake">taking C-STOREs ({room})</dd>'
    return ('<dt>intake</dt><dd id="relay-intake"><span class="badge down">REFUSING</span> '
            f'<span class="bad">new C-STOREs answered 0xA700: {_e(intake.get("refusing"))}'
            f"</span> ({room})</dd>")


def _destination_error(d: dict[str, Any], now: float) -> str:
    """A destination's last error: red while current, muted once it delivered since."""
    if not d.get("last_error"):
        return "-"
    when = _when(d.get("last_error_time"), now)
    success, failed_at = d.get("last_success"), d.get("last_error_time") or 0.0
    if success is not None and success > failed_at:
        return f'<span class="muted">{_e(d["last_error"])}</span> {when}, recovered'
    return f'<span class="bad">{_e(d["last_error"])}</span> {when}'


def _render_relay(r: dict[str, Any], now: float) -> str:
    if not r.get("enabled"):
        return ('<section id="relay"><h2>DIMSE relay</h2>'
                '<p><span id="relay-state" class="badge disabled">DISABLED</span></p>'
                "</section>")
    if "error" in r:
        return ('<section id="relay"><h2>DIMSE relay</h2>'
                f'<p class="bad">{_e(r["error"])}</p></section>')
    busy = {name: f.get("busy") for name, f in r.get("forwarders", {}).items()}
    rows = []
    for name, d in r.get("destinations", {}).items():
        learned = d.get("learned_syntaxes") or {}
        # learned_syntaxes: SOP class UID -> transfer syntaxes the peer accepted for it
        syntaxes = "".join(
            f"<li>{_e(_syntax_name(k))}: "
            + ", ".join(_e(_syntax_name(str(t))) for t in (v if isinstance(v, list) else [v]))
            + "</li>" for k, v in sorted(learned.items()))
        error = _destination_error(d, now)
        rows.append([
            f"<b>{_e(name)}</b>{' (sending)' if busy.get(name) else ''}",
            str(d.get("queue_depth", 0)),
            "-" if d.get("oldest_age_seconds") is None else f"{d['oldest_age_seconds']:.0f} s",
            _e(d.get("configured_strategy") or "-"),
            _e(d.get("learned_strategy") or "-")
            + (f"<details><summary>accepted by SOP class ({len(learned)})</summary>"
               f"<ul>{syntaxes}</ul></details>" if learned else ""),
            str(d.get("quarantined", 0)),
            _when(d.get("last_success"), now),
            error,
        ])
    return (
        '<section id="relay"><h2>DIMSE relay</h2><dl>'
        '<dt>state</dt><dd><span id="relay-state" class="badge up">RUNNING</span> '
        f"{_e(r.get('ae_title', ''))} on {_e(r.get('listening', ''))}</dd>"
        + _render_intake(r.get("intake") or {})
        + ('<dt>draining</dt><dd id="relay-draining"><span class="badge down">DRAINING'
           "</span> new associations rejected until the relay restarts (`dicomcache relay "
           "drain`; `relay drain --cancel` ends it)</dd>" if r.get("draining") else "")
        + f"<dt>inbound associations</dt><dd>{r.get('active_inbound_associations', 0)}</dd>"
        f"<dt>spooled</dt><dd>{r.get('spooled_instances', 0)} instances "
        f"({_bytes(r.get('spooled_bytes', 0))})</dd>"
        f"<dt>quarantined files</dt><dd>{r.get('quarantine_files', 0)}</dd></dl>"
        + _table(("destination", "queue", "oldest", "strategy", "learned", "quarantined",
                  "last success", "last error"), rows, "No destinations configured.")
        + "</section>")
