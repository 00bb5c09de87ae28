"""Reading the records back from Kafka, counting them, and making topics for the tests to write to."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from tests.support.broker import broker_choice


@dataclass
class StoredRecord:
    """A record as a reader gets it (aiokafka's `ConsumerRecord` fits the same protocol), without a broker."""

    value: bytes | None
    key: bytes | None
    headers: Sequence[tuple[str, bytes]]
    timestamp: int
    topic: str = "tim.official-account"
    partition: int = 0
    offset: int = 0


async def _partitions(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> list[TopicPartition]:
    cluster = await consumer._client.fetch_all_metadata()  # as bridge/readback/reader.py reads it, and why
    return [
        TopicPartition(topic, partition)
        for topic in topics
        for partition in sorted(cluster.partitions_for_topic(topic) or ())
    ]


async def read_records(
    bootstrap_servers: str,
    topics: Sequence[str],
    *,
    expect: int,
    idle_s: float = 0.7,
    timeout_s: float = 20.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record in `topics`: read to the end offsets, waiting up to `timeout_s` for `expect` records.

    On Apache Kafka the end offsets are exact. Tansu's can miss the tail of a multi-record batch, so on the
    Tansu lane the read goes on until nothing new came for `idle_s`.
    """
    exact_ends = broker_choice().kind != "tansu"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions = await _partitions(consumer, topics)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        ends = await consumer.end_offsets(partitions)
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            fresh = [record for part in batch.values() for record in part]
            if fresh:
                records += fresh
                last_new = time.monotonic()
            if len(records) < expect:
                if not fresh:
                    ends = await consumer.end_offsets(partitions)
                continue
            if exact_ends and all(await _at_end(consumer, ends)):
                break
            if not exact_ends and not fresh and time.monotonic() - last_new >= idle_s:
                break
        return records
    finally:
        await consumer.stop()


async def _at_end(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> list[bool]:
    return [await consumer.position(tp) >= end for tp, end in ends.items()]


async def create_topic(bootstrap_servers: str, topic: str, partitions: int) -> None:
    """A new topic of `partitions` partitions, replication factor 1: a destination for `replay --to-topic`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def count_records(bootstrap_servers: str, topics: Sequence[str]) -> int:
    """How many records `topics` hold by their end offsets: exact for an empty topic on any broker."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await _partitions(consumer, topics)
        ends = await consumer.end_offsets(partitions)
        return sum(ends.values())
    finally:
        await consumer.stop()


async def topic_names(bootstrap_servers: str) -> set[str]:
    """The names of every topic on the broker, Kafka's internal ones included."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def delete_topics_since(bootstrap_servers: str, before: set[str]) -> list[str]:
    """Delete every topic not in `before` (none of Kafka's internal ones); return their names.

    Every bridge, reader and `topics ensure` reads the metadata of every topic on the broker (a probe every
    second), so a session broker that kept each test's seven topics of twelve partitions (~2,000 topics by
    the end of the suite) made every later metadata request slower: 0.5 s each, 0.2 s of it parsing in the
    test process, at 1,300 topics.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        made = sorted(set(await admin.list_topics()) - before)
        made = [name for name in made if not name.startswith("__")]
        if made:
            await admin.delete_topics(made)
        return made
    finally:
        await admin.close()
