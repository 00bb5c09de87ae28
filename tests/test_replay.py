"""`bridge replay` copies exactly a window of callbacks to a file, a topic or an HTTP receiver, resumably."""

from __future__ import annotations

import asyncio
import io
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from bridge.readback.replay import Replay
from bridge.readback.sinks import FileSink, TopicSink, UrlSink
from bridge.settings import ReplaySettings, ServeSettings, build
from bridge.tencent.partitioner import partition_for
from bridge.tools.embedded import free_port
from tests.conftest import BridgeClient
from tests.support.readback import ACCOUNTS, DAY_MS, FIRST_DAY_MS, Posted, Receiver, message, post_all
from tests.support.records import create_topic, read_records
from tests.support.serve import one_line_error, run_bridge
from tests.support.settings import NO_BROKER, reading

DAY_1 = (FIRST_DAY_MS + DAY_MS, FIRST_DAY_MS + 2 * DAY_MS)


def in_day(posted: list[Posted], day: int) -> list[Posted]:
    start = FIRST_DAY_MS + day * DAY_MS
    return [p for p in posted if start <= p.event_time < start + DAY_MS]


def bodies(callbacks: list[Posted]) -> Counter[bytes]:
    return Counter(orjson.dumps(c.body, option=orjson.OPT_SORT_KEYS) for c in callbacks)


def normalized(body: object) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


async def replay_to(settings: ReplaySettings, sink: FileSink | TopicSink | UrlSink) -> Replay:
    replay = Replay(settings, sink, report=io.StringIO())
    async with asyncio.timeout(60):
        await replay.run()
    return replay


async def test_a_day_replayed_to_a_file_holds_that_days_callbacks_late_and_repeated_ones_included(
    posted: list[Posted], settings: ServeSettings, tmp_path: Path
) -> None:
    out = tmp_path / "day1.jsonl"
    window = reading(ReplaySettings, settings, since=DAY_1[0], until=DAY_1[1], to_file=str(out))
    replay = await replay_to(window, FileSink(str(out)))

    lines = out.read_bytes().splitlines()
    envelopes = [orjson.loads(line) for line in lines]
    assert Counter(normalized(e["callback"]) for e in envelopes) == bodies(in_day(posted, 1))
    assert all(e["schema"] == "tencent-chat-callback/1" for e in envelopes)
    assert replay.tally.copied == 16
    # What is filtered out depends on the broker's time lookup and on where the reader stops.
    assert replay.tally.filtered_out <= len(posted) - 16
    assert (replay.tally.duplicates, replay.tally.errors) == (0, 0)


async def test_the_late_callback_of_a_day_is_copied_even_with_no_lateness_allowed(
    posted: list[Posted], settings: ServeSettings, tmp_path: Path
) -> None:
    """Day 0's 23:50 message lands after day 1's 00:30 ones: the lateness only moves the start lookup, it
    never ends a partition's read before the end offset."""
    day_0 = in_day(posted, 0)
    assert "d0-news-99" in {p.key for p in day_0}
    out = tmp_path / "day0.jsonl"
    window = reading(
        ReplaySettings,
        settings,
        since=FIRST_DAY_MS,
        until=FIRST_DAY_MS + DAY_MS,
        lateness=0.0,
        to_file=str(out),
    )
    await replay_to(window, FileSink(str(out)))
    copied = [orjson.loads(line)["callback"] for line in out.read_bytes().splitlines()]
    assert Counter(normalized(c) for c in copied) == bodies(day_0)


async def test_a_day_replayed_to_a_topic_with_dedup_keeps_key_timestamp_headers_and_the_partition_rule(
    posted: list[Posted], settings: ServeSettings, kafka: str
) -> None:
    destination = f"{settings.topic}.backfill"
    await create_topic(kafka, destination, 3)
    window = reading(
        ReplaySettings, settings, since=DAY_1[0], until=DAY_1[1], to_topic=destination, dedup=True
    )
    replay = await replay_to(window, TopicSink(window, destination))

    expected = {normalized(p.body): p for p in in_day(posted, 1)}  # each callback once
    assert replay.tally.copied == len(expected) == 15
    assert replay.tally.duplicates == 1
    source: dict[bytes, list[ConsumerRecord[bytes, bytes]]] = {}
    for record in await read_records(kafka, [settings.topic], expect=len(posted)):
        source.setdefault(normalized(orjson.loads(record.value or b"")["callback"]), []).append(record)
    copies = await read_records(kafka, [destination], expect=len(expected))
    assert len(copies) == len(expected)
    for copy in copies:
        body = normalized(orjson.loads(copy.value or b"")["callback"])
        original = next(r for r in source[body] if r.value == copy.value)
        assert copy.key == original.key
        assert copy.timestamp == original.timestamp
        assert copy.headers == original.headers
        assert copy.partition == partition_for(expected[body].account, 3)
    assert {normalized(orjson.loads(c.value or b"")["callback"]) for c in copies} == set(expected)


async def test_a_day_reposted_to_a_url_arrives_with_its_original_query_and_bytes_despite_a_503(
    posted: list[Posted], settings: ServeSettings, receiver: Receiver
) -> None:
    target, url = receiver, receiver.url()
    first = in_day(posted, 1)[0]
    target.fail_first.add(orjson.dumps(first.body))  # the bridge posted orjson.dumps(body): same bytes
    window = reading(
        ReplaySettings, settings, since=DAY_1[0], until=DAY_1[1], to_url=url, concurrency=4, rate=500.0
    )
    replay = await replay_to(window, UrlSink(url))

    assert replay.tally.copied == 16
    assert Counter(body for _, body in target.received) == Counter(
        orjson.dumps(p.body) for p in in_day(posted, 1)
    )
    for query, body in target.received:
        assert query == next(p.query for p in posted if orjson.dumps(p.body) == body)


async def test_an_interrupted_replay_resumed_from_its_checkpoint_copies_each_record_once(
    posted: list[Posted], settings: ServeSettings, receiver: Receiver, tmp_path: Path
) -> None:
    target, url = receiver, receiver.url()
    checkpoint = tmp_path / "checkpoint.json"
    everything = reading(ReplaySettings, settings, to_url=url, concurrency=4, checkpoint=str(checkpoint))
    first = Replay(everything, UrlSink(url), report=io.StringIO())

    def interrupt_after_ten() -> None:
        if len(target.received) == 10:
            first.interrupt()

    target.after_each = interrupt_after_ten
    async with asyncio.timeout(60):
        await first.run()
    assert first.interrupted
    assert 10 <= first.tally.copied < len(posted)
    assert checkpoint.exists()

    second = Replay(everything, UrlSink(url), report=io.StringIO())
    async with asyncio.timeout(60):
        await second.run()
    assert not second.interrupted
    assert first.tally.copied + second.tally.copied == len(posted)
    assert Counter(body for _, body in target.received) == Counter(orjson.dumps(p.body) for p in posted)


async def test_a_foreign_record_is_reported_with_its_coordinates_and_the_replay_goes_on(
    posted: list[Posted], settings: ServeSettings, kafka: str, tmp_path: Path
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, enable_idempotence=False)
    await producer.start()
    try:
        foreign = await producer.send_and_wait(settings.topic, b'{"hello":"world"}', partition=2)
    finally:
        await producer.stop()
    report = io.StringIO()
    out = tmp_path / "all.jsonl"
    replay = Replay(reading(ReplaySettings, settings, to_file=str(out)), FileSink(str(out)), report=report)
    async with asyncio.timeout(60):
        await replay.run()
    assert replay.tally.errors == 1
    assert replay.tally.copied == len(posted)
    assert f"{settings.topic}/2@{foreign.offset}: not a callback envelope" in report.getvalue()


async def test_the_readmes_backfill_command_copies_that_day_each_callback_once(
    posted: list[Posted], settings: ServeSettings, kafka: str, tmp_path: Path
) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    backfill = next(line for line in readme.splitlines() if line.startswith("bridge replay "))
    arguments = [*shlex.split(backfill.replace("kafka:9092", kafka))[1:], "--topic", settings.topic]
    command = [sys.executable, "-m", "bridge", *arguments]
    result = await asyncio.to_thread(
        subprocess.run, command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"replay: copied 15, skipped as duplicates 1, filtered out \d+, errors 0", result.stderr)
    out = tmp_path / "2024-05-02.jsonl"
    copied = Counter(normalized(orjson.loads(line)["callback"]) for line in out.read_bytes().splitlines())
    assert copied == Counter(set(bodies(in_day(posted, 1))))
    assert (tmp_path / "2024-05-02.ckpt").exists()


async def test_a_replay_copies_a_backfilled_callback_written_after_later_days_and_a_foreign_record(
    posted: list[Posted], settings: ServeSettings, kafka: str, bridge: BridgeClient, tmp_path: Path
) -> None:
    """Backfills write old event times after newer ones, and a foreign record may be stamped now: neither
    ends the partition; only the end offset seen at start does."""
    partition = partition_for(ACCOUNTS[0], settings.partitions)
    producer = AIOKafkaProducer(bootstrap_servers=kafka, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic, b'{"hello":"now"}', partition=partition)
    finally:
        await producer.stop()
    backfilled = message(0, 720, ACCOUNTS[0], 77)
    await post_all(bridge, [backfilled])
    out = tmp_path / "day0.jsonl"
    window = reading(
        ReplaySettings, settings, since=FIRST_DAY_MS, until=FIRST_DAY_MS + DAY_MS, to_file=str(out)
    )
    replay = await replay_to(window, FileSink(str(out)))

    copied = Counter(normalized(orjson.loads(line)["callback"]) for line in out.read_bytes().splitlines())
    assert copied == bodies([*in_day(posted, 0), backfilled])
    assert replay.tally.errors == 1  # the foreign record, reported


async def test_replay_with_no_broker_answering_exits_3_with_a_one_line_error(tmp_path: Path) -> None:
    result = await asyncio.to_thread(
        run_bridge, "replay", "--bootstrap-servers", f"127.0.0.1:{free_port()}",
        "--to-file", str(tmp_path / "out.jsonl"),
    )  # fmt: skip
    assert result.returncode == 3
    assert "cannot reach the Kafka cluster" in one_line_error(result)


@pytest.mark.parametrize("option", ["--to-file", "--checkpoint"])
async def test_replay_refuses_a_file_it_cannot_write_before_copying_anything(
    option: str, posted: list[Posted], settings: ServeSettings, kafka: str, tmp_path: Path
) -> None:
    unwritable = str(tmp_path / "missing" / "file")
    files = {
        "--to-file": str(tmp_path / "out.jsonl"),
        "--checkpoint": str(tmp_path / "c.ckpt"),
        option: unwritable,
    }
    result = await asyncio.to_thread(
        run_bridge, "replay", "--bootstrap-servers", kafka, "--topic", settings.topic,
        *(part for pair in files.items() for part in pair),
    )  # fmt: skip
    assert result.returncode == 2
    assert f"cannot write {option} {unwritable}" in one_line_error(result)
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_bytes()


async def test_replay_with_since_later_than_until_is_a_usage_error(
    offline_settings: ServeSettings, tmp_path: Path
) -> None:
    result = await asyncio.to_thread(
        run_bridge, "replay", "--bootstrap-servers", NO_BROKER, "--topic", offline_settings.topic,
        "--since", "2024-05-03", "--until", "2024-05-02", "--to-file", "never-written.jsonl",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--since must be earlier than --until" in one_line_error(result)
    assert not (tmp_path / "never-written.jsonl").exists()


@pytest.mark.parametrize("change", ["window", "destination"])
async def test_a_checkpoint_refuses_to_resume_a_replay_of_another_window_or_destination(
    change: str, posted: list[Posted], settings: ServeSettings, kafka: str, tmp_path: Path
) -> None:
    common = ("replay", "--bootstrap-servers", kafka, "--topic", settings.topic, "--checkpoint", "day.ckpt")
    first = await asyncio.to_thread(
        run_bridge, *common, "--since", "2024-05-02", "--until", "2024-05-03", "--to-file", "day.jsonl",
        cwd=tmp_path,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    other = (
        ("--since", "2024-05-03", "--until", "2024-05-04", "--to-file", "day.jsonl")
        if change == "window"
        else ("--since", "2024-05-02", "--until", "2024-05-03", "--to-file", "other.jsonl")
    )
    second = await asyncio.to_thread(run_bridge, *common, *other, cwd=tmp_path)
    assert second.returncode == 2
    assert "checkpoint day.ckpt is for another replay" in one_line_error(second)
    assert not (tmp_path / "other.jsonl").exists()


async def test_a_delivery_that_stops_the_replay_after_its_retries_counts_as_an_error(
    posted: list[Posted], settings: ServeSettings, receiver: Receiver
) -> None:
    target, url = receiver, receiver.url()
    first = in_day(posted, 1)[0]
    target.fail_first.add(orjson.dumps(first.body))
    window = reading(
        ReplaySettings, settings, since=DAY_1[0], until=DAY_1[1], to_url=url, concurrency=1, retries=0
    )
    replay = await replay_to(window, UrlSink(url))
    assert replay.failure is not None
    assert replay.tally.errors == 1


async def test_the_topic_sink_writes_with_replays_own_compression_and_record_limit_not_serves() -> None:
    """`--compression` and `--max-record-bytes` are replay's; serve's variables do not reach its producer."""
    given: dict[str, Any] = {}

    class Recording(AIOKafkaProducer):  # type: ignore[misc]  # aiokafka ships no type information
        def __init__(self, **arguments: Any) -> None:
            given.update(arguments)
            super().__init__(**arguments)

    serves = {"BRIDGE_BOOTSTRAP_SERVERS": "kafka:9092", "BRIDGE_COMPRESSION": "gzip"}
    serves["BRIDGE_MAX_BODY_BYTES"] = "10"
    untouched = build("replay", {}, serves)
    assert (untouched.compression, untouched.max_record_bytes) == ("none", 1024 * 1024 + 64 * 1024)
    environ = {**serves, "BRIDGE_REPLAY_COMPRESSION": "zstd", "BRIDGE_REPLAY_MAX_RECORD_BYTES": "2097152"}
    sink = TopicSink(build("replay", {}, environ), "tim.copy", producer_class=Recording)
    try:
        assert (given["compression_type"], given["max_request_size"]) == ("zstd", 2097152)
        assert given["client_id"] == "tencent-chat-kafka-bridge-replay"
    finally:
        await sink.close()
