"""Reading the topic back: `bridge consume`'s filters are exact, commits cover only finished events, and the
README's analytics job runs."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from bridge.readback.events import Event, EventFilter
from bridge.readback.reader import EventReader
from bridge.settings import ServeSettings
from bridge.tools.embedded import free_port
from tests.support.broker import broker_choice
from tests.support.readback import ACCOUNTS, DAY_MS, FIRST_DAY_MS, Posted, post_through_a_bridge, three_days
from tests.support.serve import one_line_error, run_bridge
from tests.support.settings import NO_BROKER

README = (Path(__file__).parent.parent / "README.md").read_text()


def run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("BRIDGE_")}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, env={**clean, **(env or {})}
    )


def normalized(body: object) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


async def test_consume_prints_exactly_the_events_of_a_command_an_account_and_a_day(
    posted: list[Posted], settings: ServeSettings, kafka: str
) -> None:
    result = await asyncio.to_thread(
        run,
        *(sys.executable, "-m", "bridge", "consume", "--bootstrap-servers", kafka, "--topic", settings.topic),
        *("--since", "2024-05-02T00:00:00Z", "--until", str(FIRST_DAY_MS + 2 * DAY_MS)),
        *("--command", "OfficialAccount.CallbackAfterSendMsg", "--account", ACCOUNTS[0]),
    )
    assert result.returncode == 0, result.stderr
    day_1 = range(FIRST_DAY_MS + DAY_MS, FIRST_DAY_MS + 2 * DAY_MS)
    expected = [
        p
        for p in posted
        if p.event_time in day_1 and p.account == ACCOUNTS[0] and p.command.endswith("AfterSendMsg")
    ]
    assert len(expected) == 5  # four messages, one of them delivered twice
    lines = result.stdout.splitlines()
    assert Counter(normalized(orjson.loads(line)["callback"]) for line in lines) == Counter(
        normalized(p.body) for p in expected
    )
    assert re.search(r"consume: 5 events written, \d+ filtered out, 0 bad records", result.stderr)


async def test_consume_by_family_from_the_beginning_with_max_stops_after_max_events(
    posted: list[Posted], settings: ServeSettings, kafka: str
) -> None:
    result = await asyncio.to_thread(
        run,
        *(sys.executable, "-m", "bridge", "consume", "--from-beginning", "--command", "OfficialAccount"),
        *("--max", "7"),
        env={"BRIDGE_BOOTSTRAP_SERVERS": kafka, "BRIDGE_TOPIC": settings.topic},
    )
    assert result.returncode == 0, result.stderr
    envelopes = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len(envelopes) == 7
    assert {normalized(e["callback"]) for e in envelopes} <= {normalized(p.body) for p in posted}


class JobFailed(Exception):
    def __init__(self, event: Event) -> None:
        super().__init__(str(event.coordinates))
        self.event = event


async def job_failing_on_its_fourth_event(reader: EventReader, finished: list[Event]) -> None:
    async for event in reader:
        if len(finished) == 3:
            raise JobFailed(event)
        finished.append(event)


async def test_a_group_commits_the_events_a_job_finished_and_not_the_one_it_failed_on(
    posted: list[Posted], settings: ServeSettings, kafka: str
) -> None:
    one_account = EventFilter.of(entities=[ACCOUNTS[1]])
    finished: list[Event] = []
    async with asyncio.timeout(60):
        async with EventReader(kafka, settings.topic, select=one_account, group="job") as reader:
            with pytest.raises(JobFailed) as failure:
                await job_failing_on_its_fourth_event(reader, finished)
        async with EventReader(kafka, settings.topic, select=one_account, group="job") as again:
            rest = [event async for event in again]
    assert rest[0].coordinates == failure.value.event.coordinates
    everything = [*finished, *rest]
    assert len(everything) == sum(p.account == ACCOUNTS[1] for p in posted)
    assert len({e.coordinates for e in everything}) == len(everything)


async def test_the_readmes_analytics_job_counts_each_accounts_messages_of_the_day_once(
    posted: list[Posted], settings: ServeSettings, kafka: str, tmp_path: Path
) -> None:
    job = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL) if "EventReader" in b)
    (tmp_path / "job.py").write_text(job)
    result = await asyncio.to_thread(
        run,
        sys.executable,
        str(tmp_path / "job.py"),
        env={"BRIDGE_BOOTSTRAP_SERVERS": kafka, "BRIDGE_TOPIC": settings.topic},
    )
    assert result.returncode == 0, result.stderr
    # Four messages per account on 2024-05-02; the one delivered twice counts once.
    assert result.stdout.splitlines() == [f"{account} 4" for account in sorted(ACCOUNTS)]
    assert len(posted) == 48


def consume_day(kafka: str, topic: str, group: str, day: int) -> subprocess.CompletedProcess[str]:
    start = FIRST_DAY_MS + day * DAY_MS
    return run(
        *(sys.executable, "-m", "bridge", "consume", "--bootstrap-servers", kafka, "--topic", topic),
        *("--group", group, "--since", str(start), "--until", str(start + DAY_MS)),
    )


async def test_a_group_reading_one_day_after_another_gets_every_event_of_the_next_day(
    posted: list[Posted], settings: ServeSettings, kafka: str
) -> None:
    """The first day's run reads past its --until but commits nothing from there on, so the next day's
    run of the same group starts before that day's first events."""
    first = await asyncio.to_thread(consume_day, kafka, settings.topic, "daily", 0)
    second = await asyncio.to_thread(consume_day, kafka, settings.topic, "daily", 1)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    for result, day in ((first, 0), (second, 1)):
        start = FIRST_DAY_MS + day * DAY_MS
        expected = [p for p in posted if start <= p.event_time < start + DAY_MS]
        got = Counter(normalized(orjson.loads(line)["callback"]) for line in result.stdout.splitlines())
        assert got == Counter(normalized(p.body) for p in expected), day


async def test_consume_with_no_broker_answering_exits_3_with_a_one_line_error() -> None:
    result = await asyncio.to_thread(
        run_bridge, "consume", "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--from-beginning"
    )
    assert result.returncode == 3
    assert "cannot reach the Kafka cluster" in one_line_error(result)


@pytest.mark.parametrize("where", ["missing directory", "a directory"])
async def test_consume_refuses_an_output_it_cannot_write_with_a_one_line_usage_error(
    where: str, posted: list[Posted], settings: ServeSettings, kafka: str, tmp_path: Path
) -> None:
    output = str(tmp_path / "missing" / "out.jsonl") if where == "missing directory" else str(tmp_path)
    result = await asyncio.to_thread(
        run_bridge, "consume", "--bootstrap-servers", kafka, "--topic", settings.topic, "--from-beginning",
        "--output", output,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"cannot write --output {output}" in one_line_error(result)


async def test_consume_with_since_later_than_until_is_a_usage_error(offline_settings: ServeSettings) -> None:
    result = await asyncio.to_thread(
        run_bridge, "consume", "--bootstrap-servers", NO_BROKER, "--topic", offline_settings.topic,
        "--since", "2024-05-03", "--until", "2024-05-02",
    )  # fmt: skip
    assert result.returncode == 2
    assert "--since must be earlier than --until" in one_line_error(result)


async def test_consume_says_1_event_in_the_singular(
    posted: list[Posted], settings: ServeSettings, kafka: str
) -> None:
    result = await asyncio.to_thread(
        run_bridge, "consume", "--bootstrap-servers", kafka, "--topic", settings.topic, "--from-beginning",
        "--max", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "consume: 1 event written, " in result.stderr


async def test_a_window_at_the_end_of_the_topic_is_found_by_time_and_reads_only_its_own_records(
    settings: ServeSettings, kafka: str
) -> None:
    """`--since` looks the start up with ListOffsets by time: reading the last day of the three before
    today reads that day's records and no earlier one, where a full scan reads all of them. (Recent days:
    an event older than half the retention is stamped with its receive time, and found by a full read.)"""
    if broker_choice().kind == "tansu":
        pytest.skip("Tansu answers ListOffsets by time with offset 0: only a full scan works there")
    today = int(time.time() * 1000) // DAY_MS * DAY_MS
    posted = three_days(first_day_ms=today - 3 * DAY_MS)
    await post_through_a_bridge(settings, posted)
    last_day = today - DAY_MS
    window = EventFilter.of(since=last_day, until=today)
    async with EventReader(kafka, settings.topic, select=window, lateness_s=0) as reader:
        events = [event async for event in reader]
        windowed_read = reader.stats.events + reader.stats.filtered_out + reader.stats.bad
    async with EventReader(kafka, settings.topic) as full:
        everything = [event async for event in full]
    on_the_last_day = [p for p in posted if last_day <= p.event_time < today]
    assert len(everything) == len(posted)
    assert len(events) == len(on_the_last_day)
    assert windowed_read == len(on_the_last_day), "records before the window were read"
    assert windowed_read < len(everything) / 2
