"""The read-through buffer: order kept across memory and temp file, budget bounded."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from dicomcache.http.spill import Spill, SpillBudget


async def _pump(spill: Spill, chunks: list[bytes], rng: random.Random,
                error: BaseException | None = None) -> None:
    for chunk in chunks:
        await spill.put(chunk)
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    spill.finish(error)


async def _drain(spill: Spill, rng: random.Random) -> bytes:
    got = bytearray()
    try:
        while (chunk := await spill.get()) is not None:
            got += chunk
            if rng.random() < 0.5:
                await asyncio.sleep(0.001 if rng.random() < 0.1 else 0)
    finally:
        await spill.close()
    return bytes(got)


@pytest.mark.parametrize("seed", range(12))
async def test_order_is_kept_through_memory_and_file(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    chunks = [rng.randbytes(rng.randint(1, 70_000)) for _ in range(rng.randint(1, 120))]
    budget = SpillBudget(rng.choice([0, 100_000, 1 << 20, 1 << 30]))
    spill = Spill(rng.choice([1, 50_000, 300_000]), budget, tmp_path)
    consumer = asyncio.create_task(_drain(spill, rng))
    await _pump(spill, chunks, rng)
    assert await consumer == b"".join(chunks)
    assert budget.used == 0


async def test_a_slow_reader_does_not_hold_the_producer(tmp_path: Path) -> None:
    """Everything is accepted while the consumer reads nothing: memory, then the file."""
    budget = SpillBudget(8 << 20)
    spill = Spill(256 << 10, budget, tmp_path)
    data = [bytes([i]) * 65536 for i in range(64)]  # 4 MiB
    async with asyncio.timeout(10):
        await _pump(spill, data, random.Random(1))  # returns although nobody read yet
    assert 0 < budget.used <= 8 << 20
    assert await _drain(spill, random.Random(2)) == b"".join(data)
    assert budget.used == 0


async def test_a_spent_budget_waits_for_the_reader(tmp_path: Path) -> None:
    budget = SpillBudget(128 << 10)
    spill = Spill(64 << 10, budget, tmp_path)
    data = [bytes([i]) * 65536 for i in range(8)]
    producer = asyncio.create_task(_pump(spill, data, random.Random(3)))
    await asyncio.sleep(0.05)
    assert not producer.done()  # memory and budget full: waits for the viewer
    assert budget.used <= 128 << 10
    assert await _drain(spill, random.Random(4)) == b"".join(data)
    await producer


async def test_an_unwritable_directory_falls_back_to_the_readers_pace(tmp_path: Path) -> None:
    budget = SpillBudget(1 << 30)
    spill = Spill(64 << 10, budget, tmp_path / "missing")
    data = [bytes([i]) * 65536 for i in range(6)]
    producer = asyncio.create_task(_pump(spill, data, random.Random(5)))
    assert await _drain(spill, random.Random(6)) == b"".join(data)
    await producer
    assert budget.used == 0


async def test_a_cut_answer_reaches_the_reader_after_what_came_before(tmp_path: Path) -> None:
    spill = Spill(64 << 10, SpillBudget(1 << 20), tmp_path)
    await _pump(spill, [b"a" * 100_000, b"b" * 10], random.Random(7),
                error=ConnectionError("cut"))
    got = bytearray()

    async def read_all() -> None:
        while (chunk := await spill.get()) is not None:
            got.extend(chunk)

    with pytest.raises(ConnectionError, match="cut"):
        await read_all()
    assert got == b"a" * 100_000 + b"b" * 10  # everything before the cut, then the cut
    await spill.close()


async def test_the_producer_stops_when_the_reader_is_gone(tmp_path: Path) -> None:
    budget = SpillBudget(64 << 10)
    spill = Spill(64 << 10, budget, tmp_path)
    producer = asyncio.create_task(_pump(spill, [b"x" * 65536] * 8, random.Random(8)))
    await asyncio.sleep(0.05)
    await spill.close()  # the viewer went away
    with pytest.raises(ConnectionResetError):
        await producer
    assert budget.used == 0
