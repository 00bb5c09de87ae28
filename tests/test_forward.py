"""Forward mode: each accepted callback also goes to the app's own server, and Tencent gets the answer the
README's table says, for every combination of the Kafka write and the forward.

The app server is real HTTP on 127.0.0.1 (`tests.support.app_server`); the write-ok rows run against
Apache Kafka, the write-failed rows on a publisher whose broker refuses the write, and the write-timed-out
rows (a paused broker) in `test_before_callbacks.py`."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.errors import BrokerRejected
from bridge.ingest.forward import DECISION_SCHEMA
from bridge.ingest.reload import FAILED, FORWARD_URL_FILE, RELOADED
from bridge.ingest.server import FORWARDER, RELOADER, create_app
from bridge.secret import Secret
from bridge.settings import ServeSettings, SettingsError, build
from bridge.settings.values import forward_url, forward_url_file
from bridge.tencent.protocol import OK_BODY
from tests.conftest import BridgeClient
from tests.support.app_server import ALLOW, DENY, ERROR_BODY, MODIFY, AppServer, down_url
from tests.support.fakes import FakePublisher
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import run_bridge, wait_until_ready
from tests.support.settings import NO_BROKER, unique_settings

TOKEN = "forward-test-token"  # noqa: S105 (a test token, signs test callbacks only)
BEFORE_DEADLINE_S = 0.5
FORWARD_TIMEOUT_S = 0.3
C2C = fixture("c2c-after-send")


def c2c(command: str, msg_key: str) -> tuple[str, bytes]:
    """A signed one-to-one message callback of `command`: its raw query (Sign and RequestTime included)
    and its body, spaced as no serializer would, so byte-for-byte means something."""
    request_time = str(int(time.time()))
    sign = hashlib.sha256((TOKEN + request_time).encode()).hexdigest()
    query = urlencode({**C2C.query, "CallbackCommand": command, "RequestTime": request_time, "Sign": sign})
    body = {**C2C.body, "CallbackCommand": command, "MsgKey": msg_key}
    return query, orjson.dumps(body).replace(b",", b", ")


def forward_settings(bootstrap_servers: str, url: str, **overrides: Any) -> ServeSettings:
    return unique_settings(
        bootstrap_servers,
        forward_url=url,
        forward_timeout=FORWARD_TIMEOUT_S,
        before_callback_timeout=BEFORE_DEADLINE_S,
        callback_token=(Secret(TOKEN),),
        **overrides,
    )


async def post(client: BridgeClient, query: str, body: bytes) -> tuple[int, bytes, dict[str, str], float]:
    started = time.monotonic()
    response = await client.post(f"/callback?{query}", data=body)
    answer = await response.read()
    return response.status, answer, dict(response.headers), time.monotonic() - started


async def bridge_for(settings: ServeSettings, publisher: FakePublisher | None = None) -> BridgeClient:
    client: BridgeClient = TestClient(TestServer(create_app(settings, publisher)))
    await client.start_server()
    if publisher is None:
        await wait_until_ready(client)
    return client


BEFORE = "C2C.CallbackBeforeSendMsg"
AFTER = "C2C.CallbackAfterSendMsg"


# --- the write confirmed (Apache Kafka) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "answer"),
    [("allow", ALLOW), ("deny", DENY), ("modify", MODIFY)],
    ids=["allow", "deny", "modify"],
)
async def test_a_before_callback_is_answered_with_the_app_servers_decision_once_written(
    kafka: str, app_server: AppServer, behaviour: str, answer: dict[str, Any]
) -> None:
    """Allow, deny (ErrorCode 1) and modify (a changed MsgBody) reach Tencent as the app server sent them,
    the app server got the query (Sign included) and the body byte for byte, and Kafka holds the callback
    and then, on the same partition, the app's decision."""
    settings = forward_settings(kafka, app_server.url(behaviour))
    query, body = c2c(BEFORE, f"before-{behaviour}")
    client = await bridge_for(settings)
    try:
        status, answered, headers, _ = await post(client, query, body)
    finally:
        await client.close()
    assert status == 200
    assert orjson.loads(answered) == answer
    assert headers["X-Bridge-Forward"] == "200"
    assert headers["X-Bridge-Decision"] == "written"
    assert headers["X-Bridge-Outcome"] == "confirmed"
    [got] = app_server.received
    assert (got.raw_query, got.body) == (query, body)
    assert "Sign=" in got.raw_query
    assert "RequestTime=" in got.raw_query
    callback, decision = await read_records(kafka, [settings.c2c_topic], expect=2)
    assert orjson.loads(callback.value)["callback"] == orjson.loads(body)
    assert dict(decision.headers)["bridge-record"] == b"app-decision"
    assert dict(decision.headers)["decision-of"] == BEFORE.encode()
    assert "CallbackCommand" not in dict(decision.headers)
    assert (decision.partition, decision.key) == (callback.partition, callback.key)
    assert decision.offset > callback.offset
    value = orjson.loads(decision.value)
    assert value["schema"] == DECISION_SCHEMA
    assert (value["command"], value["status"], value["answer"]) == (BEFORE, 200, answer)


async def test_sighup_reads_the_forward_url_file_again_and_the_next_forwards_follow_it(
    kafka: str, app_server: AppServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A URL with credentials lives in `--forward-url-file`: a reload (what SIGHUP runs) points the next
    forwards at the file's new URL; a file that is not a URL keeps the old one; no credential is logged."""
    url_file = tmp_path / "forward-url"
    with_password = app_server.url("allow").replace("http://", "http://moderator:s3cret-pw@", 1)
    url_file.write_text(with_password + "\n")
    settings = replace(
        forward_settings(kafka, app_server.url("allow")),
        forward_url=None,
        forward_url_file=forward_url_file(str(url_file)),
    )
    assert "s3cret-pw" not in repr(settings)
    client = await bridge_for(settings)
    try:
        status, answered, _, _ = await post(client, *c2c(BEFORE, "reload-0"))
        assert (status, orjson.loads(answered)) == (200, ALLOW)
        url_file.write_text(app_server.url("deny").replace("http://", "http://moderator:n3w-pw@", 1))
        with caplog.at_level(logging.INFO, logger="bridge.reload"):
            client.app[RELOADER].reload()
        status, answered, _, _ = await post(client, *c2c(BEFORE, "reload-1"))
        assert (status, orjson.loads(answered)) == (200, DENY)
        url_file.write_text("not a url\n")
        with caplog.at_level(logging.INFO, logger="bridge.reload"):
            client.app[RELOADER].reload()
        status, answered, _, _ = await post(client, *c2c(BEFORE, "reload-2"))
        assert (status, orjson.loads(answered)) == (200, DENY), "the last good URL stays in use"
        counts = client.app[RELOADER].counts
        assert (counts[FORWARD_URL_FILE, RELOADED], counts[FORWARD_URL_FILE, FAILED]) == (1, 1)
    finally:
        await client.close()
    assert [got.authorization for got in app_server.received] == [
        "moderator:s3cret-pw",
        *["moderator:n3w-pw"] * 2,
    ]
    assert "pw" not in caplog.text
    assert str(url_file) in caplog.text


def test_a_forward_url_and_a_forward_url_file_are_refused_together(tmp_path: Path) -> None:
    url_file = tmp_path / "forward-url"
    url_file.write_text("http://127.0.0.1:9/tencent\n")
    with pytest.raises(SettingsError, match="not both"):
        build(
            "serve",
            {},
            {"BRIDGE_FORWARD_URL": "http://127.0.0.1:9/tencent", "BRIDGE_FORWARD_URL_FILE": str(url_file)},
        )


async def test_consume_passes_over_the_app_decisions_and_prints_only_the_callbacks(
    kafka: str, app_server: AppServer
) -> None:
    """A decision record shares its callback's topic: `bridge consume` (the reader) prints the callbacks
    only, without a warning or a bad record for the decisions, and says how many it passed over."""
    settings = forward_settings(kafka, app_server.url("allow"))
    client = await bridge_for(settings)
    try:
        for number in range(2):
            status, _, headers, _ = await post(client, *c2c(BEFORE, f"consumed-{number}"))
            assert (status, headers["X-Bridge-Decision"]) == (200, "written")
    finally:
        await client.close()
    assert len(await read_records(kafka, [settings.c2c_topic], expect=4)) == 4
    result = await asyncio.to_thread(
        run_bridge, "consume", "--bootstrap-servers", kafka, "--topic", settings.c2c_topic, "--from-beginning"
    )
    assert result.returncode == 0, result.stderr
    printed = [orjson.loads(line)["callback"]["MsgKey"] for line in result.stdout.splitlines()]
    assert printed == ["consumed-0", "consumed-1"]
    assert "0 bad records" in result.stderr
    assert "2 app decisions passed over" in result.stderr
    assert "not a callback" not in result.stderr


async def test_a_before_callback_relays_the_app_servers_5xx_as_a_502_with_its_body(
    kafka: str, app_server: AppServer
) -> None:
    """An app server's 500 goes to Tencent as a 502 with the app's body as it is (Tencent lets the action
    proceed, as without the bridge, and the bridge never answers 500); the callback is in Kafka."""
    settings = forward_settings(kafka, app_server.url("error"))
    client = await bridge_for(settings)
    try:
        status, answered, headers, _ = await post(client, *c2c(BEFORE, "before-error"))
    finally:
        await client.close()
    assert (status, answered) == (502, ERROR_BODY)
    assert headers["X-Bridge-Forward"] == "500"
    assert headers["X-Bridge-Outcome"] == "confirmed"
    assert len(await read_records(kafka, [settings.c2c_topic], expect=2)) == 2  # the 500 is a decision


@pytest.mark.parametrize("command", [BEFORE, AFTER])
async def test_a_slow_app_server_is_a_504_within_the_deadline_and_the_callback_is_written(
    kafka: str, app_server: AppServer, command: str
) -> None:
    settings = forward_settings(kafka, app_server.url("slow"))
    client = await bridge_for(settings)
    try:
        status, answered, headers, elapsed = await post(client, *c2c(command, f"slow-{command}"))
    finally:
        await client.close()
    assert status == 504
    assert orjson.loads(answered)["ErrorCode"] == 50401
    assert "written to Kafka, but not forwarded" in orjson.loads(answered)["ErrorInfo"]
    assert headers["X-Bridge-Forward"] == "timeout"
    assert headers["X-Bridge-Outcome"] == "confirmed"
    assert elapsed < min(BEFORE_DEADLINE_S, FORWARD_TIMEOUT_S) + 0.4
    assert len(await read_records(kafka, [settings.c2c_topic], expect=1)) == 1


@pytest.mark.parametrize("command", [BEFORE, AFTER])
async def test_a_down_app_server_is_a_502_and_the_callback_is_written(kafka: str, command: str) -> None:
    settings = forward_settings(kafka, down_url())
    client = await bridge_for(settings)
    try:
        status, answered, headers, _ = await post(client, *c2c(command, f"down-{command}"))
    finally:
        await client.close()
    assert status == 502
    assert orjson.loads(answered)["ErrorCode"] == 50201
    assert headers["X-Bridge-Forward"] == "unreachable"
    assert headers["X-Bridge-Outcome"] == "confirmed"
    assert len(await read_records(kafka, [settings.c2c_topic], expect=1)) == 1


@pytest.mark.parametrize("behaviour", ["allow", "deny", "modify"])
async def test_an_after_callback_is_answered_ok_once_written_and_forwarded(
    kafka: str, app_server: AppServer, behaviour: str
) -> None:
    """Tencent ignores an after-callback's ErrorCode: any 200 of the app server is a forward done."""
    settings = forward_settings(kafka, app_server.url(behaviour))
    query, body = c2c(AFTER, f"after-{behaviour}")
    client = await bridge_for(settings)
    try:
        status, answered, headers, _ = await post(client, query, body)
    finally:
        await client.close()
    assert (status, answered) == (200, OK_BODY)
    assert headers["X-Bridge-Forward"] == "200"
    assert "X-Bridge-Decision" not in headers
    assert [(r.raw_query, r.body) for r in app_server.received] == [(query, body)]
    [record] = await read_records(kafka, [settings.c2c_topic], expect=1)
    assert "bridge-record" not in dict(record.headers)


async def test_an_after_callback_the_app_server_answers_500_is_a_502_saying_so(
    kafka: str, app_server: AppServer
) -> None:
    settings = forward_settings(kafka, app_server.url("error"))
    client = await bridge_for(settings)
    try:
        status, answered, headers, _ = await post(client, *c2c(AFTER, "after-error"))
    finally:
        await client.close()
    assert status == 502
    fail = orjson.loads(answered)
    assert (fail["ActionStatus"], fail["ErrorCode"]) == ("FAIL", 50202)
    assert "written to Kafka, but the app server answered 500" in fail["ErrorInfo"]
    assert headers["X-Bridge-Forward"] == "500"
    assert len(await read_records(kafka, [settings.c2c_topic], expect=1)) == 1


async def test_a_duplicate_is_forwarded_again_but_written_once(kafka: str, app_server: AppServer) -> None:
    """The app's earlier answer is not kept: the app server decides again; Kafka gets the callback once
    (and each decision)."""
    settings = forward_settings(kafka, app_server.url("deny"))
    query, body = c2c(BEFORE, "twice")
    client = await bridge_for(settings)
    try:
        first = await post(client, query, body)
        second = await post(client, query, body)
    finally:
        await client.close()
    assert orjson.loads(first[1]) == orjson.loads(second[1]) == DENY
    assert second[2]["X-Bridge-Outcome"] == "duplicate_confirmed"
    assert len(app_server.received) == 2
    records = await read_records(kafka, [settings.c2c_topic], expect=3)
    kinds = [dict(r.headers).get("bridge-record") for r in records]
    assert kinds == [None, b"app-decision", b"app-decision"]


async def test_a_refused_callback_is_not_forwarded(kafka: str, app_server: AppServer) -> None:
    settings = forward_settings(kafka, app_server.url("allow"))
    query, _ = c2c(BEFORE, "bad")
    client = await bridge_for(settings)
    try:
        status, _, _, _ = await post(client, query, b'{"CallbackCommand": "C2C.CallbackBeforeSendMsg"}')
        unsigned, _, _, _ = await post(client, query.replace("Sign=", "Sign=0"), c2c(BEFORE, "x")[1])
    finally:
        await client.close()
    assert (status, unsigned) == (400, 401)
    assert app_server.received == []


# --- the write failed (a broker that refuses it) -----------------------------------------------------------


@pytest.mark.parametrize("behaviour", ["allow", "deny", "error", "slow", "down"])
@pytest.mark.parametrize("command", [BEFORE, AFTER])
async def test_a_failed_write_is_the_writes_503_whatever_the_app_server_said(
    app_server: AppServer, behaviour: str, command: str
) -> None:
    """The app's answer is relayed only for a callback in Kafka: every 200 means the record is there."""
    url = down_url() if behaviour == "down" else app_server.url(behaviour)
    publisher = FakePublisher(failure=BrokerRejected("the broker refused the write: KafkaTimeoutError"))
    publisher.confirm.set()
    client = await bridge_for(forward_settings(NO_BROKER, url), publisher)
    try:
        status, answered, headers, elapsed = await post(client, *c2c(command, f"failed-{behaviour}"))
    finally:
        await client.close()
    assert status == 503
    fail = orjson.loads(answered)
    assert fail["ErrorCode"] == 50303
    assert headers["X-Bridge-Outcome"] == "failed"
    assert headers["Retry-After"] == "1"
    if behaviour in ("allow", "deny", "error"):
        status_of_app = "500" if behaviour == "error" else "200"
        assert f"the app server answered {status_of_app} (not relayed" in fail["ErrorInfo"]
        assert headers["X-Bridge-Forward"] == status_of_app
    else:
        assert "the forward failed too" in fail["ErrorInfo"]
        assert headers["X-Bridge-Forward"] == ("timeout" if behaviour == "slow" else "unreachable")
    assert elapsed < BEFORE_DEADLINE_S + 0.4


async def test_forwards_past_the_bound_fail_at_once_without_holding_the_write(app_server: AppServer) -> None:
    settings = replace(forward_settings(NO_BROKER, app_server.url("slow")), forward_max_connections=1)
    publisher = FakePublisher()
    publisher.confirm.set()
    client = await bridge_for(settings, publisher)
    try:
        slow = asyncio.create_task(post(client, *c2c(AFTER, "first")))
        while not app_server.received:
            await asyncio.sleep(0.01)
        status, answered, headers, elapsed = await post(client, *c2c(AFTER, "second"))
        await slow
    finally:
        await client.close()
    assert status == 503
    assert orjson.loads(answered)["ErrorCode"] == 50306
    assert headers["X-Bridge-Forward"] == "busy"
    assert elapsed < FORWARD_TIMEOUT_S
    assert len(publisher.records) == 2  # both written


# --- the settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["ftp://app/callback", "http:///callback", "http://app/cb?x=1", "http://app/cb#f", "http://a/?"]
)
def test_a_forward_url_must_be_http_with_a_host_and_no_query(url: str) -> None:
    with pytest.raises(ValueError, match="must"):
        forward_url(url)


def test_a_forward_url_without_query_is_taken_as_given() -> None:
    assert (
        forward_url("https://moderation.internal:8443/tencent") == "https://moderation.internal:8443/tencent"
    )


def test_without_a_forward_url_the_app_has_no_forwarder() -> None:
    """Without --forward-url nothing is forwarded and no client session is made: the plain request path."""
    plain = create_app(unique_settings(NO_BROKER), FakePublisher())
    forwarding = create_app(forward_settings(NO_BROKER, "http://127.0.0.1:1/cb"), FakePublisher())
    assert FORWARDER not in plain
    assert FORWARDER in forwarding
