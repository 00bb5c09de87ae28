"""The history check: concurrent clients send callbacks while faults hit the broker; then every answer is
checked against what Kafka holds.

Every 200'd key must be in Kafka; no 4xx'd key may be; 503s are counted by whether they landed anyway.
Clients retry some 503s with the same key, as Tencent does after a timeout. Run it as:

    .venv/bin/python -m tests.chaos --duration 60 --clients 16 --seed 1

It prints a table and exits 1 if the history breaks the guarantee.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bridge.embedded import EmbeddedBroker, free_port
from bridge.server import OUTCOMES, PUBLISHER, create_app
from tests.proxy import KafkaProxy
from tests.support import fixture, read_records, unique_settings

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
            *((f"fault {name}", str(count)) for name, count in sorted(self.faults.items())),
            ("verdict", "BROKEN" if self.broken else "every 200 is in Kafka, no 4xx is"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"| {name:<{width}} | {value} |" for name, value in rows)


async def run_chaos(duration_s: float, clients: int, seed: int, delivery_timeout_s: float = 1.0) -> Report:
    rng = random.Random(seed)
    history = History()
    proxy_port = free_port()
    with EmbeddedBroker(advertised_port=proxy_port) as broker:
        proxy = await KafkaProxy(broker.port, proxy_port).start()
        settings = unique_settings(proxy.bootstrap_servers, delivery_timeout=delivery_timeout_s)
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
                    _fault_loop(rng, broker, proxy, history, end),
                    *(
                        _client(n, random.Random(seed * 1000 + n), session, url, history, end)
                        for n in range(clients)
                    ),
                )
                elapsed = time.monotonic() - started
                broker.resume()
                proxy.faults.clear()
                proxy.set_blackhole(False)
                publisher = app[PUBLISHER]
                async with asyncio.timeout(60):  # let every record answered 503 settle one way or the other
                    while publisher.abandoned:
                        await asyncio.sleep(0.1)
                confirmed = sum(200 in answers for answers in history.answers.values())
                records = await read_records(
                    proxy.bootstrap_servers, [settings.topic], expect=confirmed, idle_s=2
                )
                outcomes = app[OUTCOMES].snapshot()
        finally:
            await runner.cleanup()
            await proxy.close()
    return _judge(history, records, outcomes, elapsed)


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


async def _fault_loop(
    rng: random.Random, broker: EmbeddedBroker, proxy: KafkaProxy, history: History, end: float
) -> None:
    faults = proxy.faults

    def pause() -> Callable[[], None]:
        broker.pause()
        return broker.resume

    def blackhole() -> Callable[[], None]:
        proxy.set_blackhole(True)
        return lambda: proxy.set_blackhole(False)

    def slow() -> Callable[[], None]:
        faults.response_delay_s = rng.uniform(0.1, 1.5)
        return faults.clear

    def reset() -> Callable[[], None]:
        proxy.reset_all()
        return faults.clear

    def reset_produce() -> Callable[[], None]:
        if rng.random() < 0.5:
            faults.reset_before_produce = rng.randint(1, 3)
        else:
            faults.reset_after_produce = rng.randint(1, 3)
        return faults.clear

    def broker_error() -> Callable[[], None]:
        name = rng.choice(sorted(ERROR_CODES))
        history.faults[f"error {name}"] += 1
        faults.produce_error = ERROR_CODES[name]
        faults.produce_error_times = rng.choice([1, 3, None])  # None: until healed
        return faults.clear

    kinds: dict[str, Callable[[], Callable[[], None]]] = {
        "pause broker (SIGSTOP)": pause,
        "black-hole traffic": blackhole,
        "slow answers": slow,
        "reset connections": reset,
        "reset around a Produce": reset_produce,
        "broker error": broker_error,
    }
    await asyncio.sleep(rng.uniform(0.3, 1.0))
    while time.monotonic() < end:
        name = rng.choice(sorted(kinds))
        if name != "broker error":
            history.faults[name] += 1
        heal = kinds[name]()
        await asyncio.sleep(min(rng.uniform(0.2, 2.0), max(end - time.monotonic(), 0)))
        heal()
        await asyncio.sleep(rng.uniform(0.2, 1.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and faults [60]")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients [16]")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule [1]")
    parser.add_argument("--delivery-timeout", type=float, default=1.0, help="the bridge's deadline [1.0]")
    args = parser.parse_args(argv)
    # The faults make aiokafka and the bridge log by the thousand; the table is the result.
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("bridge").setLevel(logging.CRITICAL)
    report = asyncio.run(run_chaos(args.duration, args.clients, args.seed, args.delivery_timeout))
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
