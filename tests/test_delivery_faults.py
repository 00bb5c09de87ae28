"""Every 200 means the callback is in Kafka, whatever the broker or the network does.

A Kafka-aware proxy stands between the bridge and a broker of the test's own: it delays, black-holes,
resets and lies about Produce results. The history of answers is then checked against the topic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from bridge.ingest.server import ADMISSION, PUBLISHER, create_app
from bridge.kafka.publisher import KafkaPublisher
from bridge.settings import ServeSettings
from bridge.tools.embedded import free_port
from tests.support.broker import FaultBroker, fault_broker
from tests.support.proxy import KafkaProxy
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import wait_until_ready
from tests.support.settings import unique_settings

pytestmark = pytest.mark.kafka  # starts brokers of its own

SEED = fixture("oa-after-send-text")
DEADLINE_S = 1.0
NOT_LEADER_OR_FOLLOWER, MESSAGE_TOO_LARGE, NOT_ENOUGH_REPLICAS, NOT_ENOUGH_REPLICAS_AFTER_APPEND = (
    6,
    10,
    19,
    20,
)


@dataclass
class Rig:
    broker: FaultBroker
    proxy: KafkaProxy
    settings: ServeSettings
    client: TestClient[web.Request, web.Application]

    async def send(self, msg_key: str) -> tuple[int, dict[str, Any], float]:
        body = orjson.dumps({**SEED.body, "MsgKey": msg_key})
        started = time.monotonic()
        response = await self.client.post("/callback", params=SEED.query, data=body)
        return response.status, await response.json(), time.monotonic() - started

    async def copies(self, *msg_keys: str, expect: int) -> dict[str, int]:
        records = await read_records(self.proxy.bootstrap_servers, [self.settings.topic], expect=expect)
        keys = [record.key.decode() for record in records if record.key is not None]
        return {msg_key: keys.count(msg_key) for msg_key in msg_keys}

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = await (await self.client.get("/stats")).json()
        return stats


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultBroker]:
    """One broker of the module's own, advertising the port each test's proxy takes. A JVM start is the
    costly part (5-8 s a test); the tests that pause it resume it before they end, and each test writes to
    topics of its own through a proxy of its own, so none sees another's faults or records."""
    with fault_broker(tmp_path_factory.mktemp("delivery-faults"), advertised_port=free_port()) as broker:
        yield broker


@pytest.fixture
async def rig(module_broker: FaultBroker) -> AsyncIterator[Rig]:
    """A bridge -> proxy -> broker chain, ready, with a one-second delivery deadline."""
    broker = module_broker
    proxy = await KafkaProxy(broker.port, broker.advertised_port).start()
    settings = unique_settings(proxy.bootstrap_servers, delivery_timeout=DEADLINE_S)
    try:
        async with TestClient(TestServer(create_app(settings))) as client:
            await wait_until_ready(client)
            yield Rig(broker, proxy, settings, client)
    finally:
        await proxy.close()


async def test_a_slow_broker_within_the_deadline_delays_the_200_and_writes_once(rig: Rig) -> None:
    rig.proxy.faults.response_delay_s = 0.4
    status, _, elapsed = await rig.send("slow")
    assert status == 200
    assert elapsed >= 0.4, "answered before the broker's acknowledgement arrived"
    rig.proxy.faults.clear()
    assert await rig.copies("slow", expect=1) == {"slow": 1}


async def test_a_broker_paused_past_the_deadline_gets_503_then_the_same_callback_gets_200(rig: Rig) -> None:
    rig.broker.pause()
    try:
        status, body, elapsed = await rig.send("paused")
    finally:
        rig.broker.resume()
    assert status == 503
    assert elapsed < DEADLINE_S + 0.5
    assert "did not confirm" in body["ErrorInfo"]
    status, _, _ = await rig.send("paused")
    assert status == 200
    copies = await rig.copies("paused", expect=1)
    assert copies["paused"] in {1, 2}, "answered 200 but not in Kafka, or written more than twice"


async def test_black_holed_traffic_gets_503_within_the_deadline_and_recovers(rig: Rig) -> None:
    rig.proxy.set_blackhole(True)
    try:
        status, _, elapsed = await rig.send("blackholed")
    finally:
        rig.proxy.set_blackhole(False)
    assert status == 503
    assert elapsed < DEADLINE_S + 0.5
    assert (await rig.send("after-blackhole"))[0] == 200
    copies = await rig.copies("blackholed", "after-blackhole", expect=1)
    assert copies["after-blackhole"] == 1
    assert copies["blackholed"] <= 1


async def test_a_reset_before_the_broker_got_the_request_is_retried_and_written_once(rig: Rig) -> None:
    rig.proxy.faults.reset_before_produce = 1
    status, _, _ = await rig.send("reset-before")
    assert status == 200
    assert await rig.copies("reset-before", expect=1) == {"reset-before": 1}


async def test_a_reset_after_the_broker_got_the_request_is_retried_and_may_duplicate(rig: Rig) -> None:
    """The broker appended it, the answer was lost: the producer sends it again, so it lands twice."""
    rig.proxy.faults.reset_after_produce = 1
    status, _, _ = await rig.send("reset-after")
    assert status == 200
    assert rig.proxy.produce_requests >= 2, "the answer was not cut: the fault did not happen"
    assert (await rig.copies("reset-after", expect=2))["reset-after"] == 2


@pytest.mark.parametrize(
    "error_code", [NOT_ENOUGH_REPLICAS, NOT_ENOUGH_REPLICAS_AFTER_APPEND, NOT_LEADER_OR_FOLLOWER]
)
async def test_transient_broker_errors_are_retried_within_the_deadline(rig: Rig, error_code: int) -> None:
    rig.proxy.faults.produce_error, rig.proxy.faults.produce_error_times = error_code, 2
    status, _, _ = await rig.send(f"transient-{error_code}")
    assert status == 200
    # The proxy lied after the broker appended, so each retry appended a copy: never zero.
    assert (await rig.copies(f"transient-{error_code}", expect=1))[f"transient-{error_code}"] >= 1


@pytest.mark.parametrize("error_code", [NOT_ENOUGH_REPLICAS, NOT_ENOUGH_REPLICAS_AFTER_APPEND])
async def test_persistent_replication_errors_get_503_within_the_deadline(rig: Rig, error_code: int) -> None:
    rig.proxy.faults.produce_error = error_code
    status, body, elapsed = await rig.send(f"persistent-{error_code}")
    assert status == 503
    assert elapsed < DEADLINE_S + 0.5
    assert body["ActionStatus"] == "FAIL"
    outcomes = (await rig.stats())["outcomes"]
    assert outcomes["confirmed"] == 0
    assert outcomes["ambiguous"] + outcomes["failed"] == 1


async def test_a_message_too_large_answer_is_a_fast_503_and_counted_as_ambiguous_and_lost(rig: Rig) -> None:
    """Not retried, so not waited for; ambiguous, since once a record was handed over an earlier attempt
    may have been appended (here the broker did, and the proxy reported an error). The producer gave up on
    it: its end is known at once, so `ambiguous` and `ambiguous_landed + ambiguous_lost` agree."""
    rig.proxy.faults.produce_error = MESSAGE_TOO_LARGE
    status, body, elapsed = await rig.send("too-large")
    assert status == 503
    assert elapsed < DEADLINE_S / 2, "a non-retriable error must not wait for the deadline"
    assert "MessageSizeTooLargeError" in body["ErrorInfo"]
    outcomes = (await rig.stats())["outcomes"]
    assert (outcomes["ambiguous"], outcomes["ambiguous_landed"], outcomes["ambiguous_lost"]) == (1, 0, 1)


async def test_a_copy_in_flight_waits_for_the_first_write_and_a_confirmed_copy_is_not_written_again(
    rig: Rig,
) -> None:
    rig.proxy.faults.response_delay_s = 0.3
    first, second = await asyncio.gather(rig.send("twice"), rig.send("twice"))
    assert (first[0], second[0]) == (200, 200)
    rig.proxy.faults.clear()
    assert (await rig.send("twice"))[0] == 200
    assert await rig.copies("twice", expect=1) == {"twice": 1}
    outcomes = (await rig.stats())["outcomes"]
    assert (outcomes["confirmed"], outcomes["duplicate_in_flight"], outcomes["duplicate_confirmed"]) == (
        1,
        1,
        1,
    )


async def test_the_in_flight_limit_answers_the_excess_at_once_and_recovers(rig: Rig) -> None:
    limit = rig.settings.max_in_flight
    app = rig.client.app
    assert app is not None
    app[ADMISSION].limit = 4  # the same admission object the handler consults
    rig.broker.pause()
    try:
        waiting = [asyncio.create_task(rig.send(f"held-{n}")) for n in range(4)]
        async with asyncio.timeout(5):
            while app[ADMISSION].in_flight < 4:
                await asyncio.sleep(0.01)
        excess = [await rig.send(f"excess-{n}") for n in range(10)]
        assert [status for status, _, _ in excess] == [503] * 10
        assert max(elapsed for _, _, elapsed in excess) < 0.1
        assert all("--max-in-flight" in body["ErrorInfo"] for _, body, _ in excess)
        assert app[ADMISSION].in_flight + app[PUBLISHER].abandoned <= 4
        held = await asyncio.gather(*waiting)
    finally:
        rig.broker.resume()
    assert [status for status, _, _ in held] == [503] * 4
    assert (await rig.stats())["outcomes"]["overloaded"] == 10
    # The held records still count while the producer holds them; once settled, callbacks flow again.
    async with asyncio.timeout(10):
        while (await rig.send("after-overload"))[0] != 200:
            await asyncio.sleep(0.1)
    assert app[ADMISSION].limit == 4 != limit


def kill_producer(producer: AIOKafkaProducer) -> None:
    """End the producer's sender task, as a fatal error does (aiokafka's internals: it has no public way)."""
    producer._sender.sender_task.cancel()


async def test_a_producer_that_dies_is_replaced_and_the_bridge_recovers(rig: Rig) -> None:
    app = rig.client.app
    assert app is not None
    publisher = app[PUBLISHER]
    assert isinstance(publisher, KafkaPublisher)
    producer = publisher.producer
    assert producer is not None
    kill_producer(producer)
    async with asyncio.timeout(10):
        while publisher.producer is producer:
            await asyncio.sleep(0.01)
    await wait_until_ready(rig.client)
    assert (await rig.send("after-rebuild"))[0] == 200
    assert await rig.copies("after-rebuild", expect=1) == {"after-rebuild": 1}
