"""Producer supervision: connect an aiokafka producer, probe the broker while it serves, rebuild it when it
dies.

`ProducerSupervisor.start()` returns at once and connects in the background: it waits for every topic (and
creates the missing ones with `--create-topics`, before the bridge was first ready), for their leaders,
reads the topics' `max.message.bytes` and `min.insync.replicas`, and then hands the producer to its user,
the publisher (`ProducerUser`). While the producer serves, the supervisor reads the metadata of the bridge's
topics each second and passes it on; two probes unanswered in a row make the bridge not ready. When the
producer's sender task ends (only a fatal error ends it), the user is told at once, the producer is retired
and a new one built. `status` says, in words, where that stands.

Every metadata read names the bridge's topics and forbids their creation (`bridge.kafka.metadata`): the
probe's, the start-up wait's and the producer's own refreshes: a cluster's other topics cost it nothing (on
a broker below Metadata v4, which cannot forbid it, every topic is read instead).

Every Kafka client of `serve` is the supervisor's: the producer, and the short-lived admin clients and
consumers that create topics, wait for leaders and read limits. `use_sasl_password` puts a new password
(`--sasl-password-file` read again) in use for all of them from then on.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaError

from bridge.errors import describe
from bridge.kafka.batching import PartitionBatches
from bridge.kafka.metadata import read_metadata, refresh_by_name
from bridge.kafka.security import security_failure, start_client, use_sasl_password
from bridge.kafka.sizes import BATCH_BYTES
from bridge.kafka.topics import await_leaders, create_topics, how_to_create, topic_limits
from bridge.secret import Secret
from bridge.settings import ServeSettings

log = logging.getLogger("bridge.publisher")  # see `bridge.logs.LOGGERS`

_RETRY_FIRST_S, _RETRY_MAX_S = 0.25, 2.0
# Bound on connecting, reading metadata and creating topics; the delivery deadline bounds each write.
_BROKER_CALL_TIMEOUT_S = 10.0
_TOPIC_RECHECK_S = 5.0
_PROBE_INTERVAL_S = 1.0
_METADATA_SETTLE_S = 0.05
_LEADER_RECHECK_S = 0.1
_LEADER_WAIT_S = 30.0


class ProducerUser(Protocol):
    """Who writes with the supervised producer (the publisher), told as the producer comes and goes."""

    @property
    def partitions_at_start(self) -> Mapping[str, int]:
        """Each topic's partition count when the bridge first became ready; empty until it did."""
        ...

    def connected(self, producer: AIOKafkaProducer) -> PartitionBatches:
        """Serve with `producer` from now on, through the batches returned; raising refuses the producer."""
        ...

    def metadata_read(self, cluster: ClusterMetadata) -> None:
        """A probe read the metadata of the bridge's topics (a deleted one is absent from `cluster`)."""
        ...

    def disconnected(self) -> None:
        """The producer died: not ready from now on, before anything else runs."""
        ...

    async def retire(
        self, producer: AIOKafkaProducer, batches: PartitionBatches, reason: str, timeout: float
    ) -> None:
        """Stop `producer` and settle every record it and `batches` still hold."""
        ...


ProducerWatch = Callable[[AIOKafkaProducer], Awaitable[str]]
"""Waits until a producer dies, and says why (`wait_for_death`)."""


class ProducerSupervisor:
    """One producer at a time for `user`, connected, probed and rebuilt; see the module's docstring."""

    def __init__(
        self,
        settings: ServeSettings,
        connection_options: Mapping[str, Any],
        user: ProducerUser,
        watch: ProducerWatch | None = None,
    ) -> None:
        """`watch` waits for a producer's death (`wait_for_death` unless a test gives another)."""
        self._settings = settings
        self._connection_options = connection_options
        self._user = user
        self._watch = wait_for_death if watch is None else watch
        self._task: asyncio.Task[None] | None = None
        self._newest: AIOKafkaProducer | None = None
        """The producer built last: the one connecting, or the one in use."""
        self.status = "connecting to Kafka"
        self.answering = True
        """Whether the last metadata probes were answered: a hung or dead broker makes /readyz 503."""
        self.record_limits: dict[str, int] = {}
        """Each topic's `max.message.bytes`, where the broker told it and it is below the bridge's own."""
        self.min_insync: dict[str, int] = {}
        """Each topic's `min.insync.replicas`, where the broker told it."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="kafka-producer")

    def use_sasl_password(self, password: Secret) -> None:
        """Log in with `password` from now on: the producer's new connections (`use_sasl_password`), every
        producer built after, and the admin clients and consumers the supervisor starts. Connections logged
        in already stay."""
        if "sasl_plain_password" not in self._connection_options:
            raise ValueError("the connection to Kafka uses no SASL password (--security-protocol)")
        if self._newest is not None:
            use_sasl_password(self._newest.client, password.reveal())
        self._connection_options = {**self._connection_options, "sasl_plain_password": password.reveal()}
        self._settings = replace(self._settings, sasl_password=None, sasl_password_file=password)

    async def close(self) -> None:
        """Stop connecting and probing; the producer in use, if any, is the user's to retire."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        self.status = "closed"

    async def _supervise(self) -> None:
        """Connect; probe the broker while connected; when the producer dies, drop it and build a new one.

        Whatever fails here is logged and followed by a new producer: the supervisor never ends by itself,
        which would leave `/readyz` saying ready with no one watching the producer."""
        while True:
            try:
                await self._run_producer()
            except Exception:
                self.status = "the Kafka producer's supervisor failed; building a new producer"
                log.exception("%s", self.status)
                await asyncio.sleep(_RETRY_MAX_S)

    async def _run_producer(self) -> None:
        """Connect a producer, serve with it until it dies, and retire it."""
        producer = await self._connect()
        try:
            batches = self._user.connected(producer)
        except BaseException:
            await stop_producer(producer, self._settings.shutdown_timeout)
            raise
        self.status, self.answering = "ready", True
        probing = asyncio.create_task(self._probe(producer), name="kafka-probe")
        rebuild_after = 0.0
        try:
            try:
                failure = await self._watch(producer)
            except Exception as exc:
                # aiokafka changed under the bridge (say, renamed `_sender`): without a watch, a dead
                # producer would go unnoticed. Rebuild, after a pause, so that a watch failing at once does
                # not spin.
                log.exception("cannot watch the Kafka producer for failure")
                failure, rebuild_after = f"it cannot be watched: {describe(exc)}", _RETRY_MAX_S
            # Not ready from here on, before anything else can run: the probe's ending below yields.
            self._user.disconnected()
        finally:
            probing.cancel()
            await asyncio.wait({probing})
        self.status = f"the Kafka producer failed ({failure}); building a new one"
        log.error("%s", self.status)
        await self._user.retire(producer, batches, self.status, self._settings.shutdown_timeout)
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
                    # The bridge's topics by name, their creation forbidden: a deleted one stays deleted.
                    cluster = await read_metadata(producer.client, self._settings.topics)
            except Exception as exc:  # noqa: BLE001 - however the probe fails, Kafka did not answer it
                failures += 1
                if failures < 2:
                    continue
                # A login refused says so (a password rotated on the broker, not in the bridge's file), not
                # only "Unable to get cluster metadata". A hung broker (a timeout) is not asked.
                refusal = None if isinstance(exc, TimeoutError) else await self._refusal()
                if refusal is not None:
                    status = f"Kafka refuses new connections: {refusal}"
                    if status != self.status:
                        log.warning("not ready: %s", status)
                    self.answering, self.status = False, status
                elif self.answering:
                    self.answering = False
                    self.status = f"Kafka is not answering: {describe(exc)}"
                    log.warning("not ready: %s", self.status)
                continue
            if not self.answering:
                log.info("Kafka answers again")
            failures, self.answering, self.status = 0, True, "ready"
            self._user.metadata_read(cluster)

    async def _refusal(self) -> str | None:
        """Why a new connection is refused, when a matter of security (`security_failure`); None if not."""
        if self._connection_options.get("security_protocol", "PLAINTEXT") == "PLAINTEXT":
            return None
        return await security_failure(self._settings.bootstrap_servers, self._connection_options)

    async def _connect(self) -> AIOKafkaProducer:
        settings = self._settings
        delay = _RETRY_FIRST_S
        reported = ""
        while True:
            # A producer whose start() failed hangs on send() (aiokafka #759): a new one for every attempt.
            producer = self._newest = new_producer(settings, self._connection_options)
            # Before its first refresh: every one, from now on, names the bridge's topics only.
            refresh_by_name(producer.client, settings.topics)
            try:
                async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
                    # A refused password or certificate is told as such, not as "Unable to bootstrap".
                    await start_client(producer, settings.bootstrap_servers, self._connection_options)
                await self._wait_for_topics(producer)
            except Exception as exc:  # whatever failed, the next attempt gets a new producer
                if not isinstance(exc, KafkaError | OSError | TimeoutError):
                    log.exception("unexpected failure while connecting to Kafka")
                if not self.status.startswith("cannot create topics"):
                    self.status = (
                        f"cannot reach Kafka at {','.join(settings.bootstrap_servers)}: {describe(exc)}"
                    )
                # Once per new reason, not once per attempt: a broker down for an hour is one line.
                level = logging.WARNING if self.status != reported else logging.DEBUG
                log.log(level, "%s; retrying every %.2g s at most", self.status, _RETRY_MAX_S)
                reported = self.status
                # Shielded: a shutdown arriving now must not leave this producer's connections open.
                await asyncio.shield(stop_producer(producer, self._settings.shutdown_timeout))
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            except BaseException:
                await stop_producer(producer, self._settings.shutdown_timeout)
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
                cluster = await read_metadata(producer.client, settings.topics)
            missing = [topic for topic in settings.topics if topic not in cluster.topics()]
            if missing and settings.create_topics and not self._user.partitions_at_start:
                try:
                    async with asyncio.timeout(_BROKER_CALL_TIMEOUT_S):
                        await create_topics(self._settings, missing, len(cluster.brokers()))
                except (KafkaError, TimeoutError) as exc:
                    self.status = f"cannot create topics {', '.join(missing)}: {describe(exc)}"
                    log.error("not ready: %s", self.status)  # noqa: TRY400 - the message says it all
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
                    self.status = f"topics without a leader yet: {', '.join(leaderless)}"
                await asyncio.sleep(_LEADER_RECHECK_S)
                continue
            self.status = f"topics missing: {', '.join(missing)}"
            if missing != reported:
                log.error(
                    "not ready: topics missing: %s; %s", ", ".join(missing), how_to_create(settings, missing)
                )
                reported = missing
            await asyncio.sleep(_TOPIC_RECHECK_S)
        await self._read_limits()
        # The producer's own metadata, refreshed: its refreshes name the bridge's topics with their creation
        # forbidden (`refresh_by_name`), its list of topics empty and staying so. Last, so that the counts
        # the caller reads are those of this refresh.
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
            self.status = f"the topics' leaders do not answer yet: {describe(exc)}"
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
            self.min_insync = read.min_insync_replicas
        if unread is not None:
            log.warning(
                "cannot read the topics' max.message.bytes (%s); records are checked against the "
                "bridge's own limit of %d bytes",
                unread,
                self._settings.max_record_bytes,
            )
        for topic, limit in limits.items():
            if limit < self._settings.max_record_bytes:
                log.info(
                    "topic %s takes records of at most %d bytes (max.message.bytes); larger callbacks "
                    "get 413",
                    topic,
                    limit,
                )
        self.record_limits = {t: n for t, n in limits.items() if n < self._settings.max_record_bytes}


def new_producer(settings: ServeSettings, connection_options: Mapping[str, Any]) -> AIOKafkaProducer:
    """A producer as the bridge writes with: acks=all, the bridge's batch size, linger and limits."""
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
        max_request_size=settings.max_record_bytes,
        # A produce request outliving the delivery deadline only delays noticing a dead connection.
        request_timeout_ms=max(1000, math.ceil(settings.delivery_timeout * 1000)),
        **connection_options,
    )


async def stop_producer(producer: AIOKafkaProducer, timeout: float) -> None:
    """Stop `producer` within `timeout`; a failure to is logged, not raised."""
    try:
        async with asyncio.timeout(timeout):
            await producer.stop()
    except TimeoutError:
        # A timeout is the expected failure here, and its traceback would say nothing more.
        log.error("the Kafka producer did not stop within %.3g s", timeout)  # noqa: TRY400
    except (KafkaError, OSError) as exc:
        log.warning("stopping the Kafka producer: %s", describe(exc))


async def wait_for_death(producer: AIOKafkaProducer) -> str:
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
