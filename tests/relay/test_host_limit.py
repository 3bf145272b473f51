"""``relay.max_associations_per_host``: one host (a modality gone wrong, a scanner
holding half-open connections) cannot take every inbound slot; the others still get in.
Real peers: pynetdicom and DCMTK storescu, raw sockets for half-open connections."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.relay.conftest import needs_dcmtk, relay_settings, sample, storescu, wait_until

pytestmark = [
    needs_dcmtk,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _associate(port: int, source: str) -> object:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 15
    return ae.associate("127.0.0.1", port, ae_title="DICOMCACHE", bind_address=(source, 0))


@pytest.fixture
def half_open() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


async def test_one_host_cannot_take_every_slot(tmp_path: Path, relay_factory,
                                               half_open: list[socket.socket]) -> None:
    r = await relay_factory(relay_settings(tmp_path / "spool", [], max_inbound_associations=4,
                                           max_associations_per_host=2))
    # 127.0.0.1 holds two connections that never say anything (each has a slot).
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", r.port), timeout=5)
        half_open.append(s)
    await wait_until(lambda: r.relay.scp.active() == 2, 10, "two half-open associations")

    # A third association from that host: rejected, transient, local limit exceeded.
    assoc = await asyncio.to_thread(_associate, r.port, "127.0.0.1")
    assert assoc.is_rejected  # type: ignore[attr-defined]
    rj = assoc.acceptor.primitive  # type: ignore[attr-defined]
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    mr = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    refused = await asyncio.to_thread(storescu, [mr], r.port)
    assert refused.returncode != 0
    assert "Local Limit Exceeded" in refused.stdout + refused.stderr
    assert sample(r.metrics, "dicomcache_relay_associations_total", direction="inbound",
                  outcome="rejected") == 2

    # Another host still gets in (and stores).
    other = await asyncio.to_thread(_associate, r.port, "127.0.0.2")
    assert other.is_established  # type: ignore[attr-defined]
    await asyncio.to_thread(other.release)  # type: ignore[attr-defined]

    # Once the first host lets go of its connections, it gets in again.
    for s in half_open:
        s.close()
    await wait_until(lambda: r.relay.scp.active() == 0, 30, "the half-open slots released")
    ok = await asyncio.to_thread(storescu, [mr], r.port)
    assert ok.returncode == 0, ok.stderr
