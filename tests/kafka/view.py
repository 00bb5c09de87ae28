"""The cluster's view of a topic: for each partition its leader, replicas and in-sync replicas."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient


@dataclass(frozen=True)
class PartitionState:
    partition: int
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


async def partition_states(bootstrap_servers: str, topic: str) -> dict[int, PartitionState]:
    """What the controller says now about `topic`'s partitions (leader -1: none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=10_000)
    await admin.start()
    try:
        (description,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return {
        p["partition"]: PartitionState(p["partition"], p["leader"], tuple(p["replicas"]), tuple(p["isr"]))
        for p in description["partitions"]
    }
