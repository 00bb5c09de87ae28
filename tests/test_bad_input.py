"""Bad input gets its status and a Tencent-style FAIL body naming the problem, and nothing reaches the
callback topics (an authentic callback that fails validation is kept in the dead-letter topic instead:
tests/test_rejected.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.ingest.server import create_app
from bridge.settings import ServeSettings
from tests.conftest import BridgeClient
from tests.support.records import count_records, read_records
from tests.support.requests import fixture
from tests.support.serve import wait_until_ready

SEED = fixture("oa-after-send-text")
QUERY = SEED.query
BODY = SEED.body


def without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


def body_with(**fields: Any) -> bytes:
    return orjson.dumps({**BODY, **fields})


BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "the body is empty"),
    ("only whitespace", b" \r\n\t", "the body is empty"),
    ("truncated JSON", b'{"CallbackCommand": "OfficialAccount.CallbackAfterSendMsg"', "not valid UTF-8 JSON"),
    ("invalid UTF-8", b'{"Official_Account": "\xff\xfe"}', "not valid UTF-8 JSON"),
    ("UTF-16", '{"a": 1}'.encode("utf-16"), "not valid UTF-8 JSON"),
    ("trailing garbage", b'{"a": 1} x', "not valid UTF-8 JSON"),
    ("a JSON array", b"[]", "must be a JSON object, got a JSON array"),
    ("a JSON string", b'"hello"', "must be a JSON object, got a JSON string"),
    ("JSON null", b"null", "must be a JSON object, got a JSON null"),
    ("NaN", b'{"MsgTime": NaN}', "not valid UTF-8 JSON"),
    ("Infinity as 1e400", b'{"x": 1e400}', "not valid UTF-8 JSON"),
    ("integer of 2**64", b'{"x": 18446744073709551616}', "beyond 64 bits"),
    ("integer below -2**63", b'{"x": [-9223372036854775809]}', "beyond 64 bits"),
    ("huge integer in a nested value", b'{"a": {"b": 123456789012345678901234567890}}', "beyond 64 bits"),
    ("nesting deeper than the parser allows", b'{"a": ' + b"[" * 1100 + b"]" * 1100 + b"}", "depth"),
    ("nesting deeper than 128 levels", b'{"a": ' + b"[" * 128 + b"]" * 128 + b"}", "deeper than 128 levels"),
    ("lone surrogate escape", b'{"a": "\\ud800"}', "not valid UTF-8 JSON"),
    ("byte order mark", b"\xef\xbb\xbf{}", "not valid UTF-8 JSON"),
]

BAD_FIELDS: list[tuple[str, bytes, str]] = [
    (
        "Official_Account missing",
        orjson.dumps(without(BODY, "Official_Account")),
        "'Official_Account' is missing",
    ),
    (
        "Official_Account empty",
        body_with(Official_Account=""),
        "'Official_Account' must be a non-empty string",
    ),
    (
        "Official_Account a number",
        body_with(Official_Account=42),
        "'Official_Account' must be a non-empty string",
    ),
    ("MsgKey missing", orjson.dumps(without(BODY, "MsgKey")), "'MsgKey' is missing"),
    ("MsgKey empty", body_with(MsgKey=""), "'MsgKey' must be a non-empty string"),
    ("MsgKey null", body_with(MsgKey=None), "'MsgKey' must be a non-empty string, got null"),
    ("MsgTime a string", body_with(MsgTime="1490686222"), "'MsgTime' must be an integer, got string"),
    ("MsgTime a float", body_with(MsgTime=1490686222.5), "'MsgTime' must be an integer, got number"),
    ("OnlineOnlyFlag a boolean", body_with(OnlineOnlyFlag=True), "'OnlineOnlyFlag' must be an integer"),
    (
        "EventTime not decimal",
        body_with(EventTime="yesterday"),
        "'EventTime' must be an integer of milliseconds",
    ),
    (
        "EventTime a float",
        body_with(EventTime=1670574414123.5),
        "'EventTime' must be an integer of milliseconds",
    ),
    ("MsgBody an object", body_with(MsgBody={"MsgType": "TIMTextElem"}), "'MsgBody' must be an array"),
    (
        "MsgBody element a string",
        body_with(MsgBody=["TIMTextElem"]),
        "'MsgBody'[0] must be a message element",
    ),
    (
        "MsgType missing",
        body_with(MsgBody=[{"MsgType": "TIMTextElem"}, {"MsgContent": {}}]),
        "'MsgBody'[1].MsgType is missing",
    ),
    ("MsgType a number", body_with(MsgBody=[{"MsgType": 1}]), "'MsgBody'[0].MsgType must be a string"),
    ("CloudCustomData an object", body_with(CloudCustomData={"a": 1}), "'CloudCustomData' must be a string"),
]

BAD_COMMANDS: list[tuple[str, dict[str, str], bytes, str]] = [
    (
        "missing from query and body",
        without(QUERY, "CallbackCommand"),
        orjson.dumps(without(BODY, "CallbackCommand")),
        "missing from both the query and the body",
    ),
    (
        "query and body differ",
        {**QUERY, "CallbackCommand": "C2C.CallbackAfterSendMsg"},
        SEED.raw_body,
        "differs between the query",
    ),
    ("body command not a string", QUERY, body_with(CallbackCommand=7), "'CallbackCommand' must be a string"),
    (
        "query command not a command name",
        {**QUERY, "CallbackCommand": "rm -rf /"},
        orjson.dumps(without(BODY, "CallbackCommand")),
        "must be a dotted command name",
    ),
    (
        "command without a dot",
        {**QUERY, "CallbackCommand": "StateChange"},
        orjson.dumps(without(BODY, "CallbackCommand")),
        "must be a dotted command name",
    ),
    (
        "group message without GroupId",
        {**QUERY, "CallbackCommand": "Group.CallbackAfterSendMsg"},
        orjson.dumps({"CallbackCommand": "Group.CallbackAfterSendMsg", "MsgSeq": 1}),
        "'GroupId' is missing",
    ),
    (
        "C2C message with a numeric To_Account",
        {**QUERY, "CallbackCommand": "C2C.CallbackAfterSendMsg"},
        orjson.dumps({"CallbackCommand": "C2C.CallbackAfterSendMsg", "From_Account": "a", "To_Account": 5}),
        "'To_Account' must be a non-empty string",
    ),
    (
        "state change without Info",
        {**QUERY, "CallbackCommand": "State.StateChange"},
        orjson.dumps({"CallbackCommand": "State.StateChange", "EventTime": 1}),
        "'Info' is missing",
    ),
]

BAD_QUERIES: list[tuple[str, str, str]] = [
    ("SdkAppid missing", "CallbackCommand=OfficialAccount.CallbackAfterSendMsg", "'SdkAppid' is missing"),
    ("SdkAppid not a number", "SdkAppid=abc", "'SdkAppid' must be a positive decimal integer"),
    ("SdkAppid zero", "SdkAppid=0", "'SdkAppid' must be a positive decimal integer"),
    ("SdkAppid negative", "SdkAppid=-1400000000", "'SdkAppid' must be a positive decimal integer"),
    ("SdkAppid with a leading zero", "SdkAppid=01400000000", "'SdkAppid' must be a positive decimal integer"),
    ("SdkAppid a fraction", "SdkAppid=1400000000.0", "'SdkAppid' must be a positive decimal integer"),
    ("SdkAppid empty", "SdkAppid=", "'SdkAppid' must be a positive decimal integer"),
    (
        "SdkAppid beyond 64 bits",
        "SdkAppid=99999999999999999999",
        "'SdkAppid' must be a positive decimal integer",
    ),
    ("SdkAppid twice", "SdkAppid=1400000000&SdkAppid=1400000001", "'SdkAppid' is given more than once"),
    (
        "SdkAppid above 2**63-1",
        "SdkAppid=9300000000000000000",
        "'SdkAppid' must be a positive decimal integer",
    ),
]


async def assert_fail(response: Any, status: int, phrase: str) -> None:
    assert response.status == status
    assert response.content_type == "application/json"
    body = orjson.loads(await response.read())
    assert set(body) == {"ActionStatus", "ErrorInfo", "ErrorCode"}
    assert body["ActionStatus"] == "FAIL"
    assert isinstance(body["ErrorCode"], int)
    assert body["ErrorCode"] != 0
    assert phrase in body["ErrorInfo"]
    assert "Traceback" not in body["ErrorInfo"]


@pytest.mark.parametrize(("raw", "phrase"), [case[1:] for case in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
async def test_malformed_bodies_get_400_and_write_nothing(
    bridge: BridgeClient, settings: ServeSettings, kafka: str, raw: bytes, phrase: str
) -> None:
    await assert_fail(await bridge.post("/callback", params=QUERY, data=raw), 400, phrase)
    assert await count_records(kafka, settings.callback_topics) == 0
    assert await count_records(kafka, [settings.rejected_topic]) == 1, "kept in the dead-letter topic"


@pytest.mark.parametrize(("raw", "phrase"), [case[1:] for case in BAD_FIELDS], ids=[c[0] for c in BAD_FIELDS])
async def test_official_account_fields_of_the_wrong_type_get_400_and_write_nothing(
    bridge: BridgeClient, settings: ServeSettings, kafka: str, raw: bytes, phrase: str
) -> None:
    await assert_fail(await bridge.post("/callback", params=QUERY, data=raw), 400, phrase)
    assert await count_records(kafka, settings.callback_topics) == 0
    assert await count_records(kafka, [settings.rejected_topic]) == 1, "kept in the dead-letter topic"


@pytest.mark.parametrize(
    ("query", "raw", "phrase"), [case[1:] for case in BAD_COMMANDS], ids=[c[0] for c in BAD_COMMANDS]
)
async def test_bad_commands_get_400_and_write_nothing(
    bridge: BridgeClient, settings: ServeSettings, kafka: str, query: dict[str, str], raw: bytes, phrase: str
) -> None:
    await assert_fail(await bridge.post("/callback", params=query, data=raw), 400, phrase)
    assert await count_records(kafka, settings.callback_topics) == 0
    # A query's bad command is refused with the query, before the signature: not known to be Tencent's.
    kept = 0 if query.get("CallbackCommand") in {"rm -rf /", "StateChange"} else 1
    assert await count_records(kafka, [settings.rejected_topic]) == kept, "kept in the dead-letter topic"


@pytest.mark.parametrize(
    ("query", "phrase"), [case[1:] for case in BAD_QUERIES], ids=[c[0] for c in BAD_QUERIES]
)
async def test_bad_sdk_app_ids_get_400_and_write_nothing(
    bridge: BridgeClient, settings: ServeSettings, kafka: str, query: str, phrase: str
) -> None:
    await assert_fail(await bridge.post(f"/callback?{query}", data=SEED.raw_body), 400, phrase)
    assert await count_records(kafka, settings.topics) == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_the_callback_path_get_405(
    bridge: BridgeClient, settings: ServeSettings, kafka: str, method: str
) -> None:
    response = await bridge.request(method, "/callback", params=QUERY, data=SEED.raw_body)
    await assert_fail(response, 405, f"{method} is not allowed")
    assert response.headers["Allow"] == "POST"
    assert await count_records(kafka, settings.topics) == 0


async def test_unknown_paths_get_404_with_a_tencent_body(bridge: BridgeClient) -> None:
    await assert_fail(
        await bridge.post("/callbacks", params=QUERY, data=SEED.raw_body), 404, "callbacks go to /callback"
    )


@pytest.fixture
async def small_bridge(settings: ServeSettings) -> Any:
    """A bridge that accepts bodies of at most 1,000 bytes."""
    small = replace(settings, max_body_bytes=1000)
    async with TestClient(TestServer(create_app(small))) as client:
        await wait_until_ready(client)
        yield client


async def test_a_body_over_the_limit_gets_413_and_writes_nothing(
    small_bridge: BridgeClient, settings: ServeSettings, kafka: str
) -> None:
    big = body_with(CloudCustomData="x" * 1000)
    await assert_fail(
        await small_bridge.post("/callback", params=QUERY, data=big), 413, "limit of 1000 bytes"
    )
    assert await count_records(kafka, settings.topics) == 0


async def test_a_chunked_body_over_the_limit_gets_413_and_writes_nothing(
    small_bridge: BridgeClient, settings: ServeSettings, kafka: str
) -> None:
    """Without a Content-Length the limit is enforced while reading."""

    async def chunks() -> Any:
        for _ in range(20):
            yield b" " * 100
        yield SEED.raw_body

    response = await small_bridge.post("/callback", params=QUERY, data=chunks())
    await assert_fail(response, 413, "limit of 1000 bytes")
    assert await count_records(kafka, settings.topics) == 0


async def test_a_body_exactly_at_the_limit_is_accepted(
    small_bridge: BridgeClient, settings: ServeSettings, kafka: str
) -> None:
    raw = SEED.raw_body
    padded = raw[:-1] + b" " * (1000 - len(raw)) + b"}"
    assert len(padded) == 1000
    assert (await small_bridge.post("/callback", params=QUERY, data=padded)).status == 200
    assert len(await read_records(kafka, [settings.topic], expect=1)) == 1


ACCEPTED_EDGES: list[tuple[str, bytes]] = [
    ("EventTime as a decimal string", body_with(EventTime="1670574414123")),
    ("the largest unsigned 64-bit integer", body_with(Extra=18446744073709551615)),
    ("the smallest signed 64-bit integer", body_with(Extra=-9223372036854775808)),
    ("a long digit run inside a string", body_with(MsgKey="1234567890123456789012345_1")),
    (
        "floats in a location element",
        body_with(
            MsgBody=[{"MsgType": "TIMLocationElem", "MsgContent": {"Latitude": 39.9, "Longitude": 1e2}}]
        ),
    ),
    (
        "an unknown MsgType and unknown fields",
        body_with(MsgBody=[{"MsgType": "TIMFutureElem"}], NewField=[None]),
    ),
    ("an empty MsgBody", body_with(MsgBody=[])),
    ("non-ASCII account ids", body_with(Official_Account="@TOA#_新闻")),
    ("nesting of exactly 128 levels", body_with(Deep=orjson.loads(b"[" * 127 + b"]" * 127))),
]


@pytest.mark.parametrize("raw", [case[1] for case in ACCEPTED_EDGES], ids=[c[0] for c in ACCEPTED_EDGES])
async def test_unusual_but_valid_callbacks_are_accepted(
    bridge: BridgeClient, settings: ServeSettings, kafka: str, raw: bytes
) -> None:
    response = await bridge.post("/callback", params=QUERY, data=raw)
    assert (response.status, await response.json()) == (
        200,
        {"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0},
    )
    [record] = await read_records(kafka, [settings.topic], expect=1)
    assert record.value is not None
    assert orjson.loads(record.value)["callback"] == orjson.loads(raw)


async def test_a_far_future_event_time_gives_way_to_the_receive_time(
    bridge: BridgeClient, settings: ServeSettings, kafka: str
) -> None:
    """Kafka 4 refuses records more than an hour ahead; a broken clock must not cost the callback."""
    response = await bridge.post("/callback", params=QUERY, data=body_with(EventTime=9223372036854775807))
    assert response.status == 200
    [record] = await read_records(kafka, [settings.topic], expect=1)
    assert record.value is not None
    assert record.timestamp == orjson.loads(record.value)["received_at"]
