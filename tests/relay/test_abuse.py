"""The relay's DIMSE edge under abuse: what a hostile or broken peer can make it
allocate.  Both ways (``accelerate``): relay/accel/ installed, and pynetdicom as
published."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import threading
import time
import warnings
from pathlib import Path

import pytest

from dicomcache.devtools.samples import make_ct_series, write_series
from dicomcache.relay.accel.fastdul import UNLIMITED_PDU_READ, read_limit
from tests.conftest import eventually
from tests.relay.conftest import needs_dcmtk, relay_settings, storescu, wait_until


def rss() -> int:
    """This process's resident memory (the relay runs in it), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("max_pdu, limit", [
    (131072, 131078), (16384, 65542), (0, UNLIMITED_PDU_READ), (1 << 20, (1 << 20) + 6),
])
def test_read_limit(max_pdu: int, limit: int) -> None:
    assert read_limit(max_pdu) == limit


@needs_dcmtk
async def test_a_pdu_header_announcing_a_gigabyte_allocates_nothing(
        tmp_path: Path, relay_factory) -> None:
    """Six bytes claiming a 1 GiB A-ASSOCIATE-RQ: the relay neither allocates it nor
    waits for it forever; the next modality is served."""
    running = await relay_factory(relay_settings(tmp_path / "spool", [], timeout=5.0))
    before = await asyncio.to_thread(rss)
    hostile = []
    for _ in range(3):
        sock = await asyncio.to_thread(socket.create_connection,
                                       ("127.0.0.1", running.port), 5)
        await asyncio.to_thread(sock.sendall, struct.pack(">BBL", 0x01, 0, 1 << 30))
        hostile.append(sock)
    await asyncio.sleep(1.0)
    grown = await asyncio.to_thread(rss) - before
    assert grown < 64 << 20, f"{grown >> 20} MiB allocated for three 6-byte headers"

    def closed(sock: socket.socket) -> bool:
        sock.settimeout(0.2)
        try:
            return sock.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    started = time.monotonic()
    for sock in hostile:
        await wait_until(lambda s=sock: closed(s), 30, "the hostile connection closed")
        sock.close()
    assert time.monotonic() - started < 30
    files = await asyncio.to_thread(write_series, make_ct_series(1, rows=16, columns=16,
                                                                 seed=3), tmp_path / "src")
    sent = await asyncio.to_thread(storescu, files, running.port, timeout=60)
    assert sent.returncode == 0, sent.stderr


@needs_dcmtk
async def test_half_open_associations_give_their_slots_back(
        tmp_path: Path, relay_factory) -> None:
    """20 connections that send the first 26 bytes of an A-ASSOCIATE-RQ and stop (more
    than max_inbound_associations): after relay.timeout they are closed, and a modality
    gets through instead of "local limit exceeded" for ever."""
    running = await relay_factory(relay_settings(tmp_path / "spool", [], timeout=3.0,
                                                 max_inbound_associations=8))
    half_open = []
    for _ in range(20):
        sock = await asyncio.to_thread(socket.create_connection,
                                       ("127.0.0.1", running.port), 5)
        await asyncio.to_thread(sock.sendall, struct.pack(">BBL", 0x01, 0, 200) + b"\x00" * 20)
        half_open.append(sock)
    files = await asyncio.to_thread(write_series, make_ct_series(1, rows=16, columns=16,
                                                                 seed=4), tmp_path / "src")
    try:
        async def gets_through() -> bool:
            sent = await asyncio.to_thread(storescu, files, running.port, timeout=60)
            return sent.returncode == 0
        await eventually(gets_through, timeout=30, interval=1.0,
                         what="a modality served after the half-open ones")
    finally:
        for sock in half_open:
            sock.close()


class StallingPACS:
    """A PACS that reads the A-ASSOCIATE-RQ, sends the first 10 bytes of an
    A-ASSOCIATE-AC and then nothing (a half-dead peer on the WAN)."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        header = await reader.readexactly(6)
        await reader.readexactly(int.from_bytes(header[2:], "big"))
        writer.write(struct.pack(">BBL", 0x02, 0, 200) + b"\x00\x01\x00\x00")
        await writer.drain()
        await asyncio.sleep(3600)

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()


@needs_dcmtk
async def test_a_pacs_stalling_mid_association_does_not_wedge_its_destination(
        tmp_path: Path, relay_factory) -> None:
    pacs = StallingPACS()
    port = await pacs.start()
    try:
        from dicomcache.config import DestinationSettings

        dest = DestinationSettings(name="STALL", remote_ae_title="PACS",
                                   remote_host="127.0.0.1", remote_port=port,
                                   max_association_retries=1)
        running = await relay_factory(relay_settings(tmp_path / "spool", [dest], timeout=2.0,
                                                     retry_backoff_max=1.0),
                                      forward_in_process=True)
        files = await asyncio.to_thread(write_series, make_ct_series(1, rows=16, columns=16,
                                                                     seed=5), tmp_path / "src")
        sent = await asyncio.to_thread(storescu, files, running.port, timeout=60)
        assert sent.returncode == 0, sent.stderr
        # The forwarder gives the association up after the timeout and tries again
        # (with back-off): the destination is not wedged.
        await eventually(lambda: pacs.connections >= 3, timeout=40,
                         what="three association attempts")
    finally:
        await pacs.stop()


class ResettingPACS:
    """A PACS that reads the A-ASSOCIATE-RQ and resets the connection (RST)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.resets = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                header = conn.recv(6, socket.MSG_WAITALL)
                conn.recv(int.from_bytes(header[2:], "big"), socket.MSG_WAITALL)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.resets += 1

    def stop(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # (wakes accept(); close() does not)
        self.server.close()
        self.thread.join(5)


def test_a_pacs_resetting_every_association_leaves_no_socket_open(tmp_path: Path) -> None:
    """pynetdicom closes a socket only when ``shutdown()`` succeeds, which it does not
    after a reset: each attempt left a descriptor to the garbage collector (and
    failed CI through the ResourceWarning)."""
    from dicomcache.config import DestinationSettings
    from dicomcache.relay.scu import SendItem, StoreSCU

    pacs = ResettingPACS()
    series = make_ct_series(1, rows=16, columns=16, seed=5)
    files = write_series(series, tmp_path / "src")
    items = [SendItem(0, files[0], str(series[0].SOPClassUID), str(series[0].SOPInstanceUID),
                      str(series[0].file_meta.TransferSyntaxUID))]
    dest = DestinationSettings(name="RESET", remote_ae_title="PACS", remote_host="127.0.0.1",
                               remote_port=pacs.port, max_association_retries=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for _ in range(3):
                scu = StoreSCU("RELAY", dest, timeout=2.0)
                assert scu.send(items).results == []
                assert scu.echo() is not None
                del scu
            gc.collect()
    finally:
        pacs.stop()
    assert pacs.resets >= 6
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []
