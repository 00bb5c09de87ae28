"""The recipes of `examples/` give the answers computed from what was posted, and so all agree.

The traffic: Tencent's official-account samples (`tests/fixtures/`) as they are, and their two message
samples varied over three accounts and five hours of event time (some with `EventTime` as a decimal string,
as Tencent sends it at times). Two bridges, each with its own dedup window, write them to one topic, as two
replicas do: what both are sent lands twice, while a copy sent again to the same bridge is answered
`duplicate_confirmed` and not written. `bridge consume` reads the topic into a JSON Lines file; DuckDB and
chDB run their SQL over it, the consumer library and Spark read the topic.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.ingest.server import create_app
from bridge.settings import ServeSettings
from bridge.tencent.commands import route
from bridge.tencent.envelope import envelope
from examples import chdb_job, duckdb_job, reader_job
from examples.answers import Answers, hour_of
from tests.support.requests import Fixture, load_fixtures
from tests.support.serve import run_bridge, wait_until_ready
from tests.support.settings import unique_settings

MESSAGE = "OfficialAccount.CallbackAfterSendMsg"
ACCOUNTS = ("@TOA#_2J4SZEAEL", "@TOA#_news_channel", "@TOA#_sports")
FIRST_HOUR_MS = 1_714_521_600_000  # 2024-05-01T00:00:00Z


@dataclass(frozen=True)
class Callback:
    query: dict[str, str]
    body: dict[str, Any]

    @property
    def identity(self) -> tuple[str, str, str]:
        """The bridge's identity of the callback, worked out by its own routing (not the recipes' SQL)."""
        command, sdk_app_id = self.query["CallbackCommand"], self.query["SdkAppid"]
        return sdk_app_id, command, route(command, sdk_app_id, self.body).key


def official_account_fixtures() -> list[Fixture]:
    return [
        fixture
        for fixture in load_fixtures()
        if fixture.query["CallbackCommand"].startswith("OfficialAccount.")
    ]


def traffic() -> list[Callback]:
    """The fixtures as they are, then 40 messages made from the two message fixtures: account, key and event
    time varied so that accounts and hours get different counts."""
    fixtures = official_account_fixtures()
    callbacks = [Callback(fixture.query, fixture.body) for fixture in fixtures]
    templates = [fixture for fixture in fixtures if fixture.query["CallbackCommand"] == MESSAGE]
    for number in range(40):
        template = templates[number % len(templates)]
        event_time = FIRST_HOUR_MS + (number * number % 5) * 3_600_000 + number * 61_000
        body = {
            **template.body,
            "Official_Account": ACCOUNTS[number % 3 if number % 4 else 0],
            "MsgKey": f"{number}_{number * 7919}_{event_time // 1000}",
            "EventTime": str(event_time) if number % 7 == 3 else event_time,
        }
        callbacks.append(Callback(template.query, body))
    return callbacks


def expected(written: Sequence[Callback], received_at: Sequence[int] = ()) -> Answers:
    """The answers worked out from the callbacks the bridges wrote (received at `received_at`, for those
    without an `EventTime`)."""
    copies = Counter(callback.identity for callback in written)
    messages: Counter[tuple[str, int]] = Counter()
    counted = set()
    for number, callback in enumerate(written):
        if callback.query["CallbackCommand"] == MESSAGE and callback.identity not in counted:
            counted.add(callback.identity)
            event_time = callback.body.get("EventTime")
            event_time_ms = received_at[number] if event_time is None else int(event_time)
            messages[callback.body["Official_Account"], hour_of(event_time_ms)] += 1
    duplicated = sum(count for count in copies.values() if count > 1)
    rows = [(account, hour, count) for (account, hour), count in messages.items()]
    return Answers.of(rows, copies.total(), len(copies), duplicated)


async def post(client: TestClient[Any, Any], callback: Callback) -> str:
    response = await client.post("/callback", params=callback.query, data=orjson.dumps(callback.body))
    assert response.status == 200, await response.text()
    return response.headers["X-Bridge-Outcome"]


async def post_through_two_bridges(settings: ServeSettings, callbacks: Sequence[Callback]) -> list[Callback]:
    """Every callback to the first bridge, every fifth (and the fixtures without a key) to the second too,
    and the first three to the first bridge again; returns the callbacks written, one per record."""
    again = callbacks[:3]
    both = [c for n, c in enumerate(callbacks) if n % 5 == 0 or "MsgKey" not in c.body]
    written: list[Callback] = []
    async with (
        TestClient(TestServer(create_app(settings))) as first,
        TestClient(TestServer(create_app(settings))) as second,
    ):
        await wait_until_ready(first)
        await wait_until_ready(second)
        for callback in callbacks:
            assert await post(first, callback) == "confirmed"
            written.append(callback)
        for callback in both:
            assert await post(second, callback) == "confirmed"  # the second bridge's window is its own
            written.append(callback)
        for callback in again:
            assert await post(first, callback) == "duplicate_confirmed"  # answered, not written again
    return written


@dataclass(frozen=True)
class Topic:
    bootstrap_servers: str
    name: str
    events_file: Path
    expected: Answers


@pytest.fixture(scope="module")
def topic(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Topic:
    """The traffic written through two bridges, and the topic read back with `bridge consume`."""
    settings = unique_settings(kafka)
    written = asyncio.run(post_through_two_bridges(settings, traffic()))
    events_file = tmp_path_factory.mktemp("examples") / "events.jsonl"
    result = run_bridge(
        "consume", "--bootstrap-servers", kafka, "--topic", settings.topic, "--from-beginning",
        "--output", str(events_file), "--log-format", "text",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(events_file.read_bytes().splitlines()) == len(written)
    return Topic(kafka, settings.topic, events_file, expected(written))


def test_the_traffic_holds_what_the_answers_must_tell_apart(topic: Topic) -> None:
    """The expected answers are not trivial: duplicates of messages and of callbacks without a key, several
    accounts and hours, and hours with more than one message."""
    answers = topic.expected
    # Sent to both bridges: the two fixtures without a MsgKey (callbacks 0 and 1) and callbacks 5, 10 ... 40.
    assert answers.records - answers.callbacks == 10
    assert 0 < answers.duplicate_rate < 1
    assert {account for account, _ in answers.messages} == set(ACCOUNTS)
    assert len({hour for _, hour in answers.messages}) >= 5
    assert max(answers.messages.values()) > 1


def test_duckdb_over_consume_output_gives_the_answers(topic: Topic) -> None:
    """DuckDB's `read_json` over `bridge consume` output gives messages per account per hour and the
    duplicate rate."""
    assert duckdb_job.answers(topic.events_file) == topic.expected


def test_chdb_runs_the_clickhouse_extraction_over_consume_output(topic: Topic) -> None:
    """chDB runs the ClickHouse column extraction over the same file and gives the same answers."""
    assert chdb_job.answers(topic.events_file) == topic.expected


async def test_the_consumer_library_reads_the_answers_from_the_topic(topic: Topic) -> None:
    """`EventReader` over the topic itself gives the same answers."""
    assert await reader_job.answers(topic.bootstrap_servers, topic.name) == topic.expected


@pytest.mark.spark
@pytest.mark.skipif(importlib.util.find_spec("pyspark") is None, reason="pyspark is the `spark` extra")
def test_spark_structured_streaming_reads_the_answers_from_the_topic(topic: Topic) -> None:
    """Spark Structured Streaming, with Spark's Kafka source, reads the topic and gives the same answers."""
    # Imported only where pyspark is installed.
    from examples import spark_job  # noqa: PLC0415

    spark = spark_job.session(spark_job.connector_jars())
    try:
        assert spark_job.answers(topic.bootstrap_servers, topic.name, spark) == topic.expected
    finally:
        spark_job.stop(spark)


def test_the_sql_recipes_compute_the_bridges_identity_for_every_fixture(tmp_path: Path) -> None:
    """Without a broker: envelopes of every fixture, of every family (keys from `MsgKey`, `GroupId:MsgSeq`
    and the body), some twice, give DuckDB and chDB the duplicates the bridge's identity counts."""
    callbacks = [Callback(fixture.query, fixture.body) for fixture in load_fixtures()]
    records = callbacks + callbacks[::2]
    received_at = [FIRST_HOUR_MS + number * 1_000_000 for number in range(len(records))]
    lines = [envelope(orjson.dumps(c.body), c.query, at) for c, at in zip(records, received_at, strict=True)]
    events_file = tmp_path / "events.jsonl"
    events_file.write_bytes(b"\n".join(lines) + b"\n")
    want = expected(records, received_at)
    assert want.duplicated_records == 2 * len(callbacks[::2])
    assert duckdb_job.answers(events_file) == want
    assert chdb_job.answers(events_file) == want
