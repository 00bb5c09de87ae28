"""What aiohttp refuses before any handler runs is still answered in Tencent's style, never with a 500."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bridge.ingest.runner import TencentRequestHandler
from tests.support.serve import BridgeTestServer, serve_listening
from tests.support.settings import unique_settings


async def raw_exchange(host: str, port: int, data: bytes) -> tuple[int, dict[str, object]]:
    """Send `data` on a new connection; the status and JSON body answered before the server closed it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), orjson.loads(body)


def test_bridge_serve_answers_a_request_line_over_its_limit_with_a_tencent_400(
    kafka: str, tmp_path: Path
) -> None:
    """The answer as `bridge serve` (and `bridge dev`, which runs the same server) gives it."""
    settings = unique_settings(kafka)
    arguments = ["--bootstrap-servers", kafka, "--max-url-bytes", "256", "--topic", settings.topic]
    stderr_path = tmp_path / "stderr"
    with serve_listening([*arguments, "--allow-unsigned"], stderr_path) as port:
        target = "/callback?SdkAppid=1400000000&pad=" + "a" * 300
        request = f"POST {target} HTTP/1.1\r\nHost: bridge\r\nContent-Length: 0\r\n\r\n".encode()
        status, body = asyncio.run(raw_exchange("127.0.0.1", port, request))
    assert status == 400
    assert body == {
        "ActionStatus": "FAIL",
        "ErrorInfo": "the request line (method, path and query) is longer than the limit of 256 bytes",
        "ErrorCode": 40006,
    }
    assert '"malformed request answered 400' in stderr_path.read_text()


async def test_an_exception_that_escapes_every_middleware_gets_a_tencent_503_not_aiohttps_500() -> None:
    async def broken(_request: web.Request) -> web.Response:
        raise RuntimeError("a bug outside the error middleware")

    app = web.Application()
    app.router.add_get("/", broken)
    async with BridgeTestServer(app) as server:
        status, body = await raw_exchange(
            str(server.host), int(server.port or 0), b"GET / HTTP/1.1\r\nHost: bridge\r\n\r\n"
        )
    assert status == 503
    assert (body["ActionStatus"], body["ErrorCode"]) == ("FAIL", 50399)


async def test_another_status_from_aiohttps_parser_is_kept_with_an_error_code_built_from_it() -> None:
    """aiohttp 3.14 answers every parser error 400; should it choose 431 one day, the answer follows."""

    async def unused(_request: web.BaseRequest) -> web.StreamResponse:
        raise AssertionError

    handler = TencentRequestHandler(web.Server(unused), loop=asyncio.get_running_loop())
    too_large = HttpProcessingError(code=431, message="Request Header Fields Too Large")
    error = handler.refusal(431, too_large, too_large.message)
    assert (error.status, error.error_code) == (431, 43100)
    assert error.info == "the HTTP request is malformed: Request Header Fields Too Large"
