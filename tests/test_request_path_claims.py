"""The request path's contracts no end-to-end test pins down alone: a dedup claim released by a holder
cancelled or failed, a copy writing for itself after the first write failed, a copy that gave up followed
once, the publisher's "not ready", deadline and partition, and readiness asked only when there is something
to write."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.errors import BrokerNotReady, DeliveryTimeout, RecordTooLarge
from bridge.ingest.dedup import EdgeDedup
from bridge.ingest.outcomes import Outcome, Outcomes
from bridge.ingest.server import OUTCOME_HEADER, create_app
from bridge.kafka.batching import PartitionBatches
from bridge.kafka.publisher import KafkaPublisher
from bridge.settings import ServeSettings
from bridge.tencent.envelope import CallbackId, Record
from tests.support.fakes import FakePublisher
from tests.support.requests import fixture
from tests.support.settings import NO_BROKER

CALLBACK: CallbackId = "1400000000/OfficialAccount.CallbackAfterSendMsg/k1"
Publish = Callable[[], Awaitable[None]]


async def _write_once(dedup: EdgeDedup, publish: Publish, deadline: float) -> Outcome:
    """What the handler does with its claim."""
    async with dedup.claim(CALLBACK, deadline) as claim:
        if claim.duplicate is None:
            await publish()
    return claim.outcome


async def _never() -> None:
    await asyncio.get_running_loop().create_future()


async def _confirmed() -> None:
    pass


async def test_a_holder_cancelled_releases_its_claim_and_a_later_copy_writes() -> None:
    outcomes = Outcomes()
    dedup = EdgeDedup(300, 100, outcomes=outcomes)
    loop = asyncio.get_running_loop()
    holder = asyncio.create_task(_write_once(dedup, _never, loop.time() + 60))
    await asyncio.sleep(0)
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    writes: list[str] = []

    async def publish() -> None:
        writes.append("copy")

    async with asyncio.timeout(5):  # a claim not released would keep this copy waiting for its deadline
        assert await _write_once(dedup, publish, loop.time() + 60) is Outcome.CONFIRMED
    assert writes == ["copy"]


@pytest.mark.parametrize(
    "failure",
    [BrokerNotReady("not ready"), RecordTooLarge("too large"), RuntimeError("a bug")],
    ids=["not-ready", "too-large", "bug"],
)
async def test_a_copy_waiting_on_a_write_that_fails_writes_for_itself(failure: Exception) -> None:
    outcomes = Outcomes()
    dedup = EdgeDedup(300, 100, outcomes=outcomes)
    loop = asyncio.get_running_loop()
    release = asyncio.Event()
    calls: list[str] = []

    async def first() -> None:
        calls.append("first")
        await release.wait()
        raise failure

    async def copy() -> None:
        calls.append("copy")

    holder = asyncio.create_task(_write_once(dedup, first, loop.time() + 60))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(_write_once(dedup, copy, loop.time() + 60))
    await asyncio.sleep(0)  # the copy now waits on the first write
    release.set()
    with pytest.raises(type(failure)):
        await holder
    assert await waiting is Outcome.CONFIRMED
    assert calls == ["first", "copy"]
    # A copy that got its own answer follows nothing: no landed or lost is counted for it.
    assert outcomes.snapshot()["ambiguous_lost"] == outcomes.snapshot()["ambiguous_landed"] == 0


async def test_a_copy_that_times_out_is_followed_once_when_the_holder_confirms() -> None:
    outcomes = Outcomes()
    dedup = EdgeDedup(300, 100, outcomes=outcomes)
    loop = asyncio.get_running_loop()
    release = asyncio.Event()

    async def first() -> None:
        await release.wait()

    holder = asyncio.create_task(_write_once(dedup, first, loop.time() + 60))
    await asyncio.sleep(0)
    with pytest.raises(DeliveryTimeout) as raised:
        await _write_once(dedup, _confirmed, loop.time() + 0.02)
    assert raised.value.ambiguous
    release.set()
    assert await holder is Outcome.CONFIRMED
    assert outcomes.snapshot()["ambiguous_landed"] == 1
    assert outcomes.snapshot()["ambiguous_lost"] == 0


# --- the publisher: "not ready" as before, and the deadline ------------------------------------------------


def _record(settings: ServeSettings) -> Record:
    return Record(topic=settings.topic, entity="@TOA#_x", key=b"k", value=b"{}", timestamp_ms=0, headers=())


async def test_not_ready_says_what_the_old_partition_check_said() -> None:
    settings = ServeSettings(bootstrap_servers=(NO_BROKER,))
    publisher = KafkaPublisher(settings)
    with pytest.raises(BrokerNotReady) as raised:
        await publisher.publish(_record(settings), asyncio.get_running_loop().time() + 5)
    # As 12313ce's `server.callback_record` said it, with `publisher.status` in the parentheses.
    assert raised.value.info == "Kafka is not ready (connecting to Kafka); the callback was not written"


class _Batches:
    """Batches that take nothing: what `publish` would hand a record to."""

    def __init__(self) -> None:
        self.added: list[tuple[Record, int]] = []

    def add(self, record: Record, partition_number: int) -> asyncio.Future[None]:
        self.added.append((record, partition_number))
        return asyncio.get_running_loop().create_future()

    def expire(self, _waiter: asyncio.Future[None]) -> None:
        raise AssertionError("not reached in these tests")

    def abandon(self, _waiter: asyncio.Future[None]) -> None:
        pass


async def test_a_deadline_already_past_is_a_503_not_written_and_not_ambiguous() -> None:
    settings = ServeSettings(bootstrap_servers=(NO_BROKER,))
    publisher = KafkaPublisher(settings)
    batches = _Batches()
    publisher.serve(cast("PartitionBatches", batches), dict.fromkeys(settings.topics, 12))
    with pytest.raises(DeliveryTimeout) as raised:
        await publisher.publish(_record(settings), asyncio.get_running_loop().time() - 0.001)
    assert not raised.value.ambiguous
    assert raised.value.status == 503
    assert batches.added == []


async def test_the_partition_is_the_entitys_in_the_count_at_start() -> None:
    from bridge.tencent.partitioner import partition_for  # noqa: PLC0415

    settings = ServeSettings(bootstrap_servers=(NO_BROKER,))
    publisher = KafkaPublisher(settings)
    batches = _Batches()
    publisher.serve(cast("PartitionBatches", batches), dict.fromkeys(settings.topics, 7))
    task: asyncio.Task[Any] = asyncio.create_task(
        publisher.publish(_record(settings), asyncio.get_running_loop().time() + 60)
    )
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [number for _, number in batches.added] == [partition_for("@TOA#_x", 7)]


# --- readiness after the claim: a copy of a confirmed callback needs no broker ------------------------------


async def test_a_copy_of_a_confirmed_callback_is_a_200_duplicate_even_while_kafka_is_not_ready() -> None:
    """Readiness is the publisher's, asked only when there is something to write: a copy of a callback
    confirmed within the dedup window is answered 200 `duplicate_confirmed` (its record is in Kafka), while
    a new callback gets the 503 "not ready"."""
    seed, other = fixture("oa-after-send-text"), fixture("c2c-after-send")
    publisher = FakePublisher()
    publisher.confirm.set()
    async with TestClient(TestServer(create_app(ServeSettings(), publisher=publisher))) as client:
        first = await client.post("/callback", params=seed.query, data=seed.raw_body)
        assert (first.status, first.headers[OUTCOME_HEADER]) == (200, "confirmed")
        publisher.partitions = None  # Kafka not ready from now on
        copy = await client.post("/callback", params=seed.query, data=seed.raw_body)
        assert (copy.status, copy.headers[OUTCOME_HEADER]) == (200, "duplicate_confirmed")
        new = await client.post("/callback", params=other.query, data=other.raw_body)
        assert new.status == 503
        assert "Kafka is not ready" in (await new.json())["ErrorInfo"]
    assert len(publisher.records) == 1
