"""The Kafka password rotates without a restart: SIGHUP, or a look at the file every `--reload-interval`,
puts the new one in use for the connections opened from then on.

Against the secured Apache Kafka node of `tests/support/kafka/secured.py`, with a SCRAM user of each test's
own: `bridge serve` writes with password A; the broker's password becomes B (`kafka-configs`, as an operator
would); the file gets B; the bridge is told (SIGHUP, or not at all with `--reload-interval`); the node is
restarted with its data, which forces every connection to log in again; callbacks get 200 and are in
Kafka. A bridge that was not told gets 503 after the same sequence, and a file that cannot be used keeps the
old password (and the metric says so). One node for the module: each test restarts it, none breaks it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from itertools import count
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.ingest.reload import FAILED, RELOADED, SASL_PASSWORD_FILE
from bridge.tools.embedded import free_port
from tests.support.kafka import jars
from tests.support.kafka.secured import SecuredKafkaNode, make_pki
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import start_serve, until_ready
from tests.support.settings import unique_settings

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(
        not jars.tools_present(), reason="the secured Apache Kafka needs java and mvn (tests/support/kafka)"
    ),
]

SEED = fixture("oa-after-send-text")
PASSWORD_A = "rotation-A-2026-11-pa55"  # noqa: S105 - the throwaway broker's users' passwords
PASSWORD_B = "rotation-B-2026-12-pa55"  # noqa: S105
MECHANISM = "SCRAM-SHA-256"
_users = count(1)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredKafkaNode]:
    """The module's secured node; a test may restart it (with its data), never leaves it down."""
    directory = tmp_path_factory.mktemp("rotation-kafka")
    with SecuredKafkaNode(directory / "node", make_pki(directory / "pki")) as secured:
        yield secured


async def new_user(node: SecuredKafkaNode, password: str) -> str:
    """A SCRAM user of the test's own, so that no test depends on another's rotation."""
    user = f"rotated-{os.getpid()}-{next(_users)}"
    await asyncio.to_thread(node.set_scram_password, user, password, MECHANISM)
    return user


async def restart(node: SecuredKafkaNode) -> None:
    """Kill the node and start it with its data: every connection to it has to log in again."""
    node.kill()
    node.launch()  # from the loop's thread, which outlives the JVM (see `KafkaNode.launch`)
    await asyncio.to_thread(node.wait_ready)


def write_atomically(path: Path, text: str) -> None:
    aside = path.with_name(path.name + ".new")
    aside.write_text(text)
    os.replace(aside, path)


class Bridge:
    """`bridge serve` logging in as `user` with the password in `password_file`, with an admin port."""

    def __init__(self, node: SecuredKafkaNode, directory: Path, user: str, password_file: Path, *flags: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.password_file = password_file
        self.names = unique_settings(node.bootstrap_servers)
        self.port, self.admin_port = free_port(), free_port()
        self.url, self.admin = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.admin_port}"
        self.log_path = directory / "serve.log"
        self.process: subprocess.Popen[bytes] = start_serve(
            ["--create-topics", "--partitions", "1", *flags],
            self.log_path,
            host="127.0.0.1",
            port=str(self.port),
            admin_port=str(self.admin_port),
            bootstrap_servers=node.address("SASL_PLAIN"),
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism=MECHANISM,
            sasl_username=user,
            sasl_password_file=str(password_file),
            topic=self.names.topic,
            rejected_topic=self.names.rejected_topic,
            delivery_timeout="2",
        )

    async def post(self, session: aiohttp.ClientSession, msg_key: str) -> int:
        body = orjson.dumps({**SEED.body, "MsgKey": msg_key})
        async with session.post(f"{self.url}/callback", params=SEED.query, data=body) as response:
            await response.read()
            return response.status

    async def readyz(self, session: aiohttp.ClientSession) -> tuple[int, str]:
        async with session.get(f"{self.admin}/readyz") as response:
            return response.status, (await response.json()).get("detail", "")

    async def reloads(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """`bridge_secret_reloads_total{source="sasl_password_file"}` by result."""
        async with session.get(f"{self.admin}/metrics") as response:
            text = await response.text()
        return {
            sample.labels["result"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "bridge_secret_reloads_total" and sample.labels["source"] == SASL_PASSWORD_FILE
        }

    async def until_counted(
        self, session: aiohttp.ClientSession, result: str, times: float
    ) -> dict[str, float]:
        async with asyncio.timeout(15):
            while (counts := await self.reloads(session)).get(result, 0) < times:
                await asyncio.sleep(0.05)
        return counts

    async def hang_up(self, session: aiohttp.ClientSession, result: str) -> dict[str, float]:
        """SIGHUP, and wait until the password file's reload counted `result` once more."""
        before = (await self.reloads(session))[result]
        self.process.send_signal(signal.SIGHUP)
        return await self.until_counted(session, result, before + 1)

    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@asynccontextmanager
async def bridges(*started: Bridge) -> AsyncIterator[aiohttp.ClientSession]:
    """A session to `started`, once each is ready; each is killed at the end."""
    try:
        async with aiohttp.ClientSession() as session:
            for bridge in started:
                await until_ready(session, bridge.admin, timeout=90)
            yield session
    finally:
        for bridge in started:
            bridge.kill()


async def answers_after_restart(bridge: Bridge, session: aiohttp.ClientSession, keys: list[str]) -> list[int]:
    """Once the bridge is ready again, the answers to a callback for each of `keys`."""
    await until_ready(session, bridge.admin, timeout=60)
    return [await bridge.post(session, key) for key in keys]


async def written_keys(node: SecuredKafkaNode, bridge: Bridge, expect: int) -> set[str]:
    """The keys of the records in the bridge's topic, read through the node's PLAINTEXT listener."""
    records = await read_records(node.bootstrap_servers, [bridge.names.topic], expect=expect)
    return {record.key.decode() for record in records if record.key is not None}


def assert_no_password(text: str) -> None:
    for password in (PASSWORD_A, PASSWORD_B):
        assert password not in text, "a password is in the log"


async def test_after_sighup_the_bridge_logs_in_with_the_new_password_and_one_not_told_gets_503(
    node: SecuredKafkaNode, tmp_path: Path
) -> None:
    """The broker's password A -> B, the file -> B, SIGHUP, the broker restarted: the bridge told writes
    with 200 (the records are in Kafka); the control, whose file still says A, answers 503 and is not
    ready, saying the authentication failed."""
    user = await new_user(node, PASSWORD_A)
    rotated_file, control_file = tmp_path / "rotated-password", tmp_path / "control-password"
    for path in (rotated_file, control_file):
        path.write_text(PASSWORD_A + "\n")
    rotated = Bridge(node, tmp_path / "rotated", user, rotated_file)
    control = Bridge(node, tmp_path / "control", user, control_file)
    async with bridges(rotated, control) as session:
        assert await rotated.post(session, "r-before") == 200
        assert await control.post(session, "c-before") == 200

        await asyncio.to_thread(node.set_scram_password, user, PASSWORD_B, MECHANISM)
        # Logged in already: the broker keeps both bridges' connections.
        assert await rotated.post(session, "r-changed") == 200
        assert await control.post(session, "c-changed") == 200
        write_atomically(rotated_file, PASSWORD_B + "\n")
        assert await rotated.hang_up(session, RELOADED) == {RELOADED: 1, FAILED: 0}
        assert await rotated.post(session, "r-reloaded") == 200  # its connections stayed

        await restart(node)
        assert await answers_after_restart(rotated, session, ["r-after-1", "r-after-2"]) == [200, 200]
        # The broker is back (the rotated bridge is ready): the control's new connections are refused.
        assert [await control.post(session, f"c-after-{n}") for n in range(2)] == [503, 503]
        async with asyncio.timeout(20):  # the probe tells why, once it has tried a new connection
            while "authentication failed" not in (detail := (await control.readyz(session))[1]):
                await asyncio.sleep(0.1)
        assert (await control.readyz(session))[0] == 503
        assert detail.startswith("Kafka refuses new connections: authentication failed"), detail
        assert rotated.process.poll() is None
        assert control.process.poll() is None

    confirmed = {"r-before", "r-changed", "r-reloaded", "r-after-1", "r-after-2"}
    assert await written_keys(node, rotated, len(confirmed)) == confirmed
    assert await written_keys(node, control, 2) == {"c-before", "c-changed"}  # none of its 503s
    assert "SIGHUP: sasl_password_file reloaded" in rotated.log()
    assert_no_password(rotated.log() + control.log())


async def test_with_reload_interval_a_kubernetes_style_swap_of_the_secret_is_read_without_a_signal(
    node: SecuredKafkaNode, tmp_path: Path
) -> None:
    """The password file is a link into `..data`, itself a link to a timestamped folder, as a Kubernetes
    Secret volume lays it out; the rotation writes a new folder and swaps `..data`. With
    `--reload-interval`, no SIGHUP: the bridge reads it once, and after the broker's restart writes with B."""
    user = await new_user(node, PASSWORD_A)
    volume = tmp_path / "secret"
    first = volume / "..2026_11_30_10_00_00.1"
    first.mkdir(parents=True)
    (first / "kafka-password").write_text(PASSWORD_A)
    (volume / "..data").symlink_to(first.name)
    (volume / "kafka-password").symlink_to("..data/kafka-password")

    bridge = Bridge(node, tmp_path / "bridge", user, volume / "kafka-password", "--reload-interval", "0.2")
    async with bridges(bridge) as session:
        assert await bridge.post(session, "before") == 200
        await asyncio.sleep(0.6)  # three looks at an unchanged file: nothing read
        assert await bridge.reloads(session) == {RELOADED: 0, FAILED: 0}

        await asyncio.to_thread(node.set_scram_password, user, PASSWORD_B, MECHANISM)
        second = volume / "..2026_12_01_10_00_00.2"
        second.mkdir()
        (second / "kafka-password").write_text(PASSWORD_B)
        (volume / "..data_tmp").symlink_to(second.name)
        os.replace(volume / "..data_tmp", volume / "..data")  # Kubernetes' atomic swap
        assert await bridge.until_counted(session, RELOADED, 1) == {RELOADED: 1, FAILED: 0}

        await restart(node)
        assert await answers_after_restart(bridge, session, ["after-1", "after-2"]) == [200, 200]
        await asyncio.sleep(0.6)
        assert await bridge.reloads(session) == {RELOADED: 1, FAILED: 0}  # read once, not at every look
        assert bridge.process.poll() is None

    assert await written_keys(node, bridge, 3) == {"before", "after-1", "after-2"}
    assert "the file changed (--reload-interval): sasl_password_file reloaded" in bridge.log()
    assert_no_password(bridge.log())


async def test_a_password_file_that_cannot_be_used_keeps_the_old_password_says_why_and_is_counted(
    node: SecuredKafkaNode, tmp_path: Path
) -> None:
    """Empty, then deleted: each SIGHUP logs one error naming the file, counts a failure, and the old
    password stays in use: after the broker's restart the bridge logs in with it and writes."""
    user = await new_user(node, PASSWORD_A)
    password_file = tmp_path / "kafka-password"
    password_file.write_text(PASSWORD_A + "\n")
    bridge = Bridge(node, tmp_path / "bridge", user, password_file)
    async with bridges(bridge) as session:
        write_atomically(password_file, "")
        assert await bridge.hang_up(session, FAILED) == {RELOADED: 0, FAILED: 1}
        password_file.unlink()
        assert await bridge.hang_up(session, FAILED) == {RELOADED: 0, FAILED: 2}

        await restart(node)
        assert await answers_after_restart(bridge, session, ["after-1", "after-2"]) == [200, 200]
        assert bridge.process.poll() is None

    assert await written_keys(node, bridge, 2) == {"after-1", "after-2"}
    errors = [line for line in bridge.log().splitlines() if "not reloaded, the old value stays" in line]
    assert len(errors) == 2
    assert all(f"--sasl-password-file {password_file}" in line for line in errors)
    assert "the file is empty" in errors[0]
    assert "No such file" in errors[1]
    assert_no_password(bridge.log())
