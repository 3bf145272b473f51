"""DICOM audit messages over RFC 5424 syslog to a real local collector (asyncio UDP and TCP
servers on 127.0.0.1; TLS with a trustme CA): parseable messages, valid audit XML; a
collector that is down, then up, gets what waited; a collector we cannot trust gets
nothing."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from dicomcache import tls
from dicomcache.audit import record as r
from dicomcache.audit.record import Actor, Record, Subject
from dicomcache.audit.syslog import BOM, message, octet_counted
from dicomcache.audit.trail import AuditLog
from dicomcache.config import AuditSettings
from dicomcache.devtools.orthanc import free_port
from dicomcache.metrics import Metrics
from tests.audit.test_atna import check_shape
from tests.conftest import eventually, metric_value
from tests.tls_support import write_ca, write_pair

RFC5424 = re.compile(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) (.*)", re.S)


def parse(msg: bytes) -> dict[str, Any]:
    m = RFC5424.fullmatch(msg)
    assert m is not None, msg[:200]
    pri, ts, host, app, procid, msgid, sd, body = m.groups()
    assert body.startswith(BOM)
    return {"pri": int(pri), "time": ts.decode(), "host": host.decode(), "app": app.decode(),
            "procid": procid.decode(), "msgid": msgid.decode(), "sd": sd,
            "xml": check_shape(body[len(BOM):].decode("utf-8"))}


class Collector:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.port = 0
        #: Connections accepted (TCP and TLS).
        self.connections = 0


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, c: Collector) -> None:
        self.c = c

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.c.messages.append(data)


@pytest.fixture
async def collector() -> AsyncIterator[Callable[..., Any]]:
    """``await collector("udp"|"tcp", ssl=None, port=0)`` → a listening :class:`Collector`."""
    closers: list[Callable[[], Any]] = []

    async def start(scheme: str, ssl_ctx: ssl.SSLContext | None = None,
                    port: int = 0, greeting: bytes = b"") -> Collector:
        c = Collector()
        loop = asyncio.get_running_loop()
        if scheme == "udp":
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(c), local_addr=("127.0.0.1", port))
            c.port = transport.get_extra_info("sockname")[1]
            closers.append(transport.close)
            return c

        async def framed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            c.connections += 1
            if greeting:  # what a TLS 1.3 server's session tickets are to the sender
                writer.write(greeting)
            try:
                while True:
                    length = int((await reader.readuntil(b" "))[:-1])  # RFC 6587 framing
                    c.messages.append(await reader.readexactly(length))
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()
        server = await asyncio.start_server(framed, "127.0.0.1", port, ssl=ssl_ctx)
        c.port = server.sockets[0].getsockname()[1]
        closers.append(server.close)
        return c

    yield start
    for close in closers:
        close()


def records(n: int) -> list[Record]:
    out = [Record(r.RETRIEVE, Actor("alice", "viewer", "bearer", "10.0.0.5"),
                  Subject(patient_id=f"P{i}", study_uid="1.2.3", sop_uid=f"1.2.3.{i}"),
                  r.SUCCESS, status=200, bytes=100) for i in range(n - 1)]
    out.append(Record(r.RETRIEVE, Actor("anonymous", "admin", "none", "10.0.0.9"),
                      Subject(patient_id="PX"), r.DENIED, status=401))
    return out


async def run_trail(tmp_path: Path, url: str, recs: list[Record], **more: Any
                    ) -> tuple[AuditLog, Metrics]:
    metrics = Metrics()
    settings = AuditSettings(file=tmp_path / "audit.jsonl", syslog=url, **more)
    trail = await asyncio.to_thread(AuditLog, settings, metrics, source="serve")
    await asyncio.to_thread(trail.open)
    trail.start()
    for rec in recs:
        trail.submit(rec)
    return trail, metrics


def check_messages(c: Collector, n: int) -> None:
    parsed = [parse(m) for m in c.messages]
    assert len(parsed) == n
    assert {p["app"] for p in parsed} == {"dicomcache"}
    assert {p["msgid"] for p in parsed} == {"IHE+RFC-3881"}
    # facility 10 (security/authorization); notice for a success, warning otherwise.
    assert [p["pri"] for p in parsed] == [85] * (n - 1) + [84]
    patients = [p["xml"].find("ParticipantObjectIdentification").get("ParticipantObjectID")
                for p in parsed]
    assert patients == [f"P{i}" for i in range(n - 1)] + ["PX"]


@pytest.mark.parametrize("scheme", ["udp", "tcp"])
async def test_plain_collectors_get_parseable_audit_messages(
        tmp_path: Path, collector: Callable[..., Any], scheme: str) -> None:
    c = await collector(scheme)
    trail, metrics = await run_trail(tmp_path, f"{scheme}://127.0.0.1:{c.port}", records(5))
    try:
        await eventually(lambda: len(c.messages) >= 5, what="five messages at the collector")
    finally:
        await asyncio.to_thread(trail.close)
    check_messages(c, 5)
    assert metric_value(metrics, "dicomcache_audit_records_total", sink="syslog") == 5


async def test_tls_collector_checked_against_its_ca(
        tmp_path: Path, collector: Callable[..., Any]) -> None:
    ca = trustme.CA()
    pair = write_pair(ca, tmp_path / "pki", "collector")
    ca_file = write_ca(ca, tmp_path / "pki" / "ca.pem")
    server_ctx = tls.server_context(pair.cert, pair.key)
    c = await collector("tcp", server_ctx)
    trail, _ = await run_trail(tmp_path, f"tls://127.0.0.1:{c.port}", records(4),
                               syslog_ca_file=ca_file)
    try:
        await eventually(lambda: len(c.messages) >= 4, what="four messages over TLS")
    finally:
        await asyncio.to_thread(trail.close)
    check_messages(c, 4)
    # A collector whose certificate another CA signed gets nothing.
    other = trustme.CA()
    stranger = write_pair(other, tmp_path / "pki2", "stranger")
    s = await collector("tcp", tls.server_context(stranger.cert, stranger.key))
    trail, metrics = await run_trail(tmp_path / "2", f"tls://127.0.0.1:{s.port}", records(2),
                                     syslog_ca_file=ca_file)
    try:
        await eventually(lambda: trail.syslog is not None and trail.syslog.error is not None,
                         what="the untrusted collector refused")
        assert "CERTIFICATE_VERIFY_FAILED" in (trail.syslog.error or "")  # type: ignore[union-attr]
        assert metric_value(metrics, "dicomcache_audit_syslog_failures_total") >= 1
        assert s.messages == []
        status = trail.status()["syslog"]
        assert status["queued"] == 2 and status["error"]
    finally:
        await asyncio.to_thread(trail.close)
    assert metric_value(metrics, "dicomcache_audit_dropped_total", sink="syslog",
                        cause="shutdown") == 2
    # The file (the record of truth) has them all the same.
    lines = await asyncio.to_thread((tmp_path / "2" / "audit.jsonl").read_bytes)
    assert len(lines.splitlines()) == 2


async def test_a_collector_that_writes_keeps_its_connection_and_every_message(
        tmp_path: Path, collector: Callable[..., Any]) -> None:
    # A TLS 1.3 collector sends session tickets after the handshake: the connection is
    # readable without being closed.  Taking that for a close meant a new connection per
    # message, each old one closed with unread bytes (a reset: the collector may drop
    # what it had not read yet; 2 runs in 25 lost messages over TLS).
    c = await collector("tcp", greeting=b"ticket")
    trail, _ = await run_trail(tmp_path, f"tcp://127.0.0.1:{c.port}", records(6))
    try:
        await eventually(lambda: len(c.messages) >= 6, what="six messages")
    finally:
        await asyncio.to_thread(trail.close)
    check_messages(c, 6)
    assert c.connections == 1


async def test_collector_down_then_up_gets_what_waited(
        tmp_path: Path, collector: Callable[..., Any]) -> None:
    port = free_port()
    trail, _ = await run_trail(tmp_path, f"tcp://127.0.0.1:{port}", records(3))
    try:
        await eventually(lambda: trail.syslog is not None and trail.syslog.error is not None,
                         what="the connection refused")
        c = await collector("tcp", port=port)
        await eventually(lambda: len(c.messages) >= 3, timeout=15,
                         what="the waiting messages sent once the collector listens")
        check_messages(c, 3)
        assert trail.syslog is not None and trail.syslog.error is None
    finally:
        await asyncio.to_thread(trail.close)


def test_framing_and_header_fields() -> None:
    msg = message("<AuditMessage/>", ok=True, time=0.0, hostname="my host\n", procid="12")
    assert msg.startswith(b"<85>1 1970-01-01T00:00:00.000000Z myhost dicomcache 12 "
                          b"IHE+RFC-3881 - " + BOM)
    assert octet_counted(b"abc") == b"3 abc"
