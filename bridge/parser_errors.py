"""Tencent-style answers to the requests aiohttp's HTTP parser refuses before any handler runs.

A request line over `--max-url-bytes`, a header line over `--max-header-bytes`, more than `--max-headers`
headers, a malformed request line or header, bad chunked framing: aiohttp answers these itself, in
`RequestHandler.handle_error`, without the application or its middlewares, with a plain-text 400. aiohttp
has no hook for that answer (aio-libs/aiohttp#3287), so `BridgeRunner` serves the application through a
`web.Server` whose request handlers override `handle_error`. aiohttp still logs the refusal (one INFO line,
see `bridge.logs`, within the application's budget of lines for 4xx answers) and closes the connection;
the bridge only replaces the answer's body and headers.

The same server caps the connections open at once (`--max-connections`): one more is answered 503 with a
Tencent-style body as soon as it is accepted, and closed, before anything of it is read.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from bridge.errors import BridgeError, InternalError, MalformedRequest, Overloaded
from bridge.logs import REQUEST_ID, LineBudget, new_request_id
from bridge.protocol import fail_body
from bridge.server import REJECTION_LOG, SETTINGS, fail_response
from bridge.settings import Settings

log = logging.getLogger(__name__)

_TOO_MANY_HEADERS = "Too many headers"
# aiohttp's parser messages put an excerpt of the offending bytes after a blank line: the reason is before it.
_EXCERPT = "\n\n"
_MAX_REASON = 200


class TencentRequestHandler(web.RequestHandler):
    """aiohttp's request handler (one per connection), answering what it refuses with a FAIL body."""

    __slots__ = ()

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # A refusal of the parser is a 4xx any client can cause: its line is within the budget.
        budget = getattr(self._manager, "rejection_log", None)
        refused = isinstance(kw.get("exc_info"), HttpProcessingError)
        if refused and budget is not None and not budget.allow():
            return
        super().log_exception(*args, **kw)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Refused only once aiohttp has started the connection's task: closed the way aiohttp closes an
        # idle connection, by `force_close`.
        super().connection_made(transport)
        manager = self._manager
        if isinstance(manager, _TencentServer) and manager.over_capacity:
            self.refuse_connection(manager.max_connections)

    def refuse_connection(self, max_connections: int) -> None:
        """Answer 503 on a connection over `--max-connections` at once, and close it."""
        error = Overloaded(
            f"{max_connections} connections are already open (--max-connections); the callback was not "
            "written"
        )
        body = fail_body(error)
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nX-Request-Id: {new_request_id()}\r\n"
            "Connection: close\r\n\r\n"
        )
        if self.transport is not None:
            self.transport.write(head.encode("ascii") + body)
        self.force_close()
        budget = getattr(self._manager, "rejection_log", None)
        if budget is None or budget.allow():
            log.warning("a connection was answered 503 and closed: %s", error.info)

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
    def __init__(
        self, *args: Any, max_connections: int, rejection_log: LineBudget | None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.rejection_log = rejection_log

    def __call__(self) -> web.RequestHandler:
        # web.Server.__call__ with the bridge's request handler, given the same arguments.
        return TencentRequestHandler(self, loop=self._loop, **self._kwargs)

    @property
    def over_capacity(self) -> bool:
        # aiohttp forgets a connection once its handler has finished: one being closed still counts.
        return len(self._connections) > self.max_connections


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
            max_connections=(self.app.get(SETTINGS) or Settings()).max_connections,
            rejection_log=self.app.get(REJECTION_LOG),
            **server._kwargs,
        )
