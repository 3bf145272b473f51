"""Pure parts of dicomcache.series_stream: the multipart splitter and the commit budget."""

from __future__ import annotations

import asyncio
from unittest import mock

import aiohttp
import pytest

from dicomcache.series_stream import StreamBroken, Budget, read_parts


def reader(data: bytes) -> aiohttp.StreamReader:
    """aiohttp's reader, as the upstream response gives (its readuntil returns at EOF)."""
    protocol = mock.Mock(_reading_paused=False)
    stream = aiohttp.StreamReader(protocol, 1 << 16, loop=asyncio.get_running_loop())
    stream.feed_data(data)
    stream.feed_eof()
    return stream


def multipart(bodies: list[bytes], *, close: bool = True) -> bytes:
    out = b"".join(b"--B\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n%b\r\n"
                   % (len(b), b) for b in bodies)
    return out + (b"--B--\r\n" if close else b"")


async def collect(data: bytes) -> list[tuple[int, bytes]]:
    return [part async for part in read_parts(reader(data), "B")]


async def test_read_parts_splits_by_content_length() -> None:
    bodies = [b"x" * 10, b"--B\r\n inside a body is data", b""]
    assert await collect(multipart(bodies)) == [(len(b), b) for b in bodies]


@pytest.mark.parametrize("cut", [
    lambda d: d[:-len(b"--B--\r\n")],        # no closing boundary
    lambda d: d[:40],                          # inside a part
    lambda d: d.replace(b"Content-Length: 10\r\n", b""),  # a part without its length
])
async def test_read_parts_never_passes_a_cut_stream_as_complete(cut) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StreamBroken):
        await collect(cut(multipart([b"x" * 10, b"y" * 20])))


async def test_budget_lets_one_in_and_waits_while_over_the_limit() -> None:
    budget = Budget(100)
    await budget.take(500)  # bigger than the limit: let in when nothing is held
    second = asyncio.ensure_future(budget.take(10))
    await asyncio.sleep(0)
    assert not second.done()  # over the limit: waits for room
    budget.give_back(500)
    await asyncio.wait_for(second, 1)
    await budget.take(90)  # 10 + 90 fits exactly
    third = asyncio.ensure_future(budget.take(1))
    await asyncio.sleep(0)
    assert not third.done() and budget.held == 100
    budget.give_back(90)
    await asyncio.wait_for(third, 1)
    assert budget.held == 11
