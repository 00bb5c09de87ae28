"""Restarts: a broker killed and brought back loses nothing acknowledged; the bridge stops gracefully.

The bridge runs as a real `bridge serve` process where signals matter; the broker is an Apache Kafka node
of the test's own, SIGKILLed and started again with its data where it must survive being killed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.ingest.server import create_app
from bridge.tools.embedded import free_port
from tests.support.broker import FaultBroker, fault_broker
from tests.support.kafka.nodes import KafkaNode
from tests.support.proxy import KafkaProxy
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import start_serve, until_ready, wait_until_ready
from tests.support.settings import unique_settings

pytestmark = pytest.mark.kafka  # starts brokers of its own

SEED = fixture("oa-after-send-text")


def callback(msg_key: str) -> bytes:
    return orjson.dumps({**SEED.body, "MsgKey": msg_key})


async def test_a_broker_killed_and_restarted_loses_no_acknowledged_callback(tmp_path: Path) -> None:
    broker = fault_broker(tmp_path)
    if not isinstance(broker, KafkaNode):
        pytest.skip("needs a broker that keeps its data across SIGKILL: Apache Kafka (java and mvn)")
    with broker:
        settings = unique_settings(broker.bootstrap_servers, delivery_timeout=1.0)
        answers: dict[str, int] = {}
        async with TestClient(TestServer(create_app(settings))) as client:
            await wait_until_ready(client)

            async def send(msg_key: str) -> None:
                response = await client.post("/callback", params=SEED.query, data=callback(msg_key))
                answers[msg_key] = response.status

            for n in range(5):
                await send(f"before-{n}")
            broker.kill()  # SIGKILL: no goodbye to anyone, no flush: the records are in the page cache
            await send("while-down")
            await asyncio.to_thread(broker.start)  # the same node, its log recovered from disk
            async with asyncio.timeout(30):
                while answers.get("after") != 200:
                    await send("after")
                    await asyncio.sleep(0.2)
            records = await read_records(broker.bootstrap_servers, [settings.topic], expect=6)
    landed = {record.key.decode() for record in records if record.key is not None}
    confirmed = {key for key, status in answers.items() if status == 200}
    assert {f"before-{n}" for n in range(5)} | {"after"} <= confirmed
    assert answers["while-down"] == 503
    assert confirmed <= landed, f"answered 200 but missing: {confirmed - landed}"


class ServeProcess:
    """`bridge serve` in a process of its own, against a proxy in front of a broker of the test's own."""

    def __init__(self, bootstrap_servers: str, log_path: Path, **flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["--bootstrap-servers", bootstrap_servers, "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--create-topics", "--topic", f"shutdown-{self.port}"]
        self.process = start_serve(args, log_path, **flags)

    async def ready(self, session: aiohttp.ClientSession) -> None:
        await until_ready(session, self.url, timeout=30)

    async def post(self, session: aiohttp.ClientSession, msg_key: str) -> int | str:
        try:
            async with session.post(
                f"{self.url}/callback", params=SEED.query, data=callback(msg_key)
            ) as response:
                return response.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async def exit_code(self, within_s: float) -> int | None:
        async with asyncio.timeout(within_s):
            while self.process.poll() is None:
                await asyncio.sleep(0.05)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[tuple[FaultBroker, KafkaProxy]]:
    proxy_port = free_port()
    with fault_broker(tmp_path / "kafka", advertised_port=proxy_port) as broker:
        proxy = await KafkaProxy(broker.port, proxy_port).start()
        try:
            yield broker, proxy
        finally:
            await proxy.close()


@pytest.fixture
def serve_log(tmp_path: Path) -> Path:
    return tmp_path / "serve.log"


async def test_sigterm_answers_callbacks_in_flight_refuses_late_ones_with_503_and_exits_0(
    chain: tuple[FaultBroker, KafkaProxy], serve_log: Path
) -> None:
    _, proxy = chain
    bridge = ServeProcess(proxy.bootstrap_servers, serve_log, delivery_timeout="5", shutdown_delay="0.5")
    try:
        async with aiohttp.ClientSession() as session:
            await bridge.ready(session)
            proxy.faults.response_delay_s = 2.0  # every write takes two seconds to be confirmed
            in_flight = [asyncio.create_task(bridge.post(session, f"in-flight-{n}")) for n in range(3)]
            await asyncio.sleep(0.3)
            bridge.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            async with session.get(f"{bridge.url}/readyz") as response:
                assert response.status == 503, "not ready at once after SIGTERM"
            await asyncio.sleep(0.7)  # past --shutdown-delay, before the writes are confirmed
            late = await bridge.post(session, "late")
            assert await asyncio.gather(*in_flight) == [200, 200, 200]
            assert late == 503
            assert await bridge.exit_code(within_s=0.5 + 5 + 10 + 2) == 0
        proxy.faults.clear()
        records = await read_records(proxy.bootstrap_servers, [f"shutdown-{bridge.port}"], expect=3)
        assert sorted(r.key for r in records) == [b"in-flight-0", b"in-flight-1", b"in-flight-2"]
    finally:
        bridge.kill()
    assert "Traceback" not in await asyncio.to_thread(serve_log.read_text)


async def test_sigterm_with_the_broker_paused_answers_503_and_exits_0_within_its_budget(
    chain: tuple[FaultBroker, KafkaProxy], serve_log: Path
) -> None:
    broker, proxy = chain
    bridge = ServeProcess(proxy.bootstrap_servers, serve_log, delivery_timeout="2", shutdown_timeout="3")
    try:
        async with aiohttp.ClientSession() as session:
            await bridge.ready(session)
            broker.pause()
            try:
                in_flight = [asyncio.create_task(bridge.post(session, f"paused-{n}")) for n in range(3)]
                await asyncio.sleep(0.3)
                started = time.monotonic()
                bridge.process.send_signal(signal.SIGTERM)
                assert await asyncio.gather(*in_flight) == [503, 503, 503]
                assert await bridge.exit_code(within_s=2 + 3 + 3) == 0
                assert time.monotonic() - started < 2 + 3 + 2
            finally:
                broker.resume()
    finally:
        bridge.kill()


async def test_a_bridge_killed_mid_request_never_said_200_for_a_record_that_is_absent(
    chain: tuple[FaultBroker, KafkaProxy], serve_log: Path
) -> None:
    _, proxy = chain
    bridge = ServeProcess(proxy.bootstrap_servers, serve_log, delivery_timeout="5")
    answers: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:
            await bridge.ready(session)
            for n in range(5):
                answers[f"early-{n}"] = await bridge.post(session, f"early-{n}")
            proxy.faults.response_delay_s = 1.0
            keys = [f"killed-{n}" for n in range(5)]
            pending = [asyncio.create_task(bridge.post(session, key)) for key in keys]
            await asyncio.sleep(0.4)
            bridge.kill()  # SIGKILL mid-request
            answers.update(zip(keys, await asyncio.gather(*pending), strict=True))
        proxy.faults.clear()
        records = await read_records(proxy.bootstrap_servers, [f"shutdown-{bridge.port}"], expect=5)
    finally:
        bridge.kill()
    landed = {record.key.decode() for record in records if record.key is not None}
    assert all(answers[f"killed-{n}"] != 200 for n in range(5)), answers
    confirmed = {key for key, answer in answers.items() if answer == 200}
    assert confirmed == {f"early-{n}" for n in range(5)}
    assert confirmed <= landed
