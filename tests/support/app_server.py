"""A stand-in for an app's own callback server (forward mode): real HTTP on 127.0.0.1, a free port.

Its path says how it answers: `/allow` (ErrorCode 0), `/deny` (ErrorCode 1, the user's action refused),
`/modify` (ErrorCode 0 and a changed `MsgBody`), `/error` (a 500), `/slow` (answers after `slow_seconds`).
It keeps every request it got, raw query and body, for the tests to compare byte for byte."""

from __future__ import annotations

import asyncio
import base64
import socket
from dataclasses import dataclass, field

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

ALLOW = {"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0}
DENY = {"ActionStatus": "OK", "ErrorInfo": "not allowed here", "ErrorCode": 1}
MODIFIED_BODY = [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "*** (moderated)"}}]
MODIFY = {"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0, "MsgBody": MODIFIED_BODY}
ERROR_BODY = b'{"error":"the moderation backend is down"}'


@dataclass
class Received:
    path: str
    raw_query: str
    body: bytes
    content_type: str
    authorization: str | None = None
    """`user:password` of a Basic `Authorization` header (credentials in the forward URL), if any."""


@dataclass
class AppServer:
    slow_seconds: float = 5.0
    received: list[Received] = field(default_factory=list)
    server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{behaviour}", self._answer)
        return app

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(
            Received(
                request.path,
                request.rel_url.raw_query_string,
                body,
                request.content_type,
                _basic_credentials(request.headers.get("Authorization")),
            )
        )
        behaviour = request.match_info["behaviour"]
        if behaviour == "slow":
            await asyncio.sleep(self.slow_seconds)
            return web.json_response(ALLOW)
        if behaviour == "error":
            return web.Response(status=500, body=ERROR_BODY, content_type="application/json")
        answers = {"allow": ALLOW, "deny": DENY, "modify": MODIFY}
        return web.Response(body=orjson.dumps(answers[behaviour]), content_type="application/json")

    def url(self, behaviour: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(f"/{behaviour}"))


def down_url() -> str:
    """The URL of a port where nothing listens: bound, then closed, so the connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/callback"


def _basic_credentials(header: str | None) -> str | None:
    if header is None or not header.startswith("Basic "):
        return None
    return base64.b64decode(header.removeprefix("Basic ")).decode()
