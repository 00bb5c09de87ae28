"""Records batched per partition: each callback answered by its batch's acknowledgement, none lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaProducer

from bridge.batching import NotHandedOver, PartitionBatches
from bridge.envelope import Record
from bridge.errors import BrokerNotReady
from bridge.outcomes import Outcome, Outcomes
from bridge.publisher import KafkaPublisher
from bridge.settings import Settings
from tests.support import read_records


def _record(topic: str, partition: int, number: int, size: int = 300) -> Record:
    return Record(
        topic=topic,
        partition=partition,
        key=f"key-{number}".encode(),
        value=f"{number:08d}".encode().ljust(size, b"."),
        timestamp_ms=1_700_000_000_000 + number,
        headers=(("n", str(number).encode()),),
    )


async def _ready(publisher: KafkaPublisher, topic: str) -> None:
    async with asyncio.timeout(20):
        while not publisher.ready or publisher.partition_count(topic) is None:
            await asyncio.sleep(0.05)


def _batches(producer: _Producer, on_abandoned_settled: Callable[[bool], None]) -> PartitionBatches:
    return PartitionBatches(cast(AIOKafkaProducer, producer), on_abandoned_settled)


async def test_concurrent_records_land_once_each_in_publishing_order(kafka: str, settings: Settings) -> None:
    """400 records published at once to two partitions, some larger than a batch, each land exactly once,
    with their key, timestamp and headers, in the order they were published within each partition."""
    publisher = KafkaPublisher(settings, Outcomes())
    await publisher.start()
    try:
        await _ready(publisher, settings.topic)
        records = [
            _record(settings.topic, number % 2, number, 40_000 if number % 37 == 0 else 300)
            for number in range(400)
        ]
        await asyncio.gather(*(publisher.publish(record, 10.0) for record in records))
    finally:
        await publisher.close()
    landed = await read_records(kafka, [settings.topic], expect=400)
    assert len(landed) == 400
    for partition in (0, 1):
        expected = [record for record in records if record.partition == partition]
        got = [record for record in landed if record.partition == partition]
        assert [record.key for record in got] == [record.key for record in expected]
        assert [record.value for record in got] == [record.value for record in expected]
        assert [record.timestamp for record in got] == [record.timestamp_ms for record in expected]
        assert [list(record.headers) for record in got] == [list(record.headers) for record in expected]


class _Builder:
    """Holds up to three records, as a full aiokafka batch refuses the next one."""

    def __init__(self) -> None:
        self.records: list[bytes] = []

    def append(self, *, timestamp: int, key: bytes, value: bytes, headers: list[Any]) -> object | None:
        if len(self.records) == 3:
            return None
        self.records.append(key)
        return object()


class _Producer:
    """Takes batches when the test says so, and acknowledges or fails them when the test says so."""

    def __init__(self) -> None:
        self.taking = asyncio.Event()
        self.sent: list[tuple[_Builder, asyncio.Future[None]]] = []

    def create_batch(self) -> _Builder:
        return _Builder()

    async def send_batch(self, batch: _Builder, topic: str, *, partition: int) -> asyncio.Future[None]:
        await self.taking.wait()
        delivery = asyncio.get_running_loop().create_future()
        self.sent.append((batch, delivery))
        return delivery


async def test_a_full_batch_starts_the_next_and_one_acknowledgement_answers_all_its_records() -> None:
    producer, settled = _Producer(), list[bool]()
    batches = _batches(producer, settled.append)
    waiters = [batches.add(_record("t", 0, number)) for number in range(5)]
    producer.taking.set()
    async with asyncio.timeout(5):
        while len(producer.sent) < 2:
            await asyncio.sleep(0)
    assert [batch.records for batch, _ in producer.sent] == [
        [b"key-0", b"key-1", b"key-2"],
        [b"key-3", b"key-4"],
    ]
    producer.sent[0][1].set_result(None)
    await asyncio.sleep(0)
    assert [waiter.done() for waiter in waiters] == [True, True, True, False, False]
    producer.sent[1][1].set_exception(ConnectionError("broker gone"))
    with pytest.raises(ConnectionError):
        await waiters[4]
    assert settled == []


async def test_an_abandoned_record_is_reported_once_when_its_batch_settles() -> None:
    producer, settled = _Producer(), list[bool]()
    batches = _batches(producer, settled.append)
    waiter = batches.add(_record("t", 0, 1))
    waiter.cancel()  # the callback's deadline passed
    batches.abandon(waiter)
    producer.taking.set()
    async with asyncio.timeout(5):
        while not producer.sent:
            await asyncio.sleep(0)
    assert settled == []
    producer.sent[0][1].set_result(None)
    await asyncio.sleep(0)
    assert settled == [True]


async def test_records_never_handed_to_the_producer_are_answered_as_not_written(
    settings: Settings,
) -> None:
    """Closing with batches still waiting for the producer fails their callbacks with a 503 that says the
    callback was not written, not an ambiguous one."""
    producer, outcomes = _Producer(), Outcomes()
    publisher = KafkaPublisher(settings, outcomes)
    batches = _batches(producer, publisher._abandoned_settled)
    publisher._batches = batches  # the producer the test controls
    # The first batch waits in the producer's send_batch, the second behind it.
    first = asyncio.ensure_future(publisher.publish(_record("t", 0, 1), 5.0))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(publisher.publish(_record("t", 0, 2), 5.0))
    await asyncio.sleep(0.01)
    batches.close(ConnectionError("the producer was closed"))
    for publishing in (first, second):
        with pytest.raises(BrokerNotReady, match="was not written"):
            await publishing
    with pytest.raises(NotHandedOver):
        batches.add(_record("t", 0, 2))
    assert publisher.abandoned == 0
    assert outcomes.snapshot().get(Outcome.AMBIGUOUS_LOST.value, 0) == 0
