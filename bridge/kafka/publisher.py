"""The publisher: one aiokafka producer per process, writes confirmed with acks=all under a deadline.

`KafkaPublisher.start()` returns at once and connects in the background, so the bridge serves `/healthz`
and answers callbacks with 503 while the brokers are unreachable or its topics are missing; it becomes
ready by itself. Every await on aiokafka runs under a deadline.

Readiness also needs every topic as it was at start: present, with the partition count read when the bridge
first became ready (`partition_for` maps entities with it, so a changed count would remap accounts). The probe
checks that every second from metadata of every topic; a topic gone or changed makes the bridge not ready, its
callbacks get 503 "not written", and the log says why. The bridge never asks for a topic's metadata by name
(see `bridge.kafka.batching`): a broker with `auto.create.topics.enable` creates a topic so asked for, which
after a deletion would bring it back with the broker's default partition count.

At each connection the topics' `max.message.bytes` is read (DescribeConfigs): a record larger than its
topic takes is answered 413 before it is sent, rather than refused by the broker after the hand-over.

Readiness also needs enough replicas in sync: a partition whose in-sync replicas, in the metadata the probe
reads every second, are fewer than its topic's `min.insync.replicas` (read with `max.message.bytes`) has a
leader that refuses acks=all writes (NOT_ENOUGH_REPLICAS). The bridge is then not ready, and `/readyz` names
the partitions and the broker's last refusal; it is ready again once the metadata shows the replicas back in
sync, whether or not a callback came meanwhile (a load balancer may have sent none to a bridge not ready).
aiokafka retries such a refusal until the batch's deadline, so the bridge learns the broker's error only when
a batch fails with it: `on_broker_error` counts those records by the error's name."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import BrokerResponseError, KafkaConnectionError, KafkaError

from bridge.errors import BrokerNotReady, BrokerRejected, DeliveryTimeout, RecordTooLarge, describe
from bridge.ingest.outcomes import Outcome, Outcomes
from bridge.kafka.batching import (
    BATCH_BYTES,
    Expired,
    NotHandedOver,
    Partition,
    PartitionBatches,
    batch_bytes,
    record_bytes,
)
from bridge.kafka.security import kafka_connection_options, start_client
from bridge.kafka.topics import await_leaders, create_topics, how_to_create, max_record_bytes, topic_limits
from bridge.settings import ServeSettings
from bridge.tencent.envelope import Record

log = logging.getLogger(__name__)

_RETRY_FIRST_S, _RETRY_MAX_S = 0.25, 2.0
# Bound on connecting, reading metadata and creating topics; the delivery deadline bounds each write.
_BROKER_CALL_TIMEOUT_S = 10.0
_TOPIC_RECHECK_S = 5.0
_PROBE_INTERVAL_S = 1.0
_METADATA_SETTLE_S = 0.05
_LEADER_RECHECK_S = 0.1
_LEADER_WAIT_S = 30.0
# Partitions named in `/readyz` when too few replicas are in sync; the rest are counted.
_NAMED_PARTITIONS = 3


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
        """Return once the broker has confirmed the record with acks=all; raise `PublishError` otherwise,
        or `RecordTooLarge` for a record its topic would refuse."""
        ...


class KafkaPublisher:
    def __init__(
        self,
        settings: ServeSettings,
        outcomes: Outcomes,
        on_queued: Callable[[int], None] | None = None,
        on_broker_error: Callable[[str, int], None] | None = None,
        on_below_min_isr: Callable[[Mapping[str, int]], None] | None = None,
    ) -> None:
        """`on_queued(n)` is told of records handed to the producer (n > 0) and settled (n < 0);
        `on_broker_error(name, n)` of n records in a batch the broker refused with the Kafka error `name`;
        `on_below_min_isr(counts)` of each topic's count of partitions with too few replicas in sync."""
        self._settings = settings
        # Built once, here: a bad TLS file or a SASL setting missing fails the start, not every reconnect.
        self._connection_options = kafka_connection_options(settings)
        self._outcomes = outcomes
        self._on_queued = on_queued
        self._on_broker_error = on_broker_error
        self._on_below_min_isr = on_below_min_isr
        self._producer: AIOKafkaProducer | None = None
        self._batches: PartitionBatches | None = None
        self._start_partitions: dict[str, int] = {}
        """Each topic's partition count when the bridge first became ready: the one `partition_for` uses."""
        self._topic_problems: dict[str, str] = {}
        """Topics gone or changed since start, and what is wrong with each: their callbacks get 503."""
        self._max_record_bytes = max_record_bytes(settings)
        self._record_limits: dict[str, int] = {}
        """Each topic's `max.message.bytes`, where the broker told it and it is below the bridge's own."""
        self._min_insync: dict[str, int] = {}
        """Each topic's `min.insync.replicas`, where the broker told it."""
        self._below_min_isr: dict[Partition, str] = {}
        """Partitions with fewer replicas in sync than their topic's minimum, in the last metadata read."""
        self._isr_unreadable = False
        """Whether aiokafka's metadata was found without the partitions' in-sync replicas (said once)."""
        self._refusals: dict[Partition, str] = {}
        """The broker's error for the last batch of a partition it refused, until one of its batches is
        confirmed."""
        self._connector: asyncio.Task[None] | None = None
        self._status = "connecting to Kafka"
        self._abandoned = 0
        self._answering = True
        """Whether the last metadata probes were answered: a hung or dead broker makes /readyz 503."""

    @property
    def ready(self) -> bool:
        producer = self._producer
        return (
            producer is not None
            and self._answering
            and not self._topic_problems
            and not self._below_min_isr
            and bool(producer.client.cluster.brokers())
        )

    @property
    def abandoned(self) -> int:
        return self._abandoned

    @property
    def status(self) -> str:
        if self.ready:
            return "ready"
        if self._producer is not None and self._answering and (self._topic_problems or self._below_min_isr):
            return "; ".join([*self._topic_problems.values(), *self._isr_problems()])
        return self._status

    def _isr_problems(self) -> list[str]:
        """The partitions with too few replicas in sync: the first few named, those the broker refused a
        write of first, with its refusal."""
        named = sorted(self._below_min_isr.items(), key=lambda item: (item[0] not in self._refusals, item[0]))
        problems = []
        for partition, problem in named[:_NAMED_PARTITIONS]:
            refusal = self._refusals.get(partition)
            refused = "" if refusal is None else f"; the broker refused its last write: {refusal}"
            problems.append(problem + refused)
        if len(self._below_min_isr) > _NAMED_PARTITIONS:
            problems.append(f"and {len(self._below_min_isr) - _NAMED_PARTITIONS} more partitions so")
        return problems

    def partition_count(self, topic: str) -> int | None:
        if self._producer is None or topic in self._topic_problems:
            return None
        return self._start_partitions.get(topic)

    def _metadata_changed(self, cluster: ClusterMetadata) -> None:
        """The producer's metadata changed (every topic's, as it never names one): look at the topics."""
        self._check_metadata(cluster)
        if self._batches is not None:
            self._batches.metadata_changed()

    def _check_metadata(self, cluster: ClusterMetadata) -> None:
        """What a read of the metadata says of readiness: the topics as at start, enough replicas in sync."""
        self._check_topics(cluster)
        self._check_isr(cluster)

    def _check_topics(self, cluster: ClusterMetadata) -> None:
        """Compare the topics in `cluster`, metadata of every topic, with the start; log what changed."""
        problems = {}
        for topic in self._settings.topics:
            partitions = cluster.partitions_for_topic(topic)
            at_start = self._start_partitions.get(topic)
            if not partitions:
                problems[topic] = f"topic {topic} is missing"
            elif at_start is not None and len(partitions) != at_start:
                problems[topic] = (
                    f"topic {topic} has {len(partitions)} partitions, not the {at_start} it had at start"
                )
        if problems == self._topic_problems:
            return
        for topic, problem in problems.items():
            if self._topic_problems.get(topic) == problem:
                continue
            if topic not in cluster.topics():
                hint = (
                    "its callbacks get 503 until it is back. The bridge does not re-create a topic while it "
                    "runs, and the broker must not either (auto.create.topics.enable=false): create it again "
                    f"with {self._start_partitions.get(topic, self._settings.partitions)} partitions, e.g. "
                    "with `bridge topics ensure`"
                )
            else:
                hint = (
                    "a changed count maps accounts to other partitions, so its callbacks get 503 until the "
                    "bridge is restarted to take the new count"
                )
            log.error("not ready: %s; %s", problem, hint)
        for topic in self._topic_problems.keys() - problems.keys():
            log.info("topic %s is back as at start, with %d partitions", topic, self._start_partitions[topic])
        self._topic_problems = problems

    def _check_isr(self, cluster: ClusterMetadata) -> None:
        """Find the partitions whose in-sync replicas in `cluster` are fewer than their topic's minimum."""
        # aiokafka keeps each partition's ISR from the metadata only in this private map.
        partitions_of = getattr(cluster, "_partitions", None)
        if partitions_of is None:
            if not self._isr_unreadable:
                self._isr_unreadable = True
                log.warning(
                    "cannot read the partitions' in-sync replicas from aiokafka's metadata (its internals "
                    "changed): readiness does not know of partitions with too few replicas in sync"
                )
            return
        below: dict[Partition, str] = {}
        for topic in self._settings.topics:
            minimum = self._min_insync.get(topic)
            if minimum is None:
                continue
            for number, metadata in sorted(partitions_of.get(topic, {}).items()):
                in_sync = sorted(getattr(metadata, "isr", ()) or ())
                if len(in_sync) < minimum:
                    below[topic, number] = (
                        f"topic {topic} partition {number} has {len(in_sync)} in-sync replicas "
                        f"({', '.join(map(str, in_sync)) or 'none'}), fewer than its min.insync.replicas "
                        f"{minimum}: its leader refuses acks=all writes (NOT_ENOUGH_REPLICAS)"
                    )
        if below.keys() != self._below_min_isr.keys():
            if below:
                log.warning(
                    "not ready: %d partitions have too few replicas in sync; %s",
                    len(below),
                    next(iter(below.values())),
                )
            else:
                log.info("every partition has enough replicas in sync again")
        self._below_min_isr = below
        if self._on_below_min_isr is not None and self._min_insync:
            counts = dict.fromkeys(self._min_insync, 0)
            for topic, _ in below:
                counts[topic] += 1
            self._on_below_min_isr(counts)

    def _batch_settled(self, partition: Partition, records: int, error: BaseException | None) -> None:
        """A batch of `partition` was confirmed (`error` None) or failed: note what the broker said."""
        if error is None:
            self._refusals.pop(partition, None)
            return
        if not isinstance(error, BrokerResponseError):
            return  # not the broker's answer: a lost connection, the producer stopping
        refusal = f"{error.message} ({type(error).__name__})"
        if self._refusals.get(partition) != refusal:
            log.warning(
                "the broker refused a batch of topic %s partition %d: %s", *partition, describe(error)
            )
        self._refusals[partition] = refusal
        if self._on_broker_error is not None:
            self._on_broker_error(type(error).__name__, records)

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
        producer.client.cluster.remove_listener(self._metadata_changed)
        batches.close(KafkaConnectionError(reason))
        try:
            await self._stop(producer, timeout)
        finally:  # even when the stop is cancelled or fails: else their in-flight slots stay taken for good
            batches.abort_in_producer(reason)

    async def publish(self, record: Record, timeout: float) -> None:
        batches = self._batches
        if batches is None:
            raise BrokerNotReady(f"Kafka is not ready ({self._status}); the callback was not written")
        if timeout <= 0:
            raise DeliveryTimeout(
                "no time was left to write the callback; it was not written", ambiguous=False
            )
        self._check_size(record)
        try:
            delivery = batches.add(record)
        except NotHandedOver as exc:
            raise self._not_written(exc) from None
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(timeout, batches.expire, delivery)
        try:
            await delivery
        except Expired as exc:
            # The record stays queued: it may still be written after this answer, and is followed.
            partition = (record.topic, record.partition)
            known = self._below_min_isr.get(partition) or self._refusals.get(partition)
            why = "" if known is None else f" ({known})"
            raise DeliveryTimeout(
                f"Kafka did not confirm the write within {timeout:.3g} s{why}; the callback is not "
                "acknowledged",
                ambiguous=True,
                fate=exc.fate,
            ) from None
        except NotHandedOver as exc:
            raise self._not_written(exc) from None
        except KafkaError as exc:
            # A batch handed to the producer may have been appended by an attempt whose answer was lost;
            # aiokafka retries and reports only the last attempt's error. So: ambiguous, and given up.
            self._outcomes.record(Outcome.AMBIGUOUS_LOST)
            given_up = loop.create_future()
            given_up.set_result(False)
            raise BrokerRejected(
                f"Kafka refused the write: {describe(exc)}", ambiguous=True, fate=given_up
            ) from None
        except asyncio.CancelledError:
            batches.abandon(delivery)  # the handler was cancelled (at shutdown): follow the record still
            raise
        finally:
            deadline.cancel()

    def _check_size(self, record: Record) -> None:
        """Refuse a record its topic would refuse (`max.message.bytes`), or over the bridge's own limit."""
        limit = self._record_limits.get(record.topic, self._max_record_bytes)
        bound = record_bytes(record)
        if self._settings.compression != "none":
            # aiokafka's C batch builder keeps a compressed batch even when it came out larger (by 28-240
            # bytes for a megabyte that does not compress): bound what a codec can add.
            bound += bound // 6 + 64
        if bound <= limit:
            return
        size = batch_bytes(record, self._settings.compression)
        if size <= limit:
            return
        whose = (
            f"topic {record.topic}'s max.message.bytes"
            if record.topic in self._record_limits
            else "the bridge's limit (--max-body-bytes plus 64 KiB)"
        )
        raise RecordTooLarge(
            f"the callback's record takes {size} bytes, more than {whose} of {limit}; the callback was not "
            "written"
        )

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
        """Connect; probe the broker while connected; when the producer dies, drop it and build a new one.

        Whatever fails here is logged and followed by a new producer: the supervisor never ends by itself,
        which would leave `/readyz` saying ready with no one watching the producer."""
        while True:
            try:
                await self._run_producer()
            except Exception:
                self._status = "the Kafka producer's supervisor failed; building a new producer"
                log.exception("%s", self._status)
                await asyncio.sleep(_RETRY_MAX_S)

    async def _run_producer(self) -> None:
        """Connect a producer, serve with it until it dies, and retire it."""
        producer = await self._connect()
        try:
            batches = PartitionBatches(
                producer,
                self._abandoned_changed,
                self._on_queued,
                batch_limits={t: n for t, n in self._record_limits.items() if n < BATCH_BYTES},
                on_settled=self._batch_settled,
            )
            if not self._start_partitions:
                cluster = producer.client.cluster
                self._start_partitions = {
                    t: len(cluster.partitions_for_topic(t)) for t in self._settings.topics
                }
            self._check_metadata(producer.client.cluster)  # a producer rebuilt later may find a topic changed
            producer.client.cluster.add_listener(self._metadata_changed)
        except BaseException:
            await self._stop(producer, self._settings.shutdown_timeout)
            raise
        self._producer, self._batches = producer, batches
        self._status, self._answering = "ready", True
        probing = asyncio.create_task(self._probe(producer), name="kafka-probe")
        rebuild_after = 0.0
        try:
            try:
                failure = await _wait_for_death(producer)
            except Exception as exc:
                # aiokafka changed under the bridge (say, renamed `_sender`): without a watch, a dead
                # producer would go unnoticed. Rebuild, after a pause, so that a watch failing at once does
                # not spin.
                log.exception("cannot watch the Kafka producer for failure")
                failure, rebuild_after = f"it cannot be watched: {describe(exc)}", _RETRY_MAX_S
            # Not ready from here on, before anything else can run: the probe's ending below yields.
            self._producer, self._batches = None, None
        finally:
            probing.cancel()
            await asyncio.wait({probing})
        self._status = f"the Kafka producer failed ({failure}); building a new one"
        log.error("%s", self._status)
        await self._retire(producer, batches, self._status, self._settings.shutdown_timeout)
        await asyncio.sleep(rebuild_after)

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
                    # Metadata of every topic: asking for none by name, it can create none.
                    cluster = await producer.client.fetch_all_metadata()
            except Exception as exc:  # noqa: BLE001 - however the probe fails, Kafka did not answer it
                failures += 1
                if failures >= 2 and self._answering:
                    self._answering = False
                    self._status = f"Kafka is not answering: {describe(exc)}"
                    log.warning("not ready: %s", self._status)
                continue
            if not self._answering:
                log.info("Kafka answers again")
            failures, self._answering, self._status = 0, True, "ready"
            self._check_metadata(cluster)

    async def _connect(self) -> AIOKafkaProducer:
        settings = self._settings
        delay = _RETRY_FIRST_S
        reported = ""
        while True:
            # A producer whose start() failed hangs on send() (aiokafka #759): a new one for every attempt.
            producer = self._new_producer()
            try:
                async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
                    # A refused password or certificate is told as such, not as "Unable to bootstrap".
                    await start_client(producer, settings.bootstrap_servers, self._connection_options)
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
        """Return when every topic exists and the producer knows its partitions; read their limits.

        With `--create-topics`, missing topics are created, but only before the bridge was first ready: a
        topic deleted while it runs is an operator's matter (the log says so), not one to paper over.
        """
        settings = self._settings
        reported: list[str] = []
        while True:
            async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
                cluster = await producer.client.fetch_all_metadata()
            missing = [topic for topic in settings.topics if topic not in cluster.topics()]
            if missing and settings.create_topics and not self._start_partitions:
                try:
                    async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
                        await create_topics(settings, missing, len(cluster.brokers()))
                except (KafkaError, TimeoutError) as exc:
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
                if not leaderless and await self._leaders_answer():
                    break
                if leaderless:
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
        await self._read_limits()
        # The producer's own metadata, refreshed for every topic: its list of topics is empty and stays so.
        # `producer.partitions_for(topic)` would add the topic to that list, and every later refresh would
        # name it: after a deletion, a broker that creates topics on demand would create it again. Last, so
        # that the counts the caller reads are those of this refresh.
        async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
            while any(producer.client.cluster.partitions_for_topic(t) is None for t in settings.topics):
                await producer.client.force_metadata_update()
                if any(producer.client.cluster.partitions_for_topic(t) is None for t in settings.topics):
                    await asyncio.sleep(_METADATA_SETTLE_S)

    async def _leaders_answer(self) -> bool:
        """Whether every partition's leader answers for it (ListOffsets): a leader in the metadata may not
        have opened the partition yet, just after the topic was created, by this bridge or anyone."""
        try:
            async with asyncio.timeout(_LEADER_WAIT_S):
                await await_leaders(self._settings, list(self._settings.topics))
        except (KafkaError, OSError, TimeoutError) as exc:
            self._status = f"the topics' leaders do not answer yet: {describe(exc)}"
            return False
        return True

    async def _read_limits(self) -> None:
        """Read every topic's `max.message.bytes`; without it, records are checked against the bridge's own
        limit only, and the broker refuses larger ones after the hand-over (a 503 that may still land)."""
        topics = list(self._settings.topics)
        unread: str | None
        try:
            read = await topic_limits(self._settings, topics)
        except (KafkaError, OSError, TimeoutError) as exc:
            limits, unread = {}, describe(exc)
        else:
            limits, unread = read.max_message_bytes, read.unread
            self._min_insync = read.min_insync_replicas
        if unread is not None:
            log.warning(
                "cannot read the topics' max.message.bytes (%s); records are checked against the "
                "bridge's own limit of %d bytes",
                unread,
                self._max_record_bytes,
            )
        for topic, limit in limits.items():
            if limit < self._max_record_bytes:
                log.info(
                    "topic %s takes records of at most %d bytes (max.message.bytes); larger callbacks "
                    "get 413",
                    topic,
                    limit,
                )
        self._record_limits = {t: n for t, n in limits.items() if n < self._max_record_bytes}

    def _new_producer(self) -> AIOKafkaProducer:
        settings = self._settings
        return AIOKafkaProducer(
            bootstrap_servers=list(settings.bootstrap_servers),
            client_id=settings.client_id,
            acks="all",
            # aiokafka's idempotent mode never expires a batch (aiokafka #1101): the bridge's own deadline
            # answers the callback, and its record holds an in-flight slot until the broker takes it (README,
            # "On a three-node cluster").
            enable_idempotence=settings.idempotence,
            compression_type=None if settings.compression == "none" else settings.compression,
            linger_ms=settings.linger_ms,
            max_batch_size=BATCH_BYTES,
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
