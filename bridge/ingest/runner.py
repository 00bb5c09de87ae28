"""Serving the application: aiohttp's runner, its parser's refusals in Tencent's shape, and a graceful stop.

On SIGTERM or SIGINT the bridge stops in phases: `/readyz` turns 503 at once; the bridge keeps
serving for `--shutdown-delay` so a load balancer can notice; then new callbacks get 503 (still answered, on
new and kept-alive connections alike) while those in flight get their real answer, within the body timeout and
the delivery timeout; then aiohttp stops listening and closes idle connections, and the producer is flushed
and closed within `--shutdown-timeout`. The whole stop takes at most shutdown delay + body timeout + delivery
timeout + shutdown timeout + 2 s.

The requests aiohttp's HTTP parser refuses before any handler runs get Tencent-style answers. A request line
over `--max-url-bytes`, a header line over `--max-header-bytes`, more than `--max-headers` headers, a
malformed request line or header, bad chunked framing: aiohttp answers these itself, in
`RequestHandler.handle_error`, without the application or its middlewares, with a plain-text 400. aiohttp has
no hook for that answer (aio-libs/aiohttp#3287), so `BridgeRunner` serves the application through a
`web.Server` whose request handlers override `handle_error`. aiohttp still logs the refusal (one INFO line,
see `bridge.logs`, within the application's budget of lines for 4xx answers) and closes the connection; the
bridge only replaces the answer's body and headers. The same server hands the callback path straight to
`bridge.ingest.server.CallbackPort.handle` and every other path to the application (`callback_first`).

The same server caps the connections open at once (`--max-connections`): one more is answered 503 with a
Tencent-style body as soon as it is accepted, and closed, before anything of it is read.

SIGHUP reads the secret files again (`bridge.ingest.reload`): nothing stops, no request is dropped. (Under
`bridge dev`, which runs in a terminal, SIGHUP stops, as Ctrl-C does.) With `--admin-port`, a second
listener serves the probes and the metrics (`bridge.ingest.admin`): it starts once the callback port
listens, and stops once the callbacks in flight have their answer, so `/readyz` says 503 while they drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from bridge.errors import BridgeError, InternalError, MalformedRequest, Overloaded
from bridge.ingest.admin import ADMIN_PATHS, create_admin_app
from bridge.ingest.metrics import METRICS, Metrics
from bridge.ingest.outcomes import Outcome
from bridge.ingest.reload import Reloader
from bridge.ingest.server import (
    ADMISSION,
    PORT,
    REJECTION_LOG,
    RELOADER,
    SETTINGS,
    CallbackPort,
    create_app,
    fail_response,
)
from bridge.logs import REQUEST_ID, LineBudget, new_request_id
from bridge.process import RELOAD_SIGNAL, STOP_SIGNALS, stop_signals
from bridge.settings import ServeSettings
from bridge.tencent.protocol import fail_body

log = logging.getLogger("bridge.runner")  # see `bridge.logs.LOGGERS`
_refusals_log = logging.getLogger("bridge.parser_errors")

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
        self._count(503, Outcome.OVERLOADED)
        budget = getattr(self._manager, "rejection_log", None)
        if budget is None or budget.allow():
            _refusals_log.warning("a connection was answered 503 and closed: %s", error.info)

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
        self._count(error.status, Outcome.FAILED if error.status >= 500 else Outcome.REJECTED)
        return response

    def _count(self, status: int, outcome: Outcome) -> None:
        metrics = getattr(self._manager, "metrics", None)
        if metrics is not None:
            metrics.refused(status, outcome)

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
        self,
        *args: Any,
        max_connections: int,
        rejection_log: LineBudget | None,
        metrics: Metrics | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.rejection_log = rejection_log
        self.metrics = metrics
        """Where the answers given before any handler ran are counted (`Metrics.refused`)."""

    def __call__(self) -> web.RequestHandler:
        # web.Server.__call__ with the bridge's request handler, given the same arguments.
        return TencentRequestHandler(self, loop=self._loop, **self._kwargs)

    @property
    def over_capacity(self) -> bool:
        # aiohttp forgets a connection once its handler has finished: one being closed still counts.
        return len(self._connections) > self.max_connections


RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def callback_first(port: CallbackPort, application: RequestHandler) -> RequestHandler:
    """The request handler of the callback port: a request to the callback path goes straight to
    `port.handle`, without the application's `_handle`, its router or its middleware (15-25 us per
    callback at load, README, "Performance"); every other path to the `application`'s own
    handler (the probes, `/metrics`, `/stats`, the 404s). A plain function returning the awaitable: no
    coroutine layer of its own.

    A request that skipped the application has no match info: `request.app` and `request.match_info`
    fail on it, and nothing on the callback path reads them. One that asks for `100-continue` goes the
    application's way, whose router answers the expectation (rare: a client asks only when it holds its body
    back until told to send it)."""
    path, handle = port.path, port.handle

    def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        if request.rel_url.path_safe == path and hdrs.EXPECT not in request.headers:
            return handle(request)
        return application(request)

    return dispatch


class BridgeRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer what aiohttp's parser refuses in Tencent's style, and
    serve the callback path without the application (`callback_first`)."""

    async def _make_server(self) -> web.Server:
        # The application's own server (after its startup), rebuilt as a `_TencentServer` with the same
        # request factory and arguments, and the callback path first; nothing has connected to it yet.
        server = await super()._make_server()
        port = self.app.get(PORT)
        handler = server.request_handler if port is None else callback_first(port, server.request_handler)
        return _TencentServer(
            handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            max_connections=(self.app.get(SETTINGS) or ServeSettings()).max_connections,
            rejection_log=self.app.get(REJECTION_LOG),
            metrics=self.app.get(METRICS),
            **server._kwargs,
        )


OnStarted = Callable[[web.Application, int], Coroutine[Any, Any, None]]


# Allocations of container objects between two collections of the youngest generation (Python: 700).
# Nearly every object of a callback dies by reference counting when it is answered; each collection
# still has to traverse the objects of the callbacks in flight.
_GC_YOUNG_THRESHOLD = 20_000


def _settle_garbage_collector() -> None:
    """Keep the cyclic garbage collector's pauses short and rare on the request path.

    Measured with `bridge bench` (README, "Performance"): with Python's defaults, full collections
    traversed every object of the imported libraries about three times a second, took 8 % of the bridge's
    CPU and paused the loop up to 40 ms, which was the p99 at 64 connections; objects alive once the
    application is set up live as long as the process, so they are frozen out of every collection. Young
    collections every 20,000 allocations instead of 700 cut the CPU per callback by a further 9 %.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, middle, old)


class ListenError(OSError):
    """The bridge cannot listen on its address and port."""


def request_handler_options(settings: ServeSettings) -> dict[str, Any]:
    """aiohttp's request-handler arguments: no access log, and bounds on what a connection may send and when.

    No access log: it would repeat every query string, `Sign` included, which replays within the skew.

    aiohttp closes a connection `keepalive_timeout` after it opened or after its last answer unless a whole
    request head has arrived by then: the one timeout covers idle keep-alive connections and clients that
    trickle their headers. A trickled body is bounded by `--body-timeout`, in the handler.
    """
    return {
        "access_log": None,
        "max_line_size": settings.max_url_bytes,
        "max_field_size": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        "keepalive_timeout": settings.idle_timeout,
    }


async def run_server(
    settings: ServeSettings, on_started: OnStarted | None = None, *, hangup_stops: bool = False
) -> None:
    """Serve until a stop signal; `on_started` gets the application and the bound port. SIGHUP reads the
    secret files again, or, with `hangup_stops` (`bridge dev`, in a terminal), stops like SIGTERM."""
    if settings.admin_port is not None and settings.admin_port == settings.port != 0:
        raise ListenError(
            f"--admin-port {settings.admin_port} is also --port: the admin listener needs a port of its own"
        )
    app = create_app(settings)
    # The bridge drains callbacks in flight itself before cleanup (below); aiohttp's own wait is the last
    # second for whatever outlived that.
    runner = BridgeRunner(
        app,
        handle_signals=False,
        shutdown_timeout=1.0,
        **request_handler_options(settings),
    )
    await runner.setup()
    admin = None if settings.admin_port is None else web.AppRunner(create_admin_app(app), access_log=None)
    if admin is not None:
        await admin.setup()
    _settle_garbage_collector()
    stop = asyncio.Event()
    started: asyncio.Task[None] | None = None
    reloader = app[RELOADER]
    hangup = (RELOAD_SIGNAL,) if hangup_stops else ()
    try:
        with stop_signals(stop.set, (*STOP_SIGNALS, *hangup)), _reload_on_hangup(reloader, not hangup_stops):
            await _listen(runner, settings.host, settings.port)
            port: int = runner.addresses[0][1]
            if admin is not None:
                admin_host = settings.host if settings.admin_host is None else settings.admin_host
                await _listen(admin, admin_host, settings.admin_port or 0)
                log.info(
                    "admin listener on %s port %d: %s; the callback port serves %s and /healthz only",
                    admin_host,
                    admin.addresses[0][1],
                    ", ".join(ADMIN_PATHS),
                    settings.path,
                )
            if on_started is not None:
                started = asyncio.create_task(on_started(app, port))
            await stop.wait()
            admission = app[ADMISSION]
            admission.draining = True
            log.info("stopping: not ready; serving for %g s more (--shutdown-delay)", settings.shutdown_delay)
            if settings.shutdown_delay:
                await asyncio.sleep(settings.shutdown_delay)
            admission.closing = True
            log.info(
                "stopping: %d callbacks in flight get their answer; new ones get 503", admission.in_flight
            )
            # Still listening: a callback arriving now gets its 503 rather than a refused or dropped
            # connection. One admitted just before may still be reading its body, then waiting for the broker.
            await admission.drained(timeout=settings.body_timeout + settings.delivery_timeout + 1)
    finally:
        if started is not None:
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await started
        if admin is not None:  # first: its answers read the publisher, which the bridge's cleanup closes
            await admin.cleanup()
        await runner.cleanup()
        log.info("stopped")


async def _listen(runner: web.BaseRunner, host: str, port: int) -> None:
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _reload_on_hangup(reloader: Reloader, enabled: bool) -> Iterator[None]:
    """While the block runs (and `enabled`), SIGHUP reads the secret files again, on the running loop."""
    if not enabled:
        yield
        return
    with stop_signals(reloader.reload, (RELOAD_SIGNAL,)):
        yield
