"""The publisher: one aiokafka producer per process, writes confirmed with acks=all under a deadline.

`KafkaPublisher.start()` returns at once and connects in the background, so the bridge serves `/healthz`
and answers callbacks with 503 while the brokers are unreachable or its topics are missing; it becomes
ready by itself. Every await on aiokafka runs under a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from bridge.envelope import Record
from bridge.errors import BrokerNotReady, BrokerRejected, DeliveryTimeout
from bridge.settings import Settings
from bridge.topics import create_topics, how_to_create, max_record_bytes

log = logging.getLogger(__name__)

_RETRY_FIRST_S, _RETRY_MAX_S = 0.25, 5.0
# Bound on connecting, reading metadata and creating topics; the delivery deadline bounds each write.
_BROKER_CALL_TIMEOUT_S = 10.0
_TOPIC_RECHECK_S = 5.0


class Publisher(Protocol):
    """What the HTTP layer needs from Kafka; tests may substitute a fake."""

    @property
    def ready(self) -> bool: ...

    @property
    def status(self) -> str:
        """Why the publisher is or is not ready, in words."""
        ...

    def partition_count(self, topic: str) -> int | None: ...

    async def publish(self, record: Record) -> None:
        """Return once the broker has confirmed the record with acks=all; raise `PublishError` otherwise."""
        ...


class KafkaPublisher:
    def __init__(
        self,
        settings: Settings,
        on_queued: Callable[[asyncio.Future[Any]], None] | None = None,  # issue 6: metrics hook
    ) -> None:
        self._settings = settings
        self._on_queued = on_queued
        self._producer: AIOKafkaProducer | None = None
        self._connector: asyncio.Task[None] | None = None
        self._status = "connecting to Kafka"

    @property
    def ready(self) -> bool:
        producer = self._producer
        return producer is not None and bool(producer.client.cluster.brokers())

    @property
    def status(self) -> str:
        return "ready" if self.ready else self._status

    def partition_count(self, topic: str) -> int | None:
        producer = self._producer
        if producer is None:
            return None
        partitions = producer.client.cluster.partitions_for_topic(topic)
        return len(partitions) if partitions else None

    async def start(self) -> None:
        self._connector = asyncio.create_task(self._connect(), name="kafka-connect")

    async def close(self) -> None:
        """Stop connecting, then flush and close the producer within the shutdown timeout."""
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        producer, self._producer = self._producer, None
        self._status = "closed"
        if producer is not None:
            await self._stop(producer)

    async def publish(self, record: Record) -> None:
        producer = self._producer
        if producer is None:
            raise BrokerNotReady(f"Kafka is not ready ({self._status}); the callback was not written")
        timeout = self._settings.delivery_timeout
        try:
            async with asyncio.timeout(timeout):
                delivery = await producer.send(
                    record.topic,
                    record.value,
                    key=record.key,
                    partition=record.partition,
                    timestamp_ms=record.timestamp_ms,
                    headers=list(record.headers),
                )
                # The deadline must not cancel aiokafka's own future: the batch may still be in flight.
                delivery.add_done_callback(_retrieve_exception)
                if self._on_queued is not None:  # issue 6: counts the record as queued until it is done
                    self._on_queued(delivery)
                await asyncio.shield(delivery)
        except TimeoutError:
            raise DeliveryTimeout(
                f"Kafka did not confirm the write within {timeout:g} s; the callback is not acknowledged"
            ) from None
        except KafkaError as exc:
            raise BrokerRejected(f"Kafka refused the write: {_describe(exc)}") from None

    async def _connect(self) -> None:
        settings = self._settings
        delay = _RETRY_FIRST_S
        while True:
            # A producer whose start() failed hangs on send() (aiokafka #759): a new one for every attempt.
            producer = self._new_producer()
            try:
                async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
                    await producer.start()
                await self._wait_for_topics(producer)
            except (KafkaError, OSError, TimeoutError) as exc:
                self._status = (
                    f"cannot reach Kafka at {','.join(settings.bootstrap_servers)}: {_describe(exc)}"
                )
                log.warning("%s; retrying in %.2g s", self._status, delay)
                await self._stop(producer)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            except BaseException:
                await self._stop(producer)
                raise
            self._producer = producer
            log.info(
                "connected to Kafka at %s; writing to %s",
                ",".join(settings.bootstrap_servers),
                ", ".join(settings.topics),
            )
            return

    async def _wait_for_topics(self, producer: AIOKafkaProducer) -> None:
        """Return when every topic exists and its partitions are known; create them if allowed."""
        settings = self._settings
        reported: list[str] = []
        while True:
            async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
                cluster = await producer.client.fetch_all_metadata()
            missing = [topic for topic in settings.topics if topic not in cluster.topics()]
            if missing and settings.create_topics:
                async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
                    await create_topics(settings, missing, len(cluster.brokers()))
                continue
            if not missing:
                break
            self._status = f"topics missing: {', '.join(missing)}"
            if missing != reported:
                log.error(
                    "not ready: topics missing: %s; %s", ", ".join(missing), how_to_create(settings, missing)
                )
                reported = missing
            await asyncio.sleep(_TOPIC_RECHECK_S)
        async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
            for topic in settings.topics:
                await producer.partitions_for(topic)

    def _new_producer(self) -> AIOKafkaProducer:
        settings = self._settings
        return AIOKafkaProducer(
            bootstrap_servers=list(settings.bootstrap_servers),
            client_id=settings.client_id,
            acks="all",
            # aiokafka's idempotent mode never expires a batch: a hung broker would hang requests and
            # shutdown forever (aiokafka #1101).
            enable_idempotence=False,
            compression_type=None if settings.compression == "none" else settings.compression,
            linger_ms=settings.linger_ms,
            max_request_size=max_record_bytes(settings),
            # A produce request outliving the delivery deadline only delays noticing a dead connection.
            request_timeout_ms=max(1000, math.ceil(settings.delivery_timeout * 1000)),
        )

    async def _stop(self, producer: AIOKafkaProducer) -> None:
        try:
            async with asyncio.timeout(self._settings.shutdown_timeout):
                await producer.stop()
        except TimeoutError:
            # A timeout is the expected failure here, and its traceback would say nothing more.
            log.error("the Kafka producer did not stop within %g s", self._settings.shutdown_timeout)  # noqa: TRY400
        except (KafkaError, OSError) as exc:
            log.warning("stopping the Kafka producer: %s", _describe(exc))


def _retrieve_exception(delivery: asyncio.Future[Any]) -> None:
    if not delivery.cancelled():
        delivery.exception()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name
