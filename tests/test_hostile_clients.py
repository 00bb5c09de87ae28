"""Clients that misbehave at the HTTP level get a clear answer, never a 500 or a hang."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import BaseTestServer, TestClient

from bridge.ingest.runner import request_handler_options
from bridge.ingest.server import create_app
from bridge.settings import ServeSettings
from tests.support.records import count_records
from tests.support.requests import fixture
from tests.support.serve import BridgeTestServer, until_stats, wait_until_ready

SEED = fixture("oa-after-send-text")
QUERY = "&".join(f"{k}={v}" for k, v in SEED.query.items())


@pytest.fixture
async def server(settings: ServeSettings) -> AsyncIterator[BaseTestServer]:
    """A ready bridge, served as `bridge serve` serves it, that gives a body one second to arrive."""
    bridge_settings = replace(settings, body_timeout=1.0)
    test_server = BridgeTestServer(create_app(bridge_settings))
    await test_server.start_server(**request_handler_options(bridge_settings))
    async with TestClient(test_server) as client:
        await wait_until_ready(client)
        yield client.server


async def exchange(
    server: BaseTestServer, head: bytes, body: bytes = b"", *, then_wait: float = 5.0
) -> bytes:
    """Send raw bytes on a new connection and return everything the server answers before closing."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(then_wait):
            return await reader.read(65536)
    finally:
        writer.close()


def request_head(*headers: str, request_line: str = f"POST /callback?{QUERY} HTTP/1.1") -> bytes:
    lines = [request_line, "Host: bridge", *headers, "", ""]
    return "\r\n".join(lines).encode()


def status_and_body(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), orjson.loads(body)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_is_not_in_its_content_encoding_gets_400(
    server: BaseTestServer, settings: ServeSettings, kafka: str, encoding: str
) -> None:
    answer = await exchange(
        server, request_head(f"Content-Encoding: {encoding}", "Content-Length: 9"), b"notgzip!!"
    )
    status, body = status_and_body(answer)
    assert status == 400
    assert "could not be read" in str(body["ErrorInfo"])
    assert await count_records(kafka, settings.topics) == 0


async def test_a_gzip_encoded_callback_is_accepted(server: BaseTestServer) -> None:
    packed = gzip.compress(SEED.raw_body)
    head = request_head("Content-Encoding: gzip", f"Content-Length: {len(packed)}")
    status, body = status_and_body(await exchange(server, head, packed))
    assert (status, body["ActionStatus"]) == (200, "OK")


async def test_a_body_that_trickles_in_too_slowly_gets_408_and_frees_its_slot(
    server: BaseTestServer, settings: ServeSettings, kafka: str
) -> None:
    head = request_head(f"Content-Length: {len(SEED.raw_body)}")
    answer = await exchange(server, head, SEED.raw_body[:10])  # and the rest never comes
    status, body = status_and_body(answer)
    assert status == 408
    assert "did not arrive within 1 s" in str(body["ErrorInfo"])
    assert await count_records(kafka, settings.topics) == 0


async def test_a_client_that_leaves_mid_body_leaves_the_server_serving(server: BaseTestServer) -> None:
    _reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(request_head("Content-Length: 5000") + b'{"CallbackCommand":')
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    head = request_head(f"Content-Length: {len(SEED.raw_body)}")
    status, _ = status_and_body(await exchange(server, head, SEED.raw_body))
    assert status == 200


CHUNKED = "Transfer-Encoding: chunked"


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"POST\r\n\r\n", "Expected space after method"),
        (b"P@ST /callback HTTP/1.1\r\nHost: bridge\r\n\r\n", "Invalid method encountered"),
        (request_head(request_line=f"POST /callback?{QUERY} HTTP/9.x"), "Invalid minor version"),
        (request_head(request_line="POST /call\x7fback HTTP/1.1"), "Invalid char in url path"),
        (request_head("Not a header"), "Invalid header token"),
        (request_head("X-Note: a\x01b"), "Invalid header value char"),
        (request_head("Content-Length: ten"), "Invalid character in Content-Length"),
        (request_head("Content-Length: 2", "Content-Length: 3") + b"{}", "Duplicate Content-Length"),
        (request_head(CHUNKED, "Content-Length: 2") + b"0\r\n\r\n", "Content-Length can't be present"),
        (request_head("Transfer-Encoding: gzip, chunked, br"), "Invalid `Transfer-Encoding`"),
        (request_head(CHUNKED) + b"zz\r\n{}\r\n0\r\n\r\n", "Invalid character in chunk size"),
        (request_head(CHUNKED) + b"2\r\n{}{}\r\n0\r\n\r\n", "Expected LF after chunk data"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "Received HTTPS traffic on an HTTP port"),
    ],
    ids=[
        "request line without a target",
        "method with a bad character",
        "unknown HTTP version",
        "control character in the path",
        "header line without a colon",
        "control character in a header value",
        "Content-Length not a number",
        "two Content-Lengths",
        "Content-Length with chunked",
        "unknown Transfer-Encoding",
        "chunk size not hexadecimal",
        "chunk longer than its size",
        "TLS on the plain port",
    ],
)
async def test_a_request_the_http_parser_refuses_gets_a_tencent_400_saying_why_and_is_not_written(
    server: BaseTestServer, settings: ServeSettings, kafka: str, request_bytes: bytes, reason: str
) -> None:
    answer = await exchange(server, request_bytes)
    head, _, _ = answer.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/json" in head
    status, body = status_and_body(answer)
    assert (status, body["ActionStatus"], body["ErrorCode"]) == (400, "FAIL", 40006)
    assert str(body["ErrorInfo"]).startswith("the HTTP request is malformed: ")
    assert reason in str(body["ErrorInfo"])
    assert await count_records(kafka, settings.topics) == 0


async def test_bad_chunked_framing_after_the_body_began_gets_408_as_a_body_that_never_ends(
    server: BaseTestServer, settings: ServeSettings, kafka: str
) -> None:
    """aiohttp does not hand a framing error in a body being read to its reader: the body just stops."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request_head(CHUNKED) + b"2\r\n{}\r\n")
        await writer.drain()
        async with aiohttp.ClientSession() as session:  # the handler is reading the body
            await until_stats(session, server.make_url("/stats"), lambda stats: stats["pending_bodies"] == 1)
        writer.write(b"2\r\n{}{}\r\n0\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.read(65536)
    finally:
        writer.close()
    status, body = status_and_body(answer)
    assert (status, body["ErrorCode"]) == (408, 40800)
    assert await count_records(kafka, settings.topics) == 0
