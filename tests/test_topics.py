"""`bridge topics ensure` against the real test broker: creates, then finds no drift, then reports drift.

The broker is never asked to change an existing topic, so these tests also hold on brokers without
AlterConfigs or CreatePartitions (the embedded Tansu has neither); a changed topic is made the way an
operator would meet one: created by someone else with other settings, or the bridge's intent changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge.settings import Settings
from bridge.topics import Drift, IntendedTopic, describe_reports, ensure_topics, intended_topic
from tests.support import unique_settings
from tests.test_cli import run_bridge


@pytest.fixture
async def admin(kafka: str) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await client.start()
    yield client
    await client.close()


def small(kafka: str, **overrides: object) -> Settings:
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


def test_three_replicas_want_two_in_sync_and_fewer_want_one() -> None:
    settings = Settings()
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
    settings = Settings(retention_hours=24, max_body_bytes=1000)
    intended: IntendedTopic = intended_topic(settings, 3)
    assert intended.configs["cleanup.policy"] == "delete"
    assert intended.configs["retention.ms"] == "86400000"
    assert intended.configs["retention.bytes"] == "-1"
    assert int(intended.configs["max.message.bytes"]) > 1000


def test_the_ensure_command_exits_0_when_as_intended_and_1_on_drift(kafka: str) -> None:
    settings = small(kafka)
    topic_flags = [
        "--bootstrap-servers", kafka, "--partitions", "3",
        "--topic", settings.topic, "--c2c-topic", settings.c2c_topic, "--group-topic", settings.group_topic,
        "--user-topic", settings.user_topic, "--app-topic", settings.app_topic,
        "--unknown-topic", settings.unknown_topic,
    ]  # fmt: skip
    created = run_bridge("topics", "ensure", *topic_flags)
    assert created.returncode == 0, created.stderr
    assert created.stdout.count(": created with 3 partitions") == len(settings.topics)

    again = run_bridge("topics", "ensure", *topic_flags)
    assert (again.returncode, again.stdout.count(": ok\n")) == (0, len(settings.topics))

    drifted = run_bridge("topics", "ensure", *topic_flags, env={"BRIDGE_RETENTION_HOURS": "1"})
    assert drifted.returncode == 1
    assert drifted.stdout.count("DRIFT, left unchanged") == len(settings.topics)
    assert "retention.ms is" in drifted.stdout
    assert "kafka-configs.sh" in drifted.stdout


def test_the_ensure_command_without_brokers_says_how_to_give_them() -> None:
    result = run_bridge("topics", "ensure")
    assert result.returncode == 2
    assert "BRIDGE_BOOTSTRAP_SERVERS" in result.stderr
