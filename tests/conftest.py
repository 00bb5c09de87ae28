"""Thin fixtures over `tests/support.py`: one broker per session, a bridge with its own topics per test."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.admin import AIOKafkaAdminClient

from bridge.ingest.server import create_app
from bridge.logs import configure_logging
from bridge.settings import ServeSettings
from tests.support import (
    FakePublisher,
    Posted,
    Receiver,
    broker_choice,
    kafka_broker,
    post_through_a_bridge,
    three_days,
    unique_settings,
    wait_until_ready,
)

BridgeClient = TestClient[web.Request, web.Application]


def pytest_report_header() -> str:
    return f"broker: {broker_choice().description}"


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real Kafka-protocol broker, shared by the whole session."""
    with kafka_broker(tmp_path_factory.mktemp("kafka")) as bootstrap_servers:
        yield bootstrap_servers


@pytest.fixture
async def admin(kafka: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client of the session's broker, for tests that make or change topics themselves."""
    client = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await client.start()
    yield client
    await client.close()


@pytest.fixture
def settings(kafka: str) -> ServeSettings:
    return unique_settings(kafka)


@pytest.fixture
def publisher() -> FakePublisher:
    """A fake publisher that confirms every write at once (test_server.py's own one waits to be told)."""
    fake = FakePublisher()
    fake.confirm.set()
    return fake


@pytest.fixture
async def bridge(settings: ServeSettings) -> AsyncIterator[BridgeClient]:
    """The bridge against the session's broker, ready, with topics no other test writes to."""
    async with TestClient(TestServer(create_app(settings))) as client:
        await wait_until_ready(client)
        yield client


@pytest.fixture
async def posted(settings: ServeSettings) -> list[Posted]:
    """The settings' official-account topic, filled through the bridge with three days of callbacks (the
    bridge's edge dedup off, so the callbacks posted twice land twice)."""
    callbacks = three_days()
    await post_through_a_bridge(settings, callbacks)
    return callbacks


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A local HTTP receiver for `replay --to-url`, serving until the test ends."""
    target = Receiver()
    target.server = TestServer(target.app())
    async with target.server:
        yield target


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """Everything logged, at debug level, as `--log-level debug` configures it (aiokafka's loggers too);
    restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name in ("aiokafka", "aiokafka.conn"):
        logging.getLogger(name).setLevel(logging.NOTSET)
