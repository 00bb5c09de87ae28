"""The HTTP side: the aiohttp application, the callback handler and the probes.

The path of a callback: query (`protocol`) -> body (`protocol`) -> command (`commands`) -> record
(`envelope`, `partitioner`) -> Kafka (`publisher`) -> the answer. Every failure is a `BridgeError`, turned
into a Tencent-style FAIL answer by `tencent_errors`, the one place that does so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from bridge.commands import route
from bridge.envelope import build_record
from bridge.errors import BodyTooLarge, BridgeError, BrokerNotReady, MethodNotAllowed, NotFound
from bridge.metrics import (  # issue 6
    METRICS,
    install_metrics,
    note_command,
    note_failure,
    observe_publish,
    observe_requests,
)
from bridge.partitioner import partition_for
from bridge.protocol import OK_BODY, decode_body, fail_body, parse_query, resolve_command
from bridge.publisher import KafkaPublisher, Publisher
from bridge.settings import Settings

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
PUBLISHER = web.AppKey("publisher", Publisher)

_JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(settings: Settings, publisher: Publisher | None = None) -> web.Application:
    """The bridge's application; with no `publisher`, a `KafkaPublisher` lives and dies with the app."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[observe_requests, tencent_errors],  # issue 6: metrics and request id, outermost
    )
    app[SETTINGS] = settings
    install_metrics(app, is_ready=lambda: PUBLISHER in app and app[PUBLISHER].ready)  # issue 6: /metrics
    if publisher is None:
        app.cleanup_ctx.append(_kafka_publisher)
    else:
        app[PUBLISHER] = publisher
    app.router.add_route("*", settings.path, handle_callback)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def _kafka_publisher(app: web.Application) -> AsyncIterator[None]:
    # Created here, inside the running loop, because aiokafka binds to the loop it is created on.
    publisher = KafkaPublisher(app[SETTINGS], on_queued=app[METRICS].track_delivery)  # issue 6: queue gauge
    await publisher.start()
    app[PUBLISHER] = publisher
    yield
    await publisher.close()


async def handle_callback(request: web.Request) -> web.Response:
    if request.method != "POST":
        raise MethodNotAllowed(f"{request.method} is not allowed here; Tencent callbacks are POSTed")
    settings = request.app[SETTINGS]
    publisher = request.app[PUBLISHER]
    query = parse_query(request.query.items())
    raw_body = await _read_body(request, settings.max_body_bytes)
    received_at_ms = time.time_ns() // 1_000_000
    body = decode_body(raw_body)
    command = resolve_command(query, body)
    note_command(request, command)  # issue 6: the family labels this request's metrics
    routed = route(command, query.sdk_app_id, body)
    topic = settings.topic_for(routed.topic_group)
    partitions = publisher.partition_count(topic)
    if partitions is None:
        raise BrokerNotReady(f"Kafka is not ready ({publisher.status}); the callback was not written")
    record = build_record(
        routed,
        sdk_app_id=query.sdk_app_id,
        raw_body=raw_body,
        query=query.params,
        received_at_ms=received_at_ms,
        topic=topic,
        partition=partition_for(routed.entity, partitions),
    )
    async with observe_publish(request, record):  # issue 6: ack latency, records, bytes, errors by kind
        await publisher.publish(record)
    return web.Response(body=OK_BODY, content_type=_JSON)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    publisher = request.app[PUBLISHER]
    return web.json_response(
        {"status": "ready" if publisher.ready else "not ready", "detail": publisher.status},
        status=200 if publisher.ready else 503,
    )


async def _read_body(request: web.Request, limit: int) -> bytes:
    too_large = BodyTooLarge(f"the body is larger than the limit of {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None


@web.middleware
async def tencent_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure with its status and a Tencent-style FAIL body, and log it on one line."""
    allow = "POST"
    try:
        return await handler(request)
    except BridgeError as exc:
        error = exc
    except web.HTTPNotFound:
        error = NotFound(f"no such path {request.path!r}; callbacks go to {request.app[SETTINGS].path}")
    except web.HTTPMethodNotAllowed as exc:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
        allow = ",".join(sorted(exc.allowed_methods))
    except Exception:
        # A bug, not an input problem: keep the traceback in the log and out of the answer.
        log.exception("%s %s failed unexpectedly", request.method, request.path)
        error = BridgeError("internal error in the bridge; the callback is not acknowledged")
    note_failure(request, error)  # issue 6: publish errors by kind, ambiguous outcomes
    level = logging.INFO if error.status < 500 else logging.WARNING
    log.log(
        level,
        "%s %s -> %d: %s",
        request.method,
        request.path,
        error.status,
        error.info,
        # issue 6: fields of the JSON log line
        extra={"status": error.status, "error_code": error.error_code, "reason": error.info},
    )
    response = web.Response(status=error.status, body=fail_body(error), content_type=_JSON)
    if isinstance(error, MethodNotAllowed):
        response.headers["Allow"] = allow
    if error.retriable:
        response.headers["Retry-After"] = "1"
    return response
