"""Records grouped into one aiokafka batch per partition, and many callbacks answered per acknowledgement.

`producer.send()` costs a chain of coroutines, a future and a `RecordMetadata` per record. Here a callback's
record is appended to the open batch of its partition (`BatchBuilder.append`, in C) and the callback waits
on a plain future. One task per partition hands the batch to the producer with `send_batch` after the
current turn of the event loop, so every callback that arrived in that turn rides along; while aiokafka
still holds the partition's previous batch, new records keep filling the next one. When the broker
acknowledges a batch (acks=all), one callback resolves the futures of all its records.
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from bridge.envelope import Record

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
        self._flushers: set[asyncio.Task[None]] = set()
        self._in_producer: dict[asyncio.Future[Any], list[asyncio.Future[None]]] = {}
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
            flusher = self._loop.create_task(self._flush(partition, queue), name="kafka-batch")
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        if not queue or not self._append(queue[-1], record):
            batch = _Batch(self._producer.create_batch())
            queue.append(batch)
            self._append(batch, record)  # the first record always fits, however large
        return queue[-1].waiters[-1]

    def expire(self, waiter: asyncio.Future[None]) -> None:
        """The callback's deadline: fail `waiter` with `Expired` and follow its record to its end.

        Failing the waiter here, rather than cancelling it, marks it abandoned in the same step: its
        batch cannot settle in between unnoticed."""
        if not waiter.done():
            waiter.set_exception(Expired())
            self._abandoned.add(waiter)
            self._on_abandoned(None)

    async def flush(self) -> None:
        """Hand every queued batch to the producer."""
        while self._flushers:
            await asyncio.wait(set(self._flushers))

    def close(self, reason: BaseException) -> None:
        """Take no more records and give up on every batch not yet handed to the producer: their records
        were not written."""
        self._closed = reason
        for flusher in self._flushers:
            flusher.cancel()
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            for batch in queue:
                self._settle(batch.waiters, NotHandedOver(reason))
            queue.clear()

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

    async def _flush(self, partition: Partition, queue: deque[_Batch]) -> None:
        topic, number = partition
        try:
            while queue:
                batch = queue.popleft()  # records arriving from now on start the next batch
                try:
                    # Waits while aiokafka still holds this partition's previous batch.
                    delivery = await self._producer.send_batch(batch.builder, topic, partition=number)
                except asyncio.CancelledError:
                    self._settle(
                        batch.waiters, NotHandedOver(KafkaConnectionError("the producer was closed"))
                    )
                    raise
                except Exception as exc:  # noqa: BLE001 - whatever the reason, the batch was not written
                    self._settle(batch.waiters, NotHandedOver(exc))
                    continue
                self._in_producer[delivery] = batch.waiters
                if self._on_queued is not None:
                    self._on_queued(len(batch.waiters))
                delivery.add_done_callback(self._acknowledged)
        finally:
            if self._queues.get(partition) is queue:
                del self._queues[partition]
            for batch in queue:  # left only if the loop above failed unexpectedly
                self._settle(batch.waiters, NotHandedOver(KafkaConnectionError("the batch was dropped")))

    def _acknowledged(self, delivery: asyncio.Future[Any], error: BaseException | None = None) -> None:
        waiters = self._in_producer.pop(delivery, None)
        if error is None:
            if delivery.cancelled():
                error = KafkaConnectionError("the producer dropped the batch")
            else:
                error = delivery.exception()  # retrieved even when settled already: no warning at exit
        if waiters is None:  # settled already, by `abort_in_producer`
            return
        if self._on_queued is not None:
            self._on_queued(-len(waiters))
        self._settle(waiters, error)

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
