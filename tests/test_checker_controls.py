"""Negative controls of the history check: run it against bridges broken on purpose, and see it fail.

A checker that cannot fail proves nothing. Each broken bridge below answers 200 for records that are not in
Kafka, or writes them wrong; the same fault schedule against the real bridge must pass. The faults are the
broker refusing Produce requests without appending them, retriable and not, which is what the proxy's
after-append error rewriting could never show.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import PublishError
from bridge.kafka.publisher import KafkaPublisher, Publisher
from bridge.tencent.envelope import Record
from bridge.tools.embedded import free_port
from tests.chaos import Planned, run_chaos
from tests.history import Report
from tests.support.broker import FaultBroker, fault_broker

pytestmark = pytest.mark.kafka  # starts brokers of its own

Publish = Callable[[Record, float], Any]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultBroker, int]]:
    """One broker node for every control, advertising the port its proxy will take."""
    port = free_port()
    with fault_broker(tmp_path_factory.mktemp("controls"), advertised_port=port) as broker:
        yield broker, port


def _refusals() -> list[Planned]:
    """The broker refuses every Produce, without appending, for a while: first with an error the producer
    retries, then with one it does not; twice over."""
    refuse = [
        Planned("error-no-append", 0.6, 1.2, {"proxy": 0, "error": "NOT_ENOUGH_REPLICAS", "times": 3}),
        Planned("error-no-append", 0.6, 1.2, {"proxy": 0, "error": "MESSAGE_TOO_LARGE", "times": None}),
        Planned("error-no-append", 0.6, 1.2, {"proxy": 0, "error": "CORRUPT_MESSAGE", "times": None}),
    ]
    return refuse * 2


async def _check(
    node: tuple[FaultBroker, int], tmp_path: Path, mutate: Callable[[Publisher], None] | None
) -> Report:
    broker, port = node
    report = await run_chaos(
        duration_s=6,
        clients=8,
        seed=11,
        nodes=[broker],
        proxy_ports=[port],
        schedule=_refusals(),
        mutate=mutate,
        history_file=tmp_path / "history.jsonl",
    )
    print(report.table())  # shown with -s, or when the test fails
    assert report.answers["200"] > 50, "the history is too short to say anything"
    assert report.faults["error-no-append"] >= 3, "the refusals did not happen"
    return report


def _wrap(publisher: Publisher, make: Callable[[Publish], Publish]) -> None:
    object.__setattr__(publisher, "publish", make(publisher.publish))


def answer_without_waiting(publisher: Publisher) -> None:
    """Hands the record to the producer and answers 200 at once."""
    pending: set[asyncio.Future[None]] = set()

    def forget(done: asyncio.Future[None]) -> None:
        pending.discard(done)
        if not done.cancelled():
            done.exception()  # retrieved: its failure was the point

    def make(original: Publish) -> Publish:
        async def publish(record: Record, deadline: float) -> None:
            task = asyncio.ensure_future(original(record, deadline))
            pending.add(task)
            task.add_done_callback(forget)

        return publish

    _wrap(publisher, make)


def drop_every_tenth(publisher: Publisher) -> None:
    """Answers 200 for every tenth record without writing it."""
    count = itertools.count(1)

    def make(original: Publish) -> Publish:
        async def publish(record: Record, deadline: float) -> None:
            if next(count) % 10:
                await original(record, deadline)

        return publish

    _wrap(publisher, make)


def success_on_broker_error(publisher: Publisher) -> None:
    """Turns every failure to write into a 200."""

    def make(original: Publish) -> Publish:
        async def publish(record: Record, deadline: float) -> None:
            try:
                await original(record, deadline)
            except PublishError:
                return

        return publish

    _wrap(publisher, make)


def wrong_partition(publisher: Publisher) -> None:
    """Writes every record, and confirms it, one partition over from its owning entity's."""
    assert isinstance(publisher, KafkaPublisher)
    right = publisher.partition_of

    def one_over(record: Record, partitions: int) -> int:
        return (right(record, partitions) + 1) % partitions

    object.__setattr__(publisher, "partition_of", one_over)


async def test_the_real_bridge_passes_the_schedule_the_controls_fail(
    node: tuple[FaultBroker, int], tmp_path: Path
) -> None:
    report = await _check(node, tmp_path, None)
    assert not report.broken, report.problems()
    assert report.answers["503"] > 0, "the refusals were never felt: they cannot tell a broken bridge"


@pytest.mark.parametrize(
    "mutate",
    [answer_without_waiting, drop_every_tenth, success_on_broker_error],
    ids=["answers-without-waiting", "drops-every-tenth", "200-on-broker-error"],
)
async def test_a_bridge_that_answers_200_for_unwritten_records_is_caught(
    node: tuple[FaultBroker, int], tmp_path: Path, mutate: Callable[[Publisher], None]
) -> None:
    report = await _check(node, tmp_path, mutate)
    assert report.broken
    assert report.missing, "the checker did not see 200s missing from Kafka"
    history = (tmp_path / "history.jsonl").read_text()
    assert '"type":"verdict"' in history
    assert '"broken":true' in history, "the history file does not carry the verdict"


async def test_a_bridge_that_writes_records_to_the_wrong_partition_is_caught(
    node: tuple[FaultBroker, int], tmp_path: Path
) -> None:
    report = await _check(node, tmp_path, wrong_partition)
    assert report.broken
    assert report.wrong_content
    assert "partition" in report.wrong_content[0]
    assert not report.missing, "the records are there, only misplaced"
