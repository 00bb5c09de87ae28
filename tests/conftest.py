"""Thin fixtures over `tests/support/`: one broker per session, a bridge with its own topics per test.

Two tiers: a test that uses a broker is marked `kafka` (by its fixtures: whatever depends on `kafka` is
marked here; a module that starts brokers of its own says so with `pytestmark`), and `pytest -m "not kafka"`
runs the rest, the unit tier, on the fake publisher. A broker started by a test outside the `kafka` tier
is an error (`_KafkaTierOnly`), so a missing mark fails the test rather than quietly starting a broker.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.admin import AIOKafkaAdminClient

from bridge.ingest.server import create_app
from bridge.logs import configure_logging
from bridge.settings import ServeSettings
from bridge.tools.embedded import EmbeddedBroker
from tests.support.app_server import AppServer
from tests.support.broker import FaultBroker, broker_choice, fault_broker, kafka_broker
from tests.support.fakes import FakePublisher
from tests.support.kafka import jars
from tests.support.readback import Posted, Receiver, post_through_a_bridge, three_days
from tests.support.records import delete_topics_since, topic_names
from tests.support.serve import wait_until_ready
from tests.support.settings import NO_BROKER, unique_settings

BridgeClient = TestClient[web.Request, web.Application]


NO_TANSU = "/the-unit-tier-starts-no-broker/tansu"
"""`CALF_TANSU_BIN` outside the `kafka` tier: a `bridge dev` or `bench` subprocess there finds no Tansu."""


def pytest_report_header() -> str:
    return f"broker: {broker_choice().description}"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `kafka` every test whose fixtures include the session's broker."""
    for item in items:
        if "kafka" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)


class BrokerOutsideKafkaTier(RuntimeError):
    """A test not marked `kafka` started a broker."""


class _KafkaTierOnly:
    """Refuses to start a broker while a test that is not marked `kafka` runs, its fixtures included: the
    Apache Kafka jars (every JVM the tests start, node or tool, runs from them) and Tansu. That test's
    subprocesses get a `CALF_TANSU_BIN` that names no binary, so a `bridge dev` there cannot start one."""

    def __init__(self) -> None:
        self.running: pytest.Item | None = None
        self.patches = pytest.MonkeyPatch()

    def install(self) -> None:
        self.patches.setattr(jars, "libs", self._guarded(jars.libs, "the Apache Kafka jars"))
        self.patches.setattr(EmbeddedBroker, "start", self._guarded(EmbeddedBroker.start, "Tansu"))

    def _guarded(self, start: Callable[..., Any], what: str) -> Callable[..., Any]:
        @functools.wraps(start)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.running is not None and self.running.get_closest_marker("kafka") is None:
                raise BrokerOutsideKafkaTier(
                    f"{self.running.nodeid} starts a broker ({what}) but is not marked kafka: mark it, "
                    "or its module (`pytestmark = pytest.mark.kafka`)"
                )
            return start(*args, **kwargs)

        return guarded


_kafka_tier_only = _KafkaTierOnly()


def pytest_configure() -> None:
    _kafka_tier_only.install()


def pytest_unconfigure() -> None:
    _kafka_tier_only.patches.undo()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    _kafka_tier_only.running = item
    environment = pytest.MonkeyPatch()
    if item.get_closest_marker("kafka") is None:
        environment.setenv("CALF_TANSU_BIN", NO_TANSU)
    try:
        return (yield)
    finally:
        environment.undo()
        _kafka_tier_only.running = None


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real Kafka-protocol broker, shared by the whole session."""
    with kafka_broker(tmp_path_factory.mktemp("kafka")) as bootstrap_servers:
        yield bootstrap_servers


@pytest.fixture(autouse=True)
def _own_topics_deleted(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test on the session's broker, its topics are deleted: the broker stays as small as it
    started, so every metadata request (each bridge probes every second) stays as quick as in the first test.

    Set up after the module's and the session's fixtures (pytest sets up wider scopes first), so a topic a
    module-scoped fixture made before this test is kept for the module's later tests."""
    if "kafka" not in request.fixturenames:
        yield
        return
    bootstrap_servers: str = request.getfixturevalue("kafka")
    before = asyncio.run(topic_names(bootstrap_servers))
    yield
    asyncio.run(delete_topics_since(bootstrap_servers, before))


@pytest.fixture
async def admin(kafka: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client of the session's broker, for tests that make or change topics themselves."""
    client = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await client.start()
    yield client
    await client.close()


@pytest.fixture
def settings(kafka: str) -> ServeSettings:
    """ServeSettings whose topics are the test's own, on the session's broker."""
    return unique_settings(kafka)


@pytest.fixture
def offline_settings() -> ServeSettings:
    """Settings for a bridge that never connects (the unit tier's): no broker is started for them."""
    return unique_settings(NO_BROKER)


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


_LOGGERS_CONFIGURED = ("aiokafka", "aiokafka.conn")
"""The loggers whose level `configure_logging` sets, beside the root's."""


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs `bridge.cli.main` in this process has it configure logging: the root's handlers
    (pytest's capture among them) replaced by one on a stream pytest closes afterwards, aiokafka silenced.
    Put back after every test, so a later test's `caplog` sees every logger again."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in _LOGGERS_CONFIGURED}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


@pytest.fixture
async def posted(settings: ServeSettings) -> list[Posted]:
    """The settings' official-account topic, filled through the bridge with three days of callbacks (the
    bridge's edge dedup off, so the callbacks posted twice land twice)."""
    callbacks = three_days()
    await post_through_a_bridge(settings, callbacks)
    return callbacks


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[FaultBroker]:
    """A broker of this test's own, so that pausing it disturbs no other test."""
    with fault_broker(tmp_path) as broker:
        yield broker


@pytest.fixture
async def app_server() -> AsyncIterator[AppServer]:
    """A stand-in for the app's own callback server (forward mode), serving until the test ends."""
    target = AppServer()
    target.server = TestServer(target.app(), host="127.0.0.1")
    async with target.server:
        yield target


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
