"""The C-STORE SCP modalities send to (plus C-ECHO).

Handlers run in pynetdicom's association threads and must answer with a DICOM
status, never an exception (pynetdicom would turn one into a generic 0xC211
the modality cannot act on).  Statuses returned by :meth:`StoreSCP.handle_store`:

=========  ==============================================================
``0x0000``  written, fsynced and queued: safe to delete at the modality
``0xA700``  out of resources: the spool could not be written (disk full,
            I/O error), its file system has less than ``min_free`` left, or an
            internal error; nothing was kept, resend later
``0xA900``  the data set's SOP Class UID or SOP Instance UID is not the one
            in the request (as storescp and Orthanc answer); quarantined
``0xC000``  cannot understand: the data set cannot be read (truncated inside
            an element, overrun, malformed) or has no SOP Instance UID or
            SOP Class UID; kept in ``quarantine/`` with the reason
=========  ==============================================================

What a strict reading objects to but a PACS stores (Pixel Data of the wrong
length, tags out of order, an image without Pixel Data) is stored as received
with ``0x0000`` and recorded as a warning (:mod:`.acceptance`).  Every storage
SOP class is accepted, the retired ones included (:func:`storage_sop_classes`).

Associations from a calling AE title not in ``allowed_calling_ae_titles`` are
rejected (permanent, service user, "calling AE title not recognised"); from a
host not in ``allowed_hosts``: permanent, service user, "no reason given"
(PS3.8 has no reason for addresses); from a host that already holds
``max_associations_per_host`` (connections not yet associated included):
transient, service provider, "local limit exceeded", as pynetdicom answers
past ``max_inbound_associations``.  While ``dicomcache relay drain`` runs
(:attr:`StoreSCP.draining`), every association is rejected transient, service
provider, "temporary congestion": try again later.

With ``tls_certificate``/``tls_key`` the SCP speaks DICOM TLS (PS3.15 B.9-B.11,
:mod:`dicomcache.tls`'s policy) and nothing else; with ``tls_ca_file`` the
modalities' certificates are verified against it (required unless
``tls_require_client_certificate`` is false).  The handshake happens in the
association's own thread (:class:`~dicomcache.tls.DeferredHandshakeContext`),
so a client that never finishes it holds one thread for ``timeout`` at most,
not the accepting one.  :meth:`StoreSCP.reload_tls` (SIGHUP) takes a renewed
certificate for new associations.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt, register_uid
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Verification,
    uid_to_service_class,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicomcache import tls
from dicomcache.audit.record import DENIED, RELAY_RECEIVE, Actor, Record, Subject, outcome_of_dimse
from dicomcache.audit.trail import AuditLog
from dicomcache.config import RelaySettings
from dicomcache.dicom import syntaxes
from dicomcache.durable import is_disk_full
from dicomcache.errors import IntegrityError
from dicomcache.metrics import Metrics
from dicomcache.relay import acceptance, space
from dicomcache.relay import negotiation as neg
from dicomcache.relay.part10 import part10_header
from dicomcache.relay.spool import ACCEPTED_PREFIX, InstanceInfo, Spool, info_from_bytes

log = logging.getLogger(__name__)

SUCCESS = acceptance.SUCCESS
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = acceptance.SOP_CLASS_MISMATCH
CANNOT_UNDERSTAND = acceptance.CANNOT_UNDERSTAND
INSTANCE_MISMATCH = acceptance.INSTANCE_MISMATCH
#: A-ASSOCIATE-RJ while ``relay drain`` runs: rejected-transient, service provider
#: (presentation related), temporary congestion; a modality retries later (PS3.8 7.1.1.7).
REJECT_DRAINING = (0x02, 0x03, 0x01)


def _networks(entries: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(e, strict=False) for e in entries]


def host_allowed(address: str, allowed: Iterable[str]) -> bool:
    """Is ``address`` in the allow-list (addresses or CIDR networks; empty: anyone)?"""
    nets = _networks(allowed)
    if not nets:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


def storage_sop_classes() -> list[str]:
    """Every storage SOP class the SCP accepts: pynetdicom's list and the ones it lacks
    (:data:`.negotiation.EXTRA_STORAGE_SOP_CLASSES`, retired ones included).

    The extra ones are registered with pynetdicom's storage service (its public
    ``register_uid``; idempotent) so that their C-STOREs reach :meth:`StoreSCP.handle_store`
    instead of an "unsupported" answer.
    """
    known = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
             if cx.abstract_syntax is not None]
    for uid, keyword in neg.EXTRA_STORAGE_SOP_CLASSES.items():
        if uid_to_service_class(uid) is ServiceClass:
            register_uid(uid, keyword, StorageServiceClass)
    return list(dict.fromkeys([*known, *neg.EXTRA_STORAGE_SOP_CLASSES]))


def _modality(calling: str, address: str) -> Actor:
    """Who sends: the calling AE title (what DIMSE authenticates, if anything) and the
    peer's address."""
    return Actor(calling or "-", "modality", "dimse", address)


class StoreSCP:
    """Accepts C-STORE/C-ECHO, spools durably, answers with a status."""

    def __init__(self, settings: RelaySettings, spool: Spool, metrics: Metrics | None = None,
                 audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        #: Every C-STORE received (and every association refused) is recorded here.
        self.audit = audit
        self.server: ThreadedAssociationServer | None = None
        self.tls: tls.ServerTLS | None = None
        self._callers = {t.strip() for t in settings.allowed_calling_ae_titles}
        #: Why C-STOREs are being refused for lack of room (None: they are taken); the
        #: log says when this changes, not at every C-STORE.
        self.refusing: space.Refusal | None = None
        #: Size of the C-STORE last refused for lack of room (0: the last one was taken):
        #: the status says "refusing" while one that size would still be.
        self.last_refused_size = 0
        self._refusing_lock = threading.Lock()
        #: ``dicomcache relay drain``: every new association is rejected, transient.
        self.draining = False

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start listening (pynetdicom's server thread); returns once bound."""
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = max(self.settings.max_inbound_associations, 1)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout
        ae.maximum_pdu_size = self.settings.max_pdu
        for sop_class in storage_sop_classes():
            ae.add_supported_context(sop_class, list(neg.ACCEPTED_FROM_MODALITIES))
        ae.add_supported_context(Verification, list(syntaxes.UNCOMPRESSED))
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ESTABLISHED, self._on_established),
        ]
        self.tls = self._server_tls()
        self.server = ae.start_server((self.settings.host, self.settings.port), block=False,
                                      evt_handlers=handlers,
                                      ssl_context=self.tls.context if self.tls else None)
        log.info("Relay SCP %s listening on %s:%d%s", self.settings.ae_title,
                 self.settings.host, self.port, " (DICOM TLS)" if self.tls else "")

    def _server_tls(self) -> tls.ServerTLS | None:
        s = self.settings
        if s.tls_certificate is None or s.tls_key is None:
            return None
        server_tls = tls.ServerTLS(
            s.tls_certificate, s.tls_key, name="relay SCP", client_ca=s.tls_ca_file,
            require_client_cert=s.tls_require_client_certificate,
            cls=tls.DeferredHandshakeContext)
        # A modality that connects and never finishes its handshake holds its thread
        # this long at most (its association counts against max_inbound_associations).
        assert isinstance(server_tls.context, tls.DeferredHandshakeContext)
        server_tls.context.handshake_timeout = s.timeout
        return server_tls

    def reload_tls(self) -> bool:
        """Read the certificate and key again (blocking); False when TLS is off or the
        new pair was refused (the old one stays in use)."""
        return self.tls.reload() if self.tls is not None else False

    @property
    def port(self) -> int:
        """The bound port (useful with ``port = 0``)."""
        if self.server is None:
            return self.settings.port
        return int(self.server.server_address[1])

    def active(self) -> int:
        return len(self.server.active_associations) if self.server is not None else 0

    def stop(self, timeout: float) -> None:
        """Stop accepting; let in-flight associations finish up to ``timeout``; abort the rest.

        An aborted C-STORE was never acknowledged: the modality resends it.
        """
        server, self.server = self.server, None
        if server is None:
            return
        # shutdown() also joins the association threads (socketserver's
        # block_on_close): run it aside and abort what outlives the deadline.
        t = threading.Thread(target=server.shutdown, name="relay-scp-shutdown", daemon=True)
        t.start()
        t.join(max(timeout, 0.0))
        if t.is_alive():
            for assoc in list(server.active_associations):
                log.warning("Aborting inbound association from %s at shutdown",
                            assoc.requestor.ae_title)
                assoc.abort()
            t.join(10.0)
        log.info("Relay SCP stopped")

    # --- handlers (pynetdicom threads) -------------------------------------------------
    def _on_connect(self, event: Any) -> None:
        """TCP_NODELAY: pynetdicom never sets it (~40 ms per message on Nagle otherwise);
        a read timeout of ``relay.timeout``: pynetdicom reads the rest of a PDU with a
        blocking ``recv``, so a peer that sends a PDU header (or part of a PDU) and
        stops would hold the association's thread and slot for ever."""
        try:
            raw = event.assoc.dul.socket.socket
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if raw.gettimeout() is None:
                raw.settimeout(self.settings.timeout)
        except (AttributeError, OSError):
            pass

    def _on_requested(self, event: Any) -> None:
        """Allow-lists: reject before negotiation, with the proper reason."""
        try:
            assoc = event.assoc
            calling = str(assoc.requestor.primitive.calling_ae_title).strip()
            address = str(assoc.requestor.address)
            reason: tuple[int, int, int] | None = None
            if self.draining:
                reason = REJECT_DRAINING
                why = "the relay is draining for an upgrade (dicomcache relay drain)"
            elif self._callers and calling not in self._callers:
                reason = (0x01, 0x01, 0x03)
                why = f"calling AE title {calling!r} is not in allowed_calling_ae_titles"
            elif not host_allowed(address, self.settings.allowed_hosts):
                reason = (0x01, 0x01, 0x01)
                why = f"host {address} is not in allowed_hosts"
            elif (held := self._held_by(address, assoc)) >= self.settings.max_associations_per_host:
                reason = (0x02, 0x03, 0x02)
                why = (f"host {address} already holds {held} association(s) "
                       f"(relay.max_associations_per_host)")
            if reason is None:
                return
            log.warning("Rejecting association from %s at %s: %s", calling, address, why)
            if self.audit is not None:
                self.audit.submit(Record(RELAY_RECEIVE, _modality(calling, address),
                                         Subject(), DENIED, detail=why))
            if self.metrics is not None:
                self.metrics.relay_associations.labels("inbound", "rejected").inc()
            assoc.acse.send_reject(*reason)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
        except Exception:
            log.exception("Association check failed")

    def _held_by(self, address: str, assoc: Any) -> int:
        """Other inbound associations from ``address``, those still before their
        A-ASSOCIATE-RQ included (a connection takes its slot when it is accepted)."""
        server = self.server
        if server is None:
            return 0
        return sum(1 for other in list(server.active_associations)
                   if other is not assoc and str(other.requestor.address) == address)

    def _on_established(self, event: Any) -> None:
        if self.metrics is not None:
            self.metrics.relay_associations.labels("inbound", "established").inc()

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def handle_store(self, event: Any) -> int:
        """Spool one C-STORE; returns the status (see the module docstring). Never raises."""
        started, wall = time.perf_counter(), time.time()
        status = OUT_OF_RESOURCES
        seen: dict[str, Any] = {}
        try:
            if self.audit is not None and self.audit.required and not self.audit.accepting():
                # Fail closed: patient data is not taken in while it cannot be recorded.
                self.audit.refuse(self._receipt(event, seen, OUT_OF_RESOURCES, wall, 0.0,
                                                "audit trail unavailable"), "relay")
                log.error("Refusing a C-STORE with 0xA700: the audit trail cannot be "
                          "written ([audit] required)")
                return OUT_OF_RESOURCES
            status = self._store(event, seen)
        except Exception:
            log.exception("Unexpected error while storing a C-STORE: answering 0xA700")
            status = OUT_OF_RESOURCES
        finally:
            if self.metrics is not None:
                self.metrics.relay_received.labels(f"0x{status:04X}").inc()
                if status == SUCCESS and str(seen.get("why", "")).startswith(ACCEPTED_PREFIX):
                    self.metrics.relay_received_with_problems.inc()
                self.metrics.relay_receive_seconds.observe(time.perf_counter() - started)
        if self.audit is not None:
            try:
                self.audit.submit(self._receipt(event, seen, status, wall,
                                                time.perf_counter() - started, seen.get("why")))
            except Exception:
                log.exception("Cannot make the audit record of a C-STORE")
        return status

    def _receipt(self, event: Any, seen: dict[str, Any], status: int, wall: float,
                 seconds: float, why: str | None) -> Record:
        """The audit record of one C-STORE (what the data set said, when it parsed)."""
        assoc = event.assoc
        info: InstanceInfo | None = seen.get("info")
        request = event.request
        sop = info.sop_instance if info else str(getattr(request, "AffectedSOPInstanceUID", ""))
        subject = Subject(
            patient_id=info.patient_id if info else None,
            study_uid=(info.study_uid or None) if info else None,
            series_uid=info.series_uid if info else None, sop_uid=sop or None,
            sop_class=str(getattr(request, "AffectedSOPClassUID", "")) or None)
        return Record(RELAY_RECEIVE, _modality(str(assoc.requestor.ae_title).strip(),
                                               str(assoc.requestor.address)),
                      subject, outcome_of_dimse(status), status=status, dimse=True,
                      bytes=int(seen.get("bytes", 0)), seconds=seconds, time=wall, detail=why)

    def _store(self, event: Any, seen: dict[str, Any]) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        request = event.request
        want_class = str(request.AffectedSOPClassUID)
        want_instance = str(request.AffectedSOPInstanceUID)
        try:
            data = (part10_header(want_class, want_instance, str(event.context.transfer_syntax))
                    + event.request.DataSet.getvalue())
        except UnicodeEncodeError:  # not ASCII, so not UIDs: pynetdicom's way; checks follow
            data = event.encoded_dataset(include_meta=True)
        seen["bytes"] = len(data)
        try:
            parsed: InstanceInfo | str = info_from_bytes(data)
        except IntegrityError as exc:
            parsed = exc.reason
        verdict = acceptance.judge_received(want_class, want_instance, parsed)
        if isinstance(parsed, InstanceInfo):
            seen["info"] = parsed
        if verdict.refusal is not None:
            seen["why"] = verdict.refusal
            return self._reject(data, verdict.status, verdict.refusal, calling, want_instance)
        assert isinstance(parsed, InstanceInfo)
        info = parsed
        if verdict.warnings:
            # Stored as received, as a PACS would (see .acceptance); the spool records it.
            seen["why"] = ACCEPTED_PREFIX + "; ".join(verdict.warnings)
            log.warning("Accepting C-STORE of %s from %s as received despite: %s",
                        want_instance, calling, "; ".join(verdict.warnings))
        refused = space.refusal(self.spool.room(), len(data), self.settings.min_free)
        self._note_room(refused)
        self.last_refused_size = 0 if refused is None else len(data)
        if refused is not None:
            seen["why"] = f"spool: {refused.message}"
            if self.metrics is not None:
                self.metrics.relay_refused.labels(refused.reason).inc()
            return OUT_OF_RESOURCES
        try:
            self.spool.put(data, info, calling)
        except OSError as exc:
            what = "disk full" if is_disk_full(exc) else "write error"
            seen["why"] = f"spool: {what}"
            log.error("Cannot spool %s from %s (%s: %s): answering 0xA700", want_instance,
                      calling, what, exc)
            return OUT_OF_RESOURCES
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Spooled %s (%s, %d bytes) from %s", want_instance,
                      syntaxes.name(info.transfer_syntax), len(data), calling)
        return SUCCESS

    def _note_room(self, refused: space.Refusal | None) -> None:
        with self._refusing_lock:
            before, self.refusing = self.refusing, refused
        if refused is not None and (before is None or before.reason != refused.reason):
            log.error("Refusing new C-STOREs with 0xA700 (out of resources): %s",
                      refused.message)
        elif refused is None and before is not None:
            log.warning("Taking C-STOREs again: there is room in the spool")

    def _reject(self, data: bytes, status: int, reason: str, calling: str, sop: str) -> int:
        log.warning("Refusing C-STORE of %s from %s with 0x%04X: %s", sop, calling, status,
                    reason)
        self.spool.quarantine_received(data, reason, status, calling, sop)
        return status
