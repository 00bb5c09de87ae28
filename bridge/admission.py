"""Which callbacks the bridge takes on: the in-flight limit, and the phases of a graceful shutdown.

Every callback waiting for the broker holds its body in memory, and so does every record answered 503 that
the producer still holds; both count against `--max-in-flight`, so memory stays bounded whatever the broker
does. Past the limit a callback gets 503 at once, before its body is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from bridge.errors import Overloaded, ShuttingDown


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        """SIGTERM arrived: /readyz says 503, callbacks are still served during `--shutdown-delay`."""
        self.closing = False
        """Close has begun: callbacks get 503 at once, those in flight get their real answer."""

    @contextmanager
    def admit(self, abandoned: int) -> Iterator[None]:
        """Hold an in-flight slot for one callback; `abandoned` is what the producer still holds."""
        if self.closing:
            raise ShuttingDown("the bridge is shutting down; the callback was not written")
        if self.in_flight + abandoned >= self.limit:
            raise Overloaded(
                f"{self.limit} callbacks are already waiting for Kafka (--max-in-flight); "
                "the callback was not written"
            )
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drained(self, timeout: float) -> None:
        """Wait, at most `timeout` seconds, until no callback is in flight."""
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
