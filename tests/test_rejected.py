"""The dead-letter topic (issue 16): an authentic callback that fails validation is kept raw before its 400.

Against Apache Kafka: the shared fixtures, made malformed in every way validation refuses, land in the
dead-letter topic byte for byte with their headers, key and the app's partition, and are answered exactly
as a bridge without the dead-letter topic answers them; what is not authentic or not whole is kept nowhere;
a broker that black-holes or refuses the write makes the answer a 503 saying the callback was not kept;
`consume` prints the records in the shape of their JSON Schema, and `replay --to-url` re-posts one to a
bridge whose validation was fixed, which writes it to its callback topic. Unit tests, on the fake publisher,
cover the pure record, the settings and the accounting.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import jsonschema
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.structs import ConsumerRecord

from bridge.errors import BrokerNotReady, InvalidField, InvalidJson
from bridge.ingest.metrics import METRICS
from bridge.ingest.server import create_app
from bridge.readback.reader import EventReader
from bridge.readback.rejected import RejectedEvent, decode_any
from bridge.readback.replay import Replay, select_of
from bridge.readback.sinks import UrlSink
from bridge.secret import Secret
from bridge.settings import COMMANDS, ReplaySettings, ServeSettings, SettingsError, build
from bridge.tencent import commands
from bridge.tencent.partitioner import partition_for
from bridge.tencent.protocol import parse_query
from bridge.tencent.rejected import SCHEMA, json_schema, read_rejected, rejected_record
from bridge.tools.embedded import free_port
from tests.conftest import BridgeClient
from tests.support.fakes import FakePublisher
from tests.support.proxy import KafkaProxy
from tests.support.records import count_records, read_records
from tests.support.requests import Fixture, fixture, load_fixtures
from tests.support.serve import run_bridge, wait_until_ready
from tests.support.settings import NO_BROKER, reading, unique_settings

TOKEN = "dead-letter-token"  # noqa: S105 - a test token
APP = "1400000000"
SEED = fixture("oa-after-send-text")
CORRUPT_MESSAGE = 2
"""Kafka's error code that aiokafka does not retry: the broker refused the write."""


def signed(query: dict[str, str], token: str = TOKEN) -> dict[str, str]:
    request_time = str(int(time.time()))
    sign = hashlib.sha256((token + request_time).encode()).hexdigest()
    return {**query, "RequestTime": request_time, "Sign": sign}


@dataclass(frozen=True)
class Variant:
    """A fixture made malformed: what is posted, and the ErrorCode validation answers it with."""

    name: str
    query: dict[str, str]
    body: bytes
    error_code: int


def malformed(base: Fixture) -> list[Variant]:
    """Every way validation refuses a callback, applied to `base`."""
    raw, body = base.raw_body, base.body
    name = base.name
    variants = [
        Variant(f"{name}: truncated JSON", base.query, raw[:-1], 40002),
        Variant(f"{name}: not UTF-8", base.query, raw[:-1] + b',"Note":"\xff\xfe caf\xe9"}', 40002),
        Variant(f"{name}: not an object", base.query, b"[" + raw + b"]", 40002),
        Variant(f"{name}: a 65-bit integer", base.query, raw[:-1] + b',"Big":18446744073709551616}', 40002),
        Variant(
            f"{name}: command mismatch",
            base.query,
            orjson.dumps({**body, "CallbackCommand": "Other.CallbackElsewhere"}),
            40004,
        ),
    ]
    wrong_type = {"OfficialAccount": "Official_Account", "C2C": "From_Account", "Group": "GroupId"}
    family = base.query["CallbackCommand"].partition(".")[0]
    if family in wrong_type:
        field = wrong_type[family]
        missing = {k: v for k, v in body.items() if k != field}
        variants += [
            Variant(f"{name}: {field} missing", base.query, orjson.dumps(missing), 40003),
            Variant(f"{name}: {field} a number", base.query, orjson.dumps({**body, field: 7}), 40003),
        ]
    return variants


VARIANTS = [variant for base in load_fixtures() for variant in malformed(base)]


# --- the record, pure --------------------------------------------------------------------------------------


def test_the_record_is_the_body_byte_for_byte_keyed_by_the_app_with_why_in_its_headers() -> None:
    query = parse_query(signed(SEED.query).items())
    raw = b'{"not": json\xff'
    record = rejected_record("tim.rejected", query, raw, InvalidJson("the body is not valid UTF-8 JSON"), 42)
    assert (record.topic, record.value, record.key, record.entity) == (
        "tim.rejected",
        raw,
        b"1400000000",
        APP,
    )
    assert record.timestamp_ms == 42
    headers = dict(record.headers)
    assert headers["schema"] == b"tencent-chat-rejected/1"
    assert headers["rejected-reason"] == b"the body is not valid UTF-8 JSON"
    assert headers["rejected-error-code"] == b"40002"
    assert headers["SdkAppid"] == b"1400000000"
    assert headers["CallbackCommand"] == b"OfficialAccount.CallbackAfterSendMsg"
    assert headers["content-type"] == b"application/octet-stream"
    kept_query = orjson.loads(headers["query"])
    assert "Sign" not in kept_query
    assert list(kept_query) == [*SEED.query, "RequestTime"], "every other parameter, in the order received"


def test_the_command_is_the_querys_else_the_bodys_for_a_refused_field_else_absent() -> None:
    no_command = {k: v for k, v in SEED.query.items() if k != "CallbackCommand"}
    query = parse_query(no_command.items())
    field = rejected_record("t", query, SEED.raw_body, InvalidField("x"), 1)
    assert dict(field.headers)["CallbackCommand"] == b"OfficialAccount.CallbackAfterSendMsg"
    not_json = rejected_record("t", query, b"{", InvalidJson("x"), 1)
    assert "CallbackCommand" not in dict(not_json.headers)


@pytest.mark.parametrize(
    "raw", [SEED.raw_body, b"\xff\xfe\x00 not UTF-8", b""], ids=["UTF-8", "binary", "empty"]
)
def test_the_consumed_shape_fits_its_json_schema_and_gives_back_the_exact_bytes(raw: bytes) -> None:
    query = parse_query(SEED.query.items())
    record = rejected_record("t", query, raw, InvalidJson("why"), 7)
    kept = read_rejected(record.value, record.timestamp_ms, record.headers)
    shown = orjson.loads(kept.json_line())
    jsonschema.Draft202012Validator.check_schema(json_schema())
    jsonschema.validate(shown, json_schema())
    assert shown["schema"] == SCHEMA
    again = shown["body"].encode() if "body" in shown else base64.b64decode(shown["body_base64"])
    assert again == raw
    assert ("body" in shown) == (raw != b"\xff\xfe\x00 not UTF-8")


def test_a_record_without_the_dead_letter_headers_is_refused_as_not_one() -> None:
    query = parse_query(SEED.query.items())
    record = rejected_record("t", query, b"x", InvalidJson("why"), 7)
    headers = [(name, value) for name, value in record.headers if name != "query"]
    with pytest.raises(ValueError, match="missing or malformed"):
        read_rejected(record.value, 7, headers)


# --- settings ----------------------------------------------------------------------------------------------


def test_the_dead_letter_topic_is_one_of_the_bridges_topics_unless_turned_off() -> None:
    on = build("serve", {}, {})
    assert on.rejected_topic == "tim.rejected"
    assert on.topics == (*on.callback_topics, "tim.rejected")
    off = build("serve", {}, {"BRIDGE_DEAD_LETTER": "false"})
    assert (off.dead_letter_topic, off.topics) == (None, off.callback_topics)
    named = build("topics", {"rejected_topic": "dlq.tim"}, {})
    assert named.topics[-1] == "dlq.tim"
    assert {"rejected_topic", "dead_letter"} <= {option.field for option in COMMANDS["topics"].options}


def test_a_dead_letter_topic_that_is_also_a_callback_topic_is_refused_at_start() -> None:
    with pytest.raises(SettingsError, match="must be a topic of its own"):
        build("serve", {"rejected_topic": "tim.c2c"}, {})
    result = run_bridge("serve", "--bootstrap-servers", NO_BROKER, "--rejected-topic", "tim.app")
    assert result.returncode == 2
    assert "--rejected-topic tim.app is also a callback topic" in result.stderr


# --- the answers and their accounting, on the fake publisher -----------------------------------------------


@pytest.fixture
async def fake_bridge(
    offline_settings: ServeSettings, publisher: FakePublisher
) -> AsyncIterator[BridgeClient]:
    async with TestClient(TestServer(create_app(offline_settings, publisher=publisher))) as client:
        yield client


async def test_a_refused_callback_is_kept_then_answered_400_and_counted_as_rejected_and_dead_lettered(
    fake_bridge: BridgeClient, publisher: FakePublisher, offline_settings: ServeSettings
) -> None:
    response = await fake_bridge.post("/callback", params=SEED.query, data=b"{")
    assert response.status == 400
    assert response.headers["X-Bridge-Outcome"] == "rejected"
    [record] = publisher.records
    assert (record.topic, record.value) == (offline_settings.rejected_topic, b"{")
    stats = await (await fake_bridge.get("/stats")).json()
    assert (stats["dead_lettered"], stats["outcomes"]["rejected"]) == (1, 1)
    metrics = await (await fake_bridge.get("/metrics")).text()
    assert 'bridge_dead_lettered_total{reason="invalid_json"} 1.0' in metrics


async def test_a_refused_callback_that_cannot_be_kept_is_a_503_saying_so_never_its_400(
    fake_bridge: BridgeClient, publisher: FakePublisher
) -> None:
    publisher.failure = BrokerNotReady("Kafka is not ready (connecting); the callback was not written")
    response = await fake_bridge.post(
        "/callback", params=SEED.query, data=orjson.dumps({**SEED.body, "MsgTime": "x"})
    )
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert response.headers["X-Bridge-Outcome"] == "failed"
    answer = await response.json()
    assert answer["ErrorCode"] == 50301
    assert answer["ErrorInfo"].startswith(
        "the callback was refused (40003: OfficialAccount.CallbackAfterSendMsg:"
    )
    assert "could not be kept in the dead-letter topic" in answer["ErrorInfo"]
    metrics = await (await fake_bridge.get("/metrics")).text()
    assert 'bridge_dead_letter_failures_total{reason="invalid_field"} 1.0' in metrics
    assert 'bridge_publish_errors_total{kind="not_ready"} 1.0' in metrics
    assert (await (await fake_bridge.get("/stats")).json())["dead_lettered"] == 0


async def test_with_the_dead_letter_topic_off_a_refused_callback_is_answered_400_and_kept_nowhere(
    offline_settings: ServeSettings, publisher: FakePublisher
) -> None:
    off = replace(offline_settings, dead_letter=False)
    async with TestClient(TestServer(create_app(off, publisher=publisher))) as client:
        response = await client.post("/callback", params=SEED.query, data=b"[]")
        assert response.status == 400
    assert publisher.records == []


# --- against Apache Kafka ----------------------------------------------------------------------------------


@pytest.fixture
def signed_settings(settings: ServeSettings) -> ServeSettings:
    return replace(settings, callback_token=(Secret(TOKEN),), sdk_app_id=(APP,), max_body_bytes=4000)


@pytest.fixture
async def signed_bridge(signed_settings: ServeSettings) -> AsyncIterator[BridgeClient]:
    async with TestClient(TestServer(create_app(signed_settings))) as client:
        await wait_until_ready(client)
        yield client


async def answers_without_dead_letters(variants: list[Variant]) -> list[tuple[int, bytes]]:
    """What a bridge without the dead-letter topic (the answers before issue 16) says to each variant."""
    before = replace(unique_settings(NO_BROKER), dead_letter=False)
    publisher = FakePublisher()
    publisher.confirm.set()
    async with TestClient(TestServer(create_app(before, publisher=publisher))) as client:
        answers = []
        for variant in variants:
            response = await client.post("/callback", params=variant.query, data=variant.body)
            answers.append((response.status, await response.read()))
    assert publisher.records == []
    return answers


def by_value(records: list[ConsumerRecord[bytes, bytes]]) -> dict[bytes, ConsumerRecord[bytes, bytes]]:
    found = {record.value or b"": record for record in records}
    assert len(found) == len(records), "two dead letters with the same bytes"
    return found


async def test_malformed_fixtures_land_in_the_dead_letter_topic_byte_for_byte_and_get_the_same_400(
    signed_bridge: BridgeClient, signed_settings: ServeSettings, kafka: str
) -> None:
    assert len({variant.body for variant in VARIANTS}) == len(VARIANTS)
    expected_answers = await answers_without_dead_letters(VARIANTS)
    queries = []
    for variant, (status, body) in zip(VARIANTS, expected_answers, strict=True):
        query = signed(variant.query)
        queries.append(query)
        response = await signed_bridge.post("/callback", params=query, data=variant.body)
        assert (response.status, await response.read()) == (status, body), variant.name
        assert orjson.loads(body)["ErrorCode"] == variant.error_code, variant.name
        assert response.headers["X-Bridge-Outcome"] == "rejected"

    assert await count_records(kafka, signed_settings.callback_topics) == 0
    records = by_value(await read_records(kafka, [signed_settings.rejected_topic], expect=len(VARIANTS)))
    assert len(records) == len(VARIANTS)
    partition = partition_for(APP, signed_settings.partitions)
    for variant, query, (_, answer) in zip(VARIANTS, queries, expected_answers, strict=True):
        record = records[variant.body]  # the exact bytes posted
        assert (record.key, record.partition) == (APP.encode(), partition), variant.name
        headers = dict(record.headers)
        info = orjson.loads(answer)
        assert headers["rejected-reason"].decode() == info["ErrorInfo"]
        assert headers["rejected-error-code"] == str(variant.error_code).encode()
        assert headers["SdkAppid"] == APP.encode()
        assert headers["CallbackCommand"] == variant.query["CallbackCommand"].encode()
        assert orjson.loads(headers["query"]) == {k: v for k, v in query.items() if k != "Sign"}
    metrics = await (await signed_bridge.get("/metrics")).text()
    assert f'bridge_dead_lettered_total{{reason="invalid_json"}} {4.0 * len(load_fixtures())}' in metrics
    assert (await (await signed_bridge.get("/stats")).json())["dead_lettered"] == len(VARIANTS)


async def test_what_is_not_authentic_or_not_whole_is_kept_nowhere(
    signed_bridge: BridgeClient, signed_settings: ServeSettings, kafka: str
) -> None:
    """Unsigned, badly signed, another app's, too large, a bad query, another method: not one record. (Bodies
    that never arrive or that the HTTP parser refuses: tests/test_hostile_clients.py, whose count of records
    covers the dead-letter topic too.)"""
    bad = b"{not json"
    unsigned = await signed_bridge.post("/callback", params=SEED.query, data=bad)
    wrong = await signed_bridge.post("/callback", params=signed(SEED.query, "another-token"), data=bad)
    other_app = await signed_bridge.post(
        "/callback", params=signed({**SEED.query, "SdkAppid": "1400000099"}), data=bad
    )
    too_large = await signed_bridge.post("/callback", params=signed(SEED.query), data=b"{" + b" " * 5000)
    bad_query = await signed_bridge.post(
        "/callback", params=signed({**SEED.query, "SdkAppid": "app"}), data=bad
    )
    other_method = await signed_bridge.put("/callback", params=signed(SEED.query), data=bad)
    statuses = [r.status for r in (unsigned, wrong, other_app, too_large, bad_query, other_method)]
    assert statuses == [401, 401, 403, 413, 400, 405]
    assert await count_records(kafka, signed_settings.topics) == 0
    assert signed_settings.rejected_topic in signed_settings.topics


@dataclass
class ProxiedBridge:
    proxy: KafkaProxy
    client: BridgeClient
    settings: ServeSettings


@pytest.fixture
async def proxied(kafka: str) -> AsyncIterator[ProxiedBridge]:
    """A bridge -> fault proxy -> the session's broker, with a one-second delivery deadline."""
    if "," in kafka:
        pytest.skip("advertise_self sends every client to one broker: a one-broker cluster only")
    host, _, port = kafka.rpartition(":")
    proxy = await KafkaProxy(int(port), free_port(), upstream_host=host, advertise_self=True).start()
    settings = unique_settings(proxy.bootstrap_servers, delivery_timeout=1.0)
    try:
        async with TestClient(TestServer(create_app(settings))) as client:
            await wait_until_ready(client)
            yield ProxiedBridge(proxy, client, settings)
    finally:
        await proxy.close()


async def test_a_black_holed_or_refusing_broker_makes_a_refused_callback_a_503_saying_it_was_not_kept(
    proxied: ProxiedBridge, kafka: str
) -> None:
    client = proxied.client
    proxied.proxy.set_blackhole(True)
    try:
        started = time.monotonic()
        held = await client.post("/callback", params=SEED.query, data=b"held{")
        elapsed = time.monotonic() - started
    finally:
        proxied.proxy.set_blackhole(False)
    assert held.status == 503
    assert elapsed < 1.0 + 0.5, "answered within the callback's deadline"
    answer = await held.json()
    assert answer["ErrorCode"] == 50302
    assert "the callback was refused (40002:" in answer["ErrorInfo"]
    assert "could not be kept in the dead-letter topic" in answer["ErrorInfo"]
    assert held.headers["X-Bridge-Outcome"] == "ambiguous", "the record may still land"

    proxied.proxy.faults.refuse_produce = CORRUPT_MESSAGE
    refused = await client.post("/callback", params=SEED.query, data=b"refused{")
    assert refused.status == 503
    assert (await refused.json())["ErrorCode"] == 50303
    proxied.proxy.faults.clear()

    kept = await client.post("/callback", params=SEED.query, data=b"kept{")
    assert kept.status == 400
    records = await read_records(kafka, [proxied.settings.rejected_topic], expect=1)
    values = [record.value for record in records]
    assert b"kept{" in values
    assert b"refused{" not in values, "the broker refused it: never appended"
    app = client.app
    assert app is not None
    assert app[METRICS].dead_letter_failures == {"invalid_json": 2}


async def test_consume_prints_the_dead_letters_in_the_shape_of_their_json_schema(
    signed_bridge: BridgeClient, signed_settings: ServeSettings
) -> None:
    posted = [b"\xff\xfe binary", b'{"MsgTime": "soon"}', b"line\nbreak{"]
    for body in posted:
        assert (await signed_bridge.post("/callback", params=signed(SEED.query), data=body)).status == 400
    connection = ["--bootstrap-servers", ",".join(signed_settings.bootstrap_servers)]
    result = await asyncio.to_thread(
        run_bridge, "consume", *connection, "--topic", signed_settings.rejected_topic, "--from-beginning"
    )
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(posted)
    for line in lines:
        jsonschema.validate(line, json_schema())
    shown = [
        line["body"].encode() if "body" in line else base64.b64decode(line["body_base64"]) for line in lines
    ]
    assert shown == posted, "in the order posted: one app, one partition"
    assert [line["error_code"] for line in lines] == [40002, 40003, 40002]
    assert "3 events written" in result.stderr


async def test_replay_reposts_a_dead_letter_to_a_fixed_bridge_which_writes_it_to_its_callback_topic(
    signed_bridge: BridgeClient, signed_settings: ServeSettings, kafka: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tencent starts sending `MsgTime` as a decimal string: today's bridge keeps the callback and answers
    400; the next release takes the string (simulated here by loosening the command table); the dead letter,
    replayed to it unsigned, becomes the callback record it should have been, its body byte for byte."""
    raw = orjson.dumps({**SEED.body, "MsgTime": "1490686222"}, option=orjson.OPT_INDENT_2)  # not compact
    query = signed(SEED.query)
    assert (await signed_bridge.post("/callback", params=query, data=raw)).status == 400
    [dead_letter] = await read_records(kafka, [signed_settings.rejected_topic], expect=1)
    event = decode_any(dead_letter)
    assert isinstance(event, RejectedEvent)
    assert (event.raw_callback(), event.entity, event.command) == (raw, APP, SEED.query["CallbackCommand"])

    spec = commands.COMMANDS["OfficialAccount.CallbackAfterSendMsg"]
    loosened = tuple(
        replace(field, check=commands.event_time) if field.name == "MsgTime" else field
        for field in spec.fields
    )
    fixed_spec = replace(spec, fields=loosened)
    monkeypatch.setitem(commands.COMMANDS, spec.name, fixed_spec)
    # The validators are compiled from the table at import, as a release would compile its own.
    monkeypatch.setitem(commands.VALIDATORS, spec.name, commands.compile_validator(fixed_spec))
    fixed = unique_settings(kafka)  # no token, as `--allow-unsigned`: the kept query has no Sign
    async with TestClient(TestServer(create_app(fixed))) as receiver:
        await wait_until_ready(receiver)
        url = str(receiver.make_url("/callback"))
        window = reading(ReplaySettings, signed_settings, topic=signed_settings.rejected_topic, to_url=url)
        replay = Replay(window, UrlSink(url), report=io.StringIO())
        tally = await replay.run()
    assert (tally.copied, tally.errors, replay.failure) == (1, 0, None)

    [record] = await read_records(kafka, [fixed.topic], expect=1)
    assert record.value is not None
    envelope = orjson.loads(record.value)
    assert envelope["query"] == {k: v for k, v in query.items() if k != "Sign"}
    assert record.value.endswith(b',"callback":' + raw + b"}"), "the body embedded byte for byte"
    assert record.key == SEED.body["MsgKey"].encode()


async def test_an_event_reader_reads_an_apps_dead_letters_from_its_partition_only(
    signed_bridge: BridgeClient, signed_settings: ServeSettings
) -> None:
    assert (await signed_bridge.post("/callback", params=signed(SEED.query), data=b"[1]")).status == 400
    one_app = reading(ReplaySettings, signed_settings, topic=signed_settings.rejected_topic, account=APP)
    async with EventReader(
        one_app.bootstrap_servers, one_app.topic, select=select_of(one_app), partitions=None
    ) as reader:
        events: list[Any] = [event async for event in reader]
    assert [event.value for event in events] == [b"[1]"]
    assert isinstance(events[0], RejectedEvent)
    assert events[0].coordinates.partition == partition_for(APP, signed_settings.partitions)
    assert events[0].json_line().startswith(b'{"schema":"tencent-chat-rejected/1"')
