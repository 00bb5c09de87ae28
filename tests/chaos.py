"""The history check: concurrent clients send callbacks while faults hit the broker; then every answer is
checked against what Kafka holds.

Every 200'd key must be in Kafka; no 4xx'd key may be; 503s are counted by whether they landed anyway.
Clients retry some 503s with the same key, as Tencent does after a timeout. The broker is a three-node
Apache Kafka cluster (replication factor 3, min.insync.replicas 2), each node behind a fault proxy; the
faults pause or kill-and-restart one node at a time, or hit the proxies. Run it as:

    .venv/bin/python -m tests.chaos --duration 60 --clients 16 --seed 1

`--single` runs one node instead (Tansu where there is no java/mvn, or with BRIDGE_TEST_BROKER=tansu).

It prints a table and exits 1 if the history breaks the guarantee.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bridge.embedded import free_port
from bridge.server import OUTCOMES, PUBLISHER, create_app
from tests.kafka.nodes import KafkaCluster, KafkaNode
from tests.proxy import KafkaProxy
from tests.support import FaultBroker, broker_choice, fault_broker, fixture, read_records, unique_settings

SEED = fixture("oa-after-send-text")
ERROR_CODES = {"NOT_LEADER_OR_FOLLOWER": 6, "MESSAGE_TOO_LARGE": 10, "NOT_ENOUGH_REPLICAS": 19,
               "NOT_ENOUGH_REPLICAS_AFTER_APPEND": 20}  # fmt: skip
BAD_SHARE = 0.05
RETRY_SHARE = 0.5


@dataclass
class History:
    answers: dict[str, list[int | str]] = field(default_factory=dict)
    outcomes: dict[str, list[str]] = field(default_factory=dict)
    """What the bridge said became of each answer (its X-Bridge-Outcome header)."""
    bad: set[str] = field(default_factory=set)
    faults: Counter[str] = field(default_factory=Counter)

    def note(self, key: str, answer: tuple[int | str, str]) -> None:
        self.answers.setdefault(key, []).append(answer[0])
        self.outcomes.setdefault(key, []).append(answer[1])


@dataclass
class Report:
    duration_s: float
    requests: int
    answers: Counter[str]
    outcomes: dict[str, int]
    confirmed_keys: int
    missing: list[str]
    rejected_but_present: list[str]
    failed_but_present: list[str]
    answered_503_landed: int
    answered_503_absent: int
    duplicated_keys: int
    extra_copies: int
    faults: Counter[str]

    @property
    def unsettled_ambiguous(self) -> int:
        """Ambiguous answers minus those whose record was followed to its end: 0 once all has settled."""
        outcomes = self.outcomes
        return outcomes["ambiguous"] - outcomes["ambiguous_landed"] - outcomes["ambiguous_lost"]

    @property
    def broken(self) -> bool:
        return bool(self.missing or self.rejected_but_present or self.failed_but_present)

    def table(self) -> str:
        rows = [
            ("duration", f"{self.duration_s:.0f} s"),
            ("requests", f"{self.requests} ({self.requests / self.duration_s:.0f}/s)"),
            *((f"answered {status}", str(count)) for status, count in sorted(self.answers.items())),
            *((f"outcome {name}", str(count)) for name, count in self.outcomes.items() if count),
            ("keys confirmed (a 200)", str(self.confirmed_keys)),
            ("200'd keys missing from Kafka", str(len(self.missing))),
            ("4xx'd keys present in Kafka", str(len(self.rejected_but_present))),
            ("keys only answered 'failed' present", str(len(self.failed_but_present))),
            ("503'd keys in Kafka anyway", str(self.answered_503_landed)),
            ("503'd keys absent", str(self.answered_503_absent)),
            ("keys in Kafka more than once", f"{self.duplicated_keys} ({self.extra_copies} extra copies)"),
            ("ambiguous answers not followed to their end", str(self.unsettled_ambiguous)),
            *((f"fault {name}", str(count)) for name, count in sorted(self.faults.items())),
            ("verdict", "BROKEN" if self.broken else "every 200 is in Kafka, no 4xx is"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"| {name:<{width}} | {value} |" for name, value in rows)


@dataclass
class Brokers:
    """The broker nodes and the fault proxy in front of each; clients reach the nodes only through these."""

    nodes: list[FaultBroker]
    proxies: list[KafkaProxy]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(proxy.bootstrap_servers for proxy in self.proxies)


def cluster_possible() -> bool:
    return broker_choice().kind != "tansu"


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
        proxies = [
            await KafkaProxy(node.port, port).start() for node, port in zip(nodes, proxy_ports, strict=True)
        ]
        try:
            yield Brokers(nodes, proxies)
        finally:
            for proxy in proxies:
                await proxy.close()


async def run_chaos(
    duration_s: float,
    clients: int,
    seed: int,
    delivery_timeout_s: float = 1.0,
    *,
    cluster: bool = True,
    directory: Path | None = None,
    faults: frozenset[str] | None = None,
) -> Report:
    """`faults` names the fault kinds to inject (see FAULT_KINDS); None: all of them."""
    rng = random.Random(seed)
    history = History()
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        async with brokers(directory, cluster) as chain:
            settings = unique_settings(chain.bootstrap_servers, delivery_timeout=delivery_timeout_s)
            app = create_app(settings)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            url = f"http://127.0.0.1:{port}"
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                    await _until_ready(session, url)
                    started = time.monotonic()
                    end = started + duration_s
                    await asyncio.gather(
                        _fault_loop(rng, chain, history, end, faults),
                        *(
                            _client(n, random.Random(seed * 1000 + n), session, url, history, end)
                            for n in range(clients)
                        ),
                    )
                    elapsed = time.monotonic() - started
                    await _heal_all(chain)
                    publisher = app[PUBLISHER]
                    async with asyncio.timeout(60):  # let every record answered 503 settle one way or another
                        while publisher.abandoned:
                            await asyncio.sleep(0.1)
                    confirmed = sum(200 in answers for answers in history.answers.values())
                    records = await read_records(
                        chain.bootstrap_servers, [settings.topic], expect=confirmed, idle_s=2, timeout_s=60
                    )
                    outcomes = app[OUTCOMES].snapshot()
            finally:
                await runner.cleanup()
    return _judge(history, records, outcomes, elapsed)


async def _heal_all(chain: Brokers) -> None:
    for node in chain.nodes:
        node.resume()
        if isinstance(node, KafkaNode):
            await asyncio.to_thread(node.wait_ready)  # a node killed last is still coming back
    for proxy in chain.proxies:
        proxy.faults.clear()
        proxy.set_blackhole(False)


def _judge(history: History, records: list[Any], outcomes: dict[str, int], elapsed: float) -> Report:
    copies = Counter(record.key.decode() for record in records if record.key is not None)
    confirmed = {key for key, answers in history.answers.items() if 200 in answers}
    refused = {key for key, answers in history.answers.items() if 200 not in answers and 503 in answers}
    # Answered 503 and each time told that nothing was handed to Kafka: such a key must be absent.
    not_written = {"failed", "overloaded"}
    never_written = {key for key in refused if set(history.outcomes[key]) <= not_written}
    return Report(
        duration_s=elapsed,
        requests=sum(len(answers) for answers in history.answers.values()),
        answers=Counter(str(answer) for answers in history.answers.values() for answer in answers),
        outcomes=outcomes,
        confirmed_keys=len(confirmed),
        missing=sorted(confirmed - set(copies)),
        rejected_but_present=sorted(history.bad & set(copies)),
        failed_but_present=sorted(never_written & set(copies)),
        answered_503_landed=len(refused & set(copies)),
        answered_503_absent=len(refused - set(copies)),
        duplicated_keys=sum(1 for count in copies.values() if count > 1),
        extra_copies=sum(count - 1 for count in copies.values()),
        faults=history.faults,
    )


async def _until_ready(session: aiohttp.ClientSession, url: str) -> None:
    async with asyncio.timeout(30):
        while True:
            async with session.get(f"{url}/readyz") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.05)


async def _client(
    number: int, rng: random.Random, session: aiohttp.ClientSession, url: str, history: History, end: float
) -> None:
    sent = 0
    while time.monotonic() < end:
        sent += 1
        key = f"c{number}-{sent}"
        body = {**SEED.body, "MsgKey": key, "Official_Account": f"@TOA#_{rng.randrange(50)}"}
        if rng.random() < BAD_SHARE:
            body["MsgTime"] = "not an integer"
            history.bad.add(key)
        answer = await _post(session, url, orjson.dumps(body))
        history.note(key, answer)
        if answer[0] == 503 and rng.random() < RETRY_SHARE:  # Tencent's retry after a timeout
            history.note(key, await _post(session, url, orjson.dumps(body)))


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int | str, str]:
    """The status (or the client error) and the outcome the bridge reported."""
    try:
        async with session.post(f"{url}/callback", params=SEED.query, data=body) as response:
            await response.read()
            return response.status, response.headers.get("X-Bridge-Outcome", "none")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__, "none"


FAULT_KINDS = ("pause", "kill", "blackhole", "slow", "reset", "reset-produce", "broker-error")


async def _fault_loop(
    rng: random.Random, chain: Brokers, history: History, end: float, only: frozenset[str] | None = None
) -> None:
    """One fault at a time, healed before the next: a node paused or killed (one of three at most, so the
    cluster keeps its quorum and two in-sync replicas), or traffic through the proxies disturbed."""
    proxies = chain.proxies

    def pause() -> Callable[[], None]:
        node = rng.choice(chain.nodes)
        node.pause()
        return node.resume

    def kill_and_restart() -> Callable[[], None]:
        node = rng.choice(chain.nodes)
        assert isinstance(node, KafkaNode)
        node.kill()  # SIGKILL; its leaderships move to the others, and it comes back with its data

        def restart() -> None:
            node.launch()  # not waiting: it rejoins while the load goes on

        return restart

    def blackhole() -> Callable[[], None]:
        for proxy in proxies:
            proxy.set_blackhole(True)

        def heal() -> None:
            for proxy in proxies:
                proxy.set_blackhole(False)

        return heal

    def slow() -> Callable[[], None]:
        delay = rng.uniform(0.1, 1.5)
        for proxy in proxies:
            proxy.faults.response_delay_s = delay
        return heal_proxies

    def reset() -> Callable[[], None]:
        for proxy in proxies:
            proxy.reset_all()
        return heal_proxies

    def reset_produce() -> Callable[[], None]:
        faults = rng.choice(proxies).faults
        if rng.random() < 0.5:
            faults.reset_before_produce = rng.randint(1, 3)
        else:
            faults.reset_after_produce = rng.randint(1, 3)
        return heal_proxies

    def broker_error() -> Callable[[], None]:
        name = rng.choice(sorted(ERROR_CODES))
        history.faults[f"error {name}"] += 1
        faults = rng.choice(proxies).faults
        faults.produce_error = ERROR_CODES[name]
        faults.produce_error_times = rng.choice([1, 3, None])  # None: until healed
        return heal_proxies

    def heal_proxies() -> None:
        for proxy in proxies:
            proxy.faults.clear()

    kinds: dict[str, tuple[str, Callable[[], Callable[[], None]]]] = {
        "pause": ("pause a node (SIGSTOP)", pause),
        "blackhole": ("black-hole traffic", blackhole),
        "slow": ("slow answers", slow),
        "reset": ("reset connections", reset),
        "reset-produce": ("reset around a Produce", reset_produce),
        "broker-error": ("broker error", broker_error),
    }
    if all(isinstance(node, KafkaNode) for node in chain.nodes) and len(chain.nodes) > 1:
        kinds["kill"] = ("kill a node, restart it with its data", kill_and_restart)
    chosen = {name: fault for short, (name, fault) in kinds.items() if only is None or short in only}
    if not chosen:
        await asyncio.sleep(max(end - time.monotonic(), 0))
        return
    await asyncio.sleep(rng.uniform(0.3, 1.0))
    while time.monotonic() < end:
        name = rng.choice(sorted(chosen))
        if name != "broker error":
            history.faults[name] += 1
        heal = chosen[name]()
        await asyncio.sleep(min(rng.uniform(0.2, 2.0), max(end - time.monotonic(), 0)))
        heal()
        await asyncio.sleep(rng.uniform(0.2, 1.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and faults [60]")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients [16]")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule [1]")
    parser.add_argument("--delivery-timeout", type=float, default=1.0, help="the bridge's deadline [1.0]")
    parser.add_argument("--single", action="store_true", help="one broker node instead of a cluster of three")
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated fault kinds to inject, of {', '.join(FAULT_KINDS)}; 'none' for none [all]",
    )
    args = parser.parse_args(argv)
    cluster = not args.single
    faults = frozenset() if args.faults == "none" else frozenset(args.faults.split(","))
    if unknown := faults - set(FAULT_KINDS):
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    if cluster and not cluster_possible():
        parser.error("the three-node cluster needs Apache Kafka (java and mvn); use --single for Tansu")
    # The faults make aiokafka and the bridge log by the thousand; the table is the result.
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("bridge").setLevel(logging.CRITICAL)
    report = asyncio.run(
        run_chaos(
            args.duration, args.clients, args.seed, args.delivery_timeout, cluster=cluster, faults=faults
        )
    )
    print(f"broker: {'three Apache Kafka nodes' if cluster else broker_choice().description}")
    print(report.table())
    for key in report.missing[:20]:
        print(f"MISSING: {key} was answered 200", file=sys.stderr)
    for key in report.rejected_but_present[:20]:
        print(f"PRESENT: {key} was answered 4xx", file=sys.stderr)
    for key in report.failed_but_present[:20]:
        print(f"PRESENT: {key} was answered 503 'failed' (nothing written)", file=sys.stderr)
    return 1 if report.broken else 0


if __name__ == "__main__":
    sys.exit(main())
