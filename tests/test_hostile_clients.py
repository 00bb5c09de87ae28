"""Clients that misbehave at the HTTP level get a clear answer, never a 500 or a hang."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from dataclasses import replace

import orjson
import pytest
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer

from bridge.server import create_app
from bridge.settings import Settings
from tests.support import count_records, fixture, wait_until_ready

SEED = fixture("oa-after-send-text")
QUERY = "&".join(f"{k}={v}" for k, v in SEED.query.items())


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[BaseTestServer]:
    """A ready bridge that gives a body one second to arrive."""
    async with TestClient(TestServer(create_app(replace(settings, body_timeout=1.0)))) as client:
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


def request_head(*headers: str) -> bytes:
    lines = [f"POST /callback?{QUERY} HTTP/1.1", "Host: bridge", *headers, "", ""]
    return "\r\n".join(lines).encode()


def status_and_body(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), orjson.loads(body)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_is_not_in_its_content_encoding_gets_400(
    server: BaseTestServer, settings: Settings, kafka: str, encoding: str
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
    server: BaseTestServer, settings: Settings, kafka: str
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
