"""The publisher: one aiokafka producer per process, writes confirmed with acks=all under a deadline.

`KafkaPublisher.start()` returns at once and connects in the background, so the bridge serves `/healthz`
and answers callbacks with 503 while the brokers are unreachable or its topics are missing; it becomes
ready by itself. Every await on aiokafka runs under a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaConnectionError, KafkaError

from bridge.batching import Expired, NotHandedOver, PartitionBatches
from bridge.envelope import Record
from bridge.errors import BrokerNotReady, BrokerRejected, DeliveryTimeout, describe
from bridge.kafka_security import kafka_connection_options
from bridge.outcomes import Outcome, Outcomes
from bridge.settings import Settings
from bridge.topics import create_topics, how_to_create, max_record_bytes

log = logging.getLogger(__name__)

_RETRY_FIRST_S, _RETRY_MAX_S = 0.25, 2.0
# Bound on connecting, reading metadata and creating topics; the delivery deadline bounds each write.
_BROKER_CALL_TIMEOUT_S = 10.0
_TOPIC_RECHECK_S = 5.0
_PROBE_INTERVAL_S = 1.0
_METADATA_SETTLE_S = 0.05
_LEADER_RECHECK_S = 0.1


class Publisher(Protocol):
    """What the HTTP layer needs from Kafka; tests may substitute a fake."""

    @property
    def ready(self) -> bool: ...

    @property
    def status(self) -> str:
        """Why the publisher is or is not ready, in words."""
        ...

    @property
    def abandoned(self) -> int:
        """Records answered 503 that the producer still holds: they count against the in-flight limit."""
        ...

    def partition_count(self, topic: str) -> int | None: ...

    async def publish(self, record: Record, timeout: float) -> None:
        """Return once the broker has confirmed the record with acks=all; raise `PublishError` otherwise."""
        ...


class KafkaPublisher:
    def __init__(
        self,
        settings: Settings,
        outcomes: Outcomes,
        on_queued: Callable[[int], None] | None = None,
    ) -> None:
        """`on_queued(n)` is told of records handed to the producer (n > 0) and settled (n < 0)."""
        self._settings = settings
        # Built once, here: a bad TLS file or a SASL setting missing fails the start, not every reconnect.
        self._connection_options = kafka_connection_options(settings)
        self._outcomes = outcomes
        self._on_queued = on_queued
        self._producer: AIOKafkaProducer | None = None
        self._batches: PartitionBatches | None = None
        self._partition_counts: dict[str, int] = {}
        self._max_record_bytes = max_record_bytes(settings)
        self._connector: asyncio.Task[None] | None = None
        self._status = "connecting to Kafka"
        self._abandoned = 0
        self._answering = True
        """Whether the last metadata probes were answered: a hung or dead broker makes /readyz 503."""

    @property
    def ready(self) -> bool:
        producer = self._producer
        return producer is not None and self._answering and bool(producer.client.cluster.brokers())

    @property
    def abandoned(self) -> int:
        return self._abandoned

    @property
    def status(self) -> str:
        return "ready" if self.ready else self._status

    def partition_count(self, topic: str) -> int | None:
        return self._partition_counts.get(topic) if self._producer is not None else None

    def _count_partitions(self, cluster: ClusterMetadata) -> None:
        """Keep the partition counts of the topics at hand: aiokafka builds a set each time it is asked."""
        counts = {}
        for topic in self._settings.topics:
            partitions = cluster.partitions_for_topic(topic)
            if partitions:
                counts[topic] = len(partitions)
        self._partition_counts = counts
        if self._batches is not None:
            self._batches.metadata_changed()

    async def start(self) -> None:
        self._connector = asyncio.create_task(self._supervise(), name="kafka-producer")

    async def close(self) -> None:
        """Stop connecting, then flush and close the producer within the shutdown timeout."""
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.wait({self._connector})
        producer, batches = self._producer, self._batches
        self._producer, self._batches, self._status = None, None, "closed"
        if producer is None or batches is None:
            return
        # Half the shutdown timeout at most to hand over what is queued, so the producer has time to stop.
        try:
            async with asyncio.timeout(self._settings.shutdown_timeout / 2):
                await batches.flush()
        except TimeoutError:
            pass  # what was not handed over is given up below, and the producer stopped all the same
        await self._retire(
            producer, batches, "the bridge is shutting down", self._settings.shutdown_timeout / 2
        )

    async def _retire(
        self, producer: AIOKafkaProducer, batches: PartitionBatches, reason: str, timeout: float
    ) -> None:
        """Stop `producer` and settle every record it and `batches` still hold."""
        producer.client.cluster.remove_listener(self._count_partitions)
        batches.close(KafkaConnectionError(reason))
        await self._stop(producer, timeout)
        batches.abort_in_producer(reason)

    async def publish(self, record: Record, timeout: float) -> None:
        batches = self._batches
        if batches is None:
            raise BrokerNotReady(f"Kafka is not ready ({self._status}); the callback was not written")
        if timeout <= 0:
            raise DeliveryTimeout(
                "no time was left to write the callback; it was not written", ambiguous=False
            )
        if len(record.key) + len(record.value) > self._max_record_bytes:
            raise BrokerRejected(
                f"the record is larger than the producer's limit of {self._max_record_bytes} bytes; the "
                "callback was not written",
                ambiguous=False,
            )
        try:
            delivery = batches.add(record)
        except NotHandedOver as exc:
            raise self._not_written(exc) from None
        deadline = asyncio.get_running_loop().call_later(timeout, batches.expire, delivery)
        try:
            await delivery
        except Expired:
            # The record stays queued: it may still be written after this answer.
            raise DeliveryTimeout(
                f"Kafka did not confirm the write within {timeout:.3g} s; the callback is not acknowledged",
                ambiguous=True,
            ) from None
        except NotHandedOver as exc:
            raise self._not_written(exc) from None
        except KafkaError as exc:
            # A batch handed to the producer may have been appended by an attempt whose answer was lost;
            # aiokafka retries and reports only the last attempt's error. So: ambiguous.
            raise BrokerRejected(f"Kafka refused the write: {describe(exc)}", ambiguous=True) from None
        finally:
            deadline.cancel()

    @staticmethod
    def _not_written(exc: NotHandedOver) -> BrokerNotReady:
        return BrokerNotReady(
            f"Kafka did not take the write ({describe(exc.cause)}); the callback was not written"
        )

    def _abandoned_changed(self, landed: bool | None) -> None:
        """A record answered 503 counts against the in-flight limit until the producer settles it."""
        if landed is None:
            self._abandoned += 1
            return
        self._abandoned -= 1
        self._outcomes.record(Outcome.AMBIGUOUS_LANDED if landed else Outcome.AMBIGUOUS_LOST)

    async def _supervise(self) -> None:
        """Connect; probe the broker while connected; when the producer dies, drop it and build a new one."""
        while True:
            producer = await self._connect()
            batches = PartitionBatches(producer, self._abandoned_changed, self._on_queued)
            self._count_partitions(producer.client.cluster)
            producer.client.cluster.add_listener(self._count_partitions)
            self._producer, self._batches = producer, batches
            self._status, self._answering = "ready", True
            probing = asyncio.create_task(self._probe(producer), name="kafka-probe")
            try:
                failure = await _wait_for_death(producer)
            finally:
                probing.cancel()
                await asyncio.wait({probing})
            self._producer, self._batches = None, None
            self._status = f"the Kafka producer failed ({failure}); building a new one"
            log.error("%s", self._status)
            await self._retire(producer, batches, self._status, self._settings.shutdown_timeout)

    async def _probe(self, producer: AIOKafkaProducer) -> None:
        """Ask the cluster for metadata every second; two failures in a row make the bridge not ready.

        Callbacks are still tried while not ready: a broker that recovers within the delivery timeout still
        gets the write, and a 503 after Tencent's 2 s wait costs nothing that an early one would save.
        """
        failures = 0
        while True:
            await asyncio.sleep(_PROBE_INTERVAL_S)
            try:
                async with asyncio.timeout(_PROBE_INTERVAL_S):
                    await producer.client.fetch_all_metadata()
            except Exception as exc:  # noqa: BLE001 - however the probe fails, Kafka did not answer it
                failures += 1
                if failures >= 2 and self._answering:
                    self._answering = False
                    self._status = f"Kafka is not answering: {describe(exc)}"
                    log.warning("not ready: %s", self._status)
                continue
            if not self._answering:
                log.info("Kafka answers again; ready")
            failures, self._answering, self._status = 0, True, "ready"

    async def _connect(self) -> AIOKafkaProducer:
        settings = self._settings
        delay = _RETRY_FIRST_S
        reported = ""
        while True:
            # A producer whose start() failed hangs on send() (aiokafka #759): a new one for every attempt.
            producer = self._new_producer()
            try:
                async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
                    await producer.start()
                await self._wait_for_topics(producer)
            except Exception as exc:  # whatever failed, the next attempt gets a new producer
                if not isinstance(exc, KafkaError | OSError | TimeoutError):
                    log.exception("unexpected failure while connecting to Kafka")
                if not self._status.startswith("cannot create topics"):
                    self._status = (
                        f"cannot reach Kafka at {','.join(settings.bootstrap_servers)}: {describe(exc)}"
                    )
                # Once per new reason, not once per attempt: a broker down for an hour is one line.
                level = logging.WARNING if self._status != reported else logging.DEBUG
                log.log(level, "%s; retrying every %.2g s at most", self._status, _RETRY_MAX_S)
                reported = self._status
                # Shielded: a shutdown arriving now must not leave this producer's connections open.
                await asyncio.shield(self._stop(producer, self._settings.shutdown_timeout))
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            except BaseException:
                await self._stop(producer, self._settings.shutdown_timeout)
                raise
            log.info(
                "connected to Kafka at %s; writing to %s",
                ",".join(settings.bootstrap_servers),
                ", ".join(settings.topics),
            )
            return producer

    async def _wait_for_topics(self, producer: AIOKafkaProducer) -> None:
        """Return when every topic exists and its partitions are known; create them if allowed."""
        settings = self._settings
        reported: list[str] = []
        while True:
            async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
                cluster = await producer.client.fetch_all_metadata()
            missing = [topic for topic in settings.topics if topic not in cluster.topics()]
            if missing and settings.create_topics:
                try:
                    async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
                        await create_topics(settings, missing, len(cluster.brokers()))
                except KafkaError as exc:
                    self._status = f"cannot create topics {', '.join(missing)}: {describe(exc)}"
                    log.error("not ready: %s", self._status)  # noqa: TRY400 - the message says it all
                    await asyncio.sleep(_TOPIC_RECHECK_S)
                else:
                    await asyncio.sleep(_METADATA_SETTLE_S)  # let the new topics reach the metadata
                continue
            if not missing:
                # A topic just created has partitions before it has leaders (Apache Kafka elects them a
                # moment later): a write then gets NOT_LEADER until the deadline. Ready once every one has.
                leaderless = [topic for topic in settings.topics if _leaderless(cluster, topic)]
                if not leaderless:
                    break
                self._status = f"topics without a leader yet: {', '.join(leaderless)}"
                await asyncio.sleep(_LEADER_RECHECK_S)
                continue
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
            **self._connection_options,
        )

    async def _stop(self, producer: AIOKafkaProducer, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await producer.stop()
        except TimeoutError:
            # A timeout is the expected failure here, and its traceback would say nothing more.
            log.error("the Kafka producer did not stop within %.3g s", timeout)  # noqa: TRY400
        except (KafkaError, OSError) as exc:
            log.warning("stopping the Kafka producer: %s", describe(exc))


async def _wait_for_death(producer: AIOKafkaProducer) -> str:
    """Wait until the producer's sender task ends, which only a fatal error does; say why it ended."""
    # aiokafka has no public health signal; its sender task ending is what makes every later send() fail.
    sender_task: asyncio.Task[None] = producer._sender.sender_task
    await asyncio.wait({sender_task})
    if sender_task.cancelled():
        return "its sender task was cancelled"
    error = sender_task.exception()
    return describe(error) if error is not None else "its sender task ended"


def _leaderless(cluster: ClusterMetadata, topic: str) -> bool:
    """Whether some partition of `topic` has no leader in this metadata."""
    partitions = cluster.partitions_for_topic(topic) or set()
    return len(cluster.available_partitions_for_topic(topic) or ()) < len(partitions)
