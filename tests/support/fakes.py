"""A publisher that stands in for Kafka, for the unit tier: the bridge on it starts no broker."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from bridge.errors import BrokerNotReady
from bridge.tencent.envelope import Record


@dataclass
class FakePublisher:
    """Records what it is given; each publish waits for `confirm` and then raises `failure` if set."""

    ready: bool = True
    status: str = "ready"
    partitions: int | None = 12
    failure: Exception | None = None
    confirm: asyncio.Event = field(default_factory=asyncio.Event)
    records: list[Record] = field(default_factory=list)
    abandoned: int = 0

    async def publish(self, record: Record, deadline: float) -> None:
        if self.partitions is None:
            raise BrokerNotReady(f"Kafka is not ready ({self.status}); the callback was not written")
        await self.confirm.wait()
        if self.failure is not None:
            raise self.failure
        self.records.append(record)
