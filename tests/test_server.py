"""The HTTP layer with a fake publisher: the answer waits for the broker, and failures map to honest statuses.

These complement the tests against a real broker; they pin down the ordering and error mapping exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.errors import BrokerRejected, DeliveryTimeout
from bridge.ingest.server import create_app
from bridge.settings import ServeSettings
from tests.conftest import BridgeClient
from tests.support.fakes import FakePublisher
from tests.support.requests import fixture
from tests.support.serve import until_stats

SEED = fixture("oa-after-send-text")


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
async def client(publisher: FakePublisher) -> AsyncIterator[BridgeClient]:
    async with TestClient(TestServer(create_app(ServeSettings(), publisher=publisher))) as test_client:
        yield test_client


async def test_the_ok_is_sent_only_after_the_broker_confirms(
    client: BridgeClient, publisher: FakePublisher
) -> None:
    request = asyncio.create_task(client.post("/callback", params=SEED.query, data=SEED.raw_body))
    await until_stats(client.session, client.make_url("/stats"), lambda stats: stats["in_flight"] == 1)
    assert not request.done(), "answered before the broker confirmed"
    publisher.confirm.set()
    response = await request
    assert response.status == 200
    assert len(publisher.records) == 1


@pytest.mark.parametrize(
    ("failure", "phrase"),
    [
        (DeliveryTimeout("Kafka did not confirm the write within 1.5 s"), "did not confirm"),
        (BrokerRejected("Kafka refused the write: NotEnoughReplicasError"), "NotEnoughReplicasError"),
    ],
)
async def test_broker_failures_are_503_with_retry_after(
    client: BridgeClient, publisher: FakePublisher, failure: Exception, phrase: str
) -> None:
    publisher.failure = failure
    publisher.confirm.set()
    response = await client.post("/callback", params=SEED.query, data=SEED.raw_body)
    body = await response.json()
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert body["ActionStatus"] == "FAIL"
    assert phrase in body["ErrorInfo"]


async def test_unknown_partition_count_is_503_not_ready(
    client: BridgeClient, publisher: FakePublisher
) -> None:
    publisher.partitions = None
    publisher.status = "topics missing: tim.official-account"
    response = await client.post("/callback", params=SEED.query, data=SEED.raw_body)
    assert response.status == 503
    assert "topics missing: tim.official-account" in (await response.json())["ErrorInfo"]
    assert publisher.records == []


async def test_a_bug_in_the_path_is_a_503_without_a_traceback(
    client: BridgeClient, publisher: FakePublisher
) -> None:
    """Never a 500: the callback was not acknowledged, and Tencent may send it again."""
    publisher.failure = ZeroDivisionError("division by zero")
    publisher.confirm.set()
    response = await client.post("/callback", params=SEED.query, data=SEED.raw_body)
    body = await response.json()
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert body["ActionStatus"] == "FAIL"
    assert "Traceback" not in body["ErrorInfo"]
    assert "division" not in body["ErrorInfo"]


async def test_probes_report_the_publishers_readiness(client: BridgeClient, publisher: FakePublisher) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    publisher.ready = False
    publisher.status = "cannot reach Kafka"
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["detail"] == "cannot reach Kafka"
    assert (await client.get("/healthz")).status == 200
