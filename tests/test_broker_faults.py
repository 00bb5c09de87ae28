"""When the broker does not confirm, the answer is an honest 503 within the deadline, never a 200."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.ingest.server import create_app
from bridge.settings import ServeSettings
from tests.conftest import BridgeClient
from tests.support.broker import FaultBroker
from tests.support.kafka.nodes import running_threads
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import wait_until_ready
from tests.support.settings import unique_settings

pytestmark = pytest.mark.kafka  # starts brokers of its own

SEED = fixture("oa-after-send-text")
DELIVERY_TIMEOUT_S = 1.0


def callback(msg_key: str) -> bytes:
    return orjson.dumps({**SEED.body, "MsgKey": msg_key})


@pytest.fixture
def own_settings(own_broker: FaultBroker) -> ServeSettings:
    return unique_settings(own_broker.bootstrap_servers, delivery_timeout=DELIVERY_TIMEOUT_S)


@pytest.fixture
async def own_bridge(own_settings: ServeSettings) -> AsyncIterator[BridgeClient]:
    async with TestClient(TestServer(create_app(own_settings))) as client:
        await wait_until_ready(client)
        yield client


async def test_a_paused_broker_gets_503_within_the_deadline_and_the_next_request_after_resume_succeeds(
    own_bridge: BridgeClient, own_broker: FaultBroker, own_settings: ServeSettings
) -> None:
    assert (await own_bridge.post("/callback", params=SEED.query, data=callback("before"))).status == 200

    own_broker.pause()
    try:
        started = time.monotonic()
        response = await own_bridge.post("/callback", params=SEED.query, data=callback("during"))
        elapsed = time.monotonic() - started
        body = await response.json()
    finally:
        own_broker.resume()
    assert response.status == 503
    assert elapsed < DELIVERY_TIMEOUT_S + 0.5
    assert body["ActionStatus"] == "FAIL"
    assert body["ErrorCode"] != 0
    assert "did not confirm" in body["ErrorInfo"]
    assert response.headers["Retry-After"] == "1"

    response = await own_bridge.post("/callback", params=SEED.query, data=callback("after"))
    assert response.status == 200
    records = await read_records(own_broker.bootstrap_servers, [own_settings.topic], expect=2)
    keys = [r.key for r in records]
    assert keys.count(b"before") == 1
    assert keys.count(b"after") == 1
    # The write answered 503 may still have landed (an ambiguous outcome), but at most once.
    assert keys.count(b"during") <= 1


def test_pause_returns_only_once_every_thread_of_the_broker_is_stopped(own_broker: FaultBroker) -> None:
    # `kill(SIGSTOP)` returns before the broker's threads stop: a callback posted at once could reach a
    # broker still serving and be confirmed, which made the test above see a 200 on a loaded machine.
    assert own_broker.process is not None
    pid = own_broker.process.pid
    assert running_threads(pid)  # it serves
    for _ in range(100):  # an idle JVM had threads still running after kill() in 13 pauses of 100
        own_broker.pause()
        try:
            assert running_threads(pid) == []
        finally:
            own_broker.resume()


async def test_a_bridge_started_while_the_broker_is_down_answers_503_fast_and_becomes_ready(
    own_broker: FaultBroker,
) -> None:
    port = own_broker.port
    own_broker.stop()
    settings = unique_settings(f"127.0.0.1:{port}")
    async with TestClient(TestServer(create_app(settings))) as client:
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert "Kafka" in (await ready.json())["detail"]
        assert (await client.get("/healthz")).status == 200
        started = time.monotonic()
        response = await client.post("/callback", params=SEED.query, data=callback("no-broker"))
        assert response.status == 503
        assert time.monotonic() - started < 0.5
        assert "not ready" in (await response.json())["ErrorInfo"]

        with own_broker as revived:  # the same node, on the same port, with its data
            await wait_until_ready(client)
            assert (await client.post("/callback", params=SEED.query, data=callback("later"))).status == 200
            [record] = await read_records(revived.bootstrap_servers, [settings.topic], expect=1)
            assert record.key == b"later"


async def test_missing_topics_keep_the_bridge_not_ready_until_they_exist(kafka: str) -> None:
    settings = unique_settings(kafka, create_topics=False)
    async with TestClient(TestServer(create_app(settings))) as client:
        async with asyncio.timeout(10):
            while "topics missing" not in (detail := (await (await client.get("/readyz")).json())["detail"]):
                await asyncio.sleep(0.05)
        assert settings.topic in detail
        response = await client.post("/callback", params=SEED.query, data=callback("too-early"))
        assert response.status == 503
        assert (await client.get("/readyz")).status == 503

        creator = create_app(replace(settings, create_topics=True))
        async with TestClient(TestServer(creator)) as other:
            await wait_until_ready(other)  # a second bridge allowed to create them does so
        await wait_until_ready(client)
        assert (await client.post("/callback", params=SEED.query, data=callback("in-time"))).status == 200
