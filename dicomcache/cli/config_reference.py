"""``dicomcache config-reference``: every configuration key as Markdown.

Each key's default, unit, when a change takes effect and one line of meaning;
``docs/configuration.md`` is this command's output.  The meanings are written
here, once; the keys and the defaults come from :mod:`dicomcache.config` (an
empty file parsed: what a key left out means), never copied.
``tests/cli/test_config_reference.py`` fails when a key of the settings has no
line here, a line here names no key the parser accepts, or the page in docs/
is not what this command prints.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomcache.config import PrewarmRule, Settings, from_dict
from dicomcache.http.auth import USERS_POLL

#: Every key: the configuration file is read once, when the process starts.
RESTART = "restart"
#: Certificate files renewed in place (the key still names the same file).
TLS_FILES = "restart; renewed files: SIGHUP"


@dataclass(frozen=True, slots=True)
class Key:
    """What one key means; its default is read from the settings."""

    meaning: str
    #: ``seconds``, ``size`` (a string such as "50GiB" or "500MB"), ``bytes``, …
    unit: str = ""
    #: When a change takes effect (:data:`RESTART` unless part of it is re-read live).
    applies: str = RESTART
    #: What leaving the key out means, where the parsed value alone would mislead.
    default: str | None = None


@dataclass(frozen=True, slots=True)
class Section:
    """One TOML table (``[server]``) or array of tables (``[[relay.destinations]]``)."""

    about: str
    #: The operator page that explains it (relative to docs/).
    see: str
    keys: dict[str, Key]
    array: bool = False


#: Keys the file may hold that are not a field of the settings (they fill one in).
TOML_ONLY = {"upstream.password_file"}
#: Settings fields that are sections of their own here (arrays of tables).
SUBTABLES = {"relay.destinations", "changes.prewarm"}

SECTIONS: dict[str, Section] = {
    "server": Section(
        "Where viewers connect: address, port, HTTPS, logging.", "security.md", {
            "host": Key("Address viewers connect to; \"0.0.0.0\" for the clinic LAN "
                        "(then with authentication, see `[auth]`)."),
            "port": Key("Port for viewers (HTTP, or HTTPS with `tls_certificate`).", "port"),
            "admin_port": Key("Serve the status page, status JSON and `/metrics` on this port "
                              "of `admin_host` instead of the viewer port (where they then "
                              "answer 404).", "port", default="not set: on the viewer port"),
            "admin_host": Key("Address of `admin_port` (loopback: this machine's operators "
                              "and a local Prometheus only)."),
            "allowed_hosts": Key("`Host:` names viewers may use; others get 421 (DNS "
                                 "rebinding). Empty: the listen address, this machine's names, "
                                 "`localhost` and loopback."),
            "shutdown_timeout": Key("Time in-flight requests get on SIGTERM before they are "
                                    "cancelled.", "seconds"),
            "send_timeout": Key("Time a viewer may read nothing of a relayed answer before "
                                "the connection is closed.", "seconds"),
            "log_format": Key("`\"plain\"` or `\"json\"` (one JSON object per line)."),
            "log_level": Key("DEBUG, INFO, WARNING or ERROR."),
            "tls_certificate": Key("PEM chain (this server's certificate first, then the "
                                   "intermediates): the viewer port speaks HTTPS only.",
                                   applies=TLS_FILES),
            "tls_key": Key("PEM private key of `tls_certificate`, unencrypted, readable by "
                           "the service only (`root:dicomcache` 0640).", applies=TLS_FILES),
            "http_redirect_port": Key("With TLS: a plain-HTTP port answering every request "
                                      "with a 308 to the same path over HTTPS.", "port"),
            "max_requests_per_client": Key("Requests one client (an address, an IPv6 /64, or "
                                           "the client a trusted proxy names) may have in "
                                           "progress; more wait their turn, up to 8 times as "
                                           "many, beyond that 429. 0: no limit.", "count"),
            "client_rate": Key("Requests per second one client may send on average "
                               "(bursts up to `client_burst`); beyond that 429 with "
                               "`Retry-After`. 0: no limit.", "requests/s"),
            "client_burst": Key("Requests one client may send at once before `client_rate` "
                                "applies (OHIF opening a 1,000-slice series sends about "
                                "1,000).", "count"),
            "max_connections_per_client": Key(
                "Connections one client (an address or an IPv6 /64) may hold open on the "
                "viewer port; beyond it its longest idle one is closed (or the new one, when "
                "none is idle). Proxies in `[audit] trusted_proxies` are exempt. Raise it when "
                "many workstations share one address (NAT). 0: no limit.", "count"),
        }),
    "upstream": Section(
        "The hospital's Orthanc, and how dicomcache talks to it.", "operations.md", {
            "url": Key("Orthanc's base URL, e.g. `http://orthanc.example.org:8042`; https is "
                       "verified.", default="required (only `serve` without `--config` runs "
                       "without it, against a demo Orthanc)"),
            "username": Key("HTTP basic user dicomcache uses towards Orthanc (viewers never "
                            "see it)."),
            "password": Key("Its password; prefer `password_file`."),
            "password_file": Key("File holding only the password, readable by the service "
                                 "only (`root:dicomcache` 0640), relative to the config "
                                 "file."),
            "connect_timeout": Key("Time to open a connection to Orthanc.", "seconds"),
            "read_timeout": Key("Silence tolerated while reading an answer.", "seconds"),
            "retries": Key("Attempts after the first (exponential backoff with jitter); "
                           "0 to 20.", "count"),
            "backoff_base": Key("Wait before the first retry (doubles, jittered).", "seconds"),
            "backoff_max": Key("Longest single backoff wait, also on an honoured "
                               "`Retry-After`.", "seconds"),
            "max_connections": Key("Connection pool towards Orthanc (at least 2).", "count"),
            "read_through_connections": Key(
                "Of `max_connections`, what the read-through (Orthanc paths answered as "
                "Orthanc sends them) may hold; viewers' misses and metadata keep the rest.",
                "count", default="half of `max_connections`"),
            "breaker_failures": Key("Requests failing on every attempt (link down) that open "
                                    "the circuit breaker: misses then get 503 at once; 0 "
                                    "disables it.", "count"),
            "breaker_probe_interval": Key("While the circuit is open, `GET /system` is probed "
                                          "this often.", "seconds"),
            "compression": Key("Ask Orthanc for gzip: `\"none\"`, `\"json\"` (listings and "
                               "lookups), `\"all\"` (instances too; pays only on links "
                               "slower than Orthanc compresses) or `\"auto\"` (JSON always, "
                               "instances when the link, measured from recent downloads, is "
                               "slower than gzip's break-even)."),
            "ca_file": Key("PEM bundle of the CA(s) an https Orthanc's certificate must "
                           "chain to.", default="not set: the system's CAs"),
            "read_through_buffer": Key("Of one read-through answer, what is kept in memory "
                                       "while its viewer reads slower than Orthanc sends; "
                                       "beyond it, a temp file.", "size"),
            "read_through_temp": Key("Temp-file bytes all read-through answers may hold "
                                     "together (in the cache directory's `tmp/`): Orthanc's "
                                     "connection is released once its answer is buffered; "
                                     "0: never spill.", "size"),
            "frames_transfer_syntax": Key("Opt-in: a viewer's frames of an instance not "
                                          "cached yet, asked in any syntax "
                                          "(`transfer-syntax=*`, as OHIF asks), are fetched "
                                          "from Orthanc transcoded to this lossless syntax "
                                          "(`\"1.2.840.10008.1.2.4.80\"`, JPEG-LS Lossless: "
                                          "the one Orthanc 1.10 makes); the cached original "
                                          "serves everything else.",
                                          default="`\"\"`: off"),
            "warm_connections": Key("Connections to Orthanc opened ahead (a `GET /system` "
                                    "each, at most once a second) when a viewer searches or "
                                    "opens a series, so the metadata and frames that follow "
                                    "do not each wait for a new connection (one round trip, "
                                    "two over TLS); 0: off.", "count"),
        }),
    "cache": Section(
        "The verified store on local disk.", "integrity.md", {
            "directory": Key("Verified instances and their index; a local disk, owned by the "
                             "service user."),
            "max_size": Key("Bound on disk use; least recently used entries are evicted.",
                            "size"),
            "scrub_period": Key("One background pass re-checking every stored file's MD5 "
                                "takes this long; 0: off, else at least 60.", "seconds"),
            "confirm_interval": Key("A stored series is served while Orthanc confirmed its "
                                    "instance list within twice this; 0: never confirm.",
                                    "seconds"),
            "revalidate_after": Key("An entry's MD5 is compared with Orthanc's again after "
                                    "this long; 0: never.", "seconds"),
            "min_free": Key("Space left free on the cache's file system (as nginx's "
                            "`min_free`): below it the least recently used entries are evicted "
                            "(pinned ones never), or new images are served uncached (\"cache "
                            "degraded\"); 0: no guard.", "size"),
            "stream_above": Key("Instances larger than this are written to disk as they "
                                "arrive (hashed on the way, verified from the file), never "
                                "held whole in memory.", "size"),
        }),
    "access": Section(
        "What is read through to Orthanc beyond the built-in allow-list.", "security.md", {
            "allow": Key("`\"METHOD /path\"` rules (`*` globs) opening endpoints closed by "
                         "default, e.g. `\"POST /tools/find\"`."),
        }),
    "relay": Section(
        "The DIMSE relay: a C-STORE SCP that spools and forwards to the PACS.", "relay.md", {
            "enabled": Key("Run the relay inside `dicomcache serve` (`dicomcache relay run` "
                           "runs it alone)."),
            "ae_title": Key("Our AE title (modalities send to it)."),
            "host": Key("Listen address; \"0.0.0.0\" for modalities on the LAN."),
            "port": Key("DICOM port.", "port"),
            "spool_directory": Key("Received instances wait here until delivered: data, not "
                                   "a cache (back it up, never delete it)."),
            "allowed_calling_ae_titles": Key("Only these calling AE titles may send; empty: "
                                             "any."),
            "allowed_hosts": Key("Only these addresses or networks (\"10.1.0.0/16\") may "
                                 "connect; empty: any."),
            "retention": Key("Keep delivered instances this long; 0: delete once delivered "
                             "everywhere.", "seconds"),
            "retry_backoff_base": Key("Wait before the first re-delivery attempt (doubles, "
                                      "jittered).", "seconds"),
            "retry_backoff_max": Key("Longest wait between re-delivery attempts.", "seconds"),
            "max_pdu": Key("Largest PDU we receive; 0: unlimited, else 4096 to 16777216.",
                           "bytes"),
            "timeout": Key("ACSE, DIMSE and network timeout of every association.",
                           "seconds"),
            "max_inbound_associations": Key("Simultaneous modalities; more are rejected "
                                            "(\"local limit exceeded\").", "count"),
            "batch_size": Key("Most instances of one study sent in one association.",
                              "count"),
            "max_instance_retries": Key("A PACS refusing one instance this often (0xA7xx) "
                                        "gets it quarantined; connection failures never count.",
                                        "count"),
            "accelerate": Key("Install the relay's speed-ups for pynetdicom at start; false: "
                              "pynetdicom as published (same behaviour, slower)."),
            "tls_certificate": Key("DICOM TLS on the SCP: our PEM chain, ours first.",
                                   applies=TLS_FILES),
            "tls_key": Key("Its PEM private key, unencrypted, readable by the service only "
                           "(`root:dicomcache` 0640).", applies=TLS_FILES),
            "tls_ca_file": Key("Modalities' certificates are verified against this PEM "
                               "bundle.", applies="restart; renewed file: SIGHUP"),
            "tls_require_client_certificate": Key("With `tls_ca_file`: a modality must "
                                                  "present a certificate (false: checked "
                                                  "only when it presents one)."),
            "min_free": Key("C-STOREs are refused (0xA700) when less than this would stay "
                            "free on the spool's file system; 0: off.", "size"),
            "max_associations_per_host": Key("Simultaneous inbound associations from one "
                                             "address; more are rejected (\"local limit "
                                             "exceeded\").", "count"),
            "forward_idle_release": Key("A forwarder keeps its association with a PACS open "
                                        "this long after a batch, for the next one (at "
                                        "most half the `timeout`); 0: released after every "
                                        "batch.", "seconds"),
        }),
    "relay.destinations": Section(
        "One table per PACS the relay forwards to.", "relay.md", {
            "name": Key("A name for logs, metrics and `dicomcache relay status` (letters, "
                        "digits, `.`, `_`, `-`)."),
            "remote_ae_title": Key("The PACS's AE title."),
            "remote_host": Key("The PACS's address."),
            "remote_port": Key("The PACS's DICOM port.", "port"),
            "transfer_syntax_strategy": Key("`universal`, `conservative`, `standard`, "
                                            "`compression` or `extended`: which syntaxes are "
                                            "proposed."),
            "max_association_retries": Key("Associations tried per delivery along the fallback "
                                           "sequence (a widening to `compression` or "
                                           "`extended` after a peer answers 'transfer "
                                           "syntaxes not supported' is one of them); 1 to 10.",
                                           "count"),
            "allow_lossy_recompression": Key("Only with `extended`: may re-encode to a lossy "
                                             "syntax."),
            "tls": Key("DICOM TLS towards this PACS, its certificate verified."),
            "tls_ca_file": Key("CA bundle the PACS's certificate must chain to.",
                               applies="restart; renewed file: next association",
                               default="not set: the system's CAs"),
            "tls_certificate": Key("Our certificate, when the PACS asks for one.",
                                   applies="restart; renewed files: next association"),
            "tls_key": Key("Its private key.", applies="restart; renewed files: next "
                                                       "association"),
            "tls_server_name": Key("The name in the PACS's certificate.",
                                   default="not set: `remote_host`"),
        }, array=True),
    "prefetch": Section(
        "Fetching the rest of a study ahead of the viewer.", "wan.md", {
            "mode": Key("What a first touch fetches ahead: `\"off\"`, `\"series\"` or "
                        "`\"study\"` (the series, then the rest of the study)."),
            "parallel": Key("Downloads in flight for prefetch (viewers' own never wait); "
                            "1 to 64.", "count"),
            "max_fraction": Key("Stop before the studies being viewed fill this share of "
                                "`cache.max_size`.", "fraction"),
            "active_seconds": Key("A touched study counts as being viewed this long.",
                                  "seconds"),
            "max_queued": Key("Studies waiting for prefetch at most (older touches are "
                              "dropped).", "count"),
            "max_studies_per_principal": Key("Distinct studies one user (or client address) "
                                             "may start prefetching per `principal_window`.",
                                             "count"),
            "principal_window": Key("The window of `max_studies_per_principal`.", "seconds"),
        }),
    "changes": Section(
        "Following Orthanc's change feed (`/changes`).", "coherence.md", {
            "enabled": Key("Follow `/changes`: replaced instances dropped at once, changed "
                           "studies revalidated, new studies pre-warmed."),
            "poll_interval": Key("Time between polls (at once again while Orthanc has more).",
                                 "seconds"),
            "batch": Key("Changes read per request; 1 to 10000.", "count"),
            "cursor_file": Key("Where the last change seen is kept across restarts.",
                               default="not set: `changes-cursor.json` in "
                               "`cache.directory`"),
        }),
    "changes.prewarm": Section(
        "Rules: a new stable study matching every field of one is fetched whole.",
        "coherence.md", {
            "modality": Key("A series of the study has this modality, e.g. `\"CT\"`."),
            "label": Key("The study carries this Orthanc label (Orthanc 1.12 or later)."),
            "tag": Key("A DICOM tag by name, e.g. `\"InstitutionName\"` (with `value`)."),
            "value": Key("The value `tag` must have."),
        }, array=True),
    "dicomweb": Section(
        "DICOMweb caching policy for OHIF-style viewers.", "dicomweb.md", {
            "metadata_fresh": Key("Series and study metadata (and instance lists) are served "
                                  "without asking Orthanc this long.", "seconds"),
            "qido_fresh": Key("A QIDO-RS search answer is reused this long.", "seconds"),
            "rendered_fresh": Key("Series and study rendered answers are reused this long.",
                                  "seconds"),
            "stale_if_error": Key("While Orthanc is unreachable, copies are served this long "
                                  "past fresh (marked `Warning: 110`); 0: never.", "seconds"),
            "memory_size": Key("Memory for cached metadata, searches and rendered answers; "
                               "also the bound of their disk copies.", "size"),
            "retrieve_concurrency": Key("Instances read or downloaded ahead while a series "
                                        "or study retrieve streams; 1 to 64.", "count"),
            "public_url": Key("Base of the links written into metadata, e.g. "
                              "`https://dicomcache.clinic.example:8443`.",
                              default="not set: from the viewer's `Host`/`Forwarded`"),
        }),
    "cors": Section(
        "Viewers served from another origin (OHIF on its own host name).", "dicomweb.md", {
            "allowed_origins": Key("Origins allowed to read answers, e.g. "
                                   "`[\"https://ohif.clinic.example\"]`; `\"*\"` any web page "
                                   "(avoid); empty: none."),
            "max_age": Key("A browser may keep a preflight answer this long; 0 to 86400.",
                           "seconds"),
            "allow_credentials": Key("Browser-managed credentials (cookies, the Basic "
                                     "prompt); never with `\"*\"`. Bearer tokens do not need "
                                     "it."),
        }),
    "auth": Section(
        "Who may use the HTTP side: roles `viewer` and `admin`.", "security.md", {
            "mode": Key("`\"none\"` (loopback only), `\"basic\"` (the users file) or "
                        "`\"bearer\"` (OIDC access tokens)."),
            "allow_anonymous_network": Key("Let `\"none\"` listen beyond loopback: only "
                                           "behind a proxy that authenticates every request."),
            "realm": Key("The realm of `WWW-Authenticate` challenges."),
            "users_file": Key("`basic`: one user per line, managed with `dicomcache users`.",
                              applies=f"restart; its contents: within {USERS_POLL:g} s, or "
                                      "SIGHUP"),
            "issuer": Key("`bearer`: the tokens' `iss`, exactly; the base of OIDC "
                          "discovery."),
            "audience": Key("`bearer`: the `aud` tokens must carry."),
            "jwks_url": Key("`bearer`: where the signing keys are.",
                            default="not set: OIDC discovery from `issuer`"),
            "algorithms": Key("`bearer`: accepted signature algorithms (public-key only)."),
            "leeway": Key("Clock skew tolerated for `exp`, `nbf`, `iat`; 0 to 300.",
                          "seconds"),
            "roles_claim": Key("Dotted path of the claim holding the roles."),
            "viewer_roles": Key("Claim values giving the viewer role (`\"*\"`: any token for "
                                "the audience)."),
            "admin_roles": Key("Claim values giving the admin role."),
            "name_claim": Key("The claim naming the user in logs, audit and per-user "
                              "bounds."),
            "max_failures": Key("Failed authentications from one address before it waits "
                                "(1 s, doubling).", "count"),
            "max_delay": Key("Longest wait imposed on an address after repeated failures.",
                             "seconds"),
            "authorization_url": Key("Per-study decisions by a service speaking the Orthanc "
                                     "authorization plugin's protocol.",
                                     default="not set: the role decides alone"),
            "authorization_timeout": Key("No answer within this is a refusal.", "seconds"),
            "authorization_server_id": Key("`server-id` sent to the authorization service."),
        }),
    "audit": Section(
        "The audit trail of every access to patient data.", "security.md", {
            "file": Key("JSON lines appended by every dicomcache process of this host; mode "
                        "0600."),
            "required": Key("Fail closed: patient data is refused while records cannot be "
                            "written; false: served anyway, the failure alerted."),
            "max_file_size": Key("The current file is rotated before it grows past this.",
                                 "size"),
            "keep": Key("Rotated files kept (the oldest deleted beyond); 0: all.", "count"),
            "max_queue": Key("Records waiting in memory at most; more are dropped and "
                             "counted.", "count"),
            "trusted_proxies": Key("Reverse proxies whose `X-Forwarded-For` names the "
                                   "client."),
            "syslog": Key("Also send DICOM audit messages (PS3.15 A.5) to "
                          "`udp://`, `tcp://` or `tls://host[:port]`."),
            "syslog_ca_file": Key("`tls://`: CA bundle the collector's certificate is checked "
                                  "against.", default="not set: the system's CAs"),
            "syslog_cert_file": Key("`tls://`: our client certificate, if the collector asks "
                                    "for one."),
            "syslog_key_file": Key("`tls://`: its private key."),
        }),
}


# --- what the settings say -----------------------------------------------------------------
def _minimal_destination() -> dict[str, str]:
    return {"name": "PACS", "remote_ae_title": "PACS", "remote_host": "pacs"}


def defaults() -> dict[str, Any]:
    """Each section's settings object as an empty file gives it (what a key left out means)."""
    empty = from_dict({})
    out: dict[str, Any] = {f.name: getattr(empty, f.name) for f in dataclasses.fields(Settings)
                           if f.name != "source"}
    dest = from_dict({"relay": {"destinations": [_minimal_destination()]}})
    out["relay.destinations"] = dest.relay.destinations[0]
    out["changes.prewarm"] = PrewarmRule()
    return out


def settings_keys() -> dict[str, set[str]]:
    """Every key the settings have, by section (fields, less sub-tables, plus TOML-only)."""
    out: dict[str, set[str]] = {}
    for section, value in defaults().items():
        names = {f.name for f in dataclasses.fields(value)}
        out[section] = {n for n in names if f"{section}.{n}" not in SUBTABLES}
    for dotted in TOML_ONLY:
        section, key = dotted.rsplit(".", 1)
        out[section].add(key)
    return out


# --- rendering -------------------------------------------------------------------------------
def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _size(n: int) -> str:
    """An exact size literal, in the largest binary unit that divides it."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n and n % (1 << shift) == 0:
            return f'"{n >> shift}{unit}"'
    return str(n)


_SPANS = ((86400, "d"), (3600, "h"), (60, "min"))


def _span(value: float) -> str:
    """``" (7 d)"`` after a number of seconds that is a whole number of days, hours…"""
    for span, unit in _SPANS:
        if value >= span and value % span == 0:
            return f" ({value / span:g} {unit})"
    return ""


def _literal(value: Any, unit: str) -> str:
    """A default as it would be written in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and unit == "size":
        return _size(int(value))
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    raise TypeError(f"no TOML literal for {value!r}")


def default_text(section: str, key: str, doc: Key, values: Any) -> str:
    """The default column: the parsed value of an empty file, as the file would write it."""
    required = section == "relay.destinations" and key in _minimal_destination()
    if required:
        return "required"
    value = getattr(values, key, None)
    if doc.default is not None:
        return doc.default
    if value is None:
        return "not set"
    hint = _span(value) if doc.unit == "seconds" else ""
    return f"`{_literal(value, doc.unit)}`{hint}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """docs/configuration.md."""
    values = defaults()
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `dicomcache config-reference` from the settings themselves "
        "(dicomcache/cli/config_reference.py); do not edit by hand: a test compares. -->",
        "",
        "dicomcache reads one TOML file, given with `--config` (the package installs "
        "`/etc/dicomcache/config.toml`; `config.example.toml` is a commented example). "
        "Every key is optional unless marked *required*; a key left out has the default "
        "below. Relative paths are taken from the file's directory. An unknown key is an "
        "error (usually a typo), and every problem is reported with its key:",
        "",
        "```sh test",
        "dicomcache check-config --config /etc/dicomcache/config.toml",
        "```",
        "",
        "**When a change takes effect.** The file is read once, when a process starts: "
        "after editing it, run `check-config`, then restart the service (`systemctl restart "
        "dicomcache`). Commands such as `dicomcache stats` read it each time they run. Only "
        "the *contents* of a few files are re-read while running (renewed certificates on "
        "`systemctl reload dicomcache`, which sends SIGHUP; the users file by itself); the "
        "column *takes effect* says which.",
        "",
        "**Units.** Times are in seconds (a number; `0.5` is allowed). Sizes are strings "
        "with a unit: `KiB`, `MiB`, `GiB`, `TiB` are powers of 1024 (as `df -h` and the "
        "status page print them), `kB`, `MB`, `GB`, `TB` powers of 1000 (`\"50GB\"` is "
        "46.6 GiB); a bare `\"50G\"` is refused as ambiguous; a plain integer is bytes.",
        "",
        "Sections: " + ", ".join(f"[`{_title(s)}`](#{_anchor(s)})" for s in SECTIONS) + ".",
        "",
    ]
    for name, section in SECTIONS.items():
        lines += [f"## {_title(name)}", "",
                  f"{section.about} See [{section.see}]({section.see}).", "",
                  "| key | default | unit | takes effect | meaning |",
                  "|---|---|---|---|---|"]
        for key, doc in section.keys.items():
            lines.append(f"| `{key}` | {_cell(default_text(name, key, doc, values[name]))} "
                         f"| {doc.unit} | {doc.applies} | {_cell(doc.meaning)} |")
        lines.append("")
    return "\n".join(lines)


def _title(section: str) -> str:
    return f"[[{section}]]" if SECTIONS[section].array else f"[{section}]"


def _anchor(section: str) -> str:
    """GitHub's anchor of a ``## [relay.destinations]`` heading."""
    return "".join(c for c in _title(section) if c.isalnum() or c in "-_ ").replace(" ", "-")


# --- the command -----------------------------------------------------------------------------
def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "config-reference", help="print every configuration key (Markdown)",
        description="Print every configuration key with its default, unit, when a change "
                    "takes effect and what it means, as Markdown (docs/configuration.md).")
    p.set_defaults(func=run)


def run(_args: argparse.Namespace) -> int:
    print(render(), end="")
    return 0
