"""`bridge topics ensure` against the real test broker: creates, then finds no drift, then reports drift.

A changed topic is made the ways an operator meets one: created by someone else with other settings, the
bridge's intent changed, or the topic changed after the bridge made it (AlterConfigs, CreatePartitions; the
embedded Tansu has neither, so those two tests need Apache Kafka). Ensure itself never changes a topic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import UnknownTopicOrPartitionError
from aiokafka.protocol.metadata import MetadataRequest

from bridge.kafka import topics
from bridge.kafka.metadata import metadata_request
from bridge.kafka.topics import Drift, IntendedTopic, describe_reports, ensure_topics, intended_topic
from bridge.settings import ServeSettings
from tests.support.broker import broker_choice
from tests.support.settings import unique_settings
from tests.test_cli import run_bridge


def small(kafka: str, **overrides: object) -> ServeSettings:
    return unique_settings(kafka, create_topics=False, partitions=3, **overrides)


async def partition_count(admin: AIOKafkaAdminClient, topic: str) -> int:
    (described,) = await admin.describe_topics([topic])
    return len(described["partitions"])


async def test_ensure_creates_every_missing_topic_and_then_finds_nothing_to_report(
    kafka: str, admin: AIOKafkaAdminClient
) -> None:
    settings = small(kafka)
    first = await ensure_topics(settings)
    assert [(report.topic, report.created) for report in first] == [(t, True) for t in settings.topics]
    assert set(settings.topics) <= set(await admin.list_topics())
    assert {await partition_count(admin, topic) for topic in settings.topics} == {3}

    second = await ensure_topics(settings)
    assert [report.created for report in second] == [False] * len(settings.topics)
    assert [report.drifts for report in second] == [[]] * len(settings.topics)
    assert [report.unchecked for report in second] == [None] * len(settings.topics), "configs not compared"
    assert describe_reports(settings, second) == [f"{topic}: ok" for topic in settings.topics]


async def test_a_topic_created_with_other_settings_is_reported_and_left_unchanged(
    kafka: str, admin: AIOKafkaAdminClient
) -> None:
    settings = small(kafka)
    await admin.create_topics(
        [
            NewTopic(
                settings.c2c_topic,
                2,
                1,
                topic_configs={"retention.ms": "3600000", "cleanup.policy": "compact"},
            )
        ]
    )

    reports = {report.topic: report for report in await ensure_topics(settings)}

    assert not reports[settings.c2c_topic].created
    drifts = {drift.setting: drift for drift in reports[settings.c2c_topic].drifts}
    assert drifts["partitions"] == Drift("partitions", "2", "3")
    assert drifts["retention.ms"] == Drift(
        "retention.ms", "3600000", str(settings.retention_hours * 3_600_000)
    )
    assert drifts["cleanup.policy"] == Drift("cleanup.policy", "compact", "delete")
    assert all(report.created for topic, report in reports.items() if topic != settings.c2c_topic)
    assert await partition_count(admin, settings.c2c_topic) == 2, "ensure changed an existing topic"
    lines = describe_reports(settings, list(reports.values()))
    assert f"{settings.c2c_topic}: DRIFT, left unchanged" in lines
    assert any("partitions is 2, intended 3" in line and "remaps" in line for line in lines)


async def test_changing_the_intended_settings_reports_drift_on_every_existing_topic(kafka: str) -> None:
    settings = small(kafka)
    await ensure_topics(settings)

    changed = dataclasses.replace(settings, partitions=6, retention_hours=48)
    reports = await ensure_topics(changed)

    for report in reports:
        assert not report.created
        assert Drift("partitions", "3", "6") in report.drifts
        assert Drift("retention.ms", str(settings.retention_hours * 3_600_000), "172800000") in report.drifts


needs_kafka = pytest.mark.skipif(
    broker_choice().kind == "tansu", reason="Tansu has no AlterConfigs or CreatePartitions"
)


async def topic_config(admin: AIOKafkaAdminClient, topic: str, name: str) -> str:
    (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    (resource,) = response.resources
    return next(str(entry[1]) for entry in resource[4] if entry[0] == name)


@needs_kafka
async def test_a_config_altered_after_creation_is_drift_and_ensure_leaves_it_altered(
    kafka: str, admin: AIOKafkaAdminClient
) -> None:
    settings = small(kafka)
    await ensure_topics(settings)
    altered = ConfigResource(
        ConfigResourceType.TOPIC, settings.group_topic, configs={"retention.ms": "60000"}
    )
    await admin.alter_configs([altered])  # AlterConfigs: every other override of the topic is reset too

    reports = {report.topic: report for report in await ensure_topics(settings)}

    intended_retention = str(settings.retention_hours * 3_600_000)
    assert Drift("retention.ms", "60000", intended_retention) in reports[settings.group_topic].drifts
    assert all(not report.drifts for topic, report in reports.items() if topic != settings.group_topic)
    assert await topic_config(admin, settings.group_topic, "retention.ms") == "60000", "ensure changed it"
    result = run_bridge("topics", "ensure", *topic_flags(settings))
    assert result.returncode == 1
    assert f"{settings.group_topic}: DRIFT, left unchanged" in result.stdout


@needs_kafka
async def test_partitions_added_after_creation_are_drift_and_ensure_never_adds_or_removes_any(
    kafka: str, admin: AIOKafkaAdminClient
) -> None:
    settings = small(kafka)
    await ensure_topics(settings)
    await admin.create_partitions({settings.user_topic: NewPartitions(total_count=5)})  # CreatePartitions

    reports = {report.topic: report for report in await ensure_topics(settings)}

    assert Drift("partitions", "5", "3") in reports[settings.user_topic].drifts
    assert await partition_count(admin, settings.user_topic) == 5
    lines = describe_reports(settings, list(reports.values()))
    assert any("partitions is 5, intended 3" in line and "cannot be removed" in line for line in lines)


def topic_flags(settings: ServeSettings) -> list[str]:
    return [
        "--bootstrap-servers", ",".join(settings.bootstrap_servers), "--partitions", str(settings.partitions),
        "--topic", settings.topic, "--c2c-topic", settings.c2c_topic, "--group-topic", settings.group_topic,
        "--user-topic", settings.user_topic, "--app-topic", settings.app_topic,
        "--unknown-topic", settings.unknown_topic, "--rejected-topic", settings.rejected_topic,
    ]  # fmt: skip


def test_three_replicas_want_two_in_sync_and_fewer_want_one() -> None:
    settings = ServeSettings()
    assert intended_topic(settings, 5) == intended_topic(settings, 3)
    three = intended_topic(settings, 3)
    assert (three.replication_factor, three.configs["min.insync.replicas"]) == (3, "2")
    one = intended_topic(settings, 1)
    assert (one.replication_factor, one.configs["min.insync.replicas"]) == (1, "1")
    assert (
        intended_topic(dataclasses.replace(settings, min_insync_replicas=3), 3).configs["min.insync.replicas"]
        == "3"
    )


def test_topics_keep_every_record_for_the_retention_time_and_fit_the_largest_body() -> None:
    settings = ServeSettings(retention_hours=24, max_body_bytes=1000)
    intended: IntendedTopic = intended_topic(settings, 3)
    assert intended.configs["cleanup.policy"] == "delete"
    assert intended.configs["retention.ms"] == "86400000"
    assert intended.configs["retention.bytes"] == "-1"
    assert int(intended.configs["max.message.bytes"]) > 1000


def test_the_ensure_command_exits_0_when_as_intended_and_1_on_drift(kafka: str) -> None:
    settings = small(kafka)
    flags = topic_flags(settings)
    created = run_bridge("topics", "ensure", *flags)
    assert created.returncode == 0, created.stderr
    assert created.stdout.count(": created with 3 partitions") == len(settings.topics)

    again = run_bridge("topics", "ensure", *flags)
    assert (again.returncode, again.stdout.count(": ok\n")) == (0, len(settings.topics))

    drifted = run_bridge("topics", "ensure", *flags, env={"BRIDGE_RETENTION_HOURS": "1"})
    assert drifted.returncode == 1
    assert drifted.stdout.count("DRIFT, left unchanged") == len(settings.topics)
    assert "retention.ms is" in drifted.stdout
    assert "kafka-configs.sh" in drifted.stdout


def test_the_ensure_command_without_brokers_says_how_to_give_them() -> None:
    result = run_bridge("topics", "ensure")
    assert result.returncode == 2
    assert "BRIDGE_BOOTSTRAP_SERVERS" in result.stderr


def test_topics_are_named_with_creation_forbidden_from_metadata_v4_and_all_are_read_below() -> None:
    topics = ["b.topic", "a.topic"]
    modern = metadata_request({MetadataRequest.API_KEY: (0, 12)}, topics).prepare({3: (0, 12)})
    assert modern.API_VERSION >= 4
    assert modern.topics == ["a.topic", "b.topic"]
    assert modern.allow_auto_topic_creation is False
    old = metadata_request({MetadataRequest.API_KEY: (0, 3)}, topics).prepare({3: (0, 3)})
    assert old.API_VERSION == 3
    assert old.topics is None, "below v4 naming a topic could create it: every topic is read"
    unknown = metadata_request({}, topics)
    assert unknown.prepare({3: (0, 1)}).topics is None
    assert metadata_request({3: (0, 12)}, []).prepare({3: (0, 12)}).topics is None


class CatchingUpAdmin:
    """An admin client whose broker answers the metadata of a topic just created as unknown `behind` times,
    as a KRaft broker does until it has applied the controller's record (seen in CI: a topic made by
    another client, then described at once, had 0 partitions)."""

    def __init__(self, behind: int) -> None:
        self.behind, self.asked = behind, 0

    async def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        self.asked += 1
        if self.asked <= self.behind:
            return [{"topic": name, "error_code": 3, "partitions": []} for name in names]
        return [
            {"topic": name, "error_code": 0, "partitions": [{"partition": 0}, {"partition": 1}]}
            for name in names
        ]


async def test_a_topic_the_broker_has_not_caught_up_with_is_described_again_not_taken_as_empty() -> None:
    admin = CatchingUpAdmin(behind=2)
    described = await topics._describe_topics(admin, ["t"])
    assert len(described["t"]["partitions"]) == 2
    assert admin.asked == 3


async def test_a_topic_the_broker_never_describes_is_an_error_not_a_drift(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(topics, "_DESCRIBE_WAIT_S", 0.3)
    with pytest.raises(UnknownTopicOrPartitionError, match="cannot describe topic t"):
        await topics._describe_topics(CatchingUpAdmin(behind=1_000), ["t"])
