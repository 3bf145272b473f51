"""dicomcache.upstream.client's blocking connection (the series stream's threads use it)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from dicomcache.config import UpstreamSettings
from dicomcache.metrics import Metrics
from dicomcache.devtools.orthanc import OrthancProcess
from dicomcache.upstream.client import BlockingConnection, OrthancClient, md5_path, parse_md5
from dicomcache.errors import IntegrityError
from tests.conftest import Sample


def settings(url: str, orthanc: OrthancProcess, **kw: float) -> UpstreamSettings:
    return UpstreamSettings(url=url, username=orthanc.username, password=orthanc.password,
                            **kw)  # type: ignore[arg-type]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    srv = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except TimeoutError:
                continue
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for s in accepted:
        s.close()
    srv.close()


async def test_blocking_get_with_our_credentials_and_kept_alive(
        orthanc: OrthancProcess, ct_series: list[Sample]) -> None:
    client = OrthancClient(settings(orthanc.url + "/", orthanc), Metrics())
    try:
        conn = BlockingConnection(client)

        def md5s() -> list[str]:
            out = []
            for s in ct_series[:3]:
                resp = conn.get(md5_path(s.orthanc_id))
                assert resp.status == 200
                out.append(parse_md5(resp.read(), s.orthanc_id))
            time.sleep(1.5)  # Orthanc closes a keep-alive connection idle for 1 s…
            resp = conn.get(md5_path(ct_series[3].orthanc_id))  # …so this one reconnects
            out.append(parse_md5(resp.read(), ct_series[3].orthanc_id))
            conn.close()
            return out

        import hashlib
        assert await asyncio.to_thread(md5s) == [hashlib.md5(s.data).hexdigest()
                                                 for s in ct_series[:4]]
    finally:
        await client.close()


async def test_blocking_get_without_credentials_is_refused(orthanc: OrthancProcess) -> None:
    client = OrthancClient(UpstreamSettings(url=orthanc.url), Metrics())
    try:
        conn = BlockingConnection(client)
        resp = await asyncio.to_thread(conn.get, "/system")
        assert resp.status == 401
        conn.close()
    finally:
        await client.close()


async def test_abort_wakes_a_blocked_read_at_once(orthanc: OrthancProcess,
                                                  silent_server: int) -> None:
    client = OrthancClient(settings(f"http://127.0.0.1:{silent_server}", orthanc,
                                    read_timeout=30.0), Metrics())
    try:
        conn = BlockingConnection(client)
        started = time.monotonic()
        blocked = asyncio.ensure_future(asyncio.to_thread(conn.get, "/system"))
        await asyncio.sleep(0.3)
        assert not blocked.done()  # waiting for an answer that never comes
        conn.abort()
        with pytest.raises(OSError):  # RemoteDisconnected is a ConnectionResetError
            await asyncio.wait_for(blocked, 5)
        assert time.monotonic() - started < 5  # not the 30 s read timeout
        with pytest.raises(ConnectionAbortedError):  # and no new request after an abort
            conn.get("/system")
    finally:
        await client.close()


def test_parse_md5_rejects_a_damaged_answer() -> None:
    assert parse_md5(b'"0123456789ABCDEF0123456789abcdef"\n', "x") == \
        "0123456789abcdef0123456789abcdef"
    with pytest.raises(IntegrityError):
        parse_md5(b"0123456789abcdef0123456789abcde", "x")


@contextlib.contextmanager
def one_answer_server(answer: bool) -> Iterator[int]:
    """A loopback server closing every connection after one request, answered or not."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn, conn.makefile("rb") as f:
                target = f.readline().split()[1]
                while f.readline() not in (b"\r\n", b""):
                    pass
                if answer:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%b" % (len(target), target))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        srv.close()


async def test_get_all_pipelines_in_order_against_orthanc(orthanc: OrthancProcess,
                                                          ct_series: list[Sample]) -> None:
    client = OrthancClient(settings(orthanc.url, orthanc), Metrics())
    try:
        conn = BlockingConnection(client)
        paths = [md5_path(s.orthanc_id) for s in ct_series] + [md5_path("nope")] \
            + [md5_path(s.orthanc_id) for s in ct_series]
        answers = await asyncio.to_thread(lambda: list(conn.get_all(paths, window=5)))
        assert [p for p, _, _ in answers] == paths
        import hashlib
        expected = [hashlib.md5(s.data).hexdigest().encode() for s in ct_series]
        assert [b for _, st, b in answers if st == 200] == expected * 2
        assert [st for _, st, _ in answers].count(404) == 1
    finally:
        await client.close()


async def test_get_all_asks_again_on_a_new_connection_when_the_server_closes(
        orthanc: OrthancProcess) -> None:
    with one_answer_server(answer=True) as port:
        client = OrthancClient(settings(f"http://127.0.0.1:{port}", orthanc), Metrics())
        try:
            conn = BlockingConnection(client)
            paths = [f"/p{i}" for i in range(5)]
            answers = await asyncio.to_thread(lambda: list(conn.get_all(paths)))
            assert answers == [(p, 200, p.encode()) for p in paths]
        finally:
            await client.close()


async def test_get_all_raises_when_a_connection_answers_nothing(orthanc: OrthancProcess) -> None:
    with one_answer_server(answer=False) as port:
        client = OrthancClient(settings(f"http://127.0.0.1:{port}", orthanc), Metrics())
        try:
            conn = BlockingConnection(client)
            with pytest.raises(ConnectionResetError, match="no answer"):
                await asyncio.to_thread(lambda: list(conn.get_all(["/a", "/b"])))
        finally:
            await client.close()
