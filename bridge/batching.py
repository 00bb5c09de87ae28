"""Records grouped into one aiokafka batch per partition, and many callbacks answered per acknowledgement.

`producer.send()` costs a chain of coroutines, a future and a `RecordMetadata` per record. Here a callback's
record is appended to the open batch of its partition (`BatchBuilder.append`, in C) and the callback waits
on a plain future. A partition has at most one batch in the producer, and, like aiokafka, which keeps one
produce request in flight per broker, the bridge hands a broker new batches once it has answered the last
ones it was given: meanwhile records keep filling the next batches. One task hands over, in one turn of the
event loop, the batches of every partition that is free, so the producer's sender wakes once for them all.
When the broker acknowledges a batch (acks=all), one callback resolves the futures of all its records.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from bridge.envelope import Record

log = logging.getLogger(__name__)

# (topic, partition)
Partition = tuple[str, int]
# A broker's node id; -1 or None when the partition has no leader or is unknown.
Leader = int | None


class NotHandedOver(Exception):
    """The record's batch never reached the producer: it was not written."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause


class Expired(Exception):
    """The callback's deadline passed before the broker confirmed its record, which may still land."""


class _Batch:
    __slots__ = ("builder", "waiters")

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        self.waiters: list[asyncio.Future[None]] = []


class PartitionBatches:
    """The records of one producer not yet acknowledged, grouped per partition."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        on_abandoned: Callable[[bool | None], None],
        on_queued: Callable[[int], None] | None = None,
    ) -> None:
        """`on_abandoned(None)` is told of each record whose callback expired, then `on_abandoned(landed)`
        of how it ended; `on_queued(n)` of records handed to the producer (n > 0) and settled (n < 0)."""
        self._producer = producer
        self._on_abandoned = on_abandoned
        self._on_queued = on_queued
        self._queues: dict[Partition, deque[_Batch]] = {}
        """Batches not yet handed to the producer, oldest first."""
        self._in_producer: dict[
            asyncio.Future[Any], tuple[Partition, Leader, int, list[asyncio.Future[None]]]
        ] = {}
        self._busy: set[Partition] = set()
        """Partitions with a batch in the producer, not yet settled."""
        self._answering: dict[Leader, int] = {}
        """Brokers given batches in a round, by round, until the first of them settles: the broker answered.
        """
        self._round = 0
        self._leaders: dict[Partition, Leader] = {}
        self._known_topics: dict[str, bool] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._stragglers: set[asyncio.Task[None]] = set()
        self._emptied = asyncio.Event()
        self._emptied.set()
        self._abandoned: set[asyncio.Future[None]] = set()
        self._closed: BaseException | None = None
        self._loop = asyncio.get_running_loop()

    def add(self, record: Record) -> asyncio.Future[None]:
        """Queue `record`; the future resolves when the broker has it, or fails with the reason it has not:
        `NotHandedOver`, a `KafkaError` from the producer, or `Expired` (see `expire`)."""
        if self._closed is not None:
            raise NotHandedOver(self._closed)
        partition = (record.topic, record.partition)
        queue = self._queues.get(partition)
        if queue is None:
            queue = self._queues[partition] = deque()
            self._emptied.clear()
        if not queue or not self._append(queue[-1], record):
            batch = _Batch(self._producer.create_batch())
            queue.append(batch)
            self._append(batch, record)  # the first record always fits, however large
        if self._flusher is None and self._free(partition):
            self._flusher = self._loop.create_task(self._flush(), name="kafka-batches")
        return queue[-1].waiters[-1]

    def expire(self, waiter: asyncio.Future[None]) -> None:
        """The callback's deadline: fail `waiter` with `Expired` and follow its record to its end.

        Failing the waiter here, rather than cancelling it, marks it abandoned in the same step: its
        batch cannot settle in between unnoticed."""
        if not waiter.done():
            waiter.set_exception(Expired())
            self._abandoned.add(waiter)
            self._on_abandoned(None)

    def metadata_changed(self) -> None:
        """The cluster's metadata changed: look the topics and the partitions' leaders up again."""
        self._known_topics.clear()
        self._leaders.clear()

    async def flush(self) -> None:
        """Wait until every queued batch is handed to the producer."""
        await self._emptied.wait()

    def close(self, reason: BaseException) -> None:
        """Take no more records and give up on every batch not yet handed to the producer: their records
        were not written."""
        self._closed = reason
        for task in (self._flusher, *self._stragglers):
            if task is not None:
                task.cancel()
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            for batch in queue:
                self._settle(batch.waiters, NotHandedOver(reason))
            queue.clear()
        self._emptied.set()

    def abort_in_producer(self, reason: str) -> None:
        """The producer is stopped: whatever it still holds will never be settled by it, so settle it now.

        aiokafka resolves nothing when its sender task ends without an error (cancelled, say). Such
        records may have reached the broker: the error is ambiguous."""
        for delivery in list(self._in_producer):
            self._acknowledged(delivery, KafkaConnectionError(reason))

    def _append(self, batch: _Batch, record: Record) -> bool:
        metadata = batch.builder.append(
            timestamp=record.timestamp_ms, key=record.key, value=record.value, headers=list(record.headers)
        )
        if metadata is None:
            return False
        batch.waiters.append(self._loop.create_future())
        return True

    def _leader(self, partition: Partition) -> Leader:
        if partition in self._leaders:
            return self._leaders[partition]
        cluster = self._producer.client.cluster
        leader: Leader = cluster.leader_for_partition(TopicPartition(*partition))
        self._leaders[partition] = leader
        return leader

    def _free(self, partition: Partition, round_: int = -1) -> bool:
        """Whether a batch of `partition` may be handed over in round `round_` (-1: a new one)."""
        if partition in self._busy:
            return False
        answering = self._answering.get(self._leader(partition))
        return answering is None or answering == round_

    def _topic_known(self, topic: str) -> bool:
        known = self._known_topics.get(topic)
        if known is None:
            known = self._known_topics[topic] = (
                self._producer.client.cluster.partitions_for_topic(topic) is not None
            )
        return known

    async def _flush(self) -> None:
        """Hand over the oldest batch of each free partition (see `_free`)."""
        self._round = round_ = self._round + 1
        try:
            for partition in list(self._queues):
                queue = self._queues.get(partition)
                if not queue or not self._free(partition, round_):
                    continue
                batch = queue.popleft()  # records arriving from now on start the next batch
                if not queue:
                    del self._queues[partition]
                leader = self._leader(partition)
                self._busy.add(partition)
                self._answering[leader] = round_
                if self._topic_known(partition[0]):
                    # At once: aiokafka holds no batch of this partition, and knows its topic.
                    await self._hand_over(partition, leader, round_, batch)
                else:  # aiokafka will wait for the topic's metadata: not in this round, which others share
                    handing = self._hand_over(partition, leader, round_, batch)
                    straggler = self._loop.create_task(handing, name="kafka-batch")
                    self._stragglers.add(straggler)
                    straggler.add_done_callback(self._stragglers.discard)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: say so; the next record or acknowledgement starts a new round
            log.exception("unexpected failure while handing batches to the Kafka producer")
            return  # not at once: a failure that repeats would go round and round
        finally:
            self._flusher = None
            if not self._queues:
                self._emptied.set()
        self._flush_free()

    async def _hand_over(self, partition: Partition, leader: Leader, round_: int, batch: _Batch) -> None:
        try:
            delivery = await self._producer.send_batch(batch.builder, partition[0], partition=partition[1])
        except asyncio.CancelledError:
            self._released(partition, leader, round_)
            self._settle(batch.waiters, NotHandedOver(KafkaConnectionError("the producer was closed")))
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the reason, the batch was not written
            self._released(partition, leader, round_)
            self._settle(batch.waiters, NotHandedOver(exc))
            return
        self._in_producer[delivery] = (partition, leader, round_, batch.waiters)
        delivery.add_done_callback(self._acknowledged)
        if self._on_queued is not None:
            self._on_queued(len(batch.waiters))

    def _released(self, partition: Partition, leader: Leader, round_: int) -> None:
        """`partition`'s batch is settled: the partition is free, and so is its broker if that batch was of
        the broker's last round (aiokafka settles a request's batches together; a retried one, later)."""
        self._busy.discard(partition)
        if self._answering.get(leader) == round_:
            del self._answering[leader]

    def _flush_free(self) -> None:
        """Start a round if a partition with queued batches has none in the producer."""
        if self._flusher is not None or self._closed is not None:
            return
        if any(self._free(partition) for partition in self._queues):
            self._flusher = self._loop.create_task(self._flush(), name="kafka-batches")

    def _acknowledged(self, delivery: asyncio.Future[Any], error: BaseException | None = None) -> None:
        entry = self._in_producer.pop(delivery, None)
        if error is None:
            if delivery.cancelled():
                error = KafkaConnectionError("the producer dropped the batch")
            else:
                error = delivery.exception()  # retrieved even when settled already: no warning at exit
        if entry is None:  # settled already, by `abort_in_producer`
            return
        partition, leader, round_, waiters = entry
        self._released(partition, leader, round_)
        if self._on_queued is not None:
            self._on_queued(-len(waiters))
        self._settle(waiters, error)
        self._flush_free()

    def _settle(self, waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
        for waiter in waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    # One instance per waiter: each is raised in its own task, with its own traceback.
                    waiter.set_exception(copy.copy(error))
            elif waiter in self._abandoned:
                self._abandoned.discard(waiter)
                self._on_abandoned(error is None)
