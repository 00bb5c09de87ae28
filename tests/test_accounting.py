"""Outcome and error accounting: every ambiguous answer ends as landed or lost, and only Kafka failures count
as publish errors; the producer's supervisor never ends by itself.

Once everything has settled, `ambiguous == ambiguous_landed + ambiguous_lost`: a 503 that may still land is
followed to its end whichever way it came about (a deadline, a broker's refusal, a copy of a callback in
flight, a handler cancelled at shutdown, a bug).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.errors import BrokerNotReady, DeliveryTimeout, PublishError
from bridge.ingest.dedup import EdgeDedup
from bridge.ingest.metrics import METRICS
from bridge.ingest.outcomes import Outcome, Outcomes
from bridge.ingest.server import ADMISSION, OUTCOMES, PUBLISHER, create_app
from bridge.kafka.producer import ProducerWatch, wait_for_death
from bridge.kafka.publisher import KafkaPublisher
from bridge.settings import ServeSettings
from bridge.tools.embedded import free_port
from tests.conftest import BridgeClient
from tests.support.fakes import FakePublisher
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import wait_until_ready
from tests.test_metrics import scrape, value

OA = fixture("oa-after-send-text")


def settled(outcomes: dict[str, int]) -> bool:
    return outcomes["ambiguous"] == outcomes["ambiguous_landed"] + outcomes["ambiguous_lost"]


# --- which 503s are publish errors -----------------------------------------------------------------------


@pytest.fixture
async def fake_client(publisher: FakePublisher) -> AsyncIterator[BridgeClient]:
    app = create_app(replace(ServeSettings(), max_in_flight=1, dedup_window=0), publisher=publisher)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_overload_shutdown_and_bugs_are_503s_but_not_publish_errors(
    fake_client: BridgeClient, publisher: FakePublisher
) -> None:
    """`bridge_publish_errors_total` counts writes Kafka did not confirm, by kind: not the other 503s."""
    app = fake_client.app
    assert app is not None
    publisher.failure = ZeroDivisionError("a bug")
    assert (await fake_client.post("/callback", params=OA.query, data=OA.raw_body)).status == 503
    publisher.failure = None
    publisher.confirm.clear()
    held = asyncio.ensure_future(fake_client.post("/callback", params=OA.query, data=OA.raw_body))
    async with asyncio.timeout(5):
        while app[ADMISSION].in_flight < 1:
            await asyncio.sleep(0.01)
    overloaded = await fake_client.post("/callback", params=OA.query, data=OA.raw_body)
    assert overloaded.status == 503
    publisher.confirm.set()
    assert (await held).status == 200
    app[ADMISSION].closing = True
    assert (await fake_client.post("/callback", params=OA.query, data=OA.raw_body)).status == 503
    app[ADMISSION].closing = False
    publisher.failure = DeliveryTimeout("Kafka did not confirm the write within 5 s", ambiguous=True)
    assert (await fake_client.post("/callback", params=OA.query, data=OA.raw_body)).status == 503

    samples = await scrape(fake_client)
    kinds = {
        dict(labels)["kind"]: count
        for (name, labels), count in samples.items()
        if name == "bridge_publish_errors_total"
    }
    assert kinds == {"delivery_timeout": 1}
    assert value(samples, "bridge_overloaded_requests_total") == 1
    outcomes = app[OUTCOMES].snapshot()
    assert (outcomes["overloaded"], outcomes["failed"], outcomes["ambiguous"]) == (1, 1, 2)
    # The bug's record cannot be followed: it counts as lost at once. The fake publisher follows nothing.
    assert outcomes["ambiguous_lost"] == 1


# --- copies of a callback in flight -----------------------------------------------------------------------


CALLBACK = "1400000000\x1fOfficialAccount.CallbackAfterSendMsg\x1fkey"


class _Writer:
    """The first write of a callback, held until the test ends it."""

    def __init__(self) -> None:
        self.end: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def publish(self, _deadline: float) -> None:
        await self.end


async def _publish_once(
    dedup: EdgeDedup, callback_id: str, publish: Callable[[float], Awaitable[None]], deadline: float
) -> Outcome:
    """What the handler does with the dedup: claim the callback, and write it unless it is a duplicate."""
    async with dedup.claim(callback_id, deadline) as claim:
        if claim.duplicate is None:
            await publish(deadline)
    return claim.outcome


async def _copy_stops_waiting(dedup: EdgeDedup, writer: _Writer, *, cancel: bool) -> asyncio.Task[Outcome]:
    """The first write under way, once a copy stopped waiting for it: by its deadline, or cancelled."""
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(_publish_once(dedup, CALLBACK, writer.publish, loop.time() + 60))
    await asyncio.sleep(0)
    copy_deadline = loop.time() + (60 if cancel else 0.05)
    copy = asyncio.create_task(_publish_once(dedup, CALLBACK, writer.publish, copy_deadline))
    await asyncio.sleep(0.01)
    if cancel:
        copy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await copy
    else:
        with pytest.raises(DeliveryTimeout) as raised:
            await copy
        assert raised.value.ambiguous
    return first


@pytest.mark.parametrize("cancel", [False, True], ids=["deadline", "cancelled"])
async def test_a_copy_that_stopped_waiting_ends_as_the_first_write_ends(cancel: bool) -> None:
    outcomes = Outcomes()
    dedup = EdgeDedup(300, 100, outcomes=outcomes)
    writer = _Writer()
    first = await _copy_stops_waiting(dedup, writer, cancel=cancel)
    assert outcomes.snapshot()["ambiguous_landed"] == 0
    writer.end.set_result(None)
    await first
    assert outcomes.snapshot()["ambiguous_landed"] == 1
    assert outcomes.snapshot()["ambiguous_lost"] == 0


async def test_a_copy_of_a_write_that_failed_is_lost_and_of_an_ambiguous_one_follows_its_record() -> None:
    outcomes = Outcomes()
    dedup = EdgeDedup(300, 100, outcomes=outcomes)
    writer = _Writer()
    first = await _copy_stops_waiting(dedup, writer, cancel=False)
    writer.end.set_exception(BrokerNotReady("not ready; the callback was not written"))
    with pytest.raises(BrokerNotReady):
        await first
    assert outcomes.snapshot()["ambiguous_lost"] == 1

    writer = _Writer()
    first = await _copy_stops_waiting(dedup, writer, cancel=False)
    fate = asyncio.get_running_loop().create_future()
    writer.end.set_exception(DeliveryTimeout("no confirmation in time", ambiguous=True, fate=fate))
    with pytest.raises(PublishError):
        await first
    assert outcomes.snapshot()["ambiguous_landed"] == 0, "the first write's record is still in the producer"
    fate.set_result(True)  # the producer's answer came after all
    await asyncio.sleep(0)
    assert (outcomes.snapshot()["ambiguous_landed"], outcomes.snapshot()["ambiguous_lost"]) == (1, 1)


# --- against the broker -----------------------------------------------------------------------------------


async def test_a_handler_cancelled_at_shutdown_is_counted_ambiguous_and_its_record_followed(
    settings: ServeSettings, kafka: str
) -> None:
    """aiohttp cancels the handlers that outlive its shutdown wait. Such a callback got no answer and its
    record was in the producer: it counts as ambiguous in `/stats` as in the metrics, and, flushed as the
    producer stops, as landed."""
    app = create_app(replace(settings, linger_ms=3000, shutdown_timeout=10))
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(20):
                while (await session.get(f"http://127.0.0.1:{port}/readyz")).status != 200:
                    await asyncio.sleep(0.05)

            async def post() -> int | str:
                try:
                    url = f"http://127.0.0.1:{port}/callback"
                    async with session.post(url, params=OA.query, data=OA.raw_body) as response:
                        return response.status
                except aiohttp.ClientError as exc:
                    return type(exc).__name__

            posting = asyncio.create_task(post())
            async with asyncio.timeout(5):
                while app[METRICS].queued < 1:  # handed to the producer, lingering there
                    await asyncio.sleep(0.01)
            await runner.cleanup()
            assert await posting != 200
    finally:
        await runner.cleanup()
    outcomes = app[OUTCOMES].snapshot()
    assert outcomes["ambiguous"] == 1
    assert (outcomes["ambiguous_landed"], outcomes["ambiguous_lost"]) == (1, 0)
    assert app[METRICS].callbacks == {("OfficialAccount", "ambiguous"): 1}
    [record] = await read_records(kafka, [settings.topic], expect=1)
    assert record.key == OA.body["MsgKey"].encode()


@contextlib.asynccontextmanager
async def _bridge_watched_by(settings: ServeSettings, watch: ProducerWatch) -> AsyncIterator[BridgeClient]:
    """The bridge, its producers watched for death by `watch` rather than `wait_for_death`."""
    publisher = KafkaPublisher(settings, watch=watch)
    await publisher.start()
    try:
        async with TestClient(TestServer(create_app(settings, publisher))) as client:
            yield client
    finally:
        await publisher.close()


async def test_a_producer_that_cannot_be_watched_is_logged_and_rebuilt(
    settings: ServeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """If watching the producer fails (aiokafka renamed what the watch reads, say), the supervisor says so
    and builds a new producer, rather than end and leave `/readyz` saying ready with no one watching."""
    failures = 0

    async def fails_once(producer: object) -> str:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise AttributeError("'AIOKafkaProducer' object has no attribute '_sender'")
        return await wait_for_death(producer)

    caplog.set_level(logging.INFO, logger="bridge")
    async with _bridge_watched_by(settings, fails_once) as client:
        async with asyncio.timeout(20):
            while "cannot watch the Kafka producer" not in caplog.text:
                await asyncio.sleep(0.05)
        assert (await client.get("/readyz")).status == 503
        await wait_until_ready(client)
        assert (await client.post("/callback", params=OA.query, data=OA.raw_body)).status == 200
    assert failures == 1
    assert "building a new one" in caplog.text


async def test_a_producer_that_can_never_be_watched_never_makes_the_bridge_ready(
    settings: ServeSettings,
) -> None:
    async def always_fails(_producer: object) -> str:
        raise AttributeError("'AIOKafkaProducer' object has no attribute '_sender'")

    async with _bridge_watched_by(settings, always_fails) as client:
        app = client.app
        assert app is not None
        publisher = app[PUBLISHER]
        for _ in range(40):  # two seconds, over which the supervisor rebuilds at least once
            response = await client.get("/readyz")
            assert response.status == 503, "ready without a watch on the producer"
            await asyncio.sleep(0.05)
        assert "cannot be watched" in publisher.status or "connecting" in publisher.status
