"""Records grouped into one aiokafka batch per partition, and many callbacks answered per acknowledgement.

`producer.send()` costs a chain of coroutines, a future and a `RecordMetadata` per record. Here a callback's
record is appended to the open batch of its partition (`BatchBuilder.append`, in C) and the callback waits
on a plain future. A partition has at most one batch in the producer, and, like aiokafka, which keeps one
produce request in flight per broker, the bridge hands a broker new batches once it has answered the last
ones it was given: meanwhile records keep filling the next batches. One task hands over, in one turn of the
event loop, the batches of every partition that is free, so the producer's sender wakes once for them all.
When the broker acknowledges a batch (acks=all), one callback resolves the futures of all its records.

A batch is handed over only for a topic the producer's metadata holds. aiokafka asks the broker for an
unknown topic by name, and such a metadata request lets a broker with `auto.create.topics.enable` create the
topic anew, with the broker's default partition count: the producer must never send one, so the bridge
answers such records as not written instead.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, UnknownTopicOrPartitionError

from bridge.kafka.sizes import record_bytes
from bridge.tencent.envelope import Record

log = logging.getLogger("bridge.batching")  # see `bridge.logs.LOGGERS`

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
    """The callback's deadline passed before the broker confirmed its record, which may still land.

    `fate` resolves once the record's end is known: True if it landed after all, False if it was given up.
    """

    def __init__(self, fate: asyncio.Future[bool]) -> None:
        super().__init__()
        self.fate = fate


class _Batch:
    __slots__ = ("builder", "handed_over", "waiters")

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        self.waiters: list[asyncio.Future[None]] = []
        self.handed_over = False


class PartitionBatches:
    """The records of one producer not yet acknowledged, grouped per partition."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        on_abandoned: Callable[[bool | None], None],
        on_queued: Callable[[int], None] | None = None,
        batch_limits: Mapping[str, int] | None = None,
        on_settled: Callable[[Partition, int, BaseException | None], None] | None = None,
    ) -> None:
        """`on_abandoned(None)` is told of each record whose callback stopped waiting (expired, or its
        handler was cancelled), then `on_abandoned(landed)` of how it ended; `on_queued(n)` of records
        handed to the producer (n > 0) and settled (n < 0); `on_settled(partition, records, error)` of each
        batch the producer settled, with the error it failed with (None: confirmed). `batch_limits` gives the
        topics whose `max.message.bytes` is below `BATCH_BYTES`: their batches are cut at that size."""
        self._producer = producer
        self._on_abandoned = on_abandoned
        self._on_queued = on_queued
        self._on_settled = on_settled
        self._batch_limits = dict(batch_limits or {})
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
        self._emptied = asyncio.Event()
        self._emptied.set()
        self._abandoned: dict[asyncio.Future[None], asyncio.Future[bool] | None] = {}
        """Waiters whose callback stopped waiting, with the future that tells an expired one's fate."""
        self._closed: BaseException | None = None
        self._loop = asyncio.get_running_loop()

    def add(self, record: Record, partition_number: int) -> asyncio.Future[None]:
        """Queue `record` for its topic's partition `partition_number`; the future resolves when the broker
        has it, or fails with the reason it has not: `NotHandedOver`, a `KafkaError` from the producer, or
        `Expired` (see `expire`)."""
        if self._closed is not None:
            raise NotHandedOver(self._closed)
        partition = (record.topic, partition_number)
        queue = self._queues.get(partition)
        if queue is None:
            queue = self._queues[partition] = deque()
            self._emptied.clear()
        # `_fits` and `_append` written out for the open batch: this runs for every callback.
        batch = queue[-1] if queue else None
        if (
            batch is None
            or (self._batch_limits and not self._fits(batch, record))
            or batch.builder.append(
                timestamp=record.timestamp_ms,
                key=record.key,
                value=record.value,
                headers=list(record.headers),
            )
            is None
        ):
            batch = _Batch(self._producer.create_batch())
            queue.append(batch)
            self._append(batch, record)  # the first record always fits, however large
            waiter = batch.waiters[-1]
        else:
            waiter = self._loop.create_future()
            batch.waiters.append(waiter)
        if self._flusher is None and self._free(partition):
            self._flusher = self._loop.create_task(self._flush(), name="kafka-batches")
        return waiter

    def expire(self, waiter: asyncio.Future[None]) -> None:
        """The callback's deadline: fail `waiter` with `Expired` and follow its record to its end.

        Failing the waiter here, rather than cancelling it, marks it abandoned in the same step: its
        batch cannot settle in between unnoticed."""
        if not waiter.done():
            fate = self._loop.create_future()
            waiter.set_exception(Expired(fate))
            self._abandoned[waiter] = fate
            self._on_abandoned(None)

    def abandon(self, waiter: asyncio.Future[None]) -> None:
        """The callback's handler was cancelled while waiting for `waiter` (at shutdown): follow its record
        to its end as if it had expired. A record settled in the same turn is reported at once."""
        if waiter in self._abandoned:
            return  # expired just before
        self._on_abandoned(None)
        if waiter.cancelled() or not waiter.done():
            self._abandoned[waiter] = None
        else:
            self._on_abandoned(waiter.exception() is None)

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
        if self._flusher is not None:
            self._flusher.cancel()
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            for batch in queue:
                self._settle(batch.waiters, NotHandedOver(reason))
            queue.clear()
        self._emptied.set()

    def abort_in_producer(self, reason: str) -> None:
        """The producer is stopped: whatever it still holds will never be settled by it, so settle it now.

        aiokafka resolves nothing when its sender task ends without an error (cancelled, say). Such
        records may have reached the broker: the error is ambiguous. A batch the broker acknowledged while
        the producer stopped is settled by that answer: its done callback may not have run yet."""
        for delivery in list(self._in_producer):
            if delivery.done():
                self._acknowledged(delivery)
            else:
                self._acknowledged(delivery, KafkaConnectionError(reason))

    def _fits(self, batch: _Batch, record: Record) -> bool:
        """Whether `record` may join `batch` within its topic's `max.message.bytes`, when that is small."""
        limit = self._batch_limits.get(record.topic) if self._batch_limits else None
        return limit is None or batch.builder.size() + record_bytes(record) <= limit

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
        batch: _Batch | None = None
        claimed: tuple[Partition, Leader] | None = None
        try:
            for partition in list(self._queues):
                queue = self._queues.get(partition)
                if not queue or not self._free(partition, round_):
                    continue
                batch, claimed = queue.popleft(), None  # records arriving from now on start the next batch
                if not queue:
                    del self._queues[partition]
                if not self._topic_known(partition[0]):
                    unknown = UnknownTopicOrPartitionError(f"topic {partition[0]} is not in the metadata")
                    self._settle(batch.waiters, NotHandedOver(unknown))
                    batch = None
                    continue
                leader = self._leader(partition)
                self._busy.add(partition)
                self._answering[leader] = round_
                claimed = partition, leader
                # At once: aiokafka holds no batch of this partition, and knows its topic.
                await self._hand_over(partition, leader, round_, batch)
                batch = None  # handed over, or settled by `_hand_over`
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: say so; the next record or acknowledgement starts a new round
            log.exception("unexpected failure while handing batches to the Kafka producer")
            if batch is not None and not batch.handed_over:  # its records were not written: say so now
                if claimed is not None:
                    self._released(*claimed, round_)
                self._settle(batch.waiters, NotHandedOver(exc))
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
        batch.handed_over = True
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
        if self._on_settled is not None:
            self._on_settled(partition, len(waiters), error)
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
                fate = self._abandoned.pop(waiter)
                if fate is not None:
                    fate.set_result(error is None)
                self._on_abandoned(error is None)
