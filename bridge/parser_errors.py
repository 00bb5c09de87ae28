"""Tencent-style answers to the requests aiohttp's HTTP parser refuses before any handler runs.

A request line over `--max-url-bytes`, a header line over `--max-header-bytes`, more than `--max-headers`
headers, a malformed request line or header, bad chunked framing: aiohttp answers these itself, in
`RequestHandler.handle_error`, without the application or its middlewares, with a plain-text 400. aiohttp
has no hook for that answer (aio-libs/aiohttp#3287), so `BridgeRunner` serves the application through a
`web.Server` whose request handlers override `handle_error`. aiohttp still logs the refusal (one INFO line,
see `bridge.logs`) and closes the connection; the bridge only replaces the answer's body and headers.
"""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from bridge.errors import BridgeError, InternalError, MalformedRequest
from bridge.logs import REQUEST_ID, new_request_id
from bridge.server import fail_response

_TOO_MANY_HEADERS = "Too many headers"
# aiohttp's parser messages put an excerpt of the offending bytes after a blank line: the reason is before it.
_EXCERPT = "\n\n"
_MAX_REASON = 200


class TencentRequestHandler(web.RequestHandler):
    """aiohttp's request handler (one per connection), answering what it refuses with a FAIL body."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        request_id = new_request_id()
        token = REQUEST_ID.set(request_id)
        try:
            # aiohttp's own logs the refusal (with this request id) and refuses to answer twice on a
            # connection that has begun an answer; its plain-text answer is dropped.
            super().handle_error(request, status, exc, message)
        finally:
            REQUEST_ID.reset(token)
        error = self.refusal(status, exc, message)
        response = fail_response(error)
        response.headers["X-Request-Id"] = request_id
        response.force_close()
        return response

    def refusal(self, status: int, exc: BaseException | None, message: str | None) -> BridgeError:
        """The error to answer: what the parser found wrong, with the status aiohttp chose."""
        if status >= 500:
            # An exception escaped the bridge's error middleware: a bug, answered as the middleware would.
            return InternalError()
        if isinstance(exc, LineTooLong) and len(exc.args) >= 2:
            return MalformedRequest(self._too_long(exc.args[1]), status)
        reason = message or (str(exc) if exc is not None else "")
        if reason.startswith(_TOO_MANY_HEADERS):
            return MalformedRequest(f"the request has more than {self.max_headers} header lines", status)
        reason = re.sub(r"\s+", " ", reason.split(_EXCERPT, 1)[0]).strip().rstrip(":")
        if not reason:
            return MalformedRequest("the HTTP request is malformed", status)
        if len(reason) > _MAX_REASON:
            reason = reason[:_MAX_REASON] + "..."
        return MalformedRequest(f"the HTTP request is malformed: {reason}", status)

    def _too_long(self, limit: object) -> str:
        # aiohttp's LineTooLong says which limit was passed, not which line; the limits usually differ.
        if limit == self.max_line_size != self.max_field_size:
            return f"the request line (method, path and query) is longer than the limit of {limit} bytes"
        if limit == self.max_field_size != self.max_line_size:
            return f"a header line is longer than the limit of {limit} bytes"
        return f"the request line or a header line is longer than the limit of {limit} bytes"


class _TencentServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        # web.Server.__call__ with the bridge's request handler, given the same arguments.
        return TencentRequestHandler(self, loop=self._loop, **self._kwargs)


class BridgeRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer what aiohttp's parser refuses in Tencent's style."""

    async def _make_server(self) -> web.Server:
        # The application's own server (after its startup), rebuilt as a `_TencentServer` with the same
        # handler, request factory and arguments; nothing has connected to it yet.
        server = await super()._make_server()
        return _TencentServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
