"""Thin fixtures over `tests/support.py`: one broker per session, a bridge with its own topics per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.server import create_app
from bridge.settings import Settings
from tests.support import Posted, kafka_broker, post_all, three_days, unique_settings, wait_until_ready

BridgeClient = TestClient[web.Request, web.Application]


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """Bootstrap servers of a real Kafka-protocol broker, shared by the whole session."""
    with kafka_broker() as bootstrap_servers:
        yield bootstrap_servers


@pytest.fixture
def settings(kafka: str) -> Settings:
    return unique_settings(kafka)


@pytest.fixture
async def bridge(settings: Settings) -> AsyncIterator[BridgeClient]:
    """The bridge against the session's broker, ready, with topics no other test writes to."""
    async with TestClient(TestServer(create_app(settings))) as client:
        await wait_until_ready(client)
        yield client


@pytest.fixture
async def posted(bridge: BridgeClient) -> list[Posted]:
    """The settings' official-account topic, filled through the bridge with three days of callbacks."""
    callbacks = three_days()
    await post_all(bridge, callbacks)
    return callbacks
