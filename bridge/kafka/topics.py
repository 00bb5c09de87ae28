"""The bridge's topics on the cluster: what they should look like, creating them, and reporting drift.

`intended_topic` is the one description of a bridge topic: partitions, replication factor and configs.
`bridge serve --create-topics` creates missing topics from it; `bridge topics ensure` creates missing ones
and checks existing ones against it, reporting every difference and changing nothing that exists: adding
partitions remaps entities to partitions, and a config change may delete data, so that is an operator's call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    IncompatibleBrokerVersion,
    KafkaError,
    LeaderNotAvailableError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)

from bridge.errors import CommandError, ExitStatus, describe
from bridge.kafka.metadata import refresh_by_name
from bridge.kafka.security import start_client
from bridge.process import run_loop
from bridge.settings import KafkaConnection, TopicLayout, TopicsSettings

log = logging.getLogger("bridge.topics")  # see `bridge.logs.LOGGERS`

_ADMIN_CALL_TIMEOUT_S = 30.0
_MS_PER_HOUR = 3_600_000


@dataclass(frozen=True, slots=True)
class IntendedTopic:
    partitions: int
    replication_factor: int
    configs: Mapping[str, str]


def intended_topic(settings: TopicLayout, broker_count: int) -> IntendedTopic:
    """What every bridge topic should look like on a cluster of `broker_count` brokers."""
    replication = settings.replication_factor or min(3, max(broker_count, 1))
    # With 3 replicas, 2 in sync: a write survives one broker down, and acks=all means two copies.
    min_insync = settings.min_insync_replicas or (2 if replication >= 3 else 1)
    return IntendedTopic(
        partitions=settings.partitions,
        replication_factor=replication,
        configs={
            # Delete, not compact: replays need every record, and compaction would keep only the last
            # record of each key, which is what deduplication is for on the consumer side, not here.
            "cleanup.policy": "delete",
            "retention.ms": str(settings.retention_hours * _MS_PER_HOUR),
            # Retention by time only: a size limit would cut the replay window short under a burst.
            "retention.bytes": "-1",
            "min.insync.replicas": str(min_insync),
            # Keep the batches as the producer compressed them (--compression); no recompression.
            "compression.type": "producer",
            "max.message.bytes": str(settings.max_record_bytes),
        },
    )


def how_to_create(settings: TopicLayout, topics: Iterable[str]) -> str:
    """A hint a user can act on when topics are missing."""
    names = " ".join(topics)
    return (
        f"create them with `bridge topics ensure` (or kafka-topics.sh --create --topic NAME --partitions "
        f"{settings.partitions} ...) for: {names}; or restart the bridge with --create-topics "
        "(BRIDGE_CREATE_TOPICS=true)"
    )


def admin_client(settings: KafkaConnection) -> AIOKafkaAdminClient:
    """An admin client of the cluster, not started, with the settings' TLS and SASL."""
    return AIOKafkaAdminClient(
        bootstrap_servers=list(settings.bootstrap_servers),
        client_id=settings.client_id,
        request_timeout_ms=int(_ADMIN_CALL_TIMEOUT_S * 1000),
        **settings.client_options(),
    )


async def _start(admin: AIOKafkaAdminClient, settings: KafkaConnection) -> None:
    await start_client(admin, settings.bootstrap_servers, settings.client_options())


async def _create(admin: AIOKafkaAdminClient, topics: list[str], intended: IntendedTopic) -> list[str]:
    """Create `topics`; return those created (not those that already existed)."""
    if intended.replication_factor < int(intended.configs["min.insync.replicas"]):
        raise ValueError(
            f"min.insync.replicas {intended.configs['min.insync.replicas']} is above the replication factor "
            f"{intended.replication_factor}: no write could ever be confirmed"
        )
    response = await admin.create_topics(
        [
            NewTopic(
                name, intended.partitions, intended.replication_factor, topic_configs=dict(intended.configs)
            )
            for name in topics
        ]
    )
    created = []
    for name, code, message in (error[:3] for error in response.topic_errors):
        if code == 0:
            created.append(name)
            log.info(
                "created topic %s with %d partitions, replication factor %d",
                name,
                intended.partitions,
                intended.replication_factor,
            )
        elif code != TopicAlreadyExistsError.errno:
            raise for_code(code)(f"cannot create topic {name}: {message}")
    return created


async def create_topics(settings: TopicsSettings, topics: list[str], broker_count: int) -> None:
    """Create `topics` as `intended_topic` says; existing ones are left alone."""
    admin = admin_client(settings)
    try:
        await _start(admin, settings)
        await _create(admin, topics, intended_topic(settings, broker_count))
    finally:
        await admin.close()


async def await_leaders(settings: KafkaConnection, topics: list[str]) -> None:
    """Return once every partition of `topics` has a leader that answers for it.

    Apache Kafka names a new partition's leader in its metadata a moment before that broker has opened the
    partition's log: a write in between gets NOT_LEADER_OR_FOLLOWER until the bridge's deadline. Asking each
    leader for the partition's end offset (ListOffsets) succeeds only once it is the leader in fact.

    The consumer's metadata names `topics` with their creation forbidden (`refresh_by_name`), and holds
    all of them before the first ListOffsets: left to itself, aiokafka would learn them one per 100 ms retry.
    """
    if not topics:
        return
    consumer = AIOKafkaConsumer(
        bootstrap_servers=list(settings.bootstrap_servers),
        client_id=settings.client_id,
        enable_auto_commit=False,
        request_timeout_ms=int(_ADMIN_CALL_TIMEOUT_S * 1000),
        **settings.client_options(),
    )
    client = consumer._client
    refresh_by_name(client, topics)
    async with asyncio.timeout(_ADMIN_CALL_TIMEOUT_S):
        try:
            await start_client(consumer, settings.bootstrap_servers, settings.client_options())
            # The client's own metadata, which ListOffsets looks the leaders up in.
            await client.force_metadata_update()
            cluster = client.cluster
            while not all(cluster.partitions_for_topic(topic) for topic in topics):
                await asyncio.sleep(0.05)
                await client.force_metadata_update()
            partitions = [
                TopicPartition(topic, partition)
                for topic in topics
                for partition in cluster.partitions_for_topic(topic) or ()
            ]
            await consumer.end_offsets(partitions)  # retried by aiokafka while a leader is not one yet
        finally:
            await consumer.stop()


@dataclass(frozen=True, slots=True)
class Drift:
    setting: str
    actual: str
    intended: str


@dataclass(slots=True)
class TopicReport:
    """What `ensure_topics` found or did for one topic."""

    topic: str
    intended: IntendedTopic
    created: bool = False
    drifts: list[Drift] = field(default_factory=list)
    unchecked: str | None = None
    """Why the configs could not be checked, when the broker cannot describe them."""


async def ensure_topics(settings: TopicsSettings) -> list[TopicReport]:
    """Create the missing topics; compare the existing ones with `intended_topic`, changing nothing."""
    admin = admin_client(settings)
    try:
        async with asyncio.timeout(_ADMIN_CALL_TIMEOUT_S):
            await _start(admin, settings)
        async with asyncio.timeout(_ADMIN_CALL_TIMEOUT_S):
            cluster = await admin.describe_cluster()
            intended = intended_topic(settings, len(cluster["brokers"]))
            existing = set(await admin.list_topics())
            missing = [topic for topic in settings.topics if topic not in existing]
            created = set(await _create(admin, missing, intended)) if missing else set()
            reports = [TopicReport(topic, intended, created=topic in created) for topic in settings.topics]
            to_check = [report for report in reports if not report.created]
            if to_check:
                await _check(admin, to_check)
    finally:
        await admin.close()
    await await_leaders(settings, sorted(created))
    return reports


async def _check(admin: AIOKafkaAdminClient, reports: list[TopicReport]) -> None:
    names = [report.topic for report in reports]
    described = await _describe_topics(admin, names)
    configs, unchecked = await _describe_configs(admin, names)
    for report in reports:
        intended = report.intended
        partitions = described[report.topic]["partitions"]
        if len(partitions) != intended.partitions:
            report.drifts.append(Drift("partitions", str(len(partitions)), str(intended.partitions)))
        replication = min((len(partition["replicas"]) for partition in partitions), default=0)
        if replication != intended.replication_factor:
            report.drifts.append(
                Drift("replication factor", str(replication), str(intended.replication_factor))
            )
        if unchecked is not None:
            report.unchecked = unchecked
            continue
        actual = configs.get(report.topic, {})
        for name, value in intended.configs.items():
            # A broker that lists only the configs set on a topic (Tansu) omits the others.
            found = actual.get(name, "(not set)")
            if found != value:
                report.drifts.append(Drift(name, found, value))


# A topic just created (by another process, or this one a moment ago) can be known to the controller before
# the broker that answers has applied it: the broker says it does not know the topic, or knows no leader yet.
_NOT_THERE_YET = frozenset({UnknownTopicOrPartitionError.errno, LeaderNotAvailableError.errno})
_DESCRIBE_RETRY_S = 0.1
_DESCRIBE_WAIT_S = 10.0


async def _describe_topics(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, Any]]:
    """The metadata of topics that exist, asked again while the broker has not caught up with them (for up
    to `_DESCRIBE_WAIT_S`): their partitions are not to be taken for zero. Raises the broker's error for a
    topic it still cannot describe, or for any other error."""
    described: dict[str, dict[str, Any]] = {}
    waiting = list(names)
    deadline = asyncio.get_running_loop().time() + _DESCRIBE_WAIT_S
    while True:
        for topic in await admin.describe_topics(waiting):
            described[topic["topic"]] = topic
        waiting = [name for name in waiting if described[name]["error_code"] in _NOT_THERE_YET]
        if not waiting or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(_DESCRIBE_RETRY_S)
    for name in names:
        if code := described[name]["error_code"]:
            raise for_code(code)(f"cannot describe topic {name}")
    return described


async def _describe_configs(
    admin: AIOKafkaAdminClient, topics: list[str]
) -> tuple[dict[str, dict[str, str]], str | None]:
    """Every config of `topics`, or why the broker could not say.

    All configs are asked for, not the few compared: some Kafka-compatible brokers drop the connection when
    asked for named configs.
    """
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics]
        )
    except IncompatibleBrokerVersion:
        return {}, "the broker does not support DescribeConfigs"
    except KafkaError as exc:
        return {}, f"DescribeConfigs failed: {type(exc).__name__}"
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for error_code, error_message, _type, name, entries in (r[:5] for r in response.resources):
            if error_code != 0:
                return {}, f"DescribeConfigs failed for {name}: {error_message}"
            configs[name] = {entry[0]: entry[1] for entry in entries}
    return configs, None


@dataclass(frozen=True)
class TopicLimits:
    """What the bridge reads of its topics' configs at each connection (DescribeConfigs)."""

    max_message_bytes: dict[str, int]
    """Each topic's `max.message.bytes`: a larger record is refused by the broker."""
    min_insync_replicas: dict[str, int]
    """Each topic's `min.insync.replicas`: with fewer replicas in sync, its leaders refuse acks=all writes."""
    unread: str | None
    """Why some `max.message.bytes` could not be read, if so."""


async def topic_limits(settings: TopicsSettings, topics: list[str]) -> TopicLimits:
    """Each topic's `max.message.bytes` and `min.insync.replicas`, in one DescribeConfigs.

    A topic the broker lists no value for (Tansu lists only the configs set on a topic) is left out.
    """
    admin = admin_client(settings)
    try:
        async with asyncio.timeout(_ADMIN_CALL_TIMEOUT_S):
            await _start(admin, settings)
            configs, unread = await _describe_configs(admin, topics)
    finally:
        await admin.close()
    limits: dict[str, dict[str, int]] = {"max.message.bytes": {}, "min.insync.replicas": {}}
    for topic in topics:
        for name, values in limits.items():
            value = configs.get(topic, {}).get(name)
            if value is not None and value.isdigit():
                values[topic] = int(value)
    missing = [topic for topic in topics if topic not in limits["max.message.bytes"]]
    if unread is None and missing:
        unread = f"the broker lists no max.message.bytes for {', '.join(missing)}"
    return TopicLimits(limits["max.message.bytes"], limits["min.insync.replicas"], unread)


async def max_message_bytes(settings: TopicsSettings, topics: list[str]) -> tuple[dict[str, int], str | None]:
    """Each topic's `max.message.bytes` (DescribeConfigs), and why some could not be read, if so."""
    limits = await topic_limits(settings, topics)
    return limits.max_message_bytes, limits.unread


def fix_hint(settings: TopicsSettings, topic: str, drift: Drift) -> str:
    """The command an operator would run to bring `topic` in line, with what it costs."""
    servers = ",".join(settings.bootstrap_servers)
    if drift.setting == "partitions":
        if int(drift.actual) > int(drift.intended):
            return "partitions cannot be removed; keep --partitions at the topic's count"
        return (
            f"kafka-topics.sh --bootstrap-server {servers} --alter --topic {topic} --partitions "
            f"{drift.intended} (remaps entities to partitions: per-entity order breaks across the change)"
        )
    if drift.setting == "replication factor":
        return "kafka-reassign-partitions.sh with a plan of the intended replicas"
    return (
        f"kafka-configs.sh --bootstrap-server {servers} --alter --entity-type topics --entity-name {topic} "
        f"--add-config {drift.setting}={drift.intended}"
    )


def describe_reports(settings: TopicsSettings, reports: list[TopicReport]) -> list[str]:
    """The lines `bridge topics ensure` prints: one per topic, one more per drift."""
    lines = []
    for report in reports:
        if report.created:
            intended = report.intended
            configs = ", ".join(f"{name}={value}" for name, value in intended.configs.items())
            lines.append(
                f"{report.topic}: created with {intended.partitions} partitions, replication factor "
                f"{intended.replication_factor}, {configs}"
            )
        elif not report.drifts:
            lines.append(
                f"{report.topic}: ok"
                + (f" (configs not checked: {report.unchecked})" if report.unchecked else "")
            )
        else:
            lines.append(f"{report.topic}: DRIFT, left unchanged")
            lines.extend(
                f"  {drift.setting} is {drift.actual}, intended {drift.intended}; fix: "
                f"{fix_hint(settings, report.topic, drift)}"
                for drift in report.drifts
            )
    return lines


def run_ensure(settings: TopicsSettings) -> int:
    """`bridge topics ensure`: print a line per topic; 0 when all are as intended, 1 on drift. Raises
    `CommandError` with status 3 when the cluster could not be reached or refused."""
    try:
        reports = run_loop(ensure_topics(settings))
    except (KafkaError, OSError, TimeoutError, ValueError) as exc:
        brokers = ",".join(settings.bootstrap_servers)
        raise CommandError(f"{describe(exc)} (brokers: {brokers})", ExitStatus.KAFKA_FAILED) from None
    for line in describe_reports(settings, reports):
        print(line)
    return ExitStatus.DRIFT if any(report.drifts for report in reports) else ExitStatus.OK
