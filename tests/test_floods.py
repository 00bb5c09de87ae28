"""Many hostile clients at once hold only cheap places: slow bodies cannot take the in-flight slots,
connections are capped, and a flood of bad requests costs the log a few lines a second."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import urlencode

import orjson
import pytest
from aiohttp.test_utils import BaseTestServer, TestServer

from bridge.ingest.metrics import METRICS
from bridge.ingest.runner import request_handler_options
from bridge.ingest.server import ADMISSION, OUTCOMES, create_app
from bridge.logs import LineBudget
from bridge.settings import ServeSettings
from tests.support.fakes import FakePublisher
from tests.support.requests import fixture
from tests.support.serve import BridgeTestServer

SEED = fixture("oa-after-send-text")
TARGET = f"/callback?{urlencode(SEED.query)}"
LIMITS = ServeSettings(max_in_flight=2, max_pending_bodies=3, max_connections=8, body_timeout=5.0)


@pytest.fixture
async def server(publisher: FakePublisher) -> AsyncIterator[TestServer]:
    test_server = BridgeTestServer(create_app(LIMITS, publisher=publisher))
    await test_server.start_server(**request_handler_options(LIMITS))
    async with test_server:
        yield test_server


def request(body: bytes = SEED.raw_body, *, target: str = TARGET, length: int | None = None) -> bytes:
    head = f"POST {target} HTTP/1.1\r\nHost: bridge\r\nContent-Length: {length or len(body)}\r\n\r\n"
    return head.encode() + body


async def connect(server: BaseTestServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(server.host, server.port)


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    """The status and Tencent-style body of the next answer on a connection."""
    async with asyncio.timeout(5):
        status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in {b"\r\n", b""}:
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length)
    return int(status_line.split()[1]), orjson.loads(body)


async def trickle(server: TestServer, count: int) -> list[asyncio.StreamWriter]:
    """`count` clients that send their headers and the start of a body that never ends."""
    writers = []
    for _ in range(count):
        _reader, writer = await connect(server)
        writer.write(request(SEED.raw_body[:10], length=len(SEED.raw_body)))
        await writer.drain()
        writers.append(writer)
    return writers


async def until(condition: object) -> None:
    async with asyncio.timeout(5):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_clients_slow_to_send_their_body_do_not_take_the_in_flight_slots(
    server: TestServer, publisher: FakePublisher
) -> None:
    """Two slow bodies with `--max-in-flight 2`: a callback that has its body is still written."""
    admission = server.app[ADMISSION]
    slow = await trickle(server, 2)
    try:
        await until(lambda: admission.pending_bodies == 2)
        assert admission.in_flight == 0
        reader, writer = await connect(server)
        writer.write(request())
        status, _ = await answer(reader)
        writer.close()
    finally:
        for writer in slow:
            writer.close()
    assert status == 200
    assert len(publisher.records) == 1


async def test_bodies_still_arriving_past_their_bound_get_503_at_once(server: TestServer) -> None:
    admission = server.app[ADMISSION]
    slow = await trickle(server, 3)
    try:
        await until(lambda: admission.pending_bodies == 3)
        reader, writer = await connect(server)
        writer.write(request(SEED.raw_body[:10], length=len(SEED.raw_body)))
        status, body = await answer(reader)
        writer.close()
        # A body that came with its headers needs no such place, and is still written.
        reader, writer = await connect(server)
        writer.write(request())
        assert (await answer(reader))[0] == 200
        writer.close()
    finally:
        for writer in slow:
            writer.close()
    assert (status, body["ErrorCode"]) == (503, 50304)
    assert "--max-pending-bodies" in str(body["ErrorInfo"])


async def test_the_in_flight_limit_still_holds_once_the_bodies_are_in(
    publisher: FakePublisher,
) -> None:
    publisher.confirm.clear()  # the broker does not answer
    settings = replace(LIMITS, max_in_flight=2)
    app = create_app(settings, publisher=publisher)
    async with TestServer(app) as test_server:
        held = []
        for _ in range(2):
            reader, writer = await connect(test_server)
            writer.write(request())
            held.append((reader, writer))
        await until(lambda: app[ADMISSION].in_flight == 2)
        reader, writer = await connect(test_server)
        writer.write(request())
        status, body = await answer(reader)
        publisher.confirm.set()
        assert [(await answer(r))[0] for r, _ in held] == [200, 200]
        for _, w in [*held, (reader, writer)]:
            w.close()
    assert (status, body["ErrorCode"]) == (503, 50304)
    assert "--max-in-flight" in str(body["ErrorInfo"])


async def test_a_connection_over_the_cap_gets_a_tencent_503_and_is_closed_and_the_others_are_served(
    server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    idle = [await connect(server) for _ in range(8)]
    try:
        reader, writer = await connect(server)
        status, body = await answer(reader)
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed
        writer.close()
        kept_reader, kept_writer = idle[0]
        kept_writer.write(request())
        assert (await answer(kept_reader))[0] == 200
    finally:
        for _, writer in idle:
            writer.close()
    assert (status, body["ErrorCode"]) == (503, 50304)
    assert "--max-connections" in str(body["ErrorInfo"])
    assert lines(caplog, "a connection was answered 503 and closed: 8 connections are already open")


async def test_a_connection_over_the_cap_is_counted_as_overloaded(server: TestServer) -> None:
    idle = [await connect(server) for _ in range(8)]
    try:
        reader, writer = await connect(server)
        assert (await answer(reader))[0] == 503
        writer.close()
    finally:
        for _, writer in idle:
            writer.close()
    # What /stats and /metrics show (a request for them would be one connection over the cap too).
    assert server.app[OUTCOMES].snapshot()["overloaded"] == 1
    assert server.app[METRICS].requests == {("none", "503"): 1}
    assert server.app[METRICS].overloaded == 1


async def test_once_connections_close_new_ones_are_served_again(server: TestServer) -> None:
    idle = [await connect(server) for _ in range(8)]
    for _, writer in idle:
        writer.close()
        await writer.wait_closed()
    async with asyncio.timeout(5):
        while True:
            reader, writer = await connect(server)
            writer.write(request())
            status, _ = await answer(reader)
            writer.close()
            if status == 200:
                break
            await asyncio.sleep(0.05)  # aiohttp forgets a closed connection once its handler has ended


def lines(caplog: pytest.LogCaptureFixture, phrase: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if phrase in record.getMessage()]


async def test_a_flood_of_bad_callbacks_is_logged_ten_lines_a_second_and_a_count(
    server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await connect(server)
    try:
        for _ in range(100):
            writer.write(request(b"not json"))
            assert (await answer(reader))[0] == 400
    finally:
        writer.close()
    async with asyncio.timeout(5):
        while not lines(caplog, "were not logged"):
            await asyncio.sleep(0.05)
    told = lines(caplog, "-> 400")
    summaries = [r for r in caplog.records if "were not logged" in r.getMessage()]
    # Ten lines in each second the flood lasted (one, unless the machine is very slow), and the count.
    assert 1 <= len(told) <= 10 * len(summaries)
    assert len(told) + sum(getattr(r, "suppressed", 0) for r in summaries) == 100
    summary = summaries[0].getMessage()
    assert summary.endswith("more lines about refused requests were not logged (at most 10 lines a second)")


async def test_requests_the_http_parser_refuses_share_the_same_budget(
    server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(30):
        reader, writer = await connect(server)
        writer.write(b"POST /callback HTTP/1.1\r\nNot a header\r\n\r\n")
        assert (await answer(reader))[0] == 400
        writer.close()
    async with asyncio.timeout(5):
        while not lines(caplog, "were not logged"):
            await asyncio.sleep(0.05)
    refused = [r for r in caplog.records if r.name == "aiohttp.server"]
    summaries = [r for r in caplog.records if "were not logged" in r.getMessage()]
    assert 1 <= len(refused) <= 10 * len(summaries)
    assert len(refused) + sum(getattr(r, "suppressed", 0) for r in summaries) == 30


def test_the_budget_allows_its_lines_each_second_and_counts_the_rest() -> None:
    now = [100.0]
    logger = logging.getLogger("tests.budget")
    told: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: told.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        budget = LineBudget(logger, "lines", per_second=3, clock=lambda: now[0])
        assert [budget.allow() for _ in range(5)] == [True, True, True, False, False]
        now[0] += 1.0
        assert budget.allow()
        assert told == ["2 more lines were not logged (at most 3 lines a second)"]
        budget.summarize()
        assert len(told) == 1  # nothing more left out
    finally:
        logger.removeHandler(handler)
