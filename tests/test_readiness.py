"""Readiness needs every topic as it was at start, and the bridge never makes a broker create a topic.

Against the session's broker. On Apache Kafka with `auto.create.topics.enable=true` (its default) the
re-creation this guards against happens for real: a producer that asks for a deleted topic's metadata by
name gets it created again, with the broker's default partition count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import IncompatibleBrokerVersion, UnsupportedVersionError

from bridge.ingest.server import PUBLISHER, create_app
from bridge.kafka.publisher import KafkaPublisher
from bridge.settings import ServeSettings
from bridge.tencent.partitioner import partition_for
from tests.conftest import BridgeClient
from tests.support import serve
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import wait_until_ready

OA = fixture("oa-after-send-text")
C2C = fixture("c2c-after-send")
NOTICE_S = 5.0
"""How soon a deleted or changed topic must make the bridge not ready: the probe looks every second."""


async def post(client: BridgeClient, msg_key: str) -> tuple[int, dict[str, Any]]:
    body = orjson.dumps({**OA.body, "MsgKey": msg_key})
    response = await client.post("/callback", params=OA.query, data=body)
    return response.status, await response.json()


async def not_ready(client: BridgeClient, phrase: str) -> str:
    """Wait until `/readyz` says 503 with `phrase` in its detail, within `NOTICE_S`; return the detail."""
    return await serve.not_ready(client, phrase, NOTICE_S)


async def gone(admin: AIOKafkaAdminClient, topic: str) -> None:
    await admin.delete_topics([topic])
    async with asyncio.timeout(30):
        while topic in await admin.list_topics():
            await asyncio.sleep(0.1)


async def create(admin: AIOKafkaAdminClient, topic: str, partitions: int) -> None:
    """Create `topic`, retrying while the broker still finishes deleting an earlier one of that name."""
    async with asyncio.timeout(30):
        while True:
            response = await admin.create_topics([NewTopic(topic, partitions, 1)])
            if all(error[1] == 0 for error in response.topic_errors):
                return
            await asyncio.sleep(0.2)


async def test_a_topic_deleted_while_serving_makes_the_bridge_not_ready_and_is_not_created_again(
    bridge: BridgeClient,
    settings: ServeSettings,
    admin: AIOKafkaAdminClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    assert (await post(bridge, "before"))[0] == 200
    await admin.delete_topics([settings.topic])
    started = time.monotonic()
    detail = await not_ready(bridge, "missing")
    assert time.monotonic() - started < NOTICE_S
    assert settings.topic in detail
    assert f"not ready: topic {settings.topic} is missing" in caplog.text
    assert "auto.create.topics.enable=false" in caplog.text

    # For as long as it is gone its callbacks are refused as not written; the probe and the producer go on
    # refreshing metadata meanwhile, and none of that brings the topic back.
    for number in range(10):
        status, body = await post(bridge, f"while-gone-{number}")
        assert status == 503
        assert "was not written" in body["ErrorInfo"]
        await asyncio.sleep(0.3)
    other = await bridge.post("/callback", params=C2C.query, data=C2C.raw_body)
    assert other.status == 200, "the other topics are still written"
    assert settings.topic not in await admin.list_topics(), "the topic was created again"
    app = bridge.app
    assert app is not None
    publisher = app[PUBLISHER]
    assert isinstance(publisher, KafkaPublisher)
    producer = publisher.producer
    assert producer is not None
    assert producer.client._topics == set(), "the producer asks for topics by name"

    await create(admin, settings.topic, settings.partitions)  # an operator restores it as it was
    await wait_until_ready(bridge)
    assert (await post(bridge, "restored"))[0] == 200
    assert "is back as at start, with 12 partitions" in caplog.text


async def grow(admin: AIOKafkaAdminClient, topic: str, partitions: int) -> None:
    try:
        response = await admin.create_partitions({topic: NewPartitions(partitions)})
    except (IncompatibleBrokerVersion, UnsupportedVersionError):
        pytest.skip("the broker cannot add partitions (CreatePartitions)")
    if any(error[1] != 0 for error in response.topic_errors):
        pytest.skip(f"the broker did not add partitions: {response.topic_errors}")


@pytest.mark.parametrize("partitions", [4, 16], ids=["re-created-smaller", "grown"])
async def test_a_topic_whose_partition_count_changed_makes_the_bridge_not_ready_until_restarted(
    bridge: BridgeClient,
    settings: ServeSettings,
    admin: AIOKafkaAdminClient,
    kafka: str,
    caplog: pytest.LogCaptureFixture,
    partitions: int,
) -> None:
    """A changed count maps accounts to other partitions: no callback of that topic is written with either
    count until the bridge restarts and takes the new one."""
    caplog.set_level(logging.INFO, logger="bridge")
    assert (await post(bridge, "before"))[0] == 200
    if partitions > settings.partitions:
        await grow(admin, settings.topic, partitions)
    else:
        await gone(admin, settings.topic)
        await create(admin, settings.topic, partitions)
    detail = await not_ready(bridge, f"has {partitions} partitions, not the 12 it had at start")
    assert settings.topic in detail
    assert "until the bridge is restarted to take the new count" in caplog.text
    status, body = await post(bridge, "changed")
    assert status == 503
    assert "was not written" in body["ErrorInfo"]

    async with TestClient(TestServer(create_app(settings))) as restarted:
        await wait_until_ready(restarted)
        assert (await post(restarted, "after-restart"))[0] == 200
    records = await read_records(kafka, [settings.topic], expect=1)
    [record] = [record for record in records if record.key == b"after-restart"]
    assert record.partition == partition_for(OA.body["Official_Account"], partitions)


async def test_a_bridge_waiting_for_missing_topics_never_has_them_created(
    kafka: str, settings: ServeSettings, admin: AIOKafkaAdminClient
) -> None:
    """Without --create-topics the bridge waits, asking only for every topic's metadata: however long it
    waits and whatever it is sent, no topic appears (a broker that creates topics on demand included)."""
    waiting = create_app(replace(settings, create_topics=False))
    async with TestClient(TestServer(waiting)) as client:
        await not_ready(client, "topics missing")
        for number in range(3):
            assert (await post(client, f"too-early-{number}"))[0] == 503
            await asyncio.sleep(0.5)
    assert not set(settings.topics) & set(await admin.list_topics())
