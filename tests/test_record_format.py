"""`--record-format`: the default envelope, with its cheap headers, and the CloudEvents Kafka binding (binary
mode), written by the bridge and read back by the library, `consume` and `replay` alike."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import jsonschema
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.errors import RecordTooLarge
from bridge.ingest.server import create_app
from bridge.kafka.sizes import check_record_size, record_bytes
from bridge.readback.events import Event, InvalidEnvelope, decode
from bridge.readback.reader import EventReader
from bridge.readback.replay import Replay
from bridge.readback.sinks import TopicSink, UrlSink
from bridge.settings import ReplaySettings, ServeSettings, SettingsError, build
from bridge.tencent import cloudevents
from bridge.tencent.callback import ParsedCallback, parse_callback
from bridge.tencent.commands import MAX_ID_BYTES
from bridge.tencent.envelope import envelope
from bridge.tencent.partitioner import partition_for
from bridge.tencent.protocol import parse_query
from tests.conftest import BridgeClient
from tests.support.fakes import FakePublisher
from tests.support.readback import ACCOUNTS, DAY_MS, Posted, message, post_all
from tests.support.records import StoredRecord, create_topic, read_records
from tests.support.requests import Fixture, fixture, load_fixtures
from tests.support.serve import wait_until_ready
from tests.support.settings import reading, unique_settings

RECEIVED_AT_MS = 1_764_143_520_123  # 2025-11-26T07:52:00.123Z
MAX_AGE_MS = 7 * DAY_MS


def parsed(callback: Fixture, received_at_ms: int = RECEIVED_AT_MS) -> ParsedCallback:
    return parse_callback(
        parse_query(callback.query.items()),
        callback.raw_body,
        received_at_ms=received_at_ms,
        max_event_age_ms=MAX_AGE_MS,
    )


def stored(callback: ParsedCallback, record_format: str) -> StoredRecord:
    record = callback.record("tim.official-account", record_format)
    return StoredRecord(record.value, record.key, record.headers, record.timestamp_ms)


def same_event(a: Event, b: Event) -> bool:
    """Equal as a job sees a callback: everything but where it is stored and how."""
    fields = ("command", "sdk_app_id", "family", "entity", "key", "event_time_ms", "received_at_ms")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and (a.callback, a.query) == (
        b.callback,
        b.query,
    )


# The mapping, without a broker.


def test_the_envelope_record_is_todays_value_with_the_cheap_headers_after_todays_three() -> None:
    """The default stays byte-identical: the value is the envelope, the first three headers are unchanged,
    and the owning entity, the receive time and the envelope version follow."""
    seed = fixture("oa-after-send-text")
    callback = parsed(seed)
    record = callback.record("tim.official-account")
    assert record == callback.record("tim.official-account", "envelope")
    assert record.value == envelope(seed.raw_body, seed.query, RECEIVED_AT_MS)
    assert record.headers == (
        ("CallbackCommand", b"OfficialAccount.CallbackAfterSendMsg"),
        ("SdkAppid", b"1400000000"),
        ("content-type", b"application/json"),
        ("entity", b"@TOA#_2J4SZEAEL"),
        ("received_at", b"1764143520123"),
        ("schema", b"tencent-chat-callback/1"),
    )


def test_a_cloudevents_record_is_the_body_byte_for_byte_with_the_metadata_in_ce_headers() -> None:
    seed = fixture("oa-after-send-text")
    callback = parsed(seed)
    record = callback.record("tim.official-account", "cloudevents")
    assert record.value == seed.raw_body
    assert dict(record.headers) == {
        "ce_specversion": b"1.0",
        "ce_id": b"1400000000/OfficialAccount.CallbackAfterSendMsg/71_1_1698741698",
        "ce_source": b"/tencent-cloud-chat/1400000000",
        "ce_type": b"com.tencentcloud.chat.OfficialAccount.CallbackAfterSendMsg",
        "ce_time": b"2025-11-26T07:52:00.123Z",  # EventTime 2022 is older than the max age: the receive time
        "content-type": b"application/json",
        "ce_partitionkey": b"@TOA#_2J4SZEAEL",
        "ce_receivedat": b"2025-11-26T07:52:00.123Z",
        "ce_query": b"SdkAppid=1400000000&CallbackCommand=OfficialAccount.CallbackAfterSendMsg"
        b"&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI",
    }
    assert [name for name, _ in record.headers] == list(cloudevents.HEADER_NAMES)


def test_key_partition_entity_and_timestamp_are_the_same_in_both_formats_for_every_fixture() -> None:
    for callback in load_fixtures():
        one = parsed(callback, received_at_ms=1_670_574_414_999)  # recent enough for the samples' EventTime
        envelope_record, ce_record = one.record("t", "envelope"), one.record("t", "cloudevents")
        assert (envelope_record.key, envelope_record.entity, envelope_record.timestamp_ms) == (
            ce_record.key,
            ce_record.entity,
            ce_record.timestamp_ms,
        ), callback.name
        assert ce_record.value == callback.raw_body
        headers = dict(ce_record.headers)
        assert cloudevents.epoch_ms(headers["ce_time"].decode()) == ce_record.timestamp_ms
        assert headers["ce_partitionkey"] == ce_record.entity.encode()


def test_every_fixtures_cloudevents_headers_validate_against_the_shipped_schema() -> None:
    schema = cloudevents.headers_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for callback in load_fixtures():
        record = parsed(callback).record("t", "cloudevents")
        jsonschema.validate({name: value.decode() for name, value in record.headers}, schema)


def test_the_shipped_schema_refuses_headers_the_bridge_never_writes() -> None:
    schema = cloudevents.headers_schema()
    good = {
        name: value.decode()
        for name, value in parsed(fixture("oa-after-send-text")).record("t", "cloudevents").headers
    }
    for change in (
        {"ce_specversion": "0.3"},
        {"ce_type": "OfficialAccount.CallbackAfterSendMsg"},
        {"ce_time": "2025-11-26 07:52:00"},
        {"ce_query": "contenttype=json"},
        {"ce_extra": "x"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**good, **change}, schema)


@pytest.mark.parametrize(
    "epoch_ms", [0, 1, 999, 1_000, 1_670_574_414_123, 1_764_143_520_123, 253_402_300_799_999]
)
def test_rfc3339_times_round_trip_to_the_millisecond(epoch_ms: int) -> None:
    text = cloudevents.rfc3339(epoch_ms)
    assert text.endswith("Z")
    assert len(text) == 24
    assert cloudevents.epoch_ms(text) == epoch_ms


def test_rfc3339_times_of_another_writer_are_read_with_their_offset() -> None:
    assert cloudevents.epoch_ms("2025-11-26T08:52:00.123+01:00") == RECEIVED_AT_MS
    assert cloudevents.epoch_ms("2025-11-26T07:52:00.123456Z") == RECEIVED_AT_MS
    for bad in ("2025-11-26T07:52:00", "2025-11-26", "yesterday"):
        with pytest.raises(ValueError, match=r"RFC 3339|isoformat"):
            cloudevents.epoch_ms(bad)


def test_a_query_of_any_characters_round_trips_through_ce_query_in_order() -> None:
    seed = fixture("oa-after-send-text")
    query = {
        "SdkAppid": "1400000000",
        "CallbackCommand": "OfficialAccount.CallbackAfterSendMsg",
        "ClientIP": "",
        "OptPlatform": "a b+c&d=e%f/g?h",
        "x-unknown": "中文 🙂",
        "RequestTime": "1764143520",
    }
    callback = parse_callback(
        parse_query(query.items()), seed.raw_body, received_at_ms=RECEIVED_AT_MS, max_event_age_ms=MAX_AGE_MS
    )
    event = decode(stored(callback, "cloudevents"))
    assert event.query == query
    assert list(event.query) == list(query)


def test_both_formats_decode_to_the_same_event_and_print_the_same_envelope_line() -> None:
    """What `consume` prints for a cloudevents record is the envelope the default format writes, byte for
    byte; `replay --to-url` posts the same body and query."""
    for callback in load_fixtures():
        one = parsed(callback)
        as_envelope, as_cloudevent = decode(stored(one, "envelope")), decode(stored(one, "cloudevents"))
        assert (as_envelope.record_format, as_cloudevent.record_format) == ("envelope", "cloudevents")
        assert same_event(as_envelope, as_cloudevent), callback.name
        assert as_envelope.identity == as_cloudevent.identity
        assert as_cloudevent.json_line() == as_envelope.json_line() == one.record("t").value + b"\n"
        assert as_cloudevent.raw_callback() == as_envelope.raw_callback() == callback.raw_body


def test_a_cloudevents_body_with_line_breaks_prints_on_one_line() -> None:
    seed = fixture("oa-after-send-text")
    raw_body = orjson.dumps(seed.body, option=orjson.OPT_INDENT_2)
    callback = parse_callback(
        parse_query(seed.query.items()), raw_body, received_at_ms=RECEIVED_AT_MS, max_event_age_ms=MAX_AGE_MS
    )
    event = decode(stored(callback, "cloudevents"))
    line = event.json_line()
    assert line.count(b"\n") == 1
    assert line.endswith(b"\n")
    assert orjson.loads(line) == orjson.loads(callback.record("t").value)
    assert event.raw_callback() == raw_body


def _broken(change: dict[str, bytes | None], value: bytes | None = None) -> StoredRecord:
    good = stored(parsed(fixture("oa-after-send-text")), "cloudevents")
    headers = tuple((n, change.get(n, v)) for n, v in good.headers if change.get(n, v) is not None)
    extra = tuple((n, v) for n, v in change.items() if v is not None and n not in dict(good.headers))
    return replace(good, headers=headers + extra, value=good.value if value is None else value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "value", "reason"),
    [
        ({"ce_query": None}, None, "missing headers ce_query"),
        ({"ce_specversion": b"0.3"}, None, "ce_specversion is '0.3'"),
        ({"ce_type": b"com.example.Other.Event"}, None, "ce_type"),
        ({"ce_type": b"com.tencentcloud.chat.C2C.CallbackAfterSendMsg"}, None, "ce_id"),
        ({"ce_source": b"/tencent-cloud-chat/1400000001"}, None, "ce_id"),
        ({"ce_partitionkey": b"@TOA#_other"}, None, "ce_partitionkey"),
        ({"ce_id": b"1400000000/OfficialAccount.CallbackAfterSendMsg/another"}, None, "ce_id names the key"),
        ({"ce_time": b"yesterday"}, None, "ce_time"),
        ({"ce_query": b"SdkAppid=1400000000&Sign=abc"}, None, "Sign"),
        ({"ce_query": b"SdkAppid=1400000001"}, None, "SdkAppid"),
        ({"content-type": b"text/plain"}, None, "content-type"),
        ({"ce_receivedat": b"\xff"}, None, "not UTF-8"),
        ({}, b"[1, 2]", "not a JSON object"),
        ({}, b'{"CallbackCommand": "OfficialAccount.CallbackAfterMsgWithDraw"}', "CallbackCommand differ"),
        ({}, b"not json", "not UTF-8 JSON"),
    ],
)
def test_a_cloudevent_the_bridge_did_not_write_is_a_bad_record_saying_why(
    change: dict[str, bytes | None], value: bytes | None, reason: str
) -> None:
    with pytest.raises(InvalidEnvelope, match=reason.replace("(", r"\(")):
        decode(_broken(change, value))


def test_a_repeated_ce_header_is_refused() -> None:
    good = stored(parsed(fixture("oa-after-send-text")), "cloudevents")
    with pytest.raises(InvalidEnvelope, match="appears twice"):
        decode(replace(good, headers=(*good.headers, ("ce_id", b"x"))))


@pytest.mark.parametrize("max_url_bytes", [4096, 16384])
def test_the_largest_cloudevents_record_fits_the_topics_limit(max_url_bytes: int) -> None:
    """The value is the body alone; the headers (a query of `--max-url-bytes` that triples when
    form-encoded, `/` becoming `%2F`, and a key and entity of the longest allowed) fit the 64 KiB headroom,
    so the size rule holds in this format too."""
    settings = ServeSettings(max_url_bytes=max_url_bytes)
    command = "Unknown.C" + "x" * 110
    long_id = "k" * MAX_ID_BYTES
    query = {"SdkAppid": "1" * 19, "CallbackCommand": command, "x": "/" * (settings.max_url_bytes - 200)}
    record = ParsedCallback(
        routed=replace(
            parsed(fixture("oa-after-send-text")).routed,
            command=command,
            entity=f"{long_id}:{long_id}",
            key=f"{command}:{long_id}",
        ),
        identity="",
        timestamp_ms=RECEIVED_AT_MS,
        body=b" " * settings.max_body_bytes,
        query=query,
        received_at_ms=RECEIVED_AT_MS,
    ).record("t", "cloudevents")
    assert len(dict(record.headers)["ce_query"]) > 3 * (settings.max_url_bytes - 200)
    assert record_bytes(record) <= settings.max_record_bytes
    check_record_size(record, {}, settings.max_record_bytes, "none")
    with pytest.raises(RecordTooLarge, match="not written"):
        check_record_size(record, {"t": len(record.value)}, settings.max_record_bytes, "none")


def test_record_format_is_an_option_of_serve_and_dev_defaulting_to_envelope() -> None:
    assert build("serve", {}, {}).record_format == "envelope"
    assert build("dev", {}, {}).record_format == "envelope"
    assert build("serve", {}, {"BRIDGE_RECORD_FORMAT": "cloudevents"}).record_format == "cloudevents"
    assert build("dev", {"record_format": "cloudevents"}, {}).record_format == "cloudevents"
    with pytest.raises(SettingsError, match="BRIDGE_RECORD_FORMAT='avro'"):
        build("serve", {}, {"BRIDGE_RECORD_FORMAT": "avro"})


async def test_a_bridge_told_cloudevents_hands_the_publisher_the_body_and_ce_headers(
    offline_settings: ServeSettings, publisher: FakePublisher
) -> None:
    seed = fixture("oa-after-send-text")
    app = create_app(replace(offline_settings, record_format="cloudevents"), publisher=publisher)
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/callback", params=seed.query, data=seed.raw_body)
        assert response.status == 200, await response.text()
    (record,) = publisher.records
    assert record.value == seed.raw_body
    assert record.key == b"71_1_1698741698"
    assert dict(record.headers)["ce_partitionkey"] == b"@TOA#_2J4SZEAEL"


# Against the broker.


@pytest.fixture
def ce_settings(settings: ServeSettings) -> ServeSettings:
    return replace(settings, record_format="cloudevents")


@pytest.fixture
async def ce_bridge(ce_settings: ServeSettings) -> AsyncIterator[BridgeClient]:
    async with TestClient(TestServer(create_app(ce_settings))) as client:
        await wait_until_ready(client)
        yield client


def recent(count: int) -> list[Posted]:
    """Official-account messages of the last day: their EventTime is the record timestamp and `ce_time`."""
    first_day_ms = (int(time.time() * 1000) // DAY_MS - 1) * DAY_MS
    return [message(0, 60 + n, ACCOUNTS[n % 3], n, first_day_ms) for n in range(count)]


async def test_callbacks_through_a_cloudevents_bridge_land_as_the_body_with_ce_headers_key_and_partition(
    ce_bridge: BridgeClient, ce_settings: ServeSettings, kafka: str
) -> None:
    callbacks = load_fixtures()
    before_ms = int(time.time() * 1000)
    for callback in callbacks:
        response = await ce_bridge.post("/callback", params=callback.query, data=callback.raw_body)
        assert response.status == 200, await response.text()
    after_ms = int(time.time() * 1000)
    records = await read_records(kafka, ce_settings.topics, expect=len(callbacks))
    assert len(records) == len(callbacks)
    schema = cloudevents.headers_schema()
    by_body = {record.value: record for record in records}
    for callback in callbacks:
        record = by_body[callback.raw_body]  # the body, byte for byte, is the value
        expected = parsed(callback, received_at_ms=before_ms).record("t", "cloudevents")
        headers = {name: value.decode() for name, value in record.headers}
        jsonschema.validate(headers, schema)
        assert record.key == expected.key
        assert record.partition == partition_for(expected.entity, ce_settings.partitions)
        assert headers["ce_partitionkey"] == expected.entity
        assert headers["ce_id"] == f"1400000000/{callback.query['CallbackCommand']}/{expected.key.decode()}"
        assert headers["ce_type"] == f"com.tencentcloud.chat.{callback.query['CallbackCommand']}"
        assert before_ms <= cloudevents.epoch_ms(headers["ce_receivedat"]) <= after_ms
        assert cloudevents.epoch_ms(headers["ce_time"]) == record.timestamp
        assert decode(record).query == callback.query


async def posted_in_both_formats(settings: ServeSettings, callbacks: list[Posted]) -> None:
    """The first half of `callbacks` through an envelope bridge, the rest through a cloudevents bridge, on
    the same topics (a bridge switched from one format to the other)."""
    half = len(callbacks) // 2
    for record_format, part in (("envelope", callbacks[:half]), ("cloudevents", callbacks[half:])):
        app = create_app(replace(settings, record_format=record_format, dedup_window=0))
        async with TestClient(TestServer(app)) as client:
            await wait_until_ready(client)
            await post_all(client, part)


async def test_a_topic_mixing_both_formats_reads_as_one_in_the_library_and_in_consume(
    settings: ServeSettings, kafka: str
) -> None:
    callbacks = recent(8)
    await posted_in_both_formats(settings, callbacks)

    async with EventReader(kafka, settings.topic) as reader:
        events = [event async for event in reader]
    assert reader.stats.bad == 0
    assert sorted(e.record_format for e in events) == ["cloudevents"] * 4 + ["envelope"] * 4
    assert sorted(e.key for e in events) == sorted(c.key or "" for c in callbacks)
    for event in events:
        posted = next(c for c in callbacks if c.key == event.key)
        assert (event.callback, event.query, event.entity) == (posted.body, posted.query, posted.account)
        assert event.event_time_ms == posted.event_time == event.coordinates.timestamp
        if event.record_format == "envelope":  # the cheap headers are on envelope records
            headers = dict(event.headers)
            assert headers["entity"] == posted.account.encode()
            assert headers["received_at"] == str(event.received_at_ms).encode()
            assert headers["schema"] == b"tencent-chat-callback/1"

    result = await asyncio.to_thread(
        _run,
        sys.executable,
        "-m",
        "bridge",
        "consume",
        "--bootstrap-servers",
        kafka,
        "--topic",
        settings.topic,
        "--from-beginning",
    )
    assert result.returncode == 0, result.stderr
    assert "8 events written, 0 filtered out, 0 bad records" in result.stderr
    lines = result.stdout.encode().splitlines()
    assert sorted(lines) == sorted(event.json_line().rstrip(b"\n") for event in events)
    for line in lines:
        shape = orjson.loads(line)
        assert set(shape) == {"schema", "received_at", "query", "callback"}
        assert shape["schema"] == "tencent-chat-callback/1"


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("BRIDGE_")}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, env=clean)


async def replayed(settings: ReplaySettings, sink: TopicSink | UrlSink) -> Replay:
    replay = Replay(settings, sink, report=io.StringIO())
    async with asyncio.timeout(60):
        await replay.run()
    return replay


async def test_replay_copies_cloudevents_records_to_a_topic_unchanged(
    ce_bridge: BridgeClient, ce_settings: ServeSettings, kafka: str
) -> None:
    callbacks = recent(6)
    await post_all(ce_bridge, callbacks)
    destination = f"{ce_settings.topic}.copy"
    await create_topic(kafka, destination, 5)
    window = reading(ReplaySettings, ce_settings, to_topic=destination)
    replay = await replayed(window, TopicSink(window, destination))
    assert (replay.tally.copied, replay.tally.errors) == (6, 0)

    originals = {r.value: r for r in await read_records(kafka, [ce_settings.topic], expect=6)}
    copies = await read_records(kafka, [destination], expect=6)
    assert len(copies) == 6
    for copy in copies:
        original = originals[copy.value]
        assert (copy.key, copy.timestamp, copy.headers) == (
            original.key,
            original.timestamp,
            original.headers,
        )
        assert copy.partition == partition_for(dict(copy.headers)["ce_partitionkey"].decode(), 5)
        assert same_event(decode(copy), decode(original))


async def test_replay_to_a_cloudevents_bridges_url_round_trips_each_record(
    ce_bridge: BridgeClient, ce_settings: ServeSettings, kafka: str
) -> None:
    """A replayed record equals the original: the same value, key, partition, timestamp and headers, but for
    the receive time (it was received again)."""
    callbacks = recent(6)
    await post_all(ce_bridge, callbacks)
    second = replace(unique_settings(kafka), record_format="cloudevents")
    async with TestClient(TestServer(create_app(second))) as client:
        await wait_until_ready(client)
        window = reading(ReplaySettings, ce_settings, to_url=str(client.make_url("/callback")))
        replay = await replayed(window, UrlSink(str(client.make_url("/callback"))))
    assert (replay.tally.copied, replay.tally.errors) == (6, 0)

    originals = {r.value: r for r in await read_records(kafka, [ce_settings.topic], expect=6)}
    copies = await read_records(kafka, [second.topic], expect=6)
    assert sorted(c.value for c in copies) == sorted(originals)
    for copy in copies:
        original = originals[copy.value]
        assert (copy.key, copy.partition, copy.timestamp) == (
            original.key,
            original.partition,
            original.timestamp,
        )
        again, first = dict(copy.headers), dict(original.headers)
        assert again.pop("ce_receivedat") >= first.pop("ce_receivedat")
        assert again == first
        copied, source = decode(copy), decode(original)
        assert same_event(copied, replace(source, received_at_ms=copied.received_at_ms))


async def test_replay_from_an_envelope_topic_into_a_cloudevents_bridge_keeps_the_identity(
    bridge: BridgeClient, settings: ServeSettings, kafka: str, tmp_path: Path
) -> None:
    """Changing the format of a topic's history by replaying it through a bridge told `cloudevents`: each
    callback keeps its key, partition, timestamp and identity."""
    callbacks = recent(4)
    await post_all(bridge, callbacks)
    second = replace(unique_settings(kafka), record_format="cloudevents")
    async with TestClient(TestServer(create_app(second))) as client:
        await wait_until_ready(client)
        url = str(client.make_url("/callback"))
        replay = await replayed(
            reading(ReplaySettings, settings, to_url=url, skipped=str(tmp_path / "s")), UrlSink(url)
        )
    assert replay.tally.copied == 4
    originals = {decode(r).identity: r for r in await read_records(kafka, [settings.topic], expect=4)}
    for copy in await read_records(kafka, [second.topic], expect=4):
        event = decode(copy)
        original = originals[event.identity]
        assert event.record_format == "cloudevents"
        assert (copy.key, copy.partition, copy.timestamp) == (
            original.key,
            original.partition,
            original.timestamp,
        )
        assert copy.value == decode(original).raw_callback()
