"""Only signed callbacks of our apps are written, checked before the body; secrets stay secret."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlencode

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.cli import _parser
from bridge.ingest.runner import request_handler_options
from bridge.ingest.server import PUBLISHER, create_app
from bridge.secret import CallbackToken, Secret
from bridge.settings import ServeSettings, SettingsError, build, require_authentication
from bridge.tencent.signature import expected_sign
from tests.conftest import BridgeClient
from tests.support.fakes import FakePublisher
from tests.support.requests import fixture
from tests.support.serve import BridgeTestServer, one_line_error, run_bridge
from tests.support.settings import unique_settings

SEED = fixture("oa-after-send-text")
OLD_TOKEN, NEW_TOKEN = "my_token", "next-token-2024"
PASSWORD = "kafka-pa55word-xyz"  # noqa: S105 - a test password
GUESS = "an-attackers-guess"
SECURED = ServeSettings(
    callback_token=(Secret(OLD_TOKEN), Secret(NEW_TOKEN)), sdk_app_id=("1400000000", "1400000001")
)


def signed(query: dict[str, str], token: str = OLD_TOKEN, at: int | None = None) -> dict[str, str]:
    request_time = str(int(time.time()) if at is None else at)
    return {**query, "RequestTime": request_time, "Sign": expected_sign(token, request_time)}


@pytest.fixture
async def secured(publisher: FakePublisher) -> AsyncIterator[BridgeClient]:
    server = BridgeTestServer(create_app(SECURED, publisher=publisher))
    await server.start_server(**request_handler_options(SECURED))
    async with TestClient(server) as client:
        yield client


async def fail_info(response: object, status: int) -> str:
    assert getattr(response, "status") == status  # noqa: B009 - a ClientResponse
    body = orjson.loads(await response.read())  # type: ignore[attr-defined]
    assert body["ActionStatus"] == "FAIL"
    assert body["ErrorCode"] // 100 == status
    return str(body["ErrorInfo"])


@pytest.mark.parametrize("token", [OLD_TOKEN, NEW_TOKEN])
async def test_a_callback_signed_with_any_configured_token_is_written_without_its_sign(
    secured: BridgeClient, publisher: FakePublisher, token: str
) -> None:
    query = signed(SEED.query, token)
    response = await secured.post("/callback", params=query, data=SEED.raw_body)
    assert response.status == 200
    (record,) = publisher.records
    envelope = orjson.loads(record.value)
    assert envelope["query"]["RequestTime"] == query["RequestTime"]
    assert "Sign" not in envelope["query"]
    assert query["Sign"].encode() not in record.value
    assert token.encode() not in record.value


@pytest.mark.parametrize(
    ("make_query", "phrase"),
    # Signed when the test runs, not when it is collected, so "fresh" stays fresh.
    [
        (lambda: SEED.query, "signature missing"),
        (lambda: {**signed(SEED.query), "Sign": "not-hex"}, "signature malformed"),
        (lambda: signed(SEED.query, at=int(time.time()) - 3600), "signature stale"),
        (lambda: signed(SEED.query, GUESS), "signature mismatch"),
    ],
    ids=["missing", "malformed", "stale", "mismatch"],
)
async def test_a_callback_failing_a_signature_check_gets_401_naming_the_check_and_nothing_is_written(
    secured: BridgeClient, publisher: FakePublisher, make_query: Callable[[], dict[str, str]], phrase: str
) -> None:
    query = make_query()
    info = await fail_info(await secured.post("/callback", params=query, data=SEED.raw_body), 401)
    assert info.startswith(phrase)
    request_time = query.get("RequestTime", "0")
    for secret in (OLD_TOKEN, NEW_TOKEN, expected_sign(OLD_TOKEN, request_time)):
        assert secret not in info
    assert publisher.records == []
    stats = await (await secured.get("/stats")).json()
    assert stats["outcomes"]["rejected"] == 1


async def test_a_signed_callback_of_an_app_not_listed_gets_403_and_nothing_is_written(
    secured: BridgeClient, publisher: FakePublisher
) -> None:
    query = signed({**SEED.query, "SdkAppid": "1400999999"})
    info = await fail_info(await secured.post("/callback", params=query, data=SEED.raw_body), 403)
    assert "1400999999 is not an app of this bridge" in info
    assert publisher.records == []


async def test_an_unsigned_callback_of_an_unlisted_app_learns_only_that_it_is_unsigned(
    secured: BridgeClient,
) -> None:
    query = {**SEED.query, "SdkAppid": "1400999999"}
    await fail_info(await secured.post("/callback", params=query, data=SEED.raw_body), 401)


async def test_every_listed_app_is_accepted(secured: BridgeClient, publisher: FakePublisher) -> None:
    for app_id in SECURED.sdk_app_id:
        query = signed({**SEED.query, "SdkAppid": app_id})
        assert (await secured.post("/callback", params=query, data=SEED.raw_body)).status == 200
    assert len(publisher.records) == 2


async def test_an_unauthenticated_request_is_answered_before_its_body_is_read(secured: BridgeClient) -> None:
    """A client that announces a large body and never sends it still gets its 401 at once."""
    server = secured.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        head = (
            f"POST /callback?{urlencode(SEED.query)} HTTP/1.1\r\nHost: b\r\nContent-Length: 1000000\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 401 ")


async def test_without_a_token_the_bridge_warns_once_at_start_that_callbacks_are_not_authenticated(
    caplog: pytest.LogCaptureFixture, publisher: FakePublisher
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge")
    async with TestClient(TestServer(create_app(ServeSettings(), publisher=publisher))) as client:
        await client.post("/callback", params=SEED.query, data=SEED.raw_body)
        await client.post("/callback", params=SEED.query, data=SEED.raw_body)
    warnings = [r for r in caplog.records if "NOT authenticated" in r.getMessage()]
    assert len(warnings) == 1


async def test_with_a_token_the_bridge_does_not_warn(
    caplog: pytest.LogCaptureFixture, secured: BridgeClient
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge")
    await secured.get("/healthz")
    assert not [r for r in caplog.records if "NOT authenticated" in r.getMessage()]


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    parts = []
    for record in caplog.records:
        parts += [record.getMessage(), repr(record.args), repr(vars(record))]
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


async def test_tokens_and_kafka_passwords_reach_no_log_metric_or_answer_even_at_debug_level(
    caplog: pytest.LogCaptureFixture, kafka: str
) -> None:
    """A real producer tries SASL against the test broker, which cannot do it, while callbacks arrive."""
    caplog.set_level(logging.DEBUG)
    settings = replace(
        unique_settings(kafka),
        callback_token=(Secret(OLD_TOKEN),),
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="bridge",
        sasl_password=Secret(PASSWORD),
    )
    answers = []
    server = BridgeTestServer(create_app(settings))
    await server.start_server(**request_handler_options(settings))
    async with TestClient(server) as client:
        publisher = client.app[PUBLISHER]
        async with asyncio.timeout(20):
            # Until the producer has tried the broker and said so; there is no event to wait on.
            while publisher.status == "connecting to Kafka":
                await asyncio.sleep(0.05)
        good = signed(SEED.query)
        for query in (good, signed(SEED.query, "wrong"), SEED.query):
            answers.append(await (await client.post("/callback", params=query, data=SEED.raw_body)).text())
        answers.append(await (await client.get("/metrics")).text())
        answers.append(await (await client.get("/stats")).text())
        answers.append(await (await client.get("/readyz")).text())
    text = everything_logged(caplog) + "\n".join(answers)
    assert any(r.name.startswith("aiokafka") for r in caplog.records), "aiokafka logged nothing at debug"
    for secret in (OLD_TOKEN, PASSWORD, good["Sign"]):
        assert secret not in text


def test_sdk_app_ids_add_up_across_repeated_flags_and_commas_and_come_comma_separated_from_the_env() -> None:
    args = _parser().parse_args(
        ["serve", "--sdk-app-id", "1400000000", "--sdk-app-id", "1400000001,1400000002"]
    )
    assert build("serve", vars(args), {}).sdk_app_id == ("1400000000", "1400000001", "1400000002")
    assert build("serve", {}, {"BRIDGE_SDK_APP_ID": "1400000000, 1400000001"}).sdk_app_id == (
        "1400000000",
        "1400000001",
    )
    with pytest.raises(SettingsError, match="not an SDKAppID"):
        build("serve", {}, {"BRIDGE_SDK_APP_ID": "14000x"})


def test_tokens_from_flags_and_a_file_one_a_line_are_all_accepted(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("from-file-1\n\n  from-file-2  \n")
    args = _parser().parse_args(
        [
            "serve",
            "--callback-token",
            "a,b",
            "--callback-token",
            "c",
            "--callback-token-file",
            str(token_file),
        ]
    )
    tokens = build("serve", vars(args), {}).callback_tokens
    assert [t.reveal() for t in tokens] == ["a", "b", "c", "from-file-1", "from-file-2"]
    env_tokens = build("serve", {}, {"BRIDGE_CALLBACK_TOKEN": "old,new"}).callback_tokens
    assert [t.reveal() for t in env_tokens] == ["old", "new"]


# --- one app's token does not sign for another (issue 12) --------------------------------------------------

APP_ONE, APP_TWO = "1400000001", "1400000002"
PER_APP = ServeSettings(
    callback_token=(CallbackToken("token-of-app-one", APP_ONE), CallbackToken("token-of-app-two", APP_TWO))
)


@pytest.fixture
async def per_app(publisher: FakePublisher) -> AsyncIterator[BridgeClient]:
    async with TestClient(TestServer(create_app(PER_APP, publisher=publisher))) as client:
        yield client


async def test_each_apps_callbacks_are_checked_with_that_apps_own_tokens(
    per_app: BridgeClient, publisher: FakePublisher
) -> None:
    for app, token in ((APP_ONE, "token-of-app-one"), (APP_TWO, "token-of-app-two")):
        query = signed({**SEED.query, "SdkAppid": app}, token)
        assert (await per_app.post("/callback", params=query, data=SEED.raw_body)).status == 200
    assert len(publisher.records) == 2


async def test_a_callback_signed_with_one_apps_token_but_claiming_another_app_gets_401_unwritten(
    per_app: BridgeClient, publisher: FakePublisher
) -> None:
    query = signed({**SEED.query, "SdkAppid": APP_TWO}, "token-of-app-one")
    info = await fail_info(await per_app.post("/callback", params=query, data=SEED.raw_body), 401)
    assert info == f"signature mismatch: 'Sign' does not match any token configured for SdkAppid {APP_TWO}"
    unlisted = signed({**SEED.query, "SdkAppid": "1400000003"}, "token-of-app-one")
    await fail_info(await per_app.post("/callback", params=unlisted, data=SEED.raw_body), 401)
    assert publisher.records == []


def test_app_tokens_come_as_appid_equals_token_from_flags_the_environment_and_the_file(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{APP_TWO}=from-file\nbare-from-file\n")
    args = _parser().parse_args(
        ["serve", "--callback-token", f"{APP_ONE}=from-flag", "--callback-token-file", str(token_file)]
    )
    tokens = build("serve", vars(args), {}).callback_tokens
    assert [(t.reveal(), getattr(t, "sdk_app_id", None)) for t in tokens] == [
        ("from-flag", APP_ONE),
        ("from-file", APP_TWO),
        ("bare-from-file", None),
    ]
    env_tokens = build("serve", {}, {"BRIDGE_CALLBACK_TOKEN": f"{APP_ONE}=a, {APP_TWO} = b,bare"})
    assert [(t.reveal(), getattr(t, "sdk_app_id", None)) for t in env_tokens.callback_tokens] == [
        ("a", APP_ONE),
        ("b", APP_TWO),
        ("bare", None),
    ]


@pytest.mark.parametrize(
    ("value", "phrase"),
    [("0123=secret-x", "APPID an SDKAppID"), (f"{APP_ONE}=", f"no token after {APP_ONE}=")],
)
def test_a_malformed_app_token_is_refused_in_one_line_that_never_repeats_it(
    tmp_path: Path, value: str, phrase: str
) -> None:
    with pytest.raises(SettingsError) as from_env:
        build("serve", {}, {"BRIDGE_CALLBACK_TOKEN": value})
    assert phrase in str(from_env.value)
    assert "BRIDGE_CALLBACK_TOKEN=********" in str(from_env.value)
    token_file = tmp_path / "tokens"
    token_file.write_text(f"good\n{value}\n")
    with pytest.raises(SettingsError) as from_file:
        build("serve", {}, {"BRIDGE_CALLBACK_TOKEN_FILE": str(token_file)})
    assert "line 2: " in str(from_file.value)
    assert phrase in str(from_file.value)
    for message in (str(from_env.value), str(from_file.value)):
        assert "secret-x" not in message


# --- serve refuses to start open, and refuses the placeholder (issue 12) ---------------------------------


def test_serve_without_a_token_refuses_to_start_in_one_line_naming_the_token_and_the_opt_out() -> None:
    result = run_bridge("serve", "--bootstrap-servers", "127.0.0.1:1")
    assert result.returncode == 2
    line = one_line_error(result)
    assert line.startswith("bridge serve: no callback token: ")
    for name in ("--callback-token", "BRIDGE_CALLBACK_TOKEN", "--allow-unsigned", "BRIDGE_ALLOW_UNSIGNED"):
        assert name in line


def test_serve_with_allow_unsigned_starts_and_warns_loudly_that_anyone_can_write(tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    clean = {name: value for name, value in os.environ.items() if not name.startswith("BRIDGE_")}
    environment = {**clean, "BRIDGE_ALLOW_UNSIGNED": "true", "BRIDGE_LOG_FORMAT": "json"}
    command = [sys.executable, "-m", "bridge", "serve", "--bootstrap-servers", "127.0.0.1:1", "--port", "0"]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, env=environment)
    try:
        deadline = time.monotonic() + 30
        while "listening on port" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    warnings = [
        line for line in map(orjson.loads, log_path.read_text().splitlines()) if line["level"] == "warning"
    ]
    loud = "UNSIGNED CALLBACKS ACCEPTED (--allow-unsigned)"
    assert any(line["message"].startswith(loud) for line in warnings)


def test_dev_stays_open_by_default_for_the_quick_start_and_serve_does_not() -> None:
    assert build("dev", {}, {}).allow_unsigned is True
    assert build("serve", {}, {}).allow_unsigned is False
    require_authentication("dev", build("dev", {}, {}))
    with pytest.raises(SettingsError):
        require_authentication("serve", build("serve", {}, {}))
    require_authentication("serve", build("serve", {}, {"BRIDGE_CALLBACK_TOKEN": "real"}))
    require_authentication("serve", build("serve", {}, {"BRIDGE_ALLOW_UNSIGNED": "true"}))


@pytest.mark.parametrize("value", ["change-me", " CHANGE-ME ", f"{APP_ONE}=change-me", "real,change-me"])
def test_the_kubernetes_secrets_placeholder_is_refused_as_a_token(tmp_path: Path, value: str) -> None:
    with pytest.raises(SettingsError, match=r"placeholder of deploy/kubernetes/secret\.yaml"):
        build("serve", {}, {"BRIDGE_CALLBACK_TOKEN": value})
    token_file = tmp_path / "tokens"
    token_file.write_text(value.replace(",", "\n"))
    with pytest.raises(SettingsError, match="placeholder"):
        build("serve", {}, {"BRIDGE_CALLBACK_TOKEN_FILE": str(token_file)})
    result = run_bridge("serve", "--bootstrap-servers", "127.0.0.1:1", "--callback-token", value)
    assert result.returncode == 2
    assert "placeholder" in one_line_error(result)


def test_bridge_devs_curl_is_signed_for_the_app_of_its_first_token_when_that_token_is_one_apps() -> None:
    from bridge.tools.dev import banner  # noqa: PLC0415 - only this test needs dev's banner

    text = banner(ServeSettings(callback_token=(CallbackToken("xxxxyyyy", APP_TWO),)), 8080, "127.0.0.1:9092")
    curl = next(line for line in text.splitlines() if "curl" in line)
    assert f"SdkAppid={APP_TWO}" in curl
    assert "Sign=" in curl
