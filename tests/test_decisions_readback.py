"""Forward mode's decision records read back: `consume --decisions` prints them after their callbacks,
`replay --to-topic` copies them byte for byte in order, `replay --to-url` never posts one, and
`EventReader.records()` yields them as `DecisionEvent`s; without the opt-in, the readers read as before.

The data set (Apache Kafka): two forward-mode bridges writing to the same topics, one whose app server
allows, one whose app server denies, post one-to-one messages of three conversations over two days: per
conversation and day, a before-callback and its after-callback twice (allowed), then a before-callback
alone (denied). Each before-callback's record is followed, on its partition, by the app's decision."""

from __future__ import annotations

import asyncio
import io
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.structs import ConsumerRecord

from bridge.ingest.server import create_app
from bridge.readback.decisions import DECISION_SCHEMA, DecisionEvent
from bridge.readback.events import Event, EventFilter
from bridge.readback.reader import EventReader
from bridge.readback.replay import Replay
from bridge.readback.sinks import DeliveryFailed, Failure, FileSink, TopicSink, UrlSink
from bridge.settings import ReplaySettings, ServeSettings
from bridge.tencent.commands import route
from bridge.tencent.envelope import SCHEMA
from bridge.tencent.partitioner import partition_for
from tests.support.app_server import ALLOW, DENY, AppServer
from tests.support.readback import DAY_MS, FIRST_DAY_MS
from tests.support.records import create_topic, read_records
from tests.support.serve import run_bridge, wait_until_ready
from tests.support.settings import reading, unique_settings

BEFORE = "C2C.CallbackBeforeSendMsg"
AFTER = "C2C.CallbackAfterSendMsg"
SDK_APP_ID = "1400000000"
CONVERSATIONS = (("alice", "bob"), ("carol", "dave"), ("erin", "frank"))
DAYS = 2
CALLBACKS = len(CONVERSATIONS) * DAYS * 5
DECISIONS = len(CONVERSATIONS) * DAYS * 3
Record: TypeAlias = ConsumerRecord[bytes, bytes]


@dataclass(frozen=True)
class Posted:
    command: str
    body: dict[str, Any]
    answer: dict[str, Any] | None
    """What the app server answered a before-callback, so what its decision holds."""

    @property
    def entity(self) -> str:
        return route(self.command, SDK_APP_ID, self.body).entity

    @property
    def record_key(self) -> bytes:
        return route(self.command, SDK_APP_ID, self.body).key.encode()


@dataclass(frozen=True)
class Topic:
    bootstrap_servers: str
    settings: ServeSettings
    posted: list[Posted]
    records: list[Record]
    """Every record of the c2c topic, callbacks and decisions, as read from Kafka."""

    @property
    def name(self) -> str:
        return self.settings.c2c_topic

    def by_partition(self) -> dict[int, list[Record]]:
        parts: dict[int, list[Record]] = defaultdict(list)
        for record in sorted(self.records, key=lambda r: (r.partition, r.offset)):
            parts[record.partition].append(record)
        return parts


def is_decision(record: Record) -> bool:
    return ("bridge-record", b"app-decision") in record.headers


def message(command: str, sender: str, to: str, key: str, event_time_ms: int) -> dict[str, Any]:
    return {
        "CallbackCommand": command,
        "From_Account": sender,
        "To_Account": to,
        "MsgSeq": 1,
        "MsgRandom": 2,
        "MsgTime": event_time_ms // 1000,
        "MsgKey": key,
        "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": f"message {key}"}}],
        "EventTime": event_time_ms,
    }


async def post_forwarded(settings: ServeSettings, app_server: AppServer) -> list[Posted]:
    """The data set, through a bridge whose app server allows and one whose app server denies."""
    posted: list[Posted] = []
    bridges = {
        answer_name: TestClient(
            TestServer(create_app(replace(settings, forward_url=app_server.url(answer_name))))
        )
        for answer_name in ("allow", "deny")
    }
    answers = {"allow": ALLOW, "deny": DENY}
    try:
        for client in bridges.values():
            await client.start_server()
            await wait_until_ready(client)
        for day in range(DAYS):
            for n, (sender, to) in enumerate(CONVERSATIONS):
                at = FIRST_DAY_MS + day * DAY_MS + n * 60_000
                plan = [("allow", 0), ("allow", 1), ("deny", 2)]
                for answer_name, number in plan:
                    key = f"{sender}-{day}-{number}"
                    commands = (BEFORE, AFTER) if answer_name == "allow" else (BEFORE,)
                    for command in commands:
                        body = message(command, sender, to, key, at + number * 1000)
                        query = {"SdkAppid": SDK_APP_ID, "CallbackCommand": command, "contenttype": "json"}
                        response = await bridges[answer_name].post(
                            "/callback", params=query, data=orjson.dumps(body)
                        )
                        assert response.status == 200, await response.text()
                        if command == BEFORE:
                            assert response.headers["X-Bridge-Decision"] == "written"
                        posted.append(
                            Posted(command, body, answers[answer_name] if command == BEFORE else None)
                        )
    finally:
        for client in bridges.values():
            await client.close()
    return posted


@pytest.fixture(scope="module")
def topic(kafka: str) -> Topic:
    """The data set, written once for the module's tests (which only read it, or copy it elsewhere)."""
    settings = unique_settings(kafka, allow_unsigned=True, forward_timeout=2.0, before_callback_timeout=2.0)

    async def write() -> tuple[list[Posted], list[Record]]:
        app_server = AppServer()
        app_server.server = TestServer(app_server.app(), host="127.0.0.1")
        async with app_server.server:
            posted = await post_forwarded(settings, app_server)
        records = await read_records(kafka, [settings.c2c_topic], expect=CALLBACKS + DECISIONS)
        return posted, records

    posted, records = asyncio.run(write())
    assert len(posted) == CALLBACKS
    assert Counter(is_decision(r) for r in records) == {False: CALLBACKS, True: DECISIONS}
    return Topic(kafka, settings, posted, records)


def line_of(record: Record) -> bytes:
    return record.value or b""


def consume(topic: Topic, *options: str) -> tuple[list[bytes], str]:
    result = run_bridge(
        "consume", "--bootstrap-servers", topic.bootstrap_servers, "--topic", topic.name, "--from-beginning",
        "--log-format", "text", *options,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.encode().splitlines(), result.stderr


def assert_in_partition_order(lines: Sequence[bytes], records: Sequence[Record]) -> None:
    """`lines` hold exactly `records`' values, each partition's in offset order, and every decision's line
    comes after its callback's."""
    assert Counter(lines) == Counter(line_of(r) for r in records)
    position = {line: index for index, line in enumerate(lines)}
    for part in Topic("", ServeSettings(), [], list(records)).by_partition().values():
        assert [position[line_of(r)] for r in part] == sorted(position[line_of(r)] for r in part)
    for record in records:
        if is_decision(record):
            decided = orjson.loads(line_of(record))
            [callback] = [r for r in records if not is_decision(r) and r.key == record.key]
            assert position[line_of(callback)] < position[line_of(record)], decided["key"]


# --- bridge consume ---------------------------------------------------------------------------------------


async def test_consume_with_decisions_included_prints_both_kinds_each_decision_after_its_callback(
    topic: Topic,
) -> None:
    """`--decisions include`: every callback and every decision, the decision as its record value (schema
    app-decision/1, told apart from a callback's envelope), each partition in offset order."""
    lines, stderr = await asyncio.to_thread(consume, topic, "--decisions", "include")
    assert_in_partition_order(lines, topic.records)
    schemas = Counter(orjson.loads(line)["schema"] for line in lines)
    assert schemas == {SCHEMA: CALLBACKS, DECISION_SCHEMA: DECISIONS}
    assert (
        f"consume: {CALLBACKS + DECISIONS} events written ({CALLBACKS} callbacks, {DECISIONS} app decisions)"
        in stderr
    )
    assert "0 bad records" in stderr
    assert "passed over" not in stderr


async def test_consume_without_the_option_prints_todays_output_exactly(topic: Topic) -> None:
    """The default: the callbacks' envelopes alone, in partition order, and the line that counts the
    decisions passed over."""
    lines, stderr = await asyncio.to_thread(consume, topic)
    assert_in_partition_order(lines, [r for r in topic.records if not is_decision(r)])
    assert re.search(
        rf"^consume: {CALLBACKS} events written, 0 filtered out, 0 bad records, "
        rf"{DECISIONS} app decisions passed over$",
        stderr,
        re.MULTILINE,
    ), stderr


async def test_consume_decisions_only_with_an_account_and_a_day_selects_by_the_callback_decided(
    topic: Topic,
) -> None:
    """`--decisions only --account A --since D1 --until D2`: the decisions of A's callbacks of day 1, though
    a decision holds no entity and was written years after its callback's event time."""
    sender, _ = CONVERSATIONS[1]
    entity = next(p.entity for p in topic.posted if p.body["From_Account"] == sender)
    lines, stderr = await asyncio.to_thread(
        consume,
        topic,
        *("--decisions", "only", "--account", entity),
        *("--since", str(FIRST_DAY_MS + DAY_MS), "--until", str(FIRST_DAY_MS + 2 * DAY_MS)),
    )
    decided = [orjson.loads(line) for line in lines]
    assert [d["key"] for d in decided] == [f"{BEFORE}:{sender}-1-{n}" for n in range(3)]
    assert [d["answer"] for d in decided] == [ALLOW, ALLOW, DENY]
    assert all(d["schema"] == DECISION_SCHEMA for d in decided)
    assert "consume: 3 app decisions written" in stderr
    assert "5 callbacks passed over" in stderr


async def test_consume_by_command_includes_the_decisions_of_the_before_callbacks_only(topic: Topic) -> None:
    """`--command C2C.CallbackAfterSendMsg` selects no decision (a decision's command is the
    before-callback it decides); `--command C2C.CallbackBeforeSendMsg` selects the before-callbacks and
    all their decisions."""
    after, _ = await asyncio.to_thread(consume, topic, "--decisions", "include", "--command", AFTER)
    assert len(after) == len(CONVERSATIONS) * DAYS * 2
    assert {orjson.loads(line)["schema"] for line in after} == {SCHEMA}
    before, _ = await asyncio.to_thread(consume, topic, "--decisions", "include", "--command", BEFORE)
    befores = [
        r
        for r in topic.records
        if is_decision(r) or orjson.loads(line_of(r))["query"]["CallbackCommand"] == BEFORE
    ]
    assert_in_partition_order(before, befores)


# --- EventReader ------------------------------------------------------------------------------------------


async def test_the_reader_yields_decisions_as_their_own_events_only_when_asked(topic: Topic) -> None:
    """`records()` yields callbacks and `DecisionEvent`s in partition order, each decision naming its
    callback (identity, coordinates, entity, event time); `async for` yields the callbacks alone."""
    async with EventReader(topic.bootstrap_servers, topic.name) as reader:
        both = [item async for item in reader.records()]
    assert Counter(type(item) for item in both) == {Event: CALLBACKS, DecisionEvent: DECISIONS}
    assert (reader.stats.events, reader.stats.decisions, reader.stats.decisions_yielded) == (
        CALLBACKS,
        DECISIONS,
        DECISIONS,
    )
    by_offset = {(item.coordinates.partition, item.coordinates.offset): item for item in both}
    for partition in {item.coordinates.partition for item in both}:
        offsets = [item.coordinates.offset for item in both if item.coordinates.partition == partition]
        assert offsets == sorted(offsets)
    answers = {p.record_key.decode(): p.answer for p in topic.posted if p.answer is not None}
    for decision in (item for item in both if isinstance(item, DecisionEvent)):
        assert decision.callback_coordinates is not None
        callback = by_offset[(decision.callback_coordinates.partition, decision.callback_coordinates.offset)]
        assert isinstance(callback, Event)
        assert callback.identity == decision.identity
        assert (decision.command, decision.entity, decision.event_time_ms) == (
            BEFORE,
            callback.entity,
            callback.event_time_ms,
        )
        assert decision.coordinates.partition == callback.coordinates.partition
        assert decision.coordinates.offset > callback.coordinates.offset
        answer = answers[decision.key]
        assert answer is not None
        assert (decision.status, decision.answer, decision.error_code) == (200, answer, answer["ErrorCode"])
        assert decision.value == next(
            r.value
            for r in topic.records
            if (r.partition, r.offset)
            == (
                decision.coordinates.partition,
                decision.coordinates.offset,
            )
        )

    async with EventReader(topic.bootstrap_servers, topic.name) as reader:
        callbacks = [event async for event in reader]
    assert [type(e) for e in callbacks] == [Event] * CALLBACKS
    assert Counter(e.coordinates for e in callbacks) == Counter(
        i.coordinates for i in both if isinstance(i, Event)
    )
    assert (reader.stats.decisions, reader.stats.decisions_yielded) == (DECISIONS, 0)


async def test_a_decision_read_without_its_callback_is_judged_by_itself_with_its_entity_header(
    topic: Topic,
) -> None:
    """Started at a decision's offset (its callback unread), the reader yields it with the owning entity
    its `entity` header names and its receive time as its event time; a filter naming that entity selects
    it (a resumed `--account` replay keeps it), one naming another leaves it out."""
    first = next(r for r in sorted(topic.records, key=lambda r: r.offset) if is_decision(r))
    assert first.offset > 0
    async with EventReader(
        topic.bootstrap_servers, topic.name, partitions=[first.partition], start_offsets=first.offset
    ) as reader:
        first_read = await anext(reader.records())
    assert isinstance(first_read, DecisionEvent)
    entity = next(p.entity for p in topic.posted if p.record_key.decode() == first_read.key)
    assert (first_read.entity, first_read.callback_coordinates) == (entity, None)
    assert (
        first_read.event_time_ms == first_read.received_at_ms == orjson.loads(line_of(first))["received_at"]
    )

    async def read_from_the_decision(entities: list[str]) -> tuple[list[int], int]:
        select = EventFilter.of(entities=entities)
        async with EventReader(
            topic.bootstrap_servers, topic.name, select=select, start_offsets={first.partition: first.offset}
        ) as reader:
            read = [item async for item in reader.records()]
        offsets = [item.coordinates.offset for item in read if item.coordinates.partition == first.partition]
        return offsets, reader.stats.filtered_out

    offsets, _ = await read_from_the_decision([entity])
    assert first.offset in offsets
    others = [p.entity for p in topic.posted if p.entity != entity]
    offsets, filtered_out = await read_from_the_decision(others[:1])
    assert first.offset not in offsets
    assert filtered_out >= 1


# --- bridge replay ----------------------------------------------------------------------------------------


async def replay_to(settings: ReplaySettings, sink: TopicSink | UrlSink) -> Replay:
    replay = Replay(settings, sink, report=io.StringIO())
    async with asyncio.timeout(60):
        await replay.run()
    return replay


async def test_replay_to_a_topic_copies_the_decisions_byte_for_byte_each_after_its_callback(
    topic: Topic,
) -> None:
    """By default (`--decisions auto`) a `--to-topic` copy holds the callbacks and the decisions: key,
    value, headers and timestamp byte for byte, each on its callback's partition for the destination's
    partition count (3, not the source's 12), and each entity's records in the source's order."""
    destination = f"{topic.name}.backfill"
    await create_topic(topic.bootstrap_servers, destination, 3)
    settings = reading(ReplaySettings, topic.settings, topic=topic.name, to_topic=destination)
    replay = await replay_to(settings, TopicSink(settings, destination))
    assert (replay.tally.copied, replay.tally.decisions, replay.tally.errors) == (
        CALLBACKS + DECISIONS,
        DECISIONS,
        0,
    )

    copies = await read_records(topic.bootstrap_servers, [destination], expect=CALLBACKS + DECISIONS)
    shape = [(r.key, r.value, r.headers, r.timestamp) for r in copies]
    assert Counter(shape) == Counter((r.key, r.value, r.headers, r.timestamp) for r in topic.records)
    entity_of_key = {p.record_key: p.entity for p in topic.posted}
    for record in copies:
        assert record.partition == partition_for(entity_of_key[record.key or b""], 3)

    def per_entity(records: list[Record], decisions: bool) -> dict[str, list[tuple[Any, ...]]]:
        ordered: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        for r in sorted(records, key=lambda r: (r.partition, r.offset)):
            if is_decision(r) == decisions:
                ordered[entity_of_key[r.key or b""]].append((r.key, r.value, r.headers))
        return ordered

    # Each entity's callbacks, and its decisions, in the source's order; each decision after its callback
    # (a record read after a decision may land before it: its delivery waits for its callback's).
    assert per_entity(copies, decisions=False) == per_entity(topic.records, decisions=False)
    assert per_entity(copies, decisions=True) == per_entity(topic.records, decisions=True)
    offset_of = {(r.key, is_decision(r)): r.offset for r in copies}
    for record in copies:
        if is_decision(record):
            assert offset_of[(record.key, False)] < record.offset


async def test_replay_to_a_topic_with_decisions_skipped_copies_the_callbacks_alone(topic: Topic) -> None:
    destination = f"{topic.name}.callbacks-only"
    await create_topic(topic.bootstrap_servers, destination, 3)
    settings = reading(
        ReplaySettings, topic.settings, topic=topic.name, to_topic=destination, decisions="skip"
    )
    replay = await replay_to(settings, TopicSink(settings, destination))
    assert (replay.tally.copied, replay.tally.decisions, replay.tally.decisions_passed_over) == (
        CALLBACKS,
        0,
        DECISIONS,
    )
    assert "app decisions passed over 18" in replay.tally.summary(1.0)
    copies = await read_records(topic.bootstrap_servers, [destination], expect=CALLBACKS)
    assert not any(is_decision(r) for r in copies)
    assert len(copies) == CALLBACKS


async def test_replay_to_a_second_bridge_posts_the_callbacks_only(topic: Topic, kafka: str) -> None:
    """`--to-url` at another bridge: it gets every callback (its topic holds them, byte for byte) and no
    decision, which the replay passes over and counts."""
    second = unique_settings(kafka, allow_unsigned=True)
    async with TestClient(TestServer(create_app(second))) as client:
        await wait_until_ready(client)
        url = str(client.make_url("/callback"))
        settings = reading(ReplaySettings, topic.settings, topic=topic.name, to_url=url)
        replay = await replay_to(settings, UrlSink(url))
    assert (replay.tally.copied, replay.tally.decisions, replay.tally.errors) == (CALLBACKS, 0, 0)
    assert replay.tally.decisions_passed_over == DECISIONS
    landed = await read_records(kafka, [second.c2c_topic], expect=CALLBACKS)
    assert not any(is_decision(r) for r in landed)
    assert Counter(orjson.loads(line_of(r))["callback"]["MsgKey"] for r in landed) == Counter(
        p.body["MsgKey"] for p in topic.posted
    )


def test_replay_to_a_file_with_decisions_included_writes_consumes_lines(topic: Topic, tmp_path: Path) -> None:
    """`replay --to-file --decisions include` writes what `consume --decisions include` prints; the
    default (`auto`) writes the callbacks alone, as before."""
    both, alone = tmp_path / "both.jsonl", tmp_path / "alone.jsonl"
    common = (
        "replay",
        "--bootstrap-servers",
        topic.bootstrap_servers,
        "--topic",
        topic.name,
        "--log-format",
        "text",
    )
    result = run_bridge(*common, "--to-file", str(both), "--decisions", "include")
    assert result.returncode == 0, result.stderr
    assert f"copied {CALLBACKS + DECISIONS} ({DECISIONS} app decisions)" in result.stderr
    assert_in_partition_order(both.read_bytes().splitlines(), topic.records)
    result = run_bridge(*common, "--to-file", str(alone))
    assert result.returncode == 0, result.stderr
    assert f"app decisions passed over {DECISIONS}" in result.stderr
    assert_in_partition_order(
        alone.read_bytes().splitlines(), [r for r in topic.records if not is_decision(r)]
    )


class FlakyFile(FileSink):
    """A file whose first write of each before-callback fails for a passing reason, so that the callback
    is tried again after the records read after it have been written."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.failed: set[str] = set()

    async def deliver(self, event: Event | DecisionEvent) -> None:
        if isinstance(event, Event) and event.command == BEFORE and event.identity not in self.failed:
            self.failed.add(event.identity)
            await asyncio.sleep(0.05)  # the failure comes back later, as a broker's would
            raise DeliveryFailed("the disk is busy", Failure.PASSING)
        await super().deliver(event)


async def test_a_decision_waits_for_its_callback_whose_delivery_is_tried_again(
    topic: Topic, tmp_path: Path
) -> None:
    """Every before-callback's first delivery fails and is tried again 0.2 s later: each decision still
    lands after its callback, and every record once."""
    out = tmp_path / "flaky.jsonl"
    settings = reading(
        ReplaySettings, topic.settings, topic=topic.name, to_file=str(out), decisions="include", concurrency=8
    )
    replay = Replay(settings, FlakyFile(str(out)), report=io.StringIO())
    async with asyncio.timeout(60):
        await replay.run()
    assert (replay.tally.copied, replay.tally.decisions, replay.tally.errors) == (
        CALLBACKS + DECISIONS,
        DECISIONS,
        0,
    )
    lines = out.read_bytes().splitlines()
    assert Counter(lines) == Counter(line_of(r) for r in topic.records)
    position = {line: index for index, line in enumerate(lines)}
    for record in topic.records:
        if is_decision(record):
            [callback] = [r for r in topic.records if not is_decision(r) and r.key == record.key]
            assert position[line_of(callback)] < position[line_of(record)]


@pytest.mark.parametrize("partitions", [12, 3])
async def test_a_decision_replayed_without_its_callback_goes_to_its_entitys_partition(
    topic: Topic, tmp_path: Path, partitions: int
) -> None:
    """`--from-offset 1` starts each partition after its first record, a before-callback: its decision is
    read without it. Its `entity` header still names the owning entity, so in a topic of as many
    partitions or of 3 it lands on that entity's partition, beside its callback's copy; nothing is set
    aside. (A decision of an older bridge, without the header: tests/test_decisions_unit.py.)"""
    destination = f"{topic.name}.from-1-of-{partitions}"
    await create_topic(topic.bootstrap_servers, destination, partitions)
    skipped = tmp_path / "skipped.jsonl"
    settings = reading(
        ReplaySettings,
        topic.settings,
        topic=topic.name,
        to_topic=destination,
        from_offset=1,
        skipped=str(skipped),
    )
    replay = await replay_to(settings, TopicSink(settings, destination))
    read = [r for r in topic.records if r.offset >= 1]
    callback_offsets = {(r.partition, r.key): r.offset for r in topic.records if not is_decision(r)}
    orphans = [r for r in read if is_decision(r) and callback_offsets[(r.partition, r.key)] < 1]
    assert orphans
    assert (replay.tally.copied, replay.tally.refused, replay.tally.errors) == (len(read), 0, 0)
    copies = await read_records(topic.bootstrap_servers, [destination], expect=len(read))
    entity_of_key = {p.record_key: p.entity for p in topic.posted}
    assert Counter((c.key, c.value) for c in copies) == Counter((r.key, r.value) for r in read)
    assert all(c.partition == partition_for(entity_of_key[c.key or b""], partitions) for c in copies)
    assert not skipped.exists() or skipped.read_bytes() == b""
