"""Records batched per partition: each callback answered by its batch's acknowledgement, none lost."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import RequestTimedOutError

from bridge.errors import BrokerNotReady, DeliveryTimeout, PublishError, RecordTooLarge
from bridge.ingest.metrics import Metrics
from bridge.ingest.outcomes import Outcome, Outcomes
from bridge.kafka.batching import Expired, NotHandedOver, PartitionBatches
from bridge.kafka.publisher import KafkaPublisher
from bridge.settings import ServeSettings
from bridge.tencent.envelope import Record
from bridge.tencent.partitioner import partition_for
from tests.support.records import read_records

FAKE_PARTITIONS = {"t": 3}
"""The topic of the fake producer, and its partitions: the count at start the publisher is given."""


@functools.cache
def _entity_on(partition: int, partitions: int) -> str:
    """An entity whose records the publisher puts on `partition` of a topic of `partitions` partitions."""
    return next(
        f"entity-{n}" for n in itertools.count() if partition_for(f"entity-{n}", partitions) == partition
    )


def _record(topic: str, partition: int, number: int, size: int = 300, partitions: int = 3) -> Record:
    """Record `number`, of an entity on `partition` (of `partitions`), of `size` bytes."""
    return Record(
        topic=topic,
        entity=_entity_on(partition, partitions),
        key=f"key-{number}".encode(),
        value=f"{number:08d}".encode().ljust(size, b"."),
        timestamp_ms=1_700_000_000_000 + number,
        headers=(("n", str(number).encode()),),
    )


def _placed(topic: str, partition: int, number: int, size: int = 300) -> tuple[Record, int]:
    """A record, and its partition, as the publisher hands them to the batches."""
    return _record(topic, partition, number, size), partition


def _in(seconds: float) -> float:
    """The deadline `seconds` from now, on the event loop's clock."""
    return asyncio.get_running_loop().time() + seconds


async def _ready(publisher: KafkaPublisher, topic: str) -> None:
    async with asyncio.timeout(20):
        while not publisher.ready or topic not in publisher.partitions_at_start:
            await asyncio.sleep(0.05)


def _serve(publisher: KafkaPublisher, producer: _Producer) -> PartitionBatches:
    """Make `publisher` write through batches of the fake `producer`, as it does with a real one."""
    batches = publisher.batches_for(cast(AIOKafkaProducer, producer))
    publisher.serve(batches, FAKE_PARTITIONS)
    return batches


def _kill(producer: AIOKafkaProducer) -> None:
    """End the producer's sender task, as a fatal error does (aiokafka's internals: it has no public way)."""
    producer._sender.sender_task.cancel()


def _batches(producer: _Producer, on_abandoned: Callable[[bool | None], None]) -> PartitionBatches:
    return PartitionBatches(cast(AIOKafkaProducer, producer), on_abandoned)


async def test_concurrent_records_land_once_each_in_publishing_order(
    kafka: str, settings: ServeSettings
) -> None:
    """400 records published at once to two partitions, some larger than a batch, each land exactly once,
    with their key, timestamp and headers, in the order they were published within each partition."""
    publisher = KafkaPublisher(settings)
    await publisher.start()
    try:
        await _ready(publisher, settings.topic)
        count = publisher.partitions_at_start[settings.topic]
        placed = [
            (
                number % 2,
                _record(settings.topic, number % 2, number, 40_000 if number % 37 == 0 else 300, count),
            )
            for number in range(400)
        ]
        records = [record for _, record in placed]
        await asyncio.gather(*(publisher.publish(record, _in(10.0)) for record in records))
    finally:
        await publisher.close()
    landed = await read_records(kafka, [settings.topic], expect=400)
    assert len(landed) == 400
    for partition in (0, 1):
        expected = [record for on, record in placed if on == partition]
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


class _Cluster:
    def __init__(self) -> None:
        self.topics = {"t"}
        self.leaders: dict[tuple[str, int], int] = {}

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return {0, 1, 2} if topic in self.topics else None

    def leader_for_partition(self, partition: TopicPartition) -> int | None:
        return self.leaders.get((partition.topic, partition.partition), 1)


class _Client:
    def __init__(self) -> None:
        self.cluster = _Cluster()


class _Producer:
    """Takes batches when the test says so, and acknowledges or fails them when the test says so."""

    def __init__(self) -> None:
        self.client = _Client()
        self.taking = asyncio.Event()
        self.sent: list[tuple[_Builder, asyncio.Future[None]]] = []

    def create_batch(self) -> _Builder:
        return _Builder()

    async def send_batch(self, batch: _Builder, topic: str, *, partition: int) -> asyncio.Future[None]:
        await self.taking.wait()
        delivery = asyncio.get_running_loop().create_future()
        self.sent.append((batch, delivery))
        return delivery


async def _sent(producer: _Producer, count: int) -> None:
    async with asyncio.timeout(5):
        while len(producer.sent) < count:
            await asyncio.sleep(0)
    for _ in range(5):  # and no more, however long the loop turns
        await asyncio.sleep(0)
    assert len(producer.sent) == count


async def test_a_full_batch_starts_the_next_and_one_acknowledgement_answers_all_its_records() -> None:
    producer, settled = _Producer(), list[bool | None]()
    batches = _batches(producer, settled.append)
    waiters = [batches.add(*_placed("t", 0, number)) for number in range(5)]
    producer.taking.set()
    await _sent(producer, 1)  # one batch of a partition per request, as aiokafka sends them
    producer.sent[0][1].set_result(None)
    await _sent(producer, 2)
    assert [batch.records for batch, _ in producer.sent] == [
        [b"key-0", b"key-1", b"key-2"],
        [b"key-3", b"key-4"],
    ]
    assert [waiter.done() for waiter in waiters] == [True, True, True, False, False]
    producer.sent[1][1].set_exception(ConnectionError("broker gone"))
    for waiter in waiters[3:]:
        with pytest.raises(ConnectionError):
            await waiter
    assert settled == []


async def test_batches_wait_for_their_broker_to_answer_and_a_retried_one_holds_back_only_its_partition() -> (
    None
):
    """Like aiokafka's one request in flight per broker: records for a broker that has not answered yet keep
    filling their partitions' batches, which go together once it answers; another broker does not wait.
    A batch the broker has not settled (aiokafka retrying it) holds back its own partition, no other."""
    producer = _Producer()
    producer.client.cluster.leaders = {("t", 0): 1, ("t", 1): 1, ("t", 2): 2}
    batches = _batches(producer, lambda _: None)
    producer.taking.set()
    first = batches.add(*_placed("t", 0, 0))
    await _sent(producer, 1)
    same_broker = [
        batches.add(*_placed("t", 0, 1)),
        batches.add(*_placed("t", 0, 2)),
        batches.add(*_placed("t", 1, 3)),
    ]
    other_broker = batches.add(*_placed("t", 2, 4))
    await _sent(producer, 2)
    assert producer.sent[1][0].records == [b"key-4"]
    producer.sent[0][1].set_result(None)
    await _sent(producer, 4)
    assert first.done()
    by_records = {tuple(batch.records): delivery for batch, delivery in producer.sent[2:]}
    assert set(by_records) == {(b"key-1", b"key-2"), (b"key-3",)}
    behind_retry = batches.add(*_placed("t", 0, 5))
    next_for_one = batches.add(*_placed("t", 1, 6))
    await _sent(producer, 4)
    by_records[(b"key-3",)].set_result(None)  # partition 0's batch is being retried
    await _sent(producer, 5)
    assert producer.sent[4][0].records == [b"key-6"]
    producer.sent[4][1].set_result(None)
    await _sent(producer, 5)  # partition 0 still waits for its batch
    by_records[(b"key-1", b"key-2")].set_result(None)
    await _sent(producer, 6)
    assert producer.sent[5][0].records == [b"key-5"]
    for _, delivery in (producer.sent[1], producer.sent[5]):
        delivery.set_result(None)
    await asyncio.gather(*same_broker, other_broker, behind_retry, next_for_one)


async def test_a_record_of_a_topic_missing_from_the_metadata_is_not_written_and_holds_back_none() -> None:
    """Never handed to the producer, which would ask the broker for the topic by name (and a broker that
    creates topics on demand would create it): answered as not written, while other topics flow."""
    producer = _Producer()
    producer.client.cluster.topics -= {"gone"}
    batches = _batches(producer, lambda _: None)
    producer.taking.set()
    unknown = batches.add(*_placed("gone", 0, 0))
    fine = batches.add(*_placed("t", 0, 1))
    with pytest.raises(NotHandedOver, match="not in the metadata"):
        await unknown
    await _sent(producer, 1)
    assert producer.sent[0][0].records == [b"key-1"]
    producer.sent[0][1].set_result(None)
    await fine


async def test_an_expired_record_is_reported_once_when_its_batch_settles() -> None:
    producer, reports = _Producer(), list[bool | None]()
    batches = _batches(producer, reports.append)
    waiter = batches.add(*_placed("t", 0, 1))
    batches.expire(waiter)  # the callback's deadline passed
    with pytest.raises(Expired):
        await waiter
    producer.taking.set()
    async with asyncio.timeout(5):
        while not producer.sent:
            await asyncio.sleep(0)
    assert reports == [None]
    producer.sent[0][1].set_result(None)
    await asyncio.sleep(0)
    assert reports == [None, True]


async def test_a_batch_settling_as_the_deadline_passes_leaves_nothing_counted_as_abandoned(
    offline_settings: ServeSettings,
) -> None:
    """The acknowledgement and the deadline in the same turn of the loop, before the callback's task runs:
    the callback is answered as ambiguous, the record counted as landed, and nothing stays abandoned."""
    producer, outcomes = _Producer(), Outcomes()
    publisher = KafkaPublisher(offline_settings, Metrics(outcomes, lambda: True))
    batches = _serve(publisher, producer)  # the producer the test controls
    producer.taking.set()
    expire = batches.expire

    def expire_as_the_broker_answers(waiter: asyncio.Future[None]) -> None:
        expire(waiter)
        producer.sent[0][1].set_result(None)

    batches.expire = expire_as_the_broker_answers  # type: ignore[method-assign]
    with pytest.raises(DeliveryTimeout) as raised:
        await publisher.publish(_record("t", 0, 1), _in(0.05))
    assert raised.value.ambiguous
    await asyncio.sleep(0)
    assert publisher.abandoned == 0
    assert outcomes.snapshot()[Outcome.AMBIGUOUS_LANDED.value] == 1


async def test_records_never_handed_to_the_producer_are_answered_as_not_written(
    offline_settings: ServeSettings,
) -> None:
    """Closing with batches still waiting for the producer fails their callbacks with a 503 that says the
    callback was not written, not an ambiguous one."""
    producer, outcomes = _Producer(), Outcomes()
    publisher = KafkaPublisher(offline_settings, Metrics(outcomes, lambda: True))
    batches = _serve(publisher, producer)  # the producer the test controls
    # The first batch waits in the producer's send_batch, the second behind it.
    first = asyncio.ensure_future(publisher.publish(_record("t", 0, 1), _in(5.0)))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(publisher.publish(_record("t", 0, 2), _in(5.0)))
    await asyncio.sleep(0.01)
    batches.close(ConnectionError("the producer was closed"))
    for publishing in (first, second):
        with pytest.raises(BrokerNotReady, match="was not written"):
            await publishing
    with pytest.raises(NotHandedOver):
        batches.add(*_placed("t", 0, 2))
    assert publisher.abandoned == 0
    assert outcomes.snapshot()[Outcome.AMBIGUOUS_LOST.value] == 0


async def test_a_record_left_in_a_producer_that_died_is_settled_when_the_producer_is_replaced(
    settings: ServeSettings,
) -> None:
    """aiokafka settles nothing when its sender task is cancelled: once the producer is stopped, the bridge
    answers the callbacks whose records it held with an ambiguous 503, without waiting for their deadline."""
    handed_over = asyncio.Event()

    class Watching(Metrics):
        def records_queued(self, records: int) -> None:
            super().records_queued(records)
            if records > 0:
                handed_over.set()

    publisher = KafkaPublisher(
        replace(settings, linger_ms=3000, shutdown_timeout=2.0), Watching(Outcomes(), lambda: True)
    )
    await publisher.start()
    try:
        await _ready(publisher, settings.topic)
        producer = publisher.producer
        assert producer is not None
        started = time.monotonic()
        count = publisher.partitions_at_start[settings.topic]
        publishing = asyncio.ensure_future(
            publisher.publish(_record(settings.topic, 0, 1, 300, count), _in(20.0))
        )
        async with asyncio.timeout(5):
            await handed_over.wait()  # lingering in the producer
        _kill(producer)
        with pytest.raises(PublishError) as raised:
            await publishing
        assert raised.value.ambiguous
        assert time.monotonic() - started < 10
        assert publisher.abandoned == 0
        await _ready(publisher, settings.topic)
        await publisher.publish(_record(settings.topic, 0, 2, 300, count), _in(5.0))
    finally:
        await publisher.close()


async def test_a_record_over_the_bridges_limit_or_without_time_left_is_not_queued(
    offline_settings: ServeSettings,
) -> None:
    """Answered 413 and 503, each saying that the callback was not written, and nothing reaches Kafka."""
    producer = _Producer()
    publisher = KafkaPublisher(offline_settings)
    _serve(publisher, producer)
    producer.taking.set()
    with pytest.raises(RecordTooLarge, match=r"the bridge's limit .* was not written"):
        await publisher.publish(_record("t", 0, 1, size=offline_settings.max_record_bytes + 1), _in(5.0))
    with pytest.raises(DeliveryTimeout, match="was not written") as late:
        await publisher.publish(_record("t", 0, 2), _in(0.0))
    assert not late.value.ambiguous
    await asyncio.sleep(0.01)
    assert producer.sent == []


async def test_a_bug_while_handing_a_batch_over_settles_that_batch_and_frees_its_partition(
    offline_settings: ServeSettings,
) -> None:
    """An unexpected failure in the flush loop after it took a batch: that batch's callbacks are answered
    as not written at once (not at their deadline, which would leave them counted against the in-flight
    limit for good), and the partition takes the next record."""
    producer, outcomes = _Producer(), Outcomes()
    publisher = KafkaPublisher(offline_settings, Metrics(outcomes, lambda: True))
    _serve(publisher, producer)
    producer.taking.set()
    cluster = producer.client.cluster
    looked_up = cluster.partitions_for_topic

    def broken_once(topic: str) -> set[int] | None:
        cluster.partitions_for_topic = looked_up  # type: ignore[method-assign]
        raise RuntimeError("a bug in the bridge")

    cluster.partitions_for_topic = broken_once  # type: ignore[method-assign]
    started = time.monotonic()
    with pytest.raises(BrokerNotReady, match="was not written"):
        await publisher.publish(_record("t", 0, 1), _in(5.0))
    assert time.monotonic() - started < 1
    assert publisher.abandoned == 0
    following = asyncio.ensure_future(publisher.publish(_record("t", 0, 2), _in(5.0)))
    await _sent(producer, 1)
    producer.sent[0][1].set_result(None)
    await following
    assert outcomes.snapshot()[Outcome.AMBIGUOUS_LOST.value] == 0


async def test_a_batch_acknowledged_as_the_producer_stops_is_answered_by_that_acknowledgement() -> None:
    """The producer settles a batch on its way out, and the bridge settles what it still holds in the same
    turn, before the acknowledgement's callback ran: the callback is confirmed, and an expired one counted
    landed, not lost."""
    producer, reports = _Producer(), list[bool | None]()
    batches = _batches(producer, reports.append)
    producer.taking.set()
    confirmed = batches.add(*_placed("t", 0, 1))
    expired = batches.add(*_placed("t", 1, 2))
    await _sent(producer, 2)
    batches.expire(expired)
    for _, delivery in producer.sent:
        delivery.set_result(None)  # the broker's answers, during producer.stop()
    batches.abort_in_producer("the bridge is shutting down")  # right after stop() returned
    await confirmed
    with pytest.raises(Expired) as raised:
        await expired
    assert reports == [None, True]
    assert await raised.value.fate is True


async def test_a_handler_cancelled_while_its_record_is_in_the_producer_still_has_it_followed(
    offline_settings: ServeSettings,
) -> None:
    """At shutdown aiohttp cancels the handlers still running: their records count against the in-flight
    limit until settled, and how they ended is counted as for an expired one."""
    producer, outcomes = _Producer(), Outcomes()
    publisher = KafkaPublisher(offline_settings, Metrics(outcomes, lambda: True))
    _serve(publisher, producer)
    producer.taking.set()
    publishing = asyncio.ensure_future(publisher.publish(_record("t", 0, 1), _in(5.0)))
    await _sent(producer, 1)
    publishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await publishing
    assert publisher.abandoned == 1
    producer.sent[0][1].set_result(None)
    await asyncio.sleep(0)
    assert publisher.abandoned == 0
    assert outcomes.snapshot()[Outcome.AMBIGUOUS_LANDED.value] == 1


class _SizedBuilder(_Builder):
    """A batch that knows its size, as aiokafka's does."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 61

    def append(self, *, timestamp: int, key: bytes, value: bytes, headers: list[Any]) -> object | None:
        self.bytes += len(key) + len(value) + 30
        return super().append(timestamp=timestamp, key=key, value=value, headers=headers)

    def size(self) -> int:
        return self.bytes


async def test_batches_of_a_topic_with_a_small_message_limit_are_cut_at_that_limit() -> None:
    """A batch of several records must fit the topic's max.message.bytes as a whole: the broker refuses the
    batch, not the record, so records that fit alone must not travel together beyond it."""
    producer = _Producer()
    producer.create_batch = _SizedBuilder  # type: ignore[method-assign]
    batches = PartitionBatches(cast(AIOKafkaProducer, producer), lambda _: None, batch_limits={"t": 1000})
    waiters = [batches.add(*_placed("t", 0, number, size=500)) for number in range(3)]
    producer.taking.set()
    await _sent(producer, 1)
    assert [len(batch.records) for batch, _ in producer.sent] == [1]
    for number in range(1, 3):
        producer.sent[number - 1][1].set_result(None)
        await _sent(producer, number + 1)
    producer.sent[2][1].set_result(None)
    await asyncio.gather(*waiters)
    assert [len(batch.records) for batch, _ in producer.sent] == [1, 1, 1]


async def test_aiokafkas_own_request_timeout_is_not_counted_or_logged_as_a_refusal_by_the_broker(
    offline_settings: ServeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka raises its client-side request timeout as `RequestTimedOutError` (the broker's
    REQUEST_TIMED_OUT), from an `asyncio.TimeoutError`: a silent broker, not one that refused the batch.
    Only the broker's own answer counts in `bridge_broker_errors_total` and logs a refusal."""
    producer, outcomes = _Producer(), Outcomes()
    metrics = Metrics(outcomes, lambda: True)
    publisher = KafkaPublisher(offline_settings, metrics)
    _serve(publisher, producer)
    producer.taking.set()
    for number, silent in enumerate((True, False)):
        error = RequestTimedOutError()
        if silent:
            error.__cause__ = TimeoutError()
        write = asyncio.ensure_future(publisher.publish(_record("t", 0, number), _in(5.0)))
        await _sent(producer, number + 1)
        producer.sent[-1][1].set_exception(error)
        with pytest.raises(PublishError):
            await write
        refusals = [r for r in caplog.records if "the broker refused a batch" in r.getMessage()]
        assert len(refusals) == (0 if silent else 1)
        assert metrics.broker_errors == ({} if silent else {"RequestTimedOutError": 1})
