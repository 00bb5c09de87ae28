"""Helpers the tests share: choosing and starting a broker, reading topics back, the Tencent fixtures.

The broker is chosen as the README's Development section says: `KAFKA_BOOTSTRAP_SERVERS` if set;
testcontainers' Apache Kafka when a Docker daemon answers; the local Apache Kafka (tests/kafka/) when java
and mvn are present; the embedded Tansu last, and never in CI (`CI` set) unless asked for with
`BRIDGE_TEST_BROKER=tansu`, the fast second lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from bridge.errors import BrokerNotReady
from bridge.ingest.runner import BridgeRunner
from bridge.ingest.server import create_app
from bridge.settings import Settings
from bridge.tencent.envelope import Record
from bridge.tools.embedded import EmbeddedBroker
from tests.kafka import jars
from tests.kafka.nodes import KafkaNode

FIXTURES = Path(__file__).parent / "fixtures"
READY_TIMEOUT_S = 20.0
CONTAINER_IMAGE = "confluentinc/cp-kafka:8.1.0"


@dataclass(frozen=True)
class Fixture:
    name: str
    query: dict[str, str]
    body: dict[str, Any]

    @property
    def raw_body(self) -> bytes:
        return orjson.dumps(self.body)


def load_fixtures() -> list[Fixture]:
    fixtures = []
    for path in sorted(FIXTURES.glob("*.json")):
        data = orjson.loads(path.read_bytes())
        fixtures.append(Fixture(name=data["name"], query=data["query"], body=data["body"]))
    return fixtures


def fixture(name: str) -> Fixture:
    return next(f for f in load_fixtures() if f.name == name)


def _docker_answers() -> bool:
    """Whether a Docker daemon answers `/_ping` on its socket (DOCKER_HOST or the default Unix socket)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        family, address = socket.AF_UNIX, host.removeprefix("unix://")
    elif host.startswith("tcp://"):
        name, _, port = host.removeprefix("tcp://").rpartition(":")
        family, address = socket.AF_INET, (name, int(port))  # type: ignore[assignment]
    else:
        return False
    with socket.socket(family) as sock:
        sock.settimeout(3)
        try:
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
        except OSError:
            return False
    return status_line.startswith(b"HTTP/1.") and b" 200" in status_line


class NoTestBroker(RuntimeError):
    """No broker the tests may use: in CI only Apache Kafka will do."""


@dataclass(frozen=True)
class BrokerChoice:
    """Which broker the session runs on, as the pytest header prints it."""

    kind: str
    """"external", "testcontainers", "apache-kafka" or "tansu"."""
    description: str


@functools.cache
def broker_choice() -> BrokerChoice:
    """The broker the session will use, in the documented order; raises NoTestBroker in CI without Kafka.

    Decided once per process: `read_records` asks at every call, and asking Docker is a socket round trip."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        return BrokerChoice("external", f"KAFKA_BOOTSTRAP_SERVERS={configured}")
    forced = os.environ.get("BRIDGE_TEST_BROKER", "")
    if forced not in ("", "tansu", "apache-kafka"):
        raise NoTestBroker(f"BRIDGE_TEST_BROKER={forced!r}: use 'apache-kafka' or 'tansu'")
    if forced == "tansu":
        return BrokerChoice("tansu", "embedded Tansu (BRIDGE_TEST_BROKER=tansu: no guarantee rests on it)")
    if not forced and _docker_answers():
        return BrokerChoice("testcontainers", f"{CONTAINER_IMAGE} (Apache Kafka 4.1) in a container")
    if jars.tools_present():
        return BrokerChoice(
            "apache-kafka", f"Apache Kafka {jars.kafka_version()}, local KRaft node (tests/kafka)"
        )
    if forced or os.environ.get("CI"):
        raise NoTestBroker(
            "no Apache Kafka for the tests: java and mvn are missing (.ci/run installs them); "
            "set BRIDGE_TEST_BROKER=tansu to run on the embedded Tansu instead"
        )
    return BrokerChoice("tansu", "embedded Tansu (no java/mvn here: no guarantee rests on it)")


def _kafka_container() -> Any:
    try:  # testcontainers 4.15 moved the module; the old path warns, which the suite makes an error
        from testcontainers.community.kafka import KafkaContainer  # noqa: PLC0415
    except ImportError:
        from testcontainers.kafka import KafkaContainer  # noqa: PLC0415
    # testcontainers' KafkaContainer drives Confluent's image scripts, so it cannot run apache/kafka; cp-kafka
    # 8.1 is Confluent's build of Apache Kafka 4.1, the line the local broker pins. Not run here (no Docker).
    return KafkaContainer(CONTAINER_IMAGE).with_kraft()


@contextlib.contextmanager
def kafka_broker(directory: Path) -> Iterator[str]:
    """A broker for the test session, as `broker_choice()` picks it; yields its bootstrap servers."""
    choice = broker_choice()
    if choice.kind == "external":
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    elif choice.kind == "testcontainers":
        with _kafka_container() as container:
            yield container.get_bootstrap_server()
    elif choice.kind == "apache-kafka":
        with KafkaNode(directory) as node:
            yield node.bootstrap_servers
    else:
        with EmbeddedBroker() as broker:
            yield broker.bootstrap_servers


FaultBroker = KafkaNode | EmbeddedBroker
"""A broker a test may pause, kill or restart: both have `start`, `pause`, `resume`, `stop` and `port`."""


def fault_broker(
    directory: Path, *, port: int | None = None, advertised_port: int | None = None
) -> FaultBroker:
    """A broker of the test's own, not yet started: an Apache Kafka node, or Tansu on the Tansu lane.

    A restart keeps its data: `stop()` then `start()` brings the same node back on the same port.
    """
    if broker_choice().kind == "tansu" or not jars.tools_present():
        return EmbeddedBroker(port=port, advertised_port=advertised_port)
    return KafkaNode(directory, client_port=port, advertised_port=advertised_port, short_lived=True)


def unique_settings(bootstrap_servers: str, **overrides: Any) -> Settings:
    """Settings whose six topics are new to the broker, so each test reads only its own records."""
    run = uuid.uuid4().hex[:10]
    base = Settings(
        bootstrap_servers=tuple(bootstrap_servers.split(",")),
        host="127.0.0.1",
        port=0,
        topic=f"t{run}.official-account",
        c2c_topic=f"t{run}.c2c",
        group_topic=f"t{run}.group",
        user_topic=f"t{run}.user",
        app_topic=f"t{run}.app",
        unknown_topic=f"t{run}.unknown",
        create_topics=True,
        partitions=12,
    )
    return replace(base, **overrides)


@dataclass
class FakePublisher:
    """Records what it is given; each publish waits for `confirm` and then raises `failure` if set."""

    ready: bool = True
    status: str = "ready"
    partitions: int | None = 12
    failure: Exception | None = None
    confirm: asyncio.Event = field(default_factory=asyncio.Event)
    records: list[Record] = field(default_factory=list)
    abandoned: int = 0

    async def publish(self, record: Record, deadline: float) -> None:
        if self.partitions is None:
            raise BrokerNotReady(f"Kafka is not ready ({self.status}); the callback was not written")
        await self.confirm.wait()
        if self.failure is not None:
            raise self.failure
        self.records.append(record)


class BridgeTestServer(TestServer):
    """aiohttp's test server, running the app through `BridgeRunner` as `bridge serve` does.

    Start it with `start_server(**request_handler_options(settings))` for the limits `bridge serve` sets.
    """

    async def _make_runner(self, **kwargs: Any) -> BridgeRunner:
        return BridgeRunner(self.app, **kwargs)


async def wait_until_ready(client: TestClient[web.Request, web.Application]) -> None:
    async with asyncio.timeout(READY_TIMEOUT_S):
        while True:
            response = await client.get("/readyz")
            if response.status == 200:
                return
            await asyncio.sleep(0.05)


async def until_ready(session: aiohttp.ClientSession, url: str, timeout: float = 60.0) -> None:
    """Wait until the bridge at `url` answers `/readyz` with 200; refused connections are waited out."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)


def start_serve(arguments: Sequence[str], log_path: Path, **flags: str) -> subprocess.Popen[bytes]:
    """`bridge serve` in a process of its own, logging to `log_path`; `flags` become `--name value`. The
    test's environment passes, but no BRIDGE_ variable: only what the test says configures it."""
    args = [*arguments, "--allow-unsigned", "--log-format", "text"]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", value]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", *args], stdout=log, stderr=log, env=clean
        )


async def _partitions(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> list[TopicPartition]:
    cluster = await consumer._client.fetch_all_metadata()  # as bridge/readback/reader.py reads it, and why
    return [
        TopicPartition(topic, partition)
        for topic in topics
        for partition in sorted(cluster.partitions_for_topic(topic) or ())
    ]


async def read_records(
    bootstrap_servers: str,
    topics: Sequence[str],
    *,
    expect: int,
    idle_s: float = 0.7,
    timeout_s: float = 20.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record in `topics`: read to the end offsets, waiting up to `timeout_s` for `expect` records.

    On Apache Kafka the end offsets are exact. Tansu's can miss the tail of a multi-record batch, so on the
    Tansu lane the read goes on until nothing new came for `idle_s`.
    """
    exact_ends = broker_choice().kind != "tansu"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions = await _partitions(consumer, topics)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        ends = await consumer.end_offsets(partitions)
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            fresh = [record for part in batch.values() for record in part]
            if fresh:
                records += fresh
                last_new = time.monotonic()
            if len(records) < expect:
                if not fresh:
                    ends = await consumer.end_offsets(partitions)
                continue
            if exact_ends and all(await _at_end(consumer, ends)):
                break
            if not exact_ends and not fresh and time.monotonic() - last_new >= idle_s:
                break
        return records
    finally:
        await consumer.stop()


async def _at_end(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> list[bool]:
    return [await consumer.position(tp) >= end for tp, end in ends.items()]


async def create_topic(bootstrap_servers: str, topic: str, partitions: int) -> None:
    """A new topic of `partitions` partitions, replication factor 1: a destination for `replay --to-topic`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def count_records(bootstrap_servers: str, topics: Sequence[str]) -> int:
    """How many records `topics` hold by their end offsets: exact for an empty topic on any broker."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await _partitions(consumer, topics)
        ends = await consumer.end_offsets(partitions)
        return sum(ends.values())
    finally:
        await consumer.stop()


# --- the command line -----------------------------------------------------------------------------------


def run_bridge(*arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m bridge ARGUMENTS` with no BRIDGE_ variable from the environment."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean,
        cwd=cwd,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a command wrote to stderr; fails on a traceback or more lines."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- a topic of several days of callbacks, for consume and replay ------------------------------------------

DAY_MS = 86_400_000
FIRST_DAY_MS = 1_714_521_600_000  # 2024-05-01T00:00:00Z
ACCOUNTS = ("@TOA#_news", "@TOA#_sports", "@TOA#_weather")
OA_QUERY = {
    "SdkAppid": "1400000000",
    "contenttype": "json",
    "ClientIP": "127.0.0.1",
    "OptPlatform": "RESTAPI",
}


@dataclass(frozen=True)
class Posted:
    """One callback posted to the bridge, and what it must look like when read back."""

    command: str
    body: dict[str, Any]
    key: str | None

    @property
    def account(self) -> str:
        account: str = self.body["Official_Account"]
        return account

    @property
    def event_time(self) -> int:
        event_time: int = self.body["EventTime"]
        return event_time

    @property
    def query(self) -> dict[str, str]:
        return {**OA_QUERY, "CallbackCommand": self.command}


def message(day: int, minute: int, account: str, number: int, first_day_ms: int = FIRST_DAY_MS) -> Posted:
    command = "OfficialAccount.CallbackAfterSendMsg"
    key = f"d{day}-{account[6:]}-{number}"
    body = {
        "CallbackCommand": command,
        "Official_Account": account,
        "MsgKey": key,
        "MsgTime": (first_day_ms + day * DAY_MS) // 1000 + minute * 60,
        "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": f"message {number}\nof day {day}"}}],
        "EventTime": first_day_ms + day * DAY_MS + minute * 60_000,
    }
    return Posted(command, body, key)


def subscription(day: int, minute: int, account: str, first_day_ms: int = FIRST_DAY_MS) -> Posted:
    command = "OfficialAccount.CallbackAfterAddSubscriber"
    body = {
        "CallbackCommand": command,
        "Official_Account": account,
        "SubscribeAccountList": [f"user-{day}-{minute}"],
        "EventTime": first_day_ms + day * DAY_MS + minute * 60_000,
    }
    return Posted(command, body, None)


def three_days(first_day_ms: int = FIRST_DAY_MS) -> list[Posted]:
    """Callbacks of 2024-05-01, -02 and -03 in the order they are posted: each day's messages and a
    subscription per account; days 0 and 2 posted latest first; a message of day 0 arriving late (at 23:50,
    posted after day 1's first messages at 00:30); and two messages delivered twice."""
    late = message(0, 1430, ACCOUNTS[0], 99, first_day_ms)
    posted: list[Posted] = []
    for day in range(3):
        day_posts = [
            message(day, minute, account, number, first_day_ms)
            for number, (minute, account) in enumerate((m, a) for m in (30, 400, 900, 1200) for a in ACCOUNTS)
        ]
        day_posts += [subscription(day, 600 + n, account, first_day_ms) for n, account in enumerate(ACCOUNTS)]
        if day == 1:
            day_posts[3:3] = [late, day_posts[0]]  # the late one, and Tencent's retry of a day-1 message
        else:
            day_posts.reverse()  # later event times written first
        posted += day_posts
    posted.append(posted[-5])  # a day-2 message that landed twice
    return posted


async def post_through_a_bridge(settings: Settings, callbacks: Sequence[Posted]) -> None:
    """Post `callbacks` through a bridge of `settings` whose edge dedup is off, so that the callbacks posted
    twice land twice, as they do in Kafka after a restart, from two replicas, or after an ambiguous 503."""
    async with TestClient(TestServer(create_app(replace(settings, dedup_window=0)))) as client:
        await wait_until_ready(client)
        await post_all(client, callbacks)


async def post_all(client: TestClient[web.Request, web.Application], callbacks: Sequence[Posted]) -> None:
    for callback in callbacks:
        response = await client.post("/callback", params=callback.query, data=orjson.dumps(callback.body))
        assert response.status == 200, await response.text()


@dataclass
class Receiver:
    """A local HTTP endpoint standing in for a second bridge, for `replay --to-url`: records what is posted
    to `/callback`. `status` answers every post (a 302 redirects to a GET of `/moved`, which answers 200, as
    a login page or a moved endpoint would); `refuse` answers a body with its status every time,
    `fail_first` with a 503 once; `after_each` runs after each callback received."""

    status: int = 200
    refuse: dict[bytes, int] = field(default_factory=dict)
    fail_first: set[bytes] = field(default_factory=set)
    after_each: Callable[[], None] | None = None
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    redirected_gets: int = 0
    server: TestServer | None = None
    """Set while it serves (the `receiver` fixture)."""

    def url(self, path: str = "/callback") -> str:
        assert self.server is not None, "the receiver is not serving"
        return str(self.server.make_url(path))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/callback", self._post)
        app.router.add_get("/moved", self._moved)
        app.router.add_get("/get-only", self._moved)
        return app

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        if body in self.refuse:
            return web.Response(status=self.refuse[body])
        if body in self.fail_first:
            self.fail_first.discard(body)
            return web.Response(status=503)
        if self.status == 302:
            raise web.HTTPFound("/moved")
        if self.status != 200:
            return web.Response(status=self.status)
        self.received.append((dict(request.query), body))
        if self.after_each is not None:
            self.after_each()
        return web.json_response({"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0})

    async def _moved(self, _request: web.Request) -> web.Response:
        self.redirected_gets += 1
        return web.json_response({"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0})
