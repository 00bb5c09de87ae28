"""The bridge reads the metadata of its own topics only, by name, and no broker creates one for it.

On a broker of this module's own with `auto.create.topics.enable=true` and a few hundred other topics of
12 partitions each: the probe's read, the start-up wait's and the producer's own refreshes hold the bridge's
seven topics and nothing else, a probe stalls the event loop far less than a read of every topic, and a
topic deleted while the bridge runs is noticed and stays deleted, though the broker creates topics on demand
(the control shows it does).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.cluster import ClusterMetadata
from aiokafka.protocol.metadata import MetadataRequest

from bridge.ingest.server import PUBLISHER, create_app
from bridge.kafka.metadata import read_metadata, refresh_by_name
from bridge.kafka.publisher import KafkaPublisher
from bridge.kafka.topics import await_leaders
from bridge.settings import ServeSettings
from tests.conftest import BridgeClient
from tests.support.kafka import jars
from tests.support.kafka.nodes import KafkaNode
from tests.support.requests import fixture
from tests.support.serve import not_ready, wait_until_ready
from tests.support.settings import unique_settings

pytestmark = [
    pytest.mark.kafka,  # starts a broker of its own
    pytest.mark.skipif(not jars.tools_present(), reason="needs the local Apache Kafka (java and mvn)"),
]

OTHER_TOPICS = 300
"""Other teams' topics on the module's broker, 12 partitions each: a shared cluster's, scaled down."""
PARTITIONS = 12
PROBES = 5
"""Probes (one a second) the event loop's stalls are measured over."""
NOTICE_S = 5.0
OA = fixture("oa-after-send-text")


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker that creates topics on demand, holding `OTHER_TOPICS` topics that are not the bridge's."""
    directory: Path = tmp_path_factory.mktemp("shared")
    with KafkaNode(directory, properties={"auto.create.topics.enable": "true"}, short_lived=True) as node:
        asyncio.run(_other_topics(node.bootstrap_servers))
        yield node.bootstrap_servers


async def _other_topics(bootstrap_servers: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=120_000)
    await admin.start()
    try:
        names = [f"other-team.topic-{number:04}" for number in range(OTHER_TOPICS)]
        for start in range(0, len(names), 100):
            await admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in names[start : start + 100]])
        async with asyncio.timeout(120):
            while len(set(names) - set(await admin.list_topics())) > 0:
                await asyncio.sleep(0.2)
    finally:
        await admin.close()


@pytest.fixture
def settings(shared_cluster: str) -> ServeSettings:
    return unique_settings(shared_cluster)


@pytest.fixture
async def admin(shared_cluster: str) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=shared_cluster)
    await client.start()
    yield client
    await client.close()


@pytest.fixture
async def bridge(settings: ServeSettings) -> AsyncIterator[BridgeClient]:
    async with TestClient(TestServer(create_app(settings))) as client:
        await wait_until_ready(client)
        yield client


def kafka_publisher(bridge: BridgeClient) -> KafkaPublisher:
    assert bridge.app is not None
    publisher = bridge.app[PUBLISHER]
    assert isinstance(publisher, KafkaPublisher)
    return publisher


def the_producer(bridge: BridgeClient) -> AIOKafkaProducer:
    producer = kafka_publisher(bridge).producer
    assert producer is not None
    return producer


async def every_topic(client: Any) -> ClusterMetadata:
    """The metadata of every topic, as the bridge's probe read it before: aiokafka's own read, which the
    bridge's clients no longer take (`refresh_by_name` replaced it on them)."""
    cluster = ClusterMetadata()
    assert await AIOKafkaClient._metadata_update(client, cluster, None)
    return cluster


def partition_count(cluster: ClusterMetadata) -> int:
    return sum(len(cluster.partitions_for_topic(topic) or ()) for topic in cluster.topics())


async def longest_stall(during: Callable[[], Awaitable[object]]) -> float:
    """The event loop's longest stall while `during` runs: the most a 10 ms sleep overran."""
    longest = 0.0
    running = True

    async def watch() -> None:
        nonlocal longest
        while running:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            longest = max(longest, time.perf_counter() - before - 0.01)

    watcher = asyncio.create_task(watch())
    try:
        await during()
    finally:
        running = False
        await watcher
    return longest


async def test_the_probe_reads_only_the_bridges_topics_and_stalls_the_loop_far_less_than_reading_all(
    bridge: BridgeClient, settings: ServeSettings, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    publisher = kafka_publisher(bridge)
    producer = the_producer(bridge)
    probed: list[ClusterMetadata] = []
    read = publisher.metadata_read

    def noted(cluster: ClusterMetadata) -> None:
        probed.append(cluster)
        read(cluster)

    monkeypatch.setattr(publisher, "metadata_read", noted)

    async def probes() -> None:
        async with asyncio.timeout(PROBES + 5):
            while len(probed) < PROBES:
                await asyncio.sleep(0.05)

    after = await longest_stall(probes)
    bridge_topics = set(settings.topics)
    assert all(set(cluster.topics()) == bridge_topics for cluster in probed), "the probe read other topics"
    assert all(partition_count(cluster) == PARTITIONS * len(bridge_topics) for cluster in probed)
    await producer.client.force_metadata_update()  # the producer's own refresh
    assert set(producer.client.cluster.topics()) == bridge_topics
    assert producer.client._topics == set(), "the producer tracks no topic by name"

    # What every probe read before: the metadata of every topic, once a second, on the same loop.
    everything: list[ClusterMetadata] = []

    async def reads_of_everything() -> None:
        for _ in range(PROBES):
            await asyncio.sleep(1.0)
            everything.append(await every_topic(producer.client))

    before = await longest_stall(reads_of_everything)
    assert all(len(cluster.topics()) >= OTHER_TOPICS + len(bridge_topics) for cluster in everything)
    assert after < before / 2, f"the probe stalled the loop {after:.3f} s, a read of all {before:.3f} s"

    named_s, all_s = [], []
    for _ in range(PROBES):
        started = time.perf_counter()
        await read_metadata(producer.client, settings.topics)
        named_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        await every_topic(producer.client)
        all_s.append(time.perf_counter() - started)
    named, every = statistics.median(named_s) * 1000, statistics.median(all_s) * 1000
    with capsys.disabled():
        print(
            f"\n{OTHER_TOPICS + len(bridge_topics)} topics of {PARTITIONS} partitions: longest stall over "
            f"{PROBES} probes {after * 1000:.1f} ms (every topic's read: {before * 1000:.1f} ms); a read "
            f"{named:.1f} ms (every topic's: {every:.1f} ms)"
        )


async def test_a_topic_deleted_on_a_broker_that_creates_topics_on_demand_is_noticed_and_stays_deleted(
    bridge: BridgeClient,
    settings: ServeSettings,
    admin: AIOKafkaAdminClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    producer = the_producer(bridge)
    await admin.delete_topics([settings.topic])
    await not_ready(bridge, "missing", NOTICE_S)
    assert f"not ready: topic {settings.topic} is missing" in caplog.text
    # Probes go on, the producer refreshes its own metadata (as after a NOT_LEADER), a write is tried.
    for number in range(3):
        await producer.client.force_metadata_update()
        body = orjson.dumps({**OA.body, "MsgKey": f"while-gone-{number}"})
        response = await bridge.post("/callback", params=OA.query, data=body)
        assert response.status == 503
        await asyncio.sleep(1.0)
    assert settings.topic not in await admin.list_topics(), "the topic was created again"
    assert settings.topic not in producer.client.cluster.topics()

    # The control: this broker does create a topic that a Metadata request names with creation allowed.
    control = f"{settings.topic}.control"
    conn = await producer.client._get_conn(producer.client.get_random_node())
    await conn.send(MetadataRequest([control], allow_auto_topic_creation=True))
    async with asyncio.timeout(NOTICE_S):
        while control not in await admin.list_topics():
            await asyncio.sleep(0.1)


async def test_awaiting_leaders_reads_every_topic_at_once_and_names_only_them(
    settings: ServeSettings, bridge: BridgeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of the consumer's metadata refreshes holds the topics asked for only, and the first holds them
    all: aiokafka alone learns one topic per 100 ms retry."""
    refreshed: list[set[str]] = []

    def counting(client: Any, topics: list[str]) -> None:
        refresh_by_name(client, topics)
        refresh = client._metadata_update

        async def counted(cluster: ClusterMetadata, tracked: Any) -> bool:
            done: bool = await refresh(cluster, tracked)
            refreshed.append(set(cluster.topics()))
            return done

        client._metadata_update = counted

    monkeypatch.setattr("bridge.kafka.topics.refresh_by_name", counting)
    topics = list(settings.topics)
    started = time.perf_counter()
    await await_leaders(settings, topics)
    took = time.perf_counter() - started
    assert refreshed, "the consumer's metadata was read through `refresh_by_name`'s request"
    assert refreshed[0] == set(topics)
    assert all(seen == set(topics) for seen in refreshed)
    assert len(refreshed) <= 2, f"{len(refreshed)} refreshes for {len(topics)} topics"
    print(f"await_leaders for {len(topics)} topics: {took * 1000:.0f} ms, {len(refreshed)} refreshes")
