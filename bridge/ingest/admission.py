"""Which callbacks the bridge takes on: the bounds on bodies arriving and on callbacks in flight, and the
phases of a graceful shutdown.

A callback passes two gates. While its body is still arriving it holds one of `--max-pending-bodies`
places (a body that came with the headers, as Tencent's usually do, takes none): a cheap bound, so clients
trickling bodies can hold only those places and never the slots of callbacks that have theirs. Once its
body is in, it takes one of `--max-in-flight` slots until answered. Every callback waiting for the broker
holds its body in memory, and so does every record answered 503 that the producer still holds; both count
against `--max-in-flight`, so memory stays bounded whatever the broker does. Past either bound a callback
gets 503 at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from bridge.errors import Overloaded, ShuttingDown


class Admission:
    def __init__(self, limit: int, max_pending_bodies: int = 256) -> None:
        self.limit = limit
        self.max_pending_bodies = max_pending_bodies
        self.in_flight = 0
        """Callbacks whose body is in, until answered."""
        self.pending_bodies = 0
        """Callbacks whose body is still arriving."""
        self._handling = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        """SIGTERM arrived: /readyz says 503, callbacks are still served during `--shutdown-delay`."""
        self.closing = False
        """Close has begun: callbacks get 503 at once, those already taken on get their real answer."""

    def admit(self) -> None:
        """Take on one callback until it is `release`d (refused once the bridge is closing). Plain calls
        in the handler's `try`/`finally`, not a context manager: the request path pays for every layer."""
        if self.closing:
            raise ShuttingDown("the bridge is shutting down; the callback was not written")
        self._handling += 1
        self._idle.clear()

    def take_slot(self, abandoned: int) -> None:
        """Take an in-flight slot for an admitted callback, its body being in; `abandoned` is what the
        producer still holds. The callback's `release` must then say it holds one."""
        if self.in_flight + abandoned >= self.limit:
            raise Overloaded(
                f"{self.limit} callbacks are already waiting for Kafka (--max-in-flight); "
                "the callback was not written"
            )
        self.in_flight += 1

    def release(self, holds_slot: bool) -> None:
        """An admitted callback was answered (or its handler ended); `holds_slot`: it took a slot."""
        if holds_slot:
            self.in_flight -= 1
        self._handling -= 1
        if self._handling == 0:
            self._idle.set()

    @contextmanager
    def waiting_for_body(self) -> Iterator[None]:
        """Hold one of the places of callbacks whose body is still arriving."""
        if self.pending_bodies >= self.max_pending_bodies:
            raise Overloaded(
                f"{self.max_pending_bodies} callbacks are already sending their body "
                "(--max-pending-bodies); the callback was not written"
            )
        self.pending_bodies += 1
        try:
            yield
        finally:
            self.pending_bodies -= 1

    async def drained(self, timeout: float) -> None:
        """Wait, at most `timeout` seconds, until every callback taken on has been answered."""
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
