"""A broker error the broker never appended: every 200 is in Kafka, and nothing refused is.

`tests/support/proxy.py`'s `refuse_produce` answers Produce requests itself, and `partition_error` withholds
one partition of a multi-partition request from the broker and answers it with an error: unlike
`produce_error`, which lies after the append, a bridge answering 200 on a broker error is caught here, since
the record is then absent. The proxy sits in front of the session's shared broker (`advertise_self`), and the
topics are read back from that broker directly, not through the proxy.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.protocol import produce
from aiokafka.protocol.api import RequestStruct
from aiokafka.protocol.metadata import MetadataRequest_v5

from bridge.ingest.metrics import METRICS
from bridge.ingest.server import ADMISSION, create_app
from bridge.settings import ServeSettings
from bridge.tencent.partitioner import partition_for
from bridge.tools.embedded import free_port
from tests.support.kafka_frames import ProduceRequestFrame
from tests.support.proxy import KafkaProxy
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import wait_until_ready
from tests.support.settings import unique_settings

SEED = fixture("oa-after-send-text")
DEADLINE_S = 3.0
FAST_S = 1.0
"""A non-retriable error is answered at once: well within this, and well before the deadline."""
# Kafka's error codes. aiokafka retries the first three (`retriable`); CORRUPT_MESSAGE is not retriable in
# aiokafka (it is in the Java client), and INVALID_RECORD is unknown to aiokafka 0.14 (UnknownError).
NOT_LEADER_OR_FOLLOWER, REQUEST_TIMED_OUT, NOT_ENOUGH_REPLICAS = 6, 7, 19
CORRUPT_MESSAGE, INVALID_RECORD = 2, 87
ACCOUNTS = 4
"""Official accounts written at once, each on its own partition, two callbacks each."""


@dataclass
class Rig:
    proxy: KafkaProxy
    kafka: str
    settings: ServeSettings
    client: TestClient[web.Request, web.Application]

    async def send(self, msg_key: str, account: str | None = None) -> tuple[int, dict[str, Any], float]:
        body = {**SEED.body, "MsgKey": msg_key}
        if account is not None:
            body["Official_Account"] = account
        started = time.monotonic()
        response = await self.client.post("/callback", params=SEED.query, data=orjson.dumps(body))
        return response.status, await response.json(), time.monotonic() - started

    async def keys_in_kafka(self, expect: int) -> Counter[str]:
        """How many times each key is in the topic, read to its end offsets on the broker itself."""
        records = await read_records(self.kafka, [self.settings.topic], expect=expect)
        return Counter(record.key.decode() for record in records if record.key is not None)


@pytest.fixture
async def rig(kafka: str) -> AsyncIterator[Rig]:
    """A bridge -> proxy -> shared broker chain, ready, with a three-second delivery deadline."""
    if "," in kafka:
        pytest.skip("advertise_self sends every client to one broker: a one-broker cluster only")
    host, _, port = kafka.rpartition(":")
    proxy = await KafkaProxy(int(port), free_port(), upstream_host=host, advertise_self=True).start()
    settings = unique_settings(proxy.bootstrap_servers, delivery_timeout=DEADLINE_S)
    try:
        async with TestClient(TestServer(create_app(settings))) as client:
            await wait_until_ready(client)
            yield Rig(proxy, kafka, settings, client)
    finally:
        await proxy.close()


def accounts_on_distinct_partitions(count: int, partitions: int) -> dict[str, int]:
    """`count` official accounts, each mapped by the bridge to a partition of its own."""
    chosen: dict[str, int] = {}
    for n in range(1000):
        account = f"@TOA#_proxy{n}"
        partition = partition_for(account, partitions)
        if partition not in chosen.values():
            chosen[account] = partition
        if len(chosen) == count:
            return chosen
    raise AssertionError("no accounts on distinct partitions")


@pytest.mark.parametrize("version", range(8))
def test_the_proxys_own_produce_answers_are_well_formed_for_every_version_aiokafka_sends(
    version: int,
) -> None:
    """aiokafka 0.14 sends Produce v0-v7; what the proxy makes up decodes as that version's response."""
    request_type = getattr(produce, f"ProduceRequest_v{version}")
    topics = [("a", [(0, b"x"), (1, b"y")]), ("b", [(3, b"z")])]
    fields: list[Any] = [-1, 1000, topics] if version < 3 else [None, -1, 1000, topics]
    request = request_type(*fields)
    body = request.build_request_header(41, "client").encode() + request.encode()
    parsed = ProduceRequestFrame(len(body).to_bytes(4, "big") + body)
    answer = parsed.refusal(NOT_LEADER_OR_FOLLOWER)
    assert int.from_bytes(answer[:4], "big") == len(answer) - 4
    assert int.from_bytes(answer[4:8], "big") == 41
    response = request_type.RESPONSE_TYPE.decode(answer[8:])
    assert [(topic, [(p[0], p[1], p[2]) for p in parts]) for topic, parts in response.topics] == [
        ("a", [(0, NOT_LEADER_OR_FOLLOWER, -1), (1, NOT_LEADER_OR_FOLLOWER, -1)]),
        ("b", [(3, NOT_LEADER_OR_FOLLOWER, -1)]),
    ]
    frame, removed = parsed.without_last_partition()
    assert removed == ("b", 3)
    rest = ProduceRequestFrame(frame)
    assert (rest.correlation_id, rest.required_acks, rest.body.topics) == (41, -1, topics[:1])


def _request_frame(request: RequestStruct, correlation_id: int) -> bytes:
    body = bytes(request.build_request_header(correlation_id, "raw").encode() + request.encode())
    return len(body).to_bytes(4, "big") + body


async def test_the_proxys_own_answers_wait_for_earlier_ones_and_acks_0_gets_none(kafka: str) -> None:
    """Kafka answers a connection's requests in order, and clients rely on it; acks=0 is never answered."""
    host, _, port = kafka.split(",", maxsplit=1)[0].rpartition(":")
    proxy = await KafkaProxy(int(port), free_port(), upstream_host=host).start()
    proxy.faults.refuse_produce = CORRUPT_MESSAGE
    produce_request = produce.ProduceRequest_v7
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        # Sent at once: the broker answers the first a round trip later than the proxy answers the third.
        writer.write(
            _request_frame(MetadataRequest_v5(None, False), 1)
            + _request_frame(produce_request(None, 0, 1000, [("t", [(0, b"")])]), 2)
            + _request_frame(produce_request(None, -1, 1000, [("t", [(0, b"")])]), 3)
        )
        answered = []
        async with asyncio.timeout(10):
            for _ in range(2):
                frame = await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))
                answered.append(int.from_bytes(frame[:4], "big"))
    finally:
        writer.close()
        await proxy.close()
    assert answered == [1, 3]
    assert proxy.refused_produces == 2


@pytest.mark.parametrize("error_code", [NOT_LEADER_OR_FOLLOWER, NOT_ENOUGH_REPLICAS, REQUEST_TIMED_OUT])
async def test_a_retriable_error_without_append_is_retried_and_written_exactly_once(
    rig: Rig, error_code: int
) -> None:
    rig.proxy.faults.refuse_produce, rig.proxy.faults.refuse_produce_times = error_code, 3
    status, body, _ = await rig.send(f"refused-{error_code}")
    assert status == 200, body
    assert rig.proxy.refused_produces == 3, "the fault did not fire as set"
    # Never appended before the retry that went through: one copy, neither more nor fewer.
    assert await rig.keys_in_kafka(expect=1) == {f"refused-{error_code}": 1}


@pytest.mark.parametrize("error_code", [CORRUPT_MESSAGE, INVALID_RECORD])
async def test_a_non_retriable_error_without_append_is_a_fast_503_and_the_record_is_absent(
    rig: Rig, error_code: int
) -> None:
    rig.proxy.faults.refuse_produce = error_code
    status, body, elapsed = await rig.send("refused")
    assert status == 503, body
    assert elapsed < FAST_S, "a non-retriable error must not wait for the deadline"
    assert body["ActionStatus"] == "FAIL"
    assert rig.proxy.refused_produces == 1, "a non-retriable error was retried"
    rig.proxy.faults.clear()
    assert (await rig.send("after"))[0] == 200
    # Read to the end offsets: the one record there is the one answered 200.
    assert await rig.keys_in_kafka(expect=1) == {"after": 1}


@pytest.mark.parametrize(
    ("error_code", "withheld_status"), [(CORRUPT_MESSAGE, 503), (NOT_ENOUGH_REPLICAS, 200)]
)
async def test_an_error_on_one_partition_of_a_request_fails_that_partition_only(
    rig: Rig, error_code: int, withheld_status: int
) -> None:
    """The withheld partition's callbacks get 503 for a non-retriable error, 200 after the producer's retry
    for a retriable one; the other partitions' get 200. Every 200 is in Kafka once; no 503 is there."""
    opener, *others = accounts_on_distinct_partitions(ACCOUNTS + 1, rig.settings.partitions).items()
    accounts = dict(others)
    callbacks = {f"{account}-{n}": account for account in accounts for n in range(2)}
    app = rig.client.app
    assert app is not None
    rig.proxy.faults.partition_error, rig.proxy.faults.partition_error_times = error_code, 1
    # The opener's batch is handed to the producer and its request held at the proxy; the bridge hands
    # that broker nothing more until it answers, so meanwhile every other callback's record is queued, and
    # then all their partitions' batches go in one round: one request of ACCOUNTS partitions.
    rig.proxy.set_blackhole(True)
    try:
        first = asyncio.create_task(rig.send("opener", opener[0]))
        async with asyncio.timeout(5):
            while app[METRICS].queued < 1:
                await asyncio.sleep(0.01)
        sends = {key: asyncio.create_task(rig.send(key, account)) for key, account in callbacks.items()}
        async with asyncio.timeout(5):
            while app[ADMISSION].in_flight < 1 + len(callbacks):
                await asyncio.sleep(0.01)
    finally:
        rig.proxy.set_blackhole(False)
    assert (await first)[0] == 200
    answers = {key: await task for key, task in sends.items()}
    assert rig.proxy.most_partitions == ACCOUNTS
    assert len(rig.proxy.partition_errors) == 1, "no request carried two partitions: the fault never fired"
    ((topic, partition),) = rig.proxy.partition_errors
    assert topic == rig.settings.topic
    withheld = {key for key, account in callbacks.items() if accounts[account] == partition}
    assert len(withheld) == 2
    statuses = {key: status for key, (status, _, _) in answers.items()}
    assert statuses == {key: withheld_status if key in withheld else 200 for key in callbacks}
    if withheld_status == 503:
        assert max(answers[key][2] for key in withheld) < FAST_S
    confirmed = {key for key, status in statuses.items() if status == 200} | {"opener"}
    assert await rig.keys_in_kafka(expect=len(confirmed)) == dict.fromkeys(confirmed, 1)
