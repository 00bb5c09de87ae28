"""The history check: concurrent clients send callbacks of every bridge topic while faults hit the brokers,
the network and the bridge itself; then every answer is checked against what Kafka holds (`tests.history`).

The broker is a three-node Apache Kafka cluster (replication factor 3, `min.insync.replicas` 2, 3 on the
group topic so that one follower down refuses its writes), each node behind a Kafka-aware fault proxy. The
bridge runs in this process through `run_server`, the code `bridge serve` runs, so a SIGTERM fault stops
it the real way; it is then started again. Faults come one at a time, each healed (and what it broke back)
before the next, in rounds that hold every chosen kind once, in an order drawn from the seed. Run it as:

    .venv/bin/python -m tests.chaos --duration 300 --clients 16 --seed 1 --history chaos.jsonl

`--single` runs one node instead (Tansu where there is no java/mvn, or with BRIDGE_TEST_BROKER=tansu), with
the faults one node allows. `--replay chaos.jsonl` runs a history's fault schedule again.

It prints a table and exits 1 if the history breaks the guarantee.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from bridge.ingest.runner import run_server
from bridge.ingest.server import OUTCOMES, PUBLISHER
from bridge.kafka.publisher import KafkaPublisher, Publisher
from bridge.kafka.topics import intended_topic
from bridge.settings import ServeSettings
from bridge.tools.embedded import free_port
from tests.history import Attempt, Callback, Fault, History, Report, judge, read_run
from tests.support.broker import FaultBroker, broker_choice, fault_broker
from tests.support.kafka.nodes import KafkaCluster, KafkaNode
from tests.support.kafka.view import partition_states
from tests.support.proxy import KafkaProxy
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import until_ready
from tests.support.settings import unique_settings

log = logging.getLogger("chaos")

BAD_SHARE = 0.05
"""Callbacks sent invalid: they must be answered 4xx and never written."""
RETRY_SHARE = 0.5
"""503'd callbacks sent again, as Tencent does after a timeout."""
COPY_SHARE = 0.03
"""Callbacks sent as two or three concurrent copies: the edge dedup's in-flight path."""
PARTITIONS = 6
APP_ID = "1400000000"
ISR_TOPIC_MIN_INSYNC = 3
"""`min.insync.replicas` of the group topic: with three replicas, one follower down refuses its writes."""

# Error codes a fault proxy gives Produce answers (Kafka's protocol: `Errors.java`).
AFTER_APPEND_ERRORS = {"NOT_LEADER_OR_FOLLOWER": 6, "MESSAGE_TOO_LARGE": 10, "NOT_ENOUGH_REPLICAS": 19,
                       "NOT_ENOUGH_REPLICAS_AFTER_APPEND": 20}  # fmt: skip
NO_APPEND_ERRORS = {"NOT_LEADER_OR_FOLLOWER": 6, "REQUEST_TIMED_OUT": 7, "NOT_ENOUGH_REPLICAS": 19,
                    "MESSAGE_TOO_LARGE": 10, "CORRUPT_MESSAGE": 2}  # fmt: skip


# --- what the clients send ----------------------------------------------------------------------------------


def _query(command: str, platform: str = "Web") -> dict[str, str]:
    return {"SdkAppid": APP_ID, "CallbackCommand": command, "contenttype": "json", "ClientIP": "127.0.0.1",
            "OptPlatform": platform}  # fmt: skip


def _sorted_sha256(body: dict[str, Any]) -> str:
    """The digest Tencent-keyless callbacks are keyed by, computed here independently of the bridge."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class Made:
    body: dict[str, Any]
    key: str
    entity: str
    invalid_field: str | None = None
    """A field the bad variant of this callback gets a wrong type in; None: this kind has no bad variant."""


Maker = Callable[[random.Random, str, int], Made]
"""(rng, a unique id, a unique number) -> the callback."""

OA, C2C, GROUP, STATE = (fixture(name) for name in ("oa-after-send-text", "c2c-after-send",
                         "group-after-send-string-eventtime", "state-change-uppercase-ios"))  # fmt: skip


def _official_account(rng: random.Random, unique: str, _number: int) -> Made:
    account = f"@TOA#_{rng.randrange(50)}"
    return Made({**OA.body, "MsgKey": unique, "Official_Account": account}, unique, account, "MsgTime")


def _c2c(rng: random.Random, unique: str, _number: int) -> Made:
    one, other = rng.sample([f"user{n}" for n in range(30)], 2)
    body = {**C2C.body, "MsgKey": unique, "From_Account": one, "To_Account": other}
    return Made(body, unique, ":".join(sorted((one, other))), "MsgTime")


def _group(rng: random.Random, _unique: str, number: int) -> Made:
    group = f"@TGS#_{rng.randrange(20)}"
    return Made({**GROUP.body, "GroupId": group, "MsgSeq": number}, f"{group}:{number}", group)


def _state(rng: random.Random, _unique: str, number: int) -> Made:
    account = f"user{rng.randrange(30)}"
    body = {**STATE.body, "Info": {**STATE.body["Info"], "To_Account": account},
            "EventTime": int(time.time() * 1000), "ChaosSeq": number}  # fmt: skip
    return Made(body, f"State.StateChange:sha256:{_sorted_sha256(body)}", account)


def _app_level(command: str) -> Maker:
    def make(_rng: random.Random, unique: str, _number: int) -> Made:
        body = {"CallbackCommand": command, "MsgKey": unique, "EventTime": int(time.time() * 1000)}
        return Made(body, f"{command}:{unique}", APP_ID)

    return make


@dataclass(frozen=True)
class Kind:
    name: str
    command: str
    topic_setting: str
    """The ServeSettings field naming its topic."""
    weight: float
    make: Maker
    platform: str = "Web"


KINDS = (
    Kind("official-account", "OfficialAccount.CallbackAfterSendMsg", "topic", 0.45, _official_account),
    Kind("c2c", "C2C.CallbackAfterSendMsg", "c2c_topic", 0.15, _c2c),
    Kind("group", "Group.CallbackAfterSendMsg", "group_topic", 0.15, _group, "Windows"),
    Kind("user", "State.StateChange", "user_topic", 0.1, _state, "IOS"),
    Kind("app", "Alert.CallbackChaosProbe", "app_topic", 0.08, _app_level("Alert.CallbackChaosProbe")),
    Kind("unknown", "Chaos.CallbackProbe", "unknown_topic", 0.07, _app_level("Chaos.CallbackProbe")),
)


# --- the brokers, the bridge -------------------------------------------------------------------------------


@dataclass
class Brokers:
    """The broker nodes and the fault proxy in front of each; clients reach the nodes only through these."""

    nodes: list[FaultBroker]
    proxies: list[KafkaProxy]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(proxy.bootstrap_servers for proxy in self.proxies)

    @property
    def cluster(self) -> bool:
        return len(self.nodes) > 1

    def node_by_id(self, node_id: int) -> KafkaNode:
        node = self.nodes[node_id - 1]
        assert isinstance(node, KafkaNode)
        assert node.node_id == node_id
        return node


def _restartable_port() -> int:
    """A free port below the kernel's range of ephemeral ports, for a bridge started again on it: a port
    from that range (`free_port`) may be taken, while the bridge is down, as the source port of one of the
    many connections the clients and aiokafka open meanwhile."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(low - 12_000, 1024), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def cluster_possible() -> bool:
    return broker_choice().kind != "tansu"


@contextlib.asynccontextmanager
async def proxied(nodes: Sequence[FaultBroker], proxy_ports: Sequence[int]) -> AsyncIterator[Brokers]:
    """A fault proxy on each of `proxy_ports`, in front of the node that advertises it."""
    proxies = [
        await KafkaProxy(node.port, port).start() for node, port in zip(nodes, proxy_ports, strict=True)
    ]
    try:
        yield Brokers(list(nodes), proxies)
    finally:
        for proxy in proxies:
            await proxy.close()


@contextlib.asynccontextmanager
async def brokers(directory: Path, cluster: bool) -> AsyncIterator[Brokers]:
    """Three Apache Kafka nodes behind three proxies, or one node (of the lane's kind) behind one."""
    proxy_ports = [free_port() for _ in range(3 if cluster else 1)]
    with contextlib.ExitStack() as stack:
        if cluster:
            nodes: list[FaultBroker] = list(
                stack.enter_context(KafkaCluster(directory, advertised_ports=proxy_ports)).nodes
            )
        else:
            node = fault_broker(directory, advertised_port=proxy_ports[0])
            stack.enter_context(node)
            nodes = [node]
        async with proxied(nodes, proxy_ports) as chain:
            yield chain


Mutation = Callable[[Publisher], None]
"""Breaks a bridge's publisher on purpose (the checker's negative controls)."""


class Bridge:
    """The bridge under test, run by `run_server` in this process: stopped by SIGTERM, started again."""

    def __init__(self, settings: ServeSettings, mutate: Mutation | None, history: History) -> None:
        self.settings = settings
        self.history = history
        self.url = f"http://127.0.0.1:{settings.port}"
        self.mutate = mutate
        self.starts = 0
        self.outcomes: dict[str, int] = {}
        self._app: web.Application | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def publisher(self) -> Publisher:
        assert self._app is not None
        return self._app[PUBLISHER]

    async def start(self, session: aiohttp.ClientSession) -> None:
        started: asyncio.Future[web.Application] = asyncio.get_running_loop().create_future()

        async def on_started(app: web.Application, _port: int) -> None:
            started.set_result(app)

        self._task = asyncio.create_task(run_server(self.settings, on_started))
        async with asyncio.timeout(60):
            self._app = await asyncio.shield(started)
        if self.mutate is not None:
            self.mutate(self._app[PUBLISHER])  # before any callback: the clients wait for /readyz
        self.starts += 1
        await self.until_ready(session)

    async def until_ready(self, session: aiohttp.ClientSession, timeout: float = 60) -> None:
        await until_ready(session, self.url, timeout)

    async def sigterm(self) -> float:
        """Stop it as an orchestrator does; the seconds it took to exit."""
        assert self._task is not None
        assert self._app is not None
        began = time.monotonic()
        self.history.stops.append(began - self.history.t0)
        signal.raise_signal(signal.SIGTERM)  # run_server's handler, on this loop
        settings = self.settings
        budget = settings.shutdown_delay + settings.body_timeout + settings.delivery_timeout
        async with asyncio.timeout(budget + settings.shutdown_timeout + 10):
            await self._task
        for name, count in self._app[OUTCOMES].snapshot().items():
            self.outcomes[name] = self.outcomes.get(name, 0) + count
        self._task = self._app = None
        return time.monotonic() - began

    async def settle(self, timeout: float = 60) -> None:
        """Wait until the producer holds no record answered 503."""
        async with asyncio.timeout(timeout):
            while self.publisher.abandoned:
                await asyncio.sleep(0.1)


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """What the clients share: the topics not to send to for now, and the requests in flight per topic."""

    quiet: set[str] = field(default_factory=set)
    in_flight: dict[str, int] = field(default_factory=dict)


@dataclass
class Chaos:
    chain: Brokers
    bridge: Bridge
    session: aiohttp.ClientSession
    history: History
    load: Load
    admin: AIOKafkaAdminClient

    @property
    def t0(self) -> float:
        return self.history.t0

    def clock(self) -> float:
        return time.monotonic() - self.history.t0

    @property
    def settings(self) -> ServeSettings:
        return self.bridge.settings


async def run_chaos(
    duration_s: float,
    clients: int,
    seed: int,
    delivery_timeout_s: float = 1.0,
    *,
    cluster: bool = True,
    directory: Path | None = None,
    faults: frozenset[str] | None = None,
    schedule: list[Planned] | None = None,
    nodes: Sequence[FaultBroker] | None = None,
    proxy_ports: Sequence[int] | None = None,
    mutate: Mutation | None = None,
    history_file: Path | None = None,
) -> Report:
    """`faults` names the fault kinds to inject (see FAULT_KINDS); None: every kind the brokers allow.
    `schedule` replaces the seed's fault schedule (a replay). `nodes` (already started, each advertising its
    port of `proxy_ports`) replace brokers of the run's own. `mutate` breaks the bridge on purpose."""
    rng = random.Random(seed)
    history = History()
    # run_server tunes the garbage collector for a serving process; this one goes on running tests.
    thresholds = gc.get_threshold()
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        async with contextlib.AsyncExitStack() as chains:
            if nodes is not None:
                assert proxy_ports is not None
                chain = await chains.enter_async_context(proxied(nodes, proxy_ports))
            else:
                chain = await chains.enter_async_context(brokers(directory, cluster))
            kinds = allowed_faults(chain) if faults is None else sorted(faults & set(allowed_faults(chain)))
            planned = schedule if schedule is not None else plan(rng, kinds, duration_s, chain)
            settings = unique_settings(
                chain.bootstrap_servers,
                port=_restartable_port(),
                delivery_timeout=delivery_timeout_s,
                shutdown_timeout=5.0,
                body_timeout=2.0,
                partitions=PARTITIONS,
            )
            topics = {kind.name: getattr(settings, kind.topic_setting) for kind in KINDS}
            history.run = {"seed": seed, "clients": clients, "duration_s": duration_s,
                           "delivery_timeout_s": delivery_timeout_s, "cluster": chain.cluster,
                           "topics": topics}  # fmt: skip
            for kind in KINDS:
                history.partition_counts[getattr(settings, kind.topic_setting)].add(PARTITIONS)
            bridge = Bridge(settings, mutate, history)
            admin = AIOKafkaAdminClient(bootstrap_servers=chain.bootstrap_servers, request_timeout_ms=15_000)
            await admin.start()
            chains.push_async_callback(admin.close)
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                    log.info("brokers up; starting the bridge")
                    await bridge.start(session)
                    if chain.cluster:
                        await _raise_min_insync(admin, settings.group_topic)
                    history.t0 = time.monotonic()
                    chaos = Chaos(chain, bridge, session, history, Load(), admin)
                    end = chaos.t0 + duration_s
                    await asyncio.gather(
                        _fault_loop(chaos, planned, end),
                        *(_client(chaos, n, random.Random(seed * 1000 + n), end) for n in range(clients)),
                    )
                    elapsed = chaos.clock()
                    proxies = chain.proxies
                    history.proxy = {
                        "Produce requests": sum(proxy.produce_requests for proxy in proxies),
                        "Produce requests refused without append": sum(p.refused_produces for p in proxies),
                        "partitions withheld from a Produce": sum(len(p.partition_errors) for p in proxies),
                    }
                    log.info("load over after %.1f s; healing", elapsed)
                    await _heal_all(chaos)
                    await bridge.until_ready(session)
                    log.info("healed at %.1f s", chaos.clock())
                    await bridge.settle()  # every record answered 503 has landed or been given up
                    await bridge.sigterm()
                    log.info("settled and stopped at %.1f s", chaos.clock())
                # The bridge has stopped: every record it wrote is below the end offsets read now. Never
                # wait for as many records as there were 200s: a broken bridge would make that wait forever.
                records = await read_records(
                    chain.bootstrap_servers, list(settings.topics), expect=0, idle_s=2, timeout_s=90
                )
            finally:
                gc.unfreeze()
                gc.set_threshold(*thresholds)
    log.info("read %d records", len(records))
    report = judge(history, records, bridge.outcomes, elapsed)
    if history_file is not None:
        history.write(history_file, report)
    return report


async def _raise_min_insync(admin: AIOKafkaAdminClient, topic: str) -> None:
    resource = ConfigResource(
        ConfigResourceType.TOPIC, topic, {"min.insync.replicas": str(ISR_TOPIC_MIN_INSYNC)}
    )
    await admin.alter_configs([resource])


async def _client(chaos: Chaos, number: int, rng: random.Random, end: float) -> None:
    history, load = chaos.history, chaos.load
    sent = 0
    weights = [kind.weight for kind in KINDS]
    while time.monotonic() < end:
        sent += 1
        kind = rng.choices(KINDS, weights)[0]
        topic = getattr(chaos.settings, kind.topic_setting)
        if topic in load.quiet:
            kind, topic = KINDS[0], chaos.settings.topic
        unique = f"{sent}_{number}_{int(chaos.t0)}"
        made = kind.make(rng, unique, number * 10_000_000 + sent)
        valid = made.invalid_field is None or rng.random() >= BAD_SHARE
        body = made.body if valid else {**made.body, str(made.invalid_field): "not an integer"}
        raw = orjson.dumps(body)
        query = _query(kind.command, kind.platform)
        callback = Callback(f"c{number}-{sent}", kind.name, topic, made.key, made.entity, kind.command, query,
                            raw, valid)  # fmt: skip
        history.callbacks[callback.id] = callback
        load.in_flight[topic] = load.in_flight.get(topic, 0) + 1
        try:
            copies = rng.randint(2, 3) if rng.random() < COPY_SHARE else 1
            whys = ["send", *["copy"] * (copies - 1)]
            answers = await asyncio.gather(*(_post(chaos, callback, why) for why in whys))
            if 503 in answers and rng.random() < RETRY_SHARE:
                answers.append(await _post(chaos, callback, "retry"))
        finally:
            load.in_flight[topic] -= 1
        if all(isinstance(answer, str) for answer in answers):
            await asyncio.sleep(0.05)  # the bridge is restarting: no spinning on refused connections
        elif 200 not in answers:
            await asyncio.sleep(0.02)  # a bridge refusing at once would have the clients spin


async def _post(chaos: Chaos, callback: Callback, why: str) -> int | str:
    started, bridge = chaos.clock(), chaos.bridge.starts
    status: int | str
    try:
        async with chaos.session.post(
            f"{chaos.bridge.url}/callback", params=callback.query, data=callback.body
        ) as response:
            await response.read()
            status, outcome = response.status, response.headers.get("X-Bridge-Outcome", "none")
    except (aiohttp.ClientError, TimeoutError) as exc:
        status, outcome = type(exc).__name__, "none"
    chaos.history.attempts.append(Attempt(callback.id, why, started, chaos.clock(), status, outcome, bridge))
    return status


# --- the faults --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One fault of the schedule: after `gap` seconds, `kind` for `hold` seconds, with `params`."""

    kind: str
    gap: float
    hold: float
    params: dict[str, Any]


FaultAction = Callable[[Chaos, Planned], Awaitable[str]]
"""Injects a fault, holds it, heals it; returns what it did, in words."""

CLUSTER_ONLY = frozenset({"leader-kill", "isr-below-min", "quorum-loss", "node-restart", "kill"})
KAFKA_ONLY = frozenset({"topic-delete", "partitions-grow"})
"""Tansu acknowledges writes to deleted topics and cannot add partitions."""


def allowed_faults(chain: Brokers) -> list[str]:
    kinds = set(FAULT_KINDS)
    if not chain.cluster:
        kinds -= CLUSTER_ONLY
    if not all(isinstance(node, KafkaNode) for node in chain.nodes):
        kinds -= KAFKA_ONLY
    return [kind for kind in FAULT_KINDS if kind in kinds]


def _params(kind: str, rng: random.Random, chain: Brokers) -> tuple[float, dict[str, Any]]:
    """How long `kind` is held, and what it hits."""
    nodes, proxies = len(chain.nodes), len(chain.proxies)

    def error(codes: dict[str, int]) -> dict[str, Any]:  # times None: every answer until healed
        return {"proxy": rng.randrange(proxies), "error": rng.choice(sorted(codes)),
                "times": rng.choice([1, 3, None])}  # fmt: skip

    hold = rng.uniform(0.2, 2.0)
    node = {"node": rng.randrange(nodes) + 1}
    parameters: dict[str, Callable[[], tuple[float, dict[str, Any]]]] = {
        "pause": lambda: (hold, node),
        "kill": lambda: (hold, node),
        "node-restart": lambda: (hold, node),
        "leader-kill": lambda: (hold, {"partition": rng.randrange(PARTITIONS)}),
        # past replica.lag.time.max.ms (3 s on the test nodes), so that the ISR shrinks
        "isr-below-min": lambda: (rng.uniform(4.5, 6.0), {"partition": rng.randrange(PARTITIONS)}),
        "quorum-loss": lambda: (rng.uniform(1.5, 3.0), {"nodes": sorted(rng.sample(range(1, nodes + 1), 2))}),
        "slow": lambda: (hold, {"delay_s": round(rng.uniform(0.1, 1.5), 3)}),
        "reset-produce": lambda: (
            hold,
            {
                "proxy": rng.randrange(proxies),
                "side": rng.choice(["before", "after"]),
                "count": rng.randint(1, 3),
            },
        ),
        "error-after-append": lambda: (hold, error(AFTER_APPEND_ERRORS)),
        "error-no-append": lambda: (hold, error(NO_APPEND_ERRORS)),
        "partition-error": lambda: (hold, error(NO_APPEND_ERRORS)),
        "topic-delete": lambda: (rng.uniform(1.0, 3.0), {}),
        "partitions-grow": lambda: (hold, {"by": 2}),
    }
    return parameters[kind]() if kind in parameters else (hold, {})


def plan(rng: random.Random, kinds: Sequence[str], duration_s: float, chain: Brokers) -> list[Planned]:
    """Rounds of every kind once, each round in its own order, enough to outlast `duration_s`."""
    schedule: list[Planned] = []
    elapsed = 0.0
    while kinds and elapsed < duration_s:
        for kind in rng.sample(list(kinds), len(kinds)):
            hold, parameters = _params(kind, rng, chain)
            gap = rng.uniform(0.3, 1.0)
            schedule.append(Planned(kind, gap, hold, parameters))
            elapsed += gap + hold + 1.0
    return schedule


def schedule_from(faults: list[dict[str, Any]]) -> list[Planned]:
    """The schedule a history file's faults followed."""
    return [Planned(f["kind"], f["gap"], f["hold"], f["params"]) for f in faults]


async def _fault_loop(chaos: Chaos, schedule: list[Planned], end: float) -> None:
    for planned in schedule:
        await asyncio.sleep(min(planned.gap, max(end - time.monotonic(), 0)))
        if time.monotonic() >= end:
            return
        started = chaos.clock()
        detail = await FAULTS[planned.kind](chaos, planned)
        await _recovered(chaos)
        chaos.history.faults.append(
            Fault(planned.kind, detail, started, chaos.clock(), planned.gap, planned.hold, planned.params)
        )


async def _recovered(chaos: Chaos) -> None:
    """Every node up again before the next fault: one fault at a time."""
    for node in chaos.chain.nodes:
        if isinstance(node, KafkaNode):
            if node.process is None:
                node.launch()
            await asyncio.to_thread(node.wait_ready)


async def _heal_all(chaos: Chaos) -> None:
    for node in chaos.chain.nodes:
        node.resume()
    await _recovered(chaos)
    for proxy in chaos.chain.proxies:
        proxy.faults.clear()
        proxy.set_blackhole(False)


def _node(chaos: Chaos, node_id: int) -> FaultBroker:
    return chaos.chain.nodes[node_id - 1]


async def _pause(chaos: Chaos, planned: Planned) -> str:
    node = _node(chaos, planned.params["node"])
    node.pause()
    await asyncio.sleep(planned.hold)
    node.resume()
    return f"node {planned.params['node']} SIGSTOPped for {planned.hold:.1f} s"


async def _kill_for(chaos: Chaos, node_ids: Sequence[int], hold: float) -> None:
    """SIGKILL the nodes; start them again with their data `hold` seconds later, without waiting."""
    for node_id in node_ids:
        chaos.chain.node_by_id(node_id).kill()
    await asyncio.sleep(hold)
    for node_id in node_ids:
        chaos.chain.node_by_id(node_id).launch()


async def _kill(chaos: Chaos, planned: Planned) -> str:
    await _kill_for(chaos, [planned.params["node"]], planned.hold)
    return f"node {planned.params['node']} SIGKILLed, started again with its data after {planned.hold:.1f} s"


async def _states(chaos: Chaos, topic: str) -> dict[int, Any]:
    return await partition_states(chaos.chain.bootstrap_servers, topic)


async def _leader_kill(chaos: Chaos, planned: Planned) -> str:
    partition = planned.params["partition"]
    topic = chaos.settings.topic
    leader = (await _states(chaos, topic))[partition].leader
    await _kill_for(chaos, [leader], planned.hold)
    return f"node {leader}, leader of {topic}[{partition}], SIGKILLed for {planned.hold:.1f} s"


async def _isr_below_min(chaos: Chaos, planned: Planned) -> str:
    partition = planned.params["partition"]
    topic = chaos.settings.group_topic
    state = (await _states(chaos, topic))[partition]
    follower = next(replica for replica in state.replicas if replica != state.leader)
    await _kill_for(chaos, [follower], planned.hold)
    return (
        f"node {follower}, a follower of {topic}[{partition}] (min.insync.replicas {ISR_TOPIC_MIN_INSYNC}), "
        f"SIGKILLed for {planned.hold:.1f} s"
    )


async def _quorum_loss(chaos: Chaos, planned: Planned) -> str:
    await _kill_for(chaos, planned.params["nodes"], planned.hold)
    return f"nodes {planned.params['nodes']} SIGKILLed for {planned.hold:.1f} s: no controller quorum"


async def _node_restart(chaos: Chaos, planned: Planned) -> str:
    """A rolling restart's step: SIGTERM (Kafka's controlled shutdown moves its leaderships), then start."""
    node = chaos.chain.node_by_id(planned.params["node"])
    process = node.process
    assert process is not None
    process.send_signal(signal.SIGTERM)
    began = time.monotonic()
    try:
        await asyncio.to_thread(process.wait, 60)
    except subprocess.TimeoutExpired:  # a node that does not stop in a minute is killed
        node.kill()
    stopped = time.monotonic() - began
    await asyncio.sleep(planned.hold)
    node.launch()
    return f"node {planned.params['node']} stopped by SIGTERM in {stopped:.1f} s, started again with its data"


async def _blackhole(chaos: Chaos, planned: Planned) -> str:
    for proxy in chaos.chain.proxies:
        proxy.set_blackhole(True)
    await asyncio.sleep(planned.hold)
    for proxy in chaos.chain.proxies:
        proxy.set_blackhole(False)
    return f"all traffic black-holed for {planned.hold:.1f} s"


async def _proxy_fault(
    chaos: Chaos, planned: Planned, proxies: Sequence[KafkaProxy], set_: Callable[..., None]
) -> None:
    for proxy in proxies:
        set_(proxy.faults)
    await asyncio.sleep(planned.hold)
    for proxy in chaos.chain.proxies:
        proxy.faults.clear()


async def _slow(chaos: Chaos, planned: Planned) -> str:
    delay = planned.params["delay_s"]
    await _proxy_fault(chaos, planned, chaos.chain.proxies, lambda f: setattr(f, "response_delay_s", delay))
    return f"every answer delayed {delay:.2f} s for {planned.hold:.1f} s"


async def _reset(chaos: Chaos, planned: Planned) -> str:
    for proxy in chaos.chain.proxies:
        proxy.reset_all()
    return "every connection reset"


async def _reset_produce(chaos: Chaos, planned: Planned) -> str:
    p = planned.params
    proxy = chaos.chain.proxies[p["proxy"]]
    field_name = f"reset_{p['side']}_produce"
    await _proxy_fault(chaos, planned, [proxy], lambda f: setattr(f, field_name, p["count"]))
    return f"{p['count']} connections of proxy {p['proxy']} reset {p['side']} a Produce"


def _error_fault(code_field: str, times_field: str, codes: dict[str, int], words: str) -> FaultAction:
    async def fault(chaos: Chaos, planned: Planned) -> str:
        p = planned.params
        proxy = chaos.chain.proxies[p["proxy"]]

        def set_(faults: Any) -> None:
            setattr(faults, code_field, codes[p["error"]])
            setattr(faults, times_field, p["times"])

        await _proxy_fault(chaos, planned, [proxy], set_)
        times = "every answer" if p["times"] is None else f"{p['times']} answers"
        return f"{p['error']} {words} by proxy {p['proxy']}, {times} within {planned.hold:.1f} s"

    return fault


async def _topic_delete(chaos: Chaos, planned: Planned) -> str:
    """An operator deletes a topic while the bridge serves, and re-creates it as it was.

    The records it held were in Kafka until then: its callbacks are held back, every one sent is answered,
    the topic is read to its end, and only then deleted. While it is gone, callbacks to it are sent again:
    none may be answered 200 (none could be in Kafka)."""
    settings, admin, load = chaos.settings, chaos.admin, chaos.load
    topic = settings.app_topic
    load.quiet.add(topic)
    async with asyncio.timeout(30):
        while load.in_flight.get(topic, 0):
            await asyncio.sleep(0.01)
    chaos.history.kept += await read_records(chaos.chain.bootstrap_servers, [topic], expect=0, timeout_s=30)
    await admin.delete_topics([topic])
    async with asyncio.timeout(30):
        while topic in await admin.list_topics():
            await asyncio.sleep(0.1)
    load.quiet.discard(topic)
    await asyncio.sleep(planned.hold)
    count = max(chaos.history.partition_counts[topic])
    intended = intended_topic(settings, len(chaos.chain.nodes))
    async with asyncio.timeout(30):
        while True:  # the brokers may still be deleting the old one's logs
            response = await admin.create_topics(
                [NewTopic(topic, count, intended.replication_factor, topic_configs=dict(intended.configs))]
            )
            if all(error == 0 for _, error, *_ in response.topic_errors):
                break
            await asyncio.sleep(0.2)
    await chaos.bridge.until_ready(chaos.session)
    return f"{topic} deleted, re-created {planned.hold:.1f} s later with {count} partitions"


async def _partitions_grow(chaos: Chaos, planned: Planned) -> str:
    """An operator adds partitions: the bridge refuses that topic's callbacks until restarted, then uses
    the new count."""
    topic = chaos.settings.user_topic
    count = max(chaos.history.partition_counts[topic]) + planned.params["by"]
    await chaos.admin.create_partitions({topic: NewPartitions(count)})
    chaos.history.partition_counts[topic].add(count)
    await asyncio.sleep(planned.hold)
    took = await chaos.bridge.sigterm()
    await chaos.bridge.start(chaos.session)
    return f"{topic} grown to {count} partitions; the bridge restarted to take them (stopped in {took:.1f} s)"


def kill_producer(producer: AIOKafkaProducer) -> None:
    """End the producer's sender task, as a fatal error does (aiokafka's internals: it has no public way)."""
    producer._sender.sender_task.cancel()


async def _producer_death(chaos: Chaos, planned: Planned) -> str:
    publisher = chaos.bridge.publisher
    assert isinstance(publisher, KafkaPublisher)
    producer = publisher.producer
    assert producer is not None
    kill_producer(producer)
    async with asyncio.timeout(30):
        while publisher.producer is producer:
            await asyncio.sleep(0.01)
    await chaos.bridge.until_ready(chaos.session)
    return "the producer's sender task cancelled; the bridge built a new producer"


async def _bridge_sigterm(chaos: Chaos, planned: Planned) -> str:
    took = await chaos.bridge.sigterm()
    await asyncio.sleep(planned.hold)
    await chaos.bridge.start(chaos.session)
    return (
        f"the bridge stopped by SIGTERM under load in {took:.1f} s, started again {planned.hold:.1f} s later"
    )


FAULTS: dict[str, FaultAction] = {
    "pause": _pause,
    "kill": _kill,
    "leader-kill": _leader_kill,
    "isr-below-min": _isr_below_min,
    "quorum-loss": _quorum_loss,
    "node-restart": _node_restart,
    "blackhole": _blackhole,
    "slow": _slow,
    "reset": _reset,
    "reset-produce": _reset_produce,
    "error-after-append": _error_fault(
        "produce_error", "produce_error_times", AFTER_APPEND_ERRORS, "after append"
    ),
    "error-no-append": _error_fault(
        "refuse_produce", "refuse_produce_times", NO_APPEND_ERRORS, "without append"
    ),
    "partition-error": _error_fault(
        "partition_error", "partition_error_times", NO_APPEND_ERRORS, "on one partition"
    ),
    "topic-delete": _topic_delete,
    "partitions-grow": _partitions_grow,
    "producer-death": _producer_death,
    "bridge-sigterm": _bridge_sigterm,
}
FAULT_KINDS = tuple(FAULTS)


async def run_each(
    kinds: Sequence[str],
    duration_s: float,
    clients: int,
    seed: int,
    delivery_timeout_s: float,
    history: Path | None,
) -> list[tuple[str, Report]]:
    """Each fault kind alone, one run after another on one cluster (each run heals what it broke)."""
    ports = [free_port() for _ in range(3)]
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="chaos-") as directory,
        KafkaCluster(Path(directory), advertised_ports=ports) as cluster,
    ):
        for kind in kinds:
            log.info("fault kind %s alone", kind)
            report = await run_chaos(
                duration_s,
                clients,
                seed,
                delivery_timeout_s,
                faults=frozenset({kind}),
                nodes=cluster.nodes,
                proxy_ports=ports,
                history_file=None if history is None else history / f"{kind}.jsonl",
            )
            results.append((kind, report))
    return results


def each_table(results: Sequence[tuple[str, Report]]) -> str:
    lines = [
        "| fault kind alone | faults | requests | 200 | 503 | other answers | 200 but missing "
        "| wrong content | 4xx present | duplicates | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, report in results:
        answers = report.answers
        other = sum(n for status, n in answers.items() if status not in {"200", "503", "400"})
        verdict = "BROKEN" if report.broken else "ok"
        lines.append(
            f"| {kind} | {report.faults[kind]} | {report.requests} | {answers['200']} | {answers['503']} "
            f"| {other} | {len(report.missing)} | {len(report.wrong_content)} "
            f"| {len(report.rejected_but_present)} | {sum(report.duplicates.values())} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and faults [60]")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients [16]")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule and the load [1]")
    parser.add_argument("--delivery-timeout", type=float, default=1.0, help="the bridge's deadline [1.0]")
    parser.add_argument("--single", action="store_true", help="one broker node instead of a cluster of three")
    parser.add_argument(
        "--faults",
        default="all",
        help=f"comma-separated fault kinds to inject, of {', '.join(FAULT_KINDS)}; 'none' for none [all]",
    )
    parser.add_argument(
        "--each",
        action="store_true",
        help="run each chosen fault kind alone, one run per kind, on one cluster",
    )
    parser.add_argument(
        "--history",
        type=Path,
        help="write the run's history here (JSON Lines); with --each, a folder for them",
    )
    parser.add_argument(
        "--replay",
        type=Path,
        help="run a history file's fault schedule again, with its seed, clients, duration",
    )
    args = parser.parse_args(argv)
    cluster = not args.single
    faults = None if args.faults == "all" else frozenset(args.faults.split(",")) - {"none"}
    if faults is not None and (unknown := faults - set(FAULT_KINDS)):
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    schedule = None
    if args.replay is not None:
        run, recorded = read_run(args.replay)
        schedule = schedule_from(recorded)
        cluster = run["cluster"]
        args.seed, args.clients, args.duration = run["seed"], run["clients"], run["duration_s"]
        args.delivery_timeout = run["delivery_timeout_s"]
    if cluster and not cluster_possible():
        parser.error("the three-node cluster needs Apache Kafka (java and mvn); use --single for Tansu")
    if args.each and (args.single or args.replay):
        parser.error("--each runs on the three-node cluster, with the seed's schedules")
    # The faults make aiokafka and the bridge log by the thousand; the table is the result.
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("bridge").setLevel(logging.CRITICAL)
    # aiokafka's producer.stop() leaves its accumulator's close task pending when the sender ends first:
    # "Task was destroyed but it is pending" at every stop of the bridge.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    logging.getLogger("chaos").setLevel(logging.INFO)
    if args.each:
        if args.history is not None:
            args.history.mkdir(parents=True, exist_ok=True)
        kinds = [kind for kind in FAULT_KINDS if faults is None or kind in faults]
        results = asyncio.run(
            run_each(kinds, args.duration, args.clients, args.seed, args.delivery_timeout, args.history)
        )
        print(each_table(results))
        return 1 if any(report.broken for _, report in results) else 0
    report = asyncio.run(
        run_chaos(
            args.duration,
            args.clients,
            args.seed,
            args.delivery_timeout,
            cluster=cluster,
            faults=faults,
            schedule=schedule,
            history_file=args.history,
        )
    )
    print(f"broker: {'three Apache Kafka nodes' if cluster else broker_choice().description}")
    print(report.table())
    for problem, ids in report.problems().items():
        for callback_id in ids[:20]:
            print(f"{problem}: {callback_id}", file=sys.stderr)
    return 1 if report.broken else 0


if __name__ == "__main__":
    sys.exit(main())
