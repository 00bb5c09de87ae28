"""Callbacks posted over HTTP land in Kafka once, as the README documents them, read back from the broker."""

from __future__ import annotations

import time

import jsonschema
import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from bridge.settings import ServeSettings
from bridge.tencent.commands import TopicGroup
from bridge.tencent.envelope import json_schema
from bridge.tencent.partitioner import partition_for
from tests.conftest import BridgeClient
from tests.support.records import read_records
from tests.support.requests import Fixture, fixture, load_fixtures

OK = {"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0}

# What the README promises for each fixture: topic group, owning entity, key, Kafka timestamp.
EXPECTED = {
    "oa-after-send-text": (TopicGroup.OFFICIAL_ACCOUNT, "@TOA#_2J4SZEAEL", "71_1_1698741698", 1670574414123),
    "oa-after-send-image-custom": (
        TopicGroup.OFFICIAL_ACCOUNT,
        "@TOA#_news_channel",
        "1024_3998651049_1700000000",
        1700000000123,
    ),
    "oa-after-msg-withdraw": (
        TopicGroup.OFFICIAL_ACCOUNT,
        "@TOA#_123",
        "OfficialAccount.CallbackAfterMsgWithDraw:sha256:",
        1670574414123,
    ),
    "oa-after-add-subscriber": (
        TopicGroup.OFFICIAL_ACCOUNT,
        "@TOA#_test_for_penn",
        "OfficialAccount.CallbackAfterAddSubscriber:sha256:",
        1670574414123,
    ),
    "c2c-after-send": (TopicGroup.C2C, "Jonh:jared", "48374_2837546_1557481126", None),
    "group-after-send-string-eventtime": (
        TopicGroup.GROUP,
        "@TGS#2J4SZEAEL",
        "@TGS#2J4SZEAEL:123",
        1670574414123,
    ),
    "state-change-uppercase-ios": (
        TopicGroup.USER,
        "testuser316",
        "State.StateChange:sha256:",
        1629883332497,
    ),
}


async def post(client: BridgeClient, callback: Fixture) -> tuple[int, dict[str, object]]:
    response = await client.post("/callback", params=callback.query, data=callback.raw_body)
    return response.status, orjson.loads(await response.read())


def envelope_of(record: ConsumerRecord[bytes, bytes]) -> dict[str, object]:
    assert record.value is not None
    value: dict[str, object] = orjson.loads(record.value)
    return value


async def test_every_fixture_lands_once_with_key_partition_timestamp_headers_and_envelope(
    bridge: BridgeClient, settings: ServeSettings, kafka: str
) -> None:
    fixtures = load_fixtures()
    assert {f.name for f in fixtures} == set(EXPECTED)
    before_ms = int(time.time() * 1000)
    for callback in fixtures:
        assert await post(bridge, callback) == (200, OK), callback.name
    after_ms = int(time.time() * 1000)

    records = await read_records(kafka, settings.topics, expect=len(fixtures))
    by_name = {}
    for record in records:
        callback_body = envelope_of(record)["callback"]
        name = next(f.name for f in fixtures if f.body == callback_body)
        assert name not in by_name, f"{name} was written twice"
        by_name[name] = record
    assert set(by_name) == set(EXPECTED)

    schema = json_schema()
    for callback in fixtures:
        record = by_name[callback.name]
        group, entity, key, event_time = EXPECTED[callback.name]
        envelope = envelope_of(record)
        jsonschema.validate(envelope, schema)
        assert envelope["schema"] == "tencent-chat-callback/1"
        assert envelope["query"] == callback.query
        assert envelope["callback"] == callback.body
        received_at = envelope["received_at"]
        assert isinstance(received_at, int)
        assert before_ms <= received_at <= after_ms
        assert record.topic == settings.topic_for(group)
        assert record.partition == partition_for(entity, settings.partitions)
        assert record.key is not None
        assert record.key.decode().startswith(key) if key.endswith(":") else record.key.decode() == key
        # Tencent's samples are years old: older than half the retention, so stamped with the receive time.
        recent = event_time is not None and event_time >= received_at - settings.max_event_age_ms
        assert record.timestamp == (event_time if recent else received_at)
        assert dict(record.headers) == {
            "CallbackCommand": callback.query["CallbackCommand"].encode(),
            "SdkAppid": b"1400000000",
            "content-type": b"application/json",
            "entity": entity.encode(),
            "received_at": str(received_at).encode(),
            "schema": b"tencent-chat-callback/1",
        }


async def test_partitions_follow_the_java_formula_for_known_accounts(
    bridge: BridgeClient, settings: ServeSettings, kafka: str
) -> None:
    """Official accounts with known Java partitions (12 partitions) land exactly there."""
    # toPositive(murmur2(utf8(account))) % 12, worked out by hand from Kafka's Java murmur2 vectors
    # (UtilsTest.testMurmur2): "21" -> -973932308, "foobar" -> -790332482, "abc" -> 479470107, ...
    accounts = {"21": 0, "foobar": 6, "abc": 3, "a-little-bit-long-string": 8}
    base = fixture("oa-after-send-text")
    for number, account in enumerate(accounts):
        body = {**base.body, "Official_Account": account, "MsgKey": f"key-{number}"}
        response = await bridge.post("/callback", params=base.query, data=orjson.dumps(body))
        assert response.status == 200
    records = await read_records(kafka, [settings.topic], expect=len(accounts))
    landed = {envelope_of(r)["callback"]["Official_Account"]: r.partition for r in records}  # type: ignore[index]
    assert landed == accounts


async def test_the_same_account_always_lands_on_the_same_partition(
    bridge: BridgeClient, settings: ServeSettings, kafka: str
) -> None:
    base = fixture("oa-after-send-text")
    for number in range(5):
        body = {**base.body, "MsgKey": f"71_{number}_1698741698"}
        assert (await bridge.post("/callback", params=base.query, data=orjson.dumps(body))).status == 200
    records = await read_records(kafka, [settings.topic], expect=5)
    assert len(records) == 5
    assert {r.partition for r in records} == {partition_for("@TOA#_2J4SZEAEL", 12)}
    assert sorted(r.key for r in records) == sorted(f"71_{n}_1698741698".encode() for n in range(5))


async def test_body_bytes_are_kept_exactly_as_posted(
    bridge: BridgeClient, settings: ServeSettings, kafka: str
) -> None:
    """Spacing, key order, escapes and unknown fields survive byte for byte inside the envelope."""
    base = fixture("oa-after-send-text")
    raw = (
        b'{ "MsgKey" : "k\\u00e9-1", "Official_Account":"@TOA#_\xe6\x96\xb0\xe9\x97\xbb",\n'
        b'"CallbackCommand":"OfficialAccount.CallbackAfterSendMsg", "FutureField": {"x": [1, 2.5e3, null]},'
        b' "MsgBody":[{"MsgType":"TIMBrandNewElem","MsgContent":{}}] }'
    )
    response = await bridge.post("/callback", params=base.query, data=raw)
    assert response.status == 200
    [record] = await read_records(kafka, [settings.topic], expect=1)
    assert record.value is not None
    assert raw in record.value
    assert record.key == "ké-1".encode()


@pytest.mark.parametrize(
    ("command", "group"),
    [
        ("OfficialAccount.CallbackSomethingNew", TopicGroup.OFFICIAL_ACCOUNT),
        ("Group.CallbackAfterTopicCreated", TopicGroup.GROUP),
        ("Push.CallbackAfterPushed", TopicGroup.APP),
        ("Brand.NewFamily", TopicGroup.UNKNOWN),
    ],
)
async def test_unknown_commands_are_accepted_and_published(
    bridge: BridgeClient, settings: ServeSettings, kafka: str, command: str, group: TopicGroup
) -> None:
    body = {"CallbackCommand": command, "Official_Account": "@TOA#_x", "GroupId": "@TGS#y", "Anything": [1]}
    query = {"SdkAppid": "1400000001", "CallbackCommand": command, "contenttype": "json"}
    response = await bridge.post("/callback", params=query, data=orjson.dumps(body))
    assert (response.status, await response.json()) == (200, OK)
    [record] = await read_records(kafka, settings.topics, expect=1)
    assert record.topic == settings.topic_for(group)
    assert envelope_of(record)["callback"] == body
    entity = {TopicGroup.OFFICIAL_ACCOUNT: "@TOA#_x", TopicGroup.GROUP: "@TGS#y"}.get(group, "1400000001")
    assert record.partition == partition_for(entity, settings.partitions)


async def test_command_only_in_the_body_or_only_in_the_query_is_enough(
    bridge: BridgeClient, settings: ServeSettings, kafka: str
) -> None:
    base = fixture("oa-after-send-text")
    query_without = {k: v for k, v in base.query.items() if k != "CallbackCommand"}
    body_without = {k: v for k, v in base.body.items() if k != "CallbackCommand"}
    assert (await bridge.post("/callback", params=query_without, data=base.raw_body)).status == 200
    body_without["MsgKey"] = "second"
    assert (await bridge.post("/callback", params=base.query, data=orjson.dumps(body_without))).status == 200
    records = await read_records(kafka, [settings.topic], expect=2)
    assert [dict(r.headers)["CallbackCommand"] for r in records] == [
        b"OfficialAccount.CallbackAfterSendMsg"
    ] * 2


async def test_sign_is_left_out_of_the_envelope_and_other_parameters_kept(
    bridge: BridgeClient, settings: ServeSettings, kafka: str
) -> None:
    base = fixture("oa-after-send-text")
    query = {
        **base.query,
        "Sign": "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061",
        "RequestTime": "1669872112",
        "Extra": "kept",
    }
    assert (await bridge.post("/callback", params=query, data=base.raw_body)).status == 200
    [record] = await read_records(kafka, [settings.topic], expect=1)
    assert record.value is not None
    assert b"17773bc39a671d7b" not in record.value
    assert envelope_of(record)["query"] == {k: v for k, v in query.items() if k != "Sign"}
