"""Logs stay quiet about secrets and one line per problem, even at debug level and under malformed traffic."""

from __future__ import annotations

import asyncio
import io
import logging

import aiohttp
from aiokafka.protocol.admin import SaslAuthenticateRequest_v1

from bridge.settings import build
from tests.support.requests import fixture

PASSWORD = "S3cretPW-do-not-log"  # noqa: S105 - a test value, to search the log for


def test_a_sasl_password_sent_to_the_broker_is_not_logged_at_debug(debug_log: io.StringIO) -> None:
    """aiokafka.conn logs each request it sends at DEBUG, the SASL one with its password: kept out."""
    request = SaslAuthenticateRequest_v1(b"alice\x00alice\x00" + PASSWORD.encode())  # as logged: the struct
    # The very call aiokafka makes before sending a request (aiokafka/conn.py, AIOKafkaConnection.send).
    logging.getLogger("aiokafka.conn").debug("Request to %s:%d %d: %s", "broker", 9092, 1, request)
    logging.getLogger("aiokafka.producer").debug("the rest of aiokafka still logs at debug")
    assert PASSWORD not in debug_log.getvalue()
    assert "the rest of aiokafka still logs at debug" in debug_log.getvalue()


async def test_a_malformed_request_is_one_info_line_not_an_error_with_a_traceback(
    debug_log: io.StringIO, kafka: str
) -> None:
    """The line quotes no query string (it may hold `Sign`) and carries the answer's `X-Request-Id`."""
    from bridge.ingest.runner import request_handler_options  # noqa: PLC0415
    from bridge.ingest.server import create_app  # noqa: PLC0415
    from tests.support.serve import BridgeTestServer  # noqa: PLC0415
    from tests.support.settings import unique_settings  # noqa: PLC0415

    settings = unique_settings(kafka)
    server = BridgeTestServer(create_app(settings))
    await server.start_server(**request_handler_options(settings))
    # Ready first: closing a bridge while its producer is still starting leaks aiokafka's bootstrap socket.
    async with aiohttp.ClientSession() as session, asyncio.timeout(20):
        while True:
            async with session.get(server.make_url("/readyz")) as ready:
                if ready.status == 200:
                    break
            await asyncio.sleep(0.05)
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        query = "&".join(f"{k}={v}" for k, v in fixture("oa-after-send-text").query.items())
        writer.write(f"POST /callback?{query}&pad={'x' * 8000} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
    finally:
        await server.close()
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert b'"ActionStatus":"FAIL"' in answer
    lines = [line for line in debug_log.getvalue().splitlines() if "aiohttp.server" in line]
    assert lines, "the malformed request was not logged at all"
    assert all('"level":"info"' in line and "Traceback" not in line for line in lines), lines
    assert all("SdkAppid" not in line for line in lines), "the log quoted the query string"
    request_id = next(h for h in answer.split(b"\r\n") if h.startswith(b"X-Request-Id: ")).split(b" ")[1]
    assert all(f'"request_id":"{request_id.decode()}"' in line for line in lines), lines


def test_settings_read_a_token_file_saved_with_a_byte_order_mark(tmp_path: object) -> None:
    from pathlib import Path  # noqa: PLC0415

    token_file = Path(str(tmp_path)) / "token"
    token_file.write_bytes("\ufeffxxxxyyyy\n".encode())
    settings = build(
        "serve", {}, {"BRIDGE_CALLBACK_TOKEN_FILE": str(token_file), "BRIDGE_BOOTSTRAP_SERVERS": "k:9092"}
    )
    assert [token.reveal() for token in settings.callback_tokens] == ["xxxxyyyy"]
