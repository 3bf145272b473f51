"""DICOM audit messages over syslog: RFC 5424 messages (pure) and the sender thread.

``[audit] syslog`` names the collector: ``udp://host[:514]`` (RFC 5426: one
message per datagram), ``tcp://host[:601]`` (RFC 6587 octet counting: ``LEN
SP MSG``) or ``tls://host[:6514]`` (RFC 5425: the same framing inside TLS,
the collector's certificate checked against ``syslog_ca_file`` or the
system's CAs, our certificate sent when ``syslog_cert_file`` is set, as IHE
ATNA's node authentication wants).

Each message is ``<85>1 TIMESTAMP HOST dicomcache PID IHE+RFC-3881 - BOM XML``:
facility 10 (security/authorization), severity 5 (notice) for a success and
4 (warning) for anything else, as IHE ITI-20 says.

The file is the record of truth; syslog is a copy for the hospital's
collector.  It has its own bounded queue and thread, so a slow or absent
collector never delays the file or a request: records it cannot take are
kept (up to ``max_queue``) and sent once it answers again; past that they
are dropped and counted (``dicomcache_audit_dropped_total{sink="syslog"}``).
Syslog has no acknowledgement: what the kernel accepted on a connection the
collector had just closed is lost without a trace, which is why the file
stays the reference.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import dicomcache.tls as tls
from dicomcache.audit.atna import to_xml
from dicomcache.audit.record import SUCCESS, Record, iso_time
from dicomcache.config import AUDIT_SYSLOG_SCHEMES
from dicomcache.metrics import Metrics

log = logging.getLogger(__name__)

#: security/authorization messages (RFC 5424 table 1)
FACILITY = 10
NOTICE, WARNING = 5, 4
MSGID = "IHE+RFC-3881"
APP_NAME = "dicomcache"
BOM = b"\xef\xbb\xbf"
#: Largest message sent in one UDP datagram (RFC 5426 allows up to the IP limit).
MAX_DATAGRAM = 65000
#: Seconds between attempts while the collector does not answer (doubling up to this).
RETRY_MAX = 30.0
CONNECT_TIMEOUT = 5.0
TICK = 0.2


def _header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit``; ``-`` if empty."""
    clean = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return clean or "-"


def message(xml: str, *, ok: bool, time: float, hostname: str, procid: str,
            app: str = APP_NAME, msgid: str = MSGID) -> bytes:
    """One RFC 5424 message (no structured data; the XML as UTF-8 after a BOM)."""
    pri = FACILITY * 8 + (NOTICE if ok else WARNING)
    head = (f"<{pri}>1 {iso_time(time)} {_header_field(hostname, 255)} "
            f"{_header_field(app, 48)} {_header_field(procid, 128)} {_header_field(msgid, 32)} -")
    return head.encode("ascii") + b" " + BOM + xml.encode("utf-8")


def octet_counted(msg: bytes) -> bytes:
    """RFC 6587 §3.4.1 framing (TCP and TLS): the length in decimal, a space, the message."""
    return str(len(msg)).encode("ascii") + b" " + msg


@dataclass(frozen=True, slots=True)
class Target:
    """Where messages go: ``scheme`` is ``udp``, ``tcp`` or ``tls``."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in AUDIT_SYSLOG_SCHEMES or not parts.hostname:
            raise ValueError(f"{url!r} is not udp://, tcp:// or tls://host[:port]")
        return cls(scheme, parts.hostname, parts.port or AUDIT_SYSLOG_SCHEMES[scheme])

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


class SyslogSender:
    """Sends records as audit messages from its own thread (see the module docstring).

    :meth:`offer` never blocks (any thread); :meth:`start` and :meth:`close`
    (which sends what it can within ``timeout``) are called by the owner.
    """

    def __init__(self, url: str, *, source_id: str, max_queue: int,
                 metrics: Metrics | None = None, ca_file: Path | None = None,
                 cert_file: Path | None = None, key_file: Path | None = None,
                 hostname: str | None = None) -> None:
        self.target = Target.parse(url)
        self.source_id = source_id
        self.max_queue = max_queue
        self.metrics = metrics
        self.hostname = hostname or socket.getfqdn()
        self.pid = os.getpid()
        self._tls: ssl.SSLContext | None = None
        if self.target.scheme == "tls":
            # The one TLS policy (TLS 1.2+, AEAD, no key log): the collector's certificate
            # and name verified; ours sent when configured (IHE ATNA node authentication).
            self._tls = tls.client_context(ca_file, cert_file, key_file)
        self._queue: collections.deque[Record] = collections.deque()
        self._sock: socket.socket | None = None
        self._address: tuple[object, ...] | None = None
        self._family = socket.AF_INET
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_at = 0.0
        self._close_deadline = 0.0
        self._delay = 1.0
        self._logged_at = float("-inf")
        self.sent = 0
        self.dropped = 0
        #: The last error while the collector cannot be reached (``None`` when it can).
        self.error: str | None = None
        self.failing_since: float | None = None

    # --- any thread --------------------------------------------------------------------
    def offer(self, rec: Record) -> bool:
        """Queue ``rec``; False (counted) when the queue is full."""
        if len(self._queue) >= self.max_queue:
            self._drop("queue_full", 1)
            return False
        self._queue.append(rec)
        return True

    def status(self) -> dict[str, object]:
        return {"target": str(self.target), "queued": len(self._queue), "sent": self.sent,
                "dropped": self.dropped, "error": self.error,
                "failing_since": self.failing_since}

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Send what can be sent within ``timeout``; what is left is dropped (counted)."""
        self._close_deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout + CONNECT_TIMEOUT + 1)
        left = len(self._queue)
        if left:
            self._queue.clear()
            self._drop("shutdown", left)
            log.error("audit: %d record(s) not sent to the syslog collector %s before the "
                      "stop (they are in the audit file)", left, self.target)
        self._disconnect()

    # --- the thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(TICK):
            self._send_queued()
        # A last try (the queue is small, the collector usually there), within the deadline.
        while self._queue and time.monotonic() < self._close_deadline:
            if not self._send_queued(force=True):
                break

    def _send_queued(self, force: bool = False) -> bool:
        if self.metrics is not None:
            self.metrics.audit_queue.labels("syslog").set(len(self._queue))
        if not self._queue or (not force and time.monotonic() < self._retry_at):
            return True
        while self._queue:
            rec = self._queue[0]
            data = message(to_xml(rec, source_id=self.source_id, host=self.hostname,
                                  pid=self.pid),
                           ok=rec.outcome == SUCCESS, time=rec.time, hostname=self.hostname,
                           procid=str(self.pid))
            if self.target.scheme == "udp" and len(data) > MAX_DATAGRAM:
                # Never sendable: dropped (counted) rather than holding up every later one.
                self._queue.popleft()
                self._drop("too_large", 1)
                log.error("audit: a message of %d bytes is too large for UDP syslog; not "
                          "sent (it is in the audit file)", len(data))
                continue
            try:
                self._send(data)
            except (OSError, ssl.SSLError) as exc:
                self._failed(exc)
                return False
            self._queue.popleft()
            self.sent += 1
            if self.metrics is not None:
                self.metrics.audit_records.labels("syslog").inc()
            if self.error is not None:
                log.warning("audit: syslog collector %s reachable again", self.target)
                self.error = self.failing_since = None
            self._delay = 1.0
        return True

    def _failed(self, exc: BaseException) -> None:
        self._disconnect()
        if self.metrics is not None:
            self.metrics.audit_syslog_failures.inc()
        now = time.monotonic()
        if self.error is None:
            self.failing_since = time.time()
        self.error = f"{type(exc).__name__}: {exc}"
        self._retry_at = now + self._delay
        self._delay = min(self._delay * 2, RETRY_MAX)
        if now - self._logged_at >= 60:
            self._logged_at = now
            log.error("audit: cannot send to the syslog collector %s: %s (%d record(s) "
                      "waiting; kept in the audit file either way)", self.target, self.error,
                      len(self._queue))

    def _drop(self, cause: str, n: int) -> None:
        self.dropped += n
        if self.metrics is not None:
            self.metrics.audit_dropped.labels("syslog", cause).inc(n)

    # --- sockets -----------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        t = self.target
        if t.scheme == "udp":
            if self._sock is None:
                family, _, _, _, address = socket.getaddrinfo(
                    t.host, t.port, type=socket.SOCK_DGRAM)[0]
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
                self._address = address
            assert self._address is not None
            self._sock.sendto(data, self._address)
            return
        if self._sock is not None and self._closed_by_peer(self._sock):
            self._disconnect()
        if self._sock is None:
            sock = socket.create_connection((t.host, t.port), timeout=CONNECT_TIMEOUT)
            try:
                if self._tls is not None:
                    sock = self._tls.wrap_socket(sock, server_hostname=t.host)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        self._sock.sendall(octet_counted(data))

    @staticmethod
    def _closed_by_peer(sock: socket.socket) -> bool:
        """Whether the collector closed the connection.  A collector has nothing to say,
        but a readable connection is not always a closed one: a TLS 1.3 server sends
        session tickets after the handshake.  What can be read is read (TLS consumes its
        own records), so that only an end of stream counts, and so that the socket is
        never closed with unread bytes, which sends a reset that can make the collector
        drop messages it has not read yet."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable) and _drained(sock)

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                _drained(sock)  # unread bytes would turn the close into a reset
                sock.close()
            except OSError:
                pass


#: Reads of what a collector sent before the connection is judged (bounded: one that
#: keeps writing is not read forever).
_DRAIN_READS = 16


def _drained(sock: socket.socket) -> bool:
    """Read, without waiting, what ``sock``'s peer has sent; True at its end of stream
    (or on an error: the connection is unusable), False when nothing more is there."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        for _ in range(_DRAIN_READS):
            if not sock.recv(4096):
                return True
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
        return False
    except OSError:  # ssl.SSLError included
        return True
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass
    return False
