"""Every Kafka client of the bridge connects through SASL and TLS to a real Apache Kafka; refusals are told.

One node (tests/support/kafka/secured.py) has SASL_PLAINTEXT and SASL_SSL listeners with PLAIN, SCRAM-SHA-256
and SCRAM-SHA-512, a TLS listener and a mutual-TLS one, with a throwaway CA. `serve` (producer, admin client,
leader check), `consume`, `replay` (the reader and the topic sink) and `topics ensure` work through them; a
wrong password, an unknown CA and a missing client certificate each give one clear line and a bridge that
stays up, not ready; and neither the password nor a private key shows in any log line at debug level. The
tests put records in and read them back through the node's PLAINTEXT listener.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.errors import CommandError
from bridge.ingest.server import create_app
from bridge.readback.consume import run_consume
from bridge.readback.replay import run_replay
from bridge.secret import Secret
from bridge.settings import ConsumeSettings, ReplaySettings, ServeSettings
from tests.support.kafka import jars
from tests.support.kafka.secured import PASSWORD, SecuredKafkaNode, connection_settings, make_pki
from tests.support.readback import ACCOUNTS, Posted, Receiver, message, post_all, post_through_a_bridge
from tests.support.records import create_topic, read_records
from tests.support.serve import one_line_error, run_bridge, wait_until_ready
from tests.support.settings import reading, unique_settings

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(
        not jars.tools_present(), reason="the secured Apache Kafka needs java and mvn (tests/support/kafka)"
    ),
]

WRONG_PASSWORD = "Wr0ng-Pa55-not-to-be-logged"  # noqa: S105 - a test value, to search the logs for
SUCCESS_KINDS = [
    "SASL_PLAIN/PLAIN",
    "SASL_PLAIN/SCRAM-SHA-256",
    "SASL_PLAIN/SCRAM-SHA-512",
    "SASL_TLS/PLAIN",
    "SASL_TLS/SCRAM-SHA-256",
    "SASL_TLS/SCRAM-SHA-512",
    "TLS",
    "MTLS",
]
FAILURES = {
    # kind, what changes, the words the error must have
    "wrong PLAIN password": ("SASL_PLAIN/PLAIN", "password", "authentication failed"),
    "wrong SCRAM password": ("SASL_TLS/SCRAM-SHA-256", "password", "authentication failed"),
    "unknown CA": ("TLS", "ca", "certificate verify failed"),
    "no client certificate": ("MTLS", "no certificate", "requires a client certificate"),
}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredKafkaNode]:
    """One node with every listener, for the whole module: a JVM start is the costly part."""
    directory = tmp_path_factory.mktemp("secured-kafka")
    with SecuredKafkaNode(directory / "node", make_pki(directory / "pki")) as node:
        yield node


def secured_fields(node: SecuredKafkaNode, kind: str, change: str | None = None) -> dict[str, object]:
    fields = connection_settings(node, kind)
    if change == "password":
        fields["sasl_password"] = Secret(WRONG_PASSWORD)
    elif change == "ca":
        fields["ssl_cafile"] = str(node.pki.other_ca)
    elif change == "no certificate":
        fields["ssl_certfile"] = fields["ssl_keyfile"] = None
    return fields


def secured_settings(node: SecuredKafkaNode, kind: str, change: str | None = None) -> ServeSettings:
    """ServeSettings of unique topics, connecting through the listener `kind` names."""
    fields = secured_fields(node, kind, change)
    return replace(unique_settings(node.bootstrap_servers), **fields)  # type: ignore[arg-type]


def secured_flags(node: SecuredKafkaNode, kind: str, tmp_path: Path, change: str | None = None) -> list[str]:
    """The command-line flags of `secured_fields`; the password from a file, as a container secret."""
    flags = []
    for name, value in secured_fields(node, kind, change).items():
        if value is None:
            continue
        if isinstance(value, tuple):
            flags += [f"--{name.replace('_', '-')}", ",".join(value)]
        elif isinstance(value, Secret):
            password_file = tmp_path / "kafka-password"
            password_file.write_text(value.reveal() + "\n")
            flags += ["--sasl-password-file", str(password_file)]
        else:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def assert_no_secret(text: str, node: SecuredKafkaNode) -> None:
    """Neither password nor any line of a private key is in `text`."""
    for secret in (PASSWORD, WRONG_PASSWORD, *node.pki.secret_texts):
        assert secret not in text, f"a secret is in the log: {secret[:6]}..."


def publisher_lines(log: io.StringIO, words: str) -> list[dict[str, str]]:
    """The publisher's log lines about a failure to connect, saying `words`."""
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    return [line for line in lines if line["logger"] == "bridge.publisher" and words in line["message"]]


def callbacks(count: int) -> list[Posted]:
    return [message(0, minute, ACCOUNTS[minute % 3], minute) for minute in range(count)]


# --- serve ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SUCCESS_KINDS)
async def test_serve_writes_callbacks_through_each_secured_listener_and_logs_no_secret(
    kind: str, secured: SecuredKafkaNode, debug_log: io.StringIO
) -> None:
    """The producer, the admin client creating the topics and the leader check all connect securely."""
    settings = secured_settings(secured, kind)
    posted = callbacks(3)
    async with TestClient(TestServer(create_app(settings))) as client:
        await wait_until_ready(client)
        await post_all(client, posted)
    records = await read_records(secured.bootstrap_servers, [settings.topic], expect=len(posted))
    assert sorted(record.key for record in records) == sorted(p.key.encode() for p in posted if p.key)
    log = debug_log.getvalue()
    assert "connected to Kafka at " + secured.address(kind.partition("/")[0]) in log
    assert_no_secret(log, secured)


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_serve_refused_by_the_broker_stays_up_not_ready_saying_why(
    failure: str, secured: SecuredKafkaNode, debug_log: io.StringIO
) -> None:
    """/readyz is 503 with the cause, /healthz 200, a callback 503 (never 200); one warning however many
    attempts, and no traceback."""
    kind, change, words = FAILURES[failure]
    settings = secured_settings(secured, kind, change)
    async with TestClient(TestServer(create_app(settings))) as client:
        async with asyncio.timeout(20):
            while True:
                response = await client.get("/readyz")
                detail = (await response.json())["detail"]
                assert response.status == 503, detail
                if words in detail:
                    break
                await asyncio.sleep(0.05)
        assert detail.startswith(f"cannot reach Kafka at {secured.address(kind.partition('/')[0])}: ")
        assert (await client.get("/healthz")).status == 200
        callback = callbacks(1)[0]
        answer = await client.post("/callback", params=callback.query, data=orjson.dumps(callback.body))
        assert answer.status == 503
        async with asyncio.timeout(20):  # a second attempt, refused alike, is logged at debug only
            while len(told := publisher_lines(debug_log, words)) < 2:
                await asyncio.sleep(0.05)
    assert [line["level"] for line in told] == ["warning"] + ["debug"] * (len(told) - 1), told
    lines = [json.loads(line) for line in debug_log.getvalue().splitlines()]
    assert not [line for line in lines if "exception" in line or "Traceback" in line["message"]]
    assert_no_secret(debug_log.getvalue(), secured)


# --- consume, replay, topics ensure -------------------------------------------------------------------------


@pytest.fixture
async def filled(secured: SecuredKafkaNode) -> ServeSettings:
    """Plaintext settings of new topics, the official-account one holding six callbacks."""
    settings = unique_settings(secured.bootstrap_servers)
    await post_through_a_bridge(settings, callbacks(6))
    return settings


@pytest.mark.parametrize("kind", ["SASL_TLS/SCRAM-SHA-512", "MTLS"])
async def test_consume_reads_through_a_secured_listener(
    kind: str, secured: SecuredKafkaNode, filled: ServeSettings, tmp_path: Path
) -> None:
    result = await asyncio.to_thread(
        run_bridge, "consume", *secured_flags(secured, kind, tmp_path), "--topic", filled.topic,
        "--from-beginning",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    keys = sorted(orjson.loads(line)["callback"]["MsgKey"] for line in result.stdout.splitlines())
    assert keys == sorted(p.key for p in callbacks(6) if p.key)


@pytest.mark.parametrize("kind", ["SASL_PLAIN/SCRAM-SHA-256", "MTLS"])
async def test_replay_reads_and_writes_a_topic_through_a_secured_listener(
    kind: str, secured: SecuredKafkaNode, filled: ServeSettings, tmp_path: Path
) -> None:
    destination = f"{filled.topic}.copy"
    await create_topic(secured.bootstrap_servers, destination, 3)
    result = await asyncio.to_thread(
        run_bridge, "replay", *secured_flags(secured, kind, tmp_path), "--topic", filled.topic,
        "--to-topic", destination,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    copied = await read_records(secured.bootstrap_servers, [destination], expect=6)
    assert sorted(r.key for r in copied) == sorted(p.key.encode() for p in callbacks(6) if p.key)


async def test_replay_to_a_url_reads_through_a_secured_listener(
    secured: SecuredKafkaNode, filled: ServeSettings, receiver: Receiver, tmp_path: Path
) -> None:
    result = await asyncio.to_thread(
        run_bridge, "replay", *secured_flags(secured, "TLS", tmp_path), "--topic", filled.topic,
        "--to-url", receiver.url(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    keys = sorted(orjson.loads(body)["MsgKey"] for _, body in receiver.received)
    assert keys == sorted(p.key for p in callbacks(6) if p.key)


def topic_flags(settings: ServeSettings) -> list[str]:
    return [
        "--partitions", "2", "--topic", settings.topic, "--c2c-topic", settings.c2c_topic,
        "--group-topic", settings.group_topic, "--user-topic", settings.user_topic,
        "--app-topic", settings.app_topic, "--unknown-topic", settings.unknown_topic,
        "--rejected-topic", settings.rejected_topic,
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["SASL_TLS/PLAIN", "MTLS"])
async def test_topics_ensure_creates_and_checks_topics_through_a_secured_listener(
    kind: str, secured: SecuredKafkaNode, tmp_path: Path
) -> None:
    settings = unique_settings(secured.bootstrap_servers)
    flags = [*secured_flags(secured, kind, tmp_path), *topic_flags(settings), "--log-level", "debug"]
    created = await asyncio.to_thread(run_bridge, "topics", "ensure", *flags)
    assert created.returncode == 0, created.stderr
    assert created.stdout.count(": created with 2 partitions") == len(settings.topics)
    again = await asyncio.to_thread(run_bridge, "topics", "ensure", *flags)  # DescribeConfigs, securely
    assert (again.returncode, again.stdout.count(": ok\n")) == (0, len(settings.topics)), again.stdout
    assert_no_secret(created.stderr + again.stderr, secured)


@pytest.mark.parametrize("command", ["consume", "replay", "topics ensure"])
@pytest.mark.parametrize("failure", list(FAILURES))
async def test_a_command_refused_by_the_broker_exits_3_with_one_line_naming_the_cause(
    command: str, failure: str, secured: SecuredKafkaNode, tmp_path: Path
) -> None:
    kind, change, words = FAILURES[failure]
    settings = unique_settings(secured.bootstrap_servers)
    arguments = {
        "consume": ["--topic", settings.topic, "--from-beginning"],
        "replay": ["--topic", settings.topic, "--to-topic", f"{settings.topic}.copy"],
        "topics ensure": topic_flags(settings),
    }[command]
    result = await asyncio.to_thread(
        run_bridge, *command.split(), *secured_flags(secured, kind, tmp_path, change), *arguments
    )
    assert result.returncode == 3, result.stderr
    line = one_line_error(result)
    assert line.startswith(f"bridge {command}: ")
    assert words in line
    assert_no_secret(result.stderr + result.stdout, secured)


@pytest.mark.parametrize("change", [None, "password"], ids=["right password", "wrong password"])
@pytest.mark.parametrize("command", ["consume", "replay"])
def test_consume_and_replay_log_no_password_at_debug(
    command: str,
    change: str | None,
    secured: SecuredKafkaNode,
    filled: ServeSettings,
    debug_log: io.StringIO,
    tmp_path: Path,
) -> None:
    """PLAIN over SASL_PLAINTEXT: the password crosses the wire as is, and aiokafka logs each request."""
    source = replace(secured_settings(secured, "SASL_PLAIN/PLAIN", change), topic=filled.topic)
    try:
        if command == "consume":
            status = run_consume(
                reading(ConsumeSettings, source, from_beginning=True, output=str(tmp_path / "out.jsonl"))
            )
        else:
            copy, skipped = str(tmp_path / "copy.jsonl"), str(tmp_path / "skipped.jsonl")
            status = run_replay(reading(ReplaySettings, source, to_file=copy, skipped=skipped))
    except CommandError as exc:
        status = exc.exit_status
    assert status == (0 if change is None else 3)
    assert "aiokafka" in debug_log.getvalue()  # aiokafka's loggers did log, at debug
    assert_no_secret(debug_log.getvalue(), secured)
