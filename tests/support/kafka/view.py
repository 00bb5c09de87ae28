"""The cluster's view of a topic: for each partition its leader, replicas and in-sync replicas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient


@dataclass(frozen=True)
class PartitionState:
    partition: int
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]

    @property
    def fully_in_sync(self) -> bool:
        """Led, and every replica in sync."""
        return self.leader >= 0 and set(self.isr) == set(self.replicas)


async def partition_states(bootstrap_servers: str, topic: str) -> dict[int, PartitionState]:
    """What the controller says now about `topic`'s partitions (leader -1: none)."""
    return (await topic_states(bootstrap_servers, [topic]))[topic]


async def topic_states(
    bootstrap_servers: str, topics: Sequence[str] | None = None
) -> dict[str, dict[int, PartitionState]]:
    """The partitions of each of `topics`, as `partition_states` gives them; of every topic if None."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=10_000)
    await admin.start()
    try:
        names = list(topics) if topics is not None else await admin.list_topics()
        descriptions = await admin.describe_topics(names) if names else []
    finally:
        await admin.close()
    return {
        description["topic"]: {
            p["partition"]: PartitionState(p["partition"], p["leader"], tuple(p["replicas"]), tuple(p["isr"]))
            for p in description["partitions"]
        }
        for description in descriptions
    }
