"""Records grouped into one aiokafka batch per partition, and many callbacks answered per acknowledgement.

`producer.send()` costs a chain of coroutines, a future and a `RecordMetadata` per record. Here a callback's
record is appended to the open batch of its partition (`BatchBuilder.append`, in C) and the callback waits
on a plain future. Like aiokafka, which keeps one produce request in flight per broker, the batches of a
broker's partitions are handed over together, by one task, once the broker has answered the previous
ones: every callback that arrived meanwhile rides along, and the producer's sender wakes once per request
rather than once per batch. When the broker acknowledges a batch (acks=all), one callback resolves the
futures of all its records.
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
    """The records of one producer not yet acknowledged, grouped per partition and handed over per broker."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        on_abandoned: Callable[[bool | None], None],
        on_queued: Callable[[int], None] | None = None,
        leader_of: Callable[[Partition], int | None] | None = None,
    ) -> None:
        """`on_abandoned(None)` is told of each record whose callback expired, then `on_abandoned(landed)`
        of how it ended; `on_queued(n)` of records handed to the producer (n > 0) and settled (n < 0);
        `leader_of(partition)` names the broker leading a partition (by default, from the producer's
        metadata)."""
        self._producer = producer
        self._on_abandoned = on_abandoned
        self._on_queued = on_queued
        self._leader_of = leader_of or self._leader_in_metadata
        self._leaders: dict[Partition, int | None] = {}
        self._queues: dict[Partition, deque[_Batch]] = {}
        self._busy: dict[int | None, int] = {}
        """Per broker, the batches handed to the producer and not yet settled."""
        self._in_producer: dict[asyncio.Future[Any], tuple[int | None, list[asyncio.Future[None]]]] = {}
        self._flusher: asyncio.Task[None] | None = None
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
        if self._flusher is None and not self._busy.get(self._leader(partition)):
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

    def forget_leaders(self) -> None:
        """The cluster's metadata changed: look the partitions' leaders up again."""
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
        records may have reached the broker: the error is ambiguous."""
        for delivery in list(self._in_producer):
            self._acknowledged(delivery, KafkaConnectionError(reason))

    def _leader_in_metadata(self, partition: Partition) -> int | None:
        leader: int | None = self._producer.client.cluster.leader_for_partition(TopicPartition(*partition))
        return leader

    def _leader(self, partition: Partition) -> int | None:
        try:
            return self._leaders[partition]
        except KeyError:
            leader = self._leaders[partition] = self._leader_of(partition)
            return leader

    def _append(self, batch: _Batch, record: Record) -> bool:
        metadata = batch.builder.append(
            timestamp=record.timestamp_ms, key=record.key, value=record.value, headers=list(record.headers)
        )
        if metadata is None:
            return False
        batch.waiters.append(self._loop.create_future())
        return True

    async def _flush(self) -> None:
        """Hand over the oldest batch of each partition whose broker has none of ours in the producer."""
        idle: dict[int | None, bool] = {}
        try:
            for partition in list(self._queues):
                leader = self._leader(partition)
                if leader not in idle:
                    idle[leader] = not self._busy.get(leader)
                queue = self._queues.get(partition)
                if not idle[leader] or not queue:
                    continue
                batch = queue.popleft()  # records arriving from now on start the next batch
                if not queue:
                    del self._queues[partition]
                try:
                    # At once, unless aiokafka still holds a batch of the partition (its leader moved).
                    delivery = await self._producer.send_batch(
                        batch.builder, partition[0], partition=partition[1]
                    )
                except asyncio.CancelledError:
                    closed = KafkaConnectionError("the producer was closed")
                    self._settle(batch.waiters, NotHandedOver(closed))
                    raise
                except Exception as exc:  # noqa: BLE001 - whatever the reason, the batch was not written
                    self._settle(batch.waiters, NotHandedOver(exc))
                    continue
                self._busy[leader] = self._busy.get(leader, 0) + 1
                self._in_producer[delivery] = (leader, batch.waiters)
                if self._on_queued is not None:
                    self._on_queued(len(batch.waiters))
                delivery.add_done_callback(self._acknowledged)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: say so; the next record for an idle broker starts a new round
            log.exception("unexpected failure while handing batches to the Kafka producer")
            return
        finally:
            self._flusher = None
            if not self._queues:
                self._emptied.set()
        self._flush_idle()

    def _flush_idle(self) -> None:
        """Start handing over if a partition with queued batches has a broker free for them."""
        if self._flusher is not None or self._closed is not None:
            return
        for partition in self._queues:
            if not self._busy.get(self._leader(partition)):
                self._flusher = self._loop.create_task(self._flush(), name="kafka-batches")
                return

    def _acknowledged(self, delivery: asyncio.Future[Any], error: BaseException | None = None) -> None:
        entry = self._in_producer.pop(delivery, None)
        if error is None:
            if delivery.cancelled():
                error = KafkaConnectionError("the producer dropped the batch")
            else:
                error = delivery.exception()  # retrieved even when settled already: no warning at exit
        if entry is None:  # settled already, by `abort_in_producer`
            return
        leader, waiters = entry
        self._busy[leader] -= 1
        if self._on_queued is not None:
            self._on_queued(-len(waiters))
        self._settle(waiters, error)
        if not self._busy[leader]:
            self._flush_idle()

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
