"""Single-flight: one piece of work per key however many ask for it at once.

Used wherever concurrent viewers would otherwise ask Orthanc the same thing
several times: instance downloads, lookups, DICOMweb answers.  The work runs
in a task of its own, so a viewer that hangs up (its handler cancelled) never
cancels what the other waiters, and the cache, depend on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Work in flight, by key (create and use on one event loop)."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Future[T]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: Hashable) -> asyncio.Future[T] | None:
        """The flight for ``key``, if one runs."""
        return self._flights.get(key)

    def start(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """The flight for ``key``: the one running, else ``work()`` started in its own task."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(work())
            self._enter(key, flight)
        return flight

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        """Join or start the flight for ``key`` and wait for its result.

        Cancelling the caller does not cancel the flight.
        """
        return await asyncio.shield(self.start(key, work))

    def claim(self, key: Hashable) -> asyncio.Future[T] | None:
        """A future for ``key`` that the caller promises to settle, or ``None`` if a
        flight already runs.  Later :meth:`run` calls for ``key`` wait for it."""
        if key in self._flights:
            return None
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enter(key, fut)
        return fut

    def _enter(self, key: Hashable, flight: asyncio.Future[T]) -> None:
        self._flights[key] = flight

        def landed(f: asyncio.Future[T]) -> None:
            if self._flights.get(key) is f:
                del self._flights[key]
            if not f.cancelled():
                f.exception()  # retrieved: every waiter may have hung up
        flight.add_done_callback(landed)
