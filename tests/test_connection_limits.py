"""What one connection may send, and for how long, is bounded: shown with raw sockets.

aiohttp's parser enforces the URL and header limits (a 400 with a Tencent-style body, given by
`bridge.ingest.runner` before any handler runs, then the connection is closed); the bridge's handler the
body limit (413) and the body timeout (408, see test_hostile_clients).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import urlencode

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from bridge.ingest.runner import request_handler_options
from bridge.ingest.server import create_app
from bridge.settings import ServeSettings
from tests.support.fakes import FakePublisher
from tests.support.requests import fixture
from tests.support.serve import BridgeTestServer

SEED = fixture("oa-after-send-text")
LIMITS = ServeSettings(
    max_url_bytes=1024, max_header_bytes=512, max_headers=16, idle_timeout=1.0, max_body_bytes=4096
)
TARGET = f"/callback?{urlencode(SEED.query)}"


@pytest.fixture
async def server(publisher: FakePublisher) -> AsyncIterator[TestServer]:
    test_server = BridgeTestServer(create_app(LIMITS, publisher=publisher))
    await test_server.start_server(**request_handler_options(LIMITS))
    async with test_server:
        yield test_server


async def answer_to(server: TestServer, data: bytes) -> bytes:
    """Send `data` on a new connection; everything answered until the server closes it."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()  # to EOF: the server closes the connection
    finally:
        writer.close()


def head(target: str = TARGET, *headers: str) -> bytes:
    return "\r\n".join([f"POST {target} HTTP/1.1", "Host: bridge", *headers, "", ""]).encode()


def refusal(answer: bytes) -> tuple[int, dict[str, object]]:
    """Status and Tencent-style body of an answer (`answer_to` read it to the closed connection)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Request-Id"]
    fail = orjson.loads(body)
    assert fail["ActionStatus"] == "FAIL"
    return int(status_line.split(" ")[1]), fail


async def test_a_url_longer_than_the_limit_gets_a_tencent_400_and_the_connection_is_closed(
    server: TestServer,
) -> None:
    answer = await answer_to(server, head(TARGET + "&pad=" + "a" * 1100, "Content-Length: 0"))
    status, body = refusal(answer)
    assert (status, body["ErrorCode"]) == (400, 40006)
    assert (
        body["ErrorInfo"]
        == "the request line (method, path and query) is longer than the limit of 1024 bytes"
    )


@pytest.mark.parametrize(
    "header", ["X-Padding: " + "a" * 600, "X-" + "a" * 600 + ": 1"], ids=["long value", "long name"]
)
async def test_a_header_longer_than_the_limit_gets_a_tencent_400_and_the_connection_is_closed(
    server: TestServer, header: str
) -> None:
    status, body = refusal(await answer_to(server, head(TARGET, header, "Content-Length: 0")))
    assert (status, body["ErrorCode"]) == (400, 40006)
    assert body["ErrorInfo"] == "a header line is longer than the limit of 512 bytes"


async def test_requests_the_parser_refuses_are_counted_in_stats_and_metrics(server: TestServer) -> None:
    await answer_to(server, head(TARGET + "&pad=" + "a" * 1100, "Content-Length: 0"))
    await answer_to(server, head(TARGET, "X-Padding: " + "a" * 600, "Content-Length: 0"))
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/stats")) as response:
            outcomes = (await response.json())["outcomes"]
        async with session.get(server.make_url("/metrics")) as response:
            metrics = await response.text()
    assert (outcomes["rejected"], outcomes["confirmed"]) == (2, 0)
    assert 'bridge_requests_total{family="none",status="400"} 2.0' in metrics
    assert 'bridge_callbacks_total{family="none",outcome="rejected"} 2.0' in metrics


async def test_more_headers_than_the_limit_get_a_tencent_400_and_the_connection_is_closed(
    server: TestServer,
) -> None:
    answer = await answer_to(server, head(TARGET, *(f"X-H{i}: 1" for i in range(20)), "Content-Length: 0"))
    status, body = refusal(answer)
    assert (status, body["ErrorCode"]) == (400, 40006)
    assert body["ErrorInfo"] == "the request has more than 16 header lines"


async def test_a_line_over_a_limit_shared_by_url_and_headers_is_named_as_either(
    publisher: FakePublisher,
) -> None:
    """aiohttp does not say which line was too long; with equal limits the answer cannot either."""
    same = replace(LIMITS, max_url_bytes=512)
    test_server = BridgeTestServer(create_app(same, publisher=publisher))
    await test_server.start_server(**request_handler_options(same))
    async with test_server:
        status, body = refusal(await answer_to(test_server, head(TARGET + "&pad=" + "a" * 600)))
    assert (status, body["ErrorCode"]) == (400, 40006)
    assert body["ErrorInfo"] == "the request line or a header line is longer than the limit of 512 bytes"


async def test_headers_just_within_the_limits_are_served(server: TestServer) -> None:
    headers = (*(f"X-H{i}: 1" for i in range(12)), "X-Padding: " + "a" * 400, "Connection: close")
    data = head(TARGET, *headers, f"Content-Length: {len(SEED.raw_body)}") + SEED.raw_body
    assert (await answer_to(server, data)).startswith(b"HTTP/1.1 200 ")


async def test_a_declared_body_over_the_limit_gets_413_before_any_of_it_is_sent(server: TestServer) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head(TARGET, "Content-Length: 100000000"))
        await writer.drain()
        async with asyncio.timeout(5):
            assert (await reader.readline()).startswith(b"HTTP/1.1 413 ")
    finally:
        writer.close()


async def test_a_client_trickling_its_headers_is_cut_off_after_the_idle_timeout(server: TestServer) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        writer.write(f"POST {TARGET} HTTP/1.1\r\n".encode())
        async with asyncio.timeout(10):
            for i in range(1000):  # a header byte every 0.1 s, never the end of the headers
                writer.write(b"X-Slow: 1\r\n"[i % 11 : i % 11 + 1])
                try:
                    await writer.drain()
                    closed = await asyncio.wait_for(reader.read(1), 0.1) == b""
                except TimeoutError:
                    continue
                except ConnectionError:
                    closed = True
                if closed:
                    break
    finally:
        writer.close()
    assert loop.time() - started < 5, "cut off within a few seconds of the 1 s idle timeout"


async def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(server: TestServer) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head(TARGET, f"Content-Length: {len(SEED.raw_body)}") + SEED.raw_body)
        await writer.drain()
        async with asyncio.timeout(10):
            assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
            await reader.read()  # the rest of the answer, then EOF once the idle connection is closed
        assert reader.at_eof()
    finally:
        writer.close()
