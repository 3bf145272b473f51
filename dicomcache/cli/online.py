"""``check-config --online``: does the world match the configuration file?

The offline check reads the file; this one asks the things the file names.
Each check is one :class:`Finding` naming the setting (or the Orthanc option)
to change, so an operator installing a clinic sees every problem in one run
instead of one per restart:

* ``upstream.url`` resolves and Orthanc answers ``/system`` with dicomcache's
  credentials (refused credentials, an untrusted certificate, a wrong port or a
  proxy that is not Orthanc each say so);
* the DICOMweb plugin is loaded and answers under ``/dicom-web/`` (viewers'
  QIDO-RS, WADO-RS and frames go there);
* ``/changes`` is readable (coherence follows it to drop what the hospital
  deleted or corrected);
* Orthanc stores MD5s of its files (``StoreMD5ForAttachments``): without them a
  body is verified only by its length and a full parse;
* every port ``serve`` and the relay listen on can be opened now;
* every relay destination answers a C-ECHO from our AE title.

Nothing is written anywhere; Orthanc is asked only cheap GETs (and one
``/tools/find`` for a single instance).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dicomcache.cli import startup
from dicomcache.config import DestinationSettings, RelaySettings, Settings, UpstreamSettings
from dicomcache.errors import Cause, NotFoundUpstream, UpstreamError
from dicomcache.metrics import Metrics
from dicomcache.upstream.client import OrthancClient

#: Exit status when the file is valid but what it names is not ready.
NOT_READY = 1
#: At most this long for each network check (the configured timeouts may be minutes).
CHECK_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Finding:
    """One online check: ``key`` is the setting (or Orthanc option) it is about."""

    key: str
    ok: bool
    message: str


def failed(findings: list[Finding]) -> bool:
    return any(not f.ok for f in findings)


def run_checks(settings: Settings) -> list[Finding]:
    """Every online check, in the order an operator fixes them."""
    found = asyncio.run(upstream_findings(settings.upstream))
    found += listen_findings(settings)
    if settings.relay.enabled:
        found += relay_findings(settings.relay)
    return found


# --- Orthanc ---------------------------------------------------------------------------
async def upstream_findings(us: UpstreamSettings) -> list[Finding]:
    """Orthanc reachable, dicomcache's credentials accepted, DICOMweb, changes, MD5s."""
    if us.url is None:
        return [Finding("upstream.url", False, "not set")]
    host = urlsplit(us.url).hostname or ""
    resolved = await _resolves(host)
    if isinstance(resolved, Finding):
        return [resolved]
    quick = dataclasses.replace(us, retries=0, connect_timeout=min(us.connect_timeout,
                                                                   CHECK_TIMEOUT),
                                read_timeout=min(us.read_timeout, CHECK_TIMEOUT))
    client = await OrthancClient.create(quick, Metrics())
    try:
        system = await _ask(client, "/system", dict)
        if isinstance(system, Finding):
            return [system]
        version = system.get("Version")
        if not isinstance(version, str):
            return [Finding("upstream.url", False, f"{us.url}/system answered JSON without "
                            "Orthanc's Version: is this Orthanc's root URL?")]
        found = [Finding("upstream.url", True, f"Orthanc {version} "
                         f"({system.get('Name', '?')}) at {us.url} ({resolved}) accepts "
                         f"dicomcache's credentials")]
        found.append(await _dicomweb(client))
        found.append(await _changes(client))
        found.append(await _md5(client))
        return found
    finally:
        await client.close()


async def _resolves(host: str) -> str | Finding:
    """The addresses ``host`` resolves to, or the finding that it does not."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            infos = await loop.getaddrinfo(host, None)
    except (OSError, TimeoutError) as exc:
        why = getattr(exc, "strerror", None) or "no answer in time"
        return Finding("upstream.url", False, f"host {host!r} does not resolve ({why})")
    return ", ".join(dict.fromkeys(str(i[4][0]) for i in infos))


async def _ask(client: OrthancClient, path: str, expect: type, *,
               method: str = "GET", body: bytes | None = None) -> Any:
    """One JSON answer (an ``expect``), or the :class:`Finding` naming the setting that
    explains its failure."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT * 2):
            return await client.get_json(path, method=method, body=body, kind="probe",
                                         retry=False, expect=expect)
    except NotFoundUpstream as exc:
        return Finding("upstream.url", False, f"{method} {path}: Orthanc answered "
                       f"{exc.status}: is upstream.url Orthanc's root URL?")
    except UpstreamError as exc:
        return Finding(_key_of(exc.cause), False, exc.reason)
    except TimeoutError:
        return Finding("upstream.url", False, f"{method} {path}: no answer in time")


def _key_of(cause: Cause) -> str:
    """The setting to look at for a failure of this cause."""
    if cause is Cause.AUTH:
        return "upstream.username"
    if cause is Cause.TLS:
        return "upstream.ca_file"
    return "upstream.url"


async def _dicomweb(client: OrthancClient) -> Finding:
    key = "Orthanc DICOMweb plugin"
    plugins = await _ask(client, "/plugins", list)
    if isinstance(plugins, Finding):
        return dataclasses.replace(plugins, key=key)
    if "dicom-web" not in plugins:
        return Finding(key, False, "not loaded (Orthanc's plugins: "
                       f"{', '.join(map(str, plugins)) or 'none'}): install orthanc-dicomweb "
                       "and list it in Orthanc's \"Plugins\"; viewers' QIDO-RS, WADO-RS "
                       "and frames need it")
    answer = await _ask(client, "/dicom-web/studies?limit=1", list)
    if isinstance(answer, Finding):
        return Finding(key, False, "loaded, but /dicom-web/studies does not answer a "
                       f"study search ({answer.message}): set Orthanc's DicomWeb.Root to "
                       "\"/dicom-web/\" and DicomWeb.Enable to true")
    return Finding(key, True, "loaded; /dicom-web/ answers searches")


async def _changes(client: OrthancClient) -> Finding:
    key = "Orthanc /changes"
    found = await _ask(client, "/changes?limit=1", dict)
    if isinstance(found, Finding):
        return dataclasses.replace(found, key=key, message=f"{found.message}: coherence "
                                   "cannot follow deletions and corrections")
    if not isinstance(found.get("Changes"), list):
        return Finding(key, False, "answered without a Changes list: coherence cannot "
                       "follow deletions and corrections")
    return Finding(key, True, "readable (deletions and corrections are followed)")


async def _md5(client: OrthancClient) -> Finding:
    key = "Orthanc StoreMD5ForAttachments"
    query = json.dumps({"Level": "Instance", "Query": {}, "Limit": 1}).encode()
    some = await _ask(client, "/tools/find", list, method="POST", body=query)
    if isinstance(some, Finding):
        return dataclasses.replace(some, key=key)
    if not some:
        return Finding(key, True, "cannot tell yet: Orthanc holds no instance")
    oid = str(some[0])
    try:
        async with asyncio.timeout(CHECK_TIMEOUT * 2):
            md5 = await client.instance_md5(oid)
    except (UpstreamError, TimeoutError) as exc:
        return Finding(key, False, f"the MD5 of instance {oid} could not be read ({exc})")
    if md5 is None:
        return Finding(key, False, f"instance {oid} was stored without an MD5: turn "
                       "StoreMD5ForAttachments on in Orthanc (its default); without it "
                       "dicomcache can verify bodies only by length and a full parse")
    return Finding(key, True, "on (bodies are checked against Orthanc's MD5)")


# --- this machine ----------------------------------------------------------------------
def listen_findings(settings: Settings) -> list[Finding]:
    """Every port ``serve`` (and the relay) would listen on, opened and closed again."""
    found: list[Finding] = []
    try:
        startup.bind_all(settings).close()
        found.append(Finding("server.port", True, f"{settings.server.host}:"
                             f"{settings.server.port} (and the other HTTP ports) can be "
                             "opened"))
    except startup.ListenError as exc:
        found.append(Finding(exc.key, False, f"{exc} (expected while dicomcache runs)"))
    rs = settings.relay
    if rs.enabled:
        try:
            for sock in startup.bind("relay.port", rs.host, rs.port):
                sock.close()
            found.append(Finding("relay.port", True, f"{rs.host}:{rs.port} can be opened"))
        except startup.ListenError as exc:
            found.append(Finding(exc.key, False, f"{exc} (expected while dicomcache runs)"))
    return found


# --- relay destinations ----------------------------------------------------------------
def relay_findings(rs: RelaySettings) -> list[Finding]:
    """A C-ECHO to every destination, together (one thread each: a peer that is down
    costs its timeout once, not once per destination)."""
    if not rs.destinations:
        return [Finding("relay.destinations", False, "none configured: what modalities "
                        "send is kept in the spool and never forwarded")]
    with ThreadPoolExecutor(max_workers=min(len(rs.destinations), 8)) as pool:
        return list(pool.map(lambda d: _echo(rs, d), rs.destinations))


def _echo(rs: RelaySettings, dest: DestinationSettings) -> Finding:
    from dicomcache.relay.scu import StoreSCU  # pynetdicom: only when the relay is on

    key = f"relay.destinations[{dest.name}]"
    scu = StoreSCU(rs.ae_title, dest, timeout=min(rs.timeout, CHECK_TIMEOUT),
                   max_pdu=rs.max_pdu)
    started = time.monotonic()
    problem = scu.echo()
    if problem is not None:
        return Finding(key, False, f"{scu.peer}: {problem}")
    return Finding(key, True, f"{scu.peer} answered C-ECHO from {rs.ae_title} in "
                   f"{(time.monotonic() - started) * 1000:.0f} ms")
