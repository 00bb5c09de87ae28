"""A topic's `max.message.bytes`, read at start: larger records get 413 "not written" before they are sent.

Against the session's broker, on a topic created with a small limit. Apache Kafka refuses a larger batch
with MESSAGE_TOO_LARGE, which after the hand-over could only be answered 503 "may still land"; these tests
also pin the bridge's measure of a record to the broker's (one byte over is refused, the limit itself is
not).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import replace

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge.errors import RecordTooLarge
from bridge.ingest.server import create_app
from bridge.kafka.publisher import KafkaPublisher
from bridge.kafka.sizes import batch_bytes, check_record_size, record_bytes
from bridge.settings import ServeSettings
from bridge.tencent.commands import MAX_ID_BYTES
from bridge.tencent.envelope import Record, envelope, record_headers
from tests.conftest import BridgeClient
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import wait_until_ready
from tests.support.settings import unique_settings
from tests.test_docs import README

OA = fixture("oa-after-send-text")
C2C = fixture("c2c-after-send")
LIMIT = 4096


@pytest.fixture
async def small_topic(kafka: str) -> ServeSettings:
    """ServeSettings whose official-account topic takes records of at most `LIMIT` bytes; the bridge creates
    the other topics as usual."""
    settings = unique_settings(kafka)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        topic = NewTopic(settings.topic, 12, 1, topic_configs={"max.message.bytes": str(LIMIT)})
        await admin.create_topics([topic])
    finally:
        await admin.close()
    return settings


@pytest.fixture
async def small_bridge(small_topic: ServeSettings) -> AsyncIterator[BridgeClient]:
    async with TestClient(TestServer(create_app(small_topic))) as client:
        await wait_until_ready(client)
        yield client


def with_text(fixture_body: dict[str, object], msg_key: str, text: str) -> bytes:
    body = {**fixture_body, "MsgKey": msg_key}
    body["MsgBody"] = [{"MsgType": "TIMTextElem", "MsgContent": {"Text": text}}]
    return orjson.dumps(body)


async def test_a_callback_larger_than_its_topic_takes_gets_413_and_is_not_written(
    small_bridge: BridgeClient, small_topic: ServeSettings, kafka: str
) -> None:
    small = await small_bridge.post("/callback", params=OA.query, data=with_text(OA.body, "small", "hi"))
    assert small.status == 200
    large = await small_bridge.post(
        "/callback", params=OA.query, data=with_text(OA.body, "large", "x" * LIMIT)
    )
    body = await large.json()
    assert large.status == 413
    assert (body["ActionStatus"], body["ErrorCode"]) == ("FAIL", 41301)
    assert f"max.message.bytes of {LIMIT}" in body["ErrorInfo"]
    assert "was not written" in body["ErrorInfo"]
    assert large.headers["X-Bridge-Outcome"] == "rejected"
    assert "Retry-After" not in large.headers
    other = await small_bridge.post("/callback", params=C2C.query, data=with_text(C2C.body, "c", "x" * LIMIT))
    assert other.status == 200, "a topic with the usual limit takes it"
    records = await read_records(kafka, [small_topic.topic], expect=1)
    assert [record.key for record in records] == [b"small"]
    stats = await (await small_bridge.get("/stats")).json()
    assert stats["outcomes"]["rejected"] == 1
    assert stats["outcomes"]["ambiguous"] == 0


def _in(seconds: float) -> float:
    """The deadline `seconds` from now, on the event loop's clock."""
    return asyncio.get_running_loop().time() + seconds


def record_of(topic: str, value_bytes: int, value: bytes | None = None) -> Record:
    return Record(
        topic=topic,
        entity="account",
        key=b"key",
        value=value if value is not None else b"v" * value_bytes,
        timestamp_ms=1_700_000_000_000,
        headers=(("CallbackCommand", b"OfficialAccount.CallbackAfterSendMsg"),),
    )


@pytest.fixture
async def small_publisher(small_topic: ServeSettings) -> AsyncIterator[KafkaPublisher]:
    publisher = KafkaPublisher(small_topic)
    await publisher.start()
    try:
        async with asyncio.timeout(20):
            while not publisher.ready:
                await asyncio.sleep(0.05)
        yield publisher
    finally:
        await publisher.close()


async def test_a_record_of_exactly_the_limit_is_written_and_one_byte_more_is_refused_up_front(
    small_publisher: KafkaPublisher, small_topic: ServeSettings
) -> None:
    """The bridge measures a record as the broker does: the size of the batch that carries it."""
    topic = small_topic.topic
    largest = next(n for n in range(LIMIT) if batch_bytes(record_of(topic, n + 1), "none") > LIMIT)
    assert batch_bytes(record_of(topic, largest), "none") == LIMIT
    await small_publisher.publish(record_of(topic, largest), _in(5.0))
    with pytest.raises(RecordTooLarge, match=f"takes {LIMIT + 1} bytes"):
        await small_publisher.publish(record_of(topic, largest + 1), _in(5.0))


async def test_records_that_fit_alone_are_batched_within_the_limit(
    small_publisher: KafkaPublisher, small_topic: ServeSettings
) -> None:
    """The broker refuses a batch, not a record: 40 records of 1 KB sent at once to one partition (which
    would share 16 KiB batches) all land."""
    records = [record_of(small_topic.topic, 1000, f"{n:04d}".encode() * 250) for n in range(40)]
    await asyncio.gather(*(small_publisher.publish(record, _in(10.0)) for record in records))


async def test_with_compression_a_record_that_fits_only_compressed_is_written(
    small_topic: ServeSettings,
) -> None:
    publisher = KafkaPublisher(replace(small_topic, compression="gzip"))
    await publisher.start()
    try:
        async with asyncio.timeout(20):
            while not publisher.ready:
                await asyncio.sleep(0.05)
        await publisher.publish(record_of(small_topic.topic, 4 * LIMIT), _in(5.0))
        with pytest.raises(RecordTooLarge):
            await publisher.publish(record_of(small_topic.topic, 0, os.urandom(2 * LIMIT)), _in(5.0))
    finally:
        await publisher.close()


def test_the_readme_gives_the_topics_limit_as_the_code_computes_it() -> None:
    row = re.search(r"^\| `max.message.bytes` \| (.*?) \|", README, flags=re.MULTILINE)
    assert row is not None
    assert row.group(1) == "`--max-body-bytes` + 64 KiB"
    assert ServeSettings(max_body_bytes=1000).max_record_bytes == 1000 + 64 * 1024


@pytest.mark.parametrize("max_url_bytes", [4096, 16384])
def test_the_largest_record_the_bridge_can_build_fits_the_topics_limit(max_url_bytes: int) -> None:
    """The largest body, the longest key (a command of 128 characters, `:`, a MsgKey of `MAX_ID_BYTES`), and
    a query of `--max-url-bytes` that doubles when escaped (`%01` is 3 bytes of URL, `\\u0001` 6 of JSON)."""
    settings = ServeSettings(max_url_bytes=max_url_bytes)
    command = "C." + "c" * 126
    query = {
        "SdkAppid": "1" * 19,
        "CallbackCommand": command,
        "x": "\x01" * (max_url_bytes // 3),
    }
    record = Record(
        topic="t",
        entity="account",
        key=f"{command}:{'k' * MAX_ID_BYTES}".encode(),
        value=envelope(b" " * settings.max_body_bytes, query, 1_764_143_520_123),
        timestamp_ms=1_764_143_520_123,
        # The envelope's headers with the longest entity (a conversation of two IDs of MAX_ID_BYTES).
        headers=record_headers(
            command, "1" * 19, f"{'k' * MAX_ID_BYTES}:{'k' * MAX_ID_BYTES}", 1_764_143_520_123
        ),
    )
    assert len(record.value) > settings.max_body_bytes + 2 * max_url_bytes - 50
    assert record_bytes(record) <= settings.max_record_bytes


@pytest.mark.parametrize("compression", ["snappy", "lz4", "gzip"])
def test_a_compressed_record_that_grows_past_its_topics_limit_is_refused_up_front(compression: str) -> None:
    """aiokafka's C builder keeps a compressed batch even when it came out larger than the record: a body that
    does not compress, right at the limit uncompressed, must be measured compressed and refused."""
    record = Record(
        topic="t",
        entity="account",
        key=b"k",
        value=os.urandom(1_000_000),
        timestamp_ms=1_764_143_520_123,
        headers=(("CallbackCommand", b"C.c"),),
    )
    assert batch_bytes(record, compression) > record_bytes(record), "the codec did not grow the batch"
    limits, own_limit = {"t": record_bytes(record)}, ServeSettings().max_record_bytes
    with pytest.raises(RecordTooLarge):
        check_record_size(record, limits, own_limit, compression)
