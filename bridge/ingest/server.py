"""The HTTP side: the aiohttp application, the callback handler and the probes.

The path of a callback, as `handle_callback` reads from top to bottom: `checked_query` (the query, the
signature and the app, before the body is read, so an unauthenticated request costs next to nothing) ->
`_read_body` (a body still arriving holds one of `--max-pending-bodies` places) -> an in-flight slot
(`admission`) -> `parse_callback` (body, command, fields, route, envelope: pure, in `bridge.tencent.callback`)
(a callback it refuses is first kept in the dead-letter topic: `bridge.ingest.rejected`)
-> `ParsedCallback.record` on the topic of its topic group -> a claim on the callback's identity (`dedup`: a
duplicate is answered without writing) -> `publisher.publish(record, deadline)`, which picks the partition
and answers once the broker confirmed with acks=all -> the answer. The deadline is one instant on the event
loop's clock, set once the body is in (`--before-callback-timeout` after it for a before-callback, else
`--delivery-timeout`); with `--forward-url`, `bridge.ingest.forward.relay` does the claim and the write while
it forwards the callback, and makes the answer. Every failure is a `BridgeError`, turned into a
Tencent-style FAIL answer by `answer_requests`, which also counts each callback's outcome: both in one place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import istr

from bridge.errors import (
    BodyTimeout,
    BodyTooLarge,
    BridgeError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    UnreadableBody,
)
from bridge.ingest.admission import Admission
from bridge.ingest.dedup import EdgeDedup, write_once
from bridge.ingest.forward import Forwarder, relay
from bridge.ingest.metrics import (
    METRICS,
    NOT_CALLBACKS,
    REQUEST_ID_HEADER,
    count_request,
    install_metrics,
    note_command,
    note_failure,
    request_id_of,
)
from bridge.ingest.outcomes import OUTCOME, Outcome, Outcomes, outcome_of
from bridge.ingest.rejected import DeadLetters
from bridge.ingest.reload import FORWARD_URL_FILE, ReloadCollector, Reloader, reread_forward_url
from bridge.kafka.publisher import KafkaPublisher, Publisher
from bridge.logs import REQUEST_ID, LineBudget
from bridge.settings import ServeSettings
from bridge.tencent.callback import checked_query, parse_callback
from bridge.tencent.commands import TopicGroup, runs_before
from bridge.tencent.protocol import OK_BODY, fail_body
from bridge.tencent.rejected import DEAD_LETTERED
from bridge.tencent.signature import SignatureCheck

log = logging.getLogger("bridge.server")  # see `bridge.logs.LOGGERS`

SETTINGS = web.AppKey("settings", ServeSettings)
PUBLISHER = web.AppKey("publisher", Publisher)
OUTCOMES = web.AppKey("outcomes", Outcomes)
ADMISSION = web.AppKey("admission", Admission)
DEDUP = web.AppKey("dedup", EdgeDedup)
SIGNATURE = web.AppKey("signature", SignatureCheck)
DEAD_LETTERS = web.AppKey("dead_letters", DeadLetters)
RELOADER = web.AppKey("reloader", Reloader)
"""What SIGHUP reads again (`bridge.ingest.reload`); the forward mode's credentials join it by `add`."""
FORWARDER = web.AppKey("forwarder", Forwarder)
"""Forward mode's client of the app server, with `--forward-url` only (`bridge.ingest.forward`)."""
TOPICS = web.AppKey("topics", dict[TopicGroup, str])
"""Each topic group's topic, from the settings once."""
REJECTION_LOG = web.AppKey("rejection_log", LineBudget)
"""The budget of the log lines any client can cause: the 4xx answers of the error middleware and of the
HTTP parser, and the connections refused over `--max-connections`."""

_JSON = "application/json"
# Each answer to a callback says what became of it: confirmed, a duplicate, rejected, failed, ambiguous.
OUTCOME_HEADER = istr("X-Bridge-Outcome")  # an `istr`: see `bridge.ingest.metrics.REQUEST_ID_HEADER`
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(settings: ServeSettings, publisher: Publisher | None = None) -> web.Application:
    """The bridge's application; with no `publisher`, a `KafkaPublisher` lives and dies with the app."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        # One middleware: each adds two coroutine layers to every request (its own and aiohttp's
        # `_fix_request_current_app`), measured at 2-3 us per callback each (README, "Performance").
        middlewares=[answer_requests],
    )
    app[SETTINGS] = settings
    app[TOPICS] = {group: settings.topic_for(group) for group in TopicGroup}
    app[OUTCOMES] = Outcomes()
    app[ADMISSION] = Admission(settings.max_in_flight, settings.max_pending_bodies)
    app[DEDUP] = EdgeDedup(
        settings.dedup_window, settings.dedup_max_keys, settings.dedup_max_bytes, outcomes=app[OUTCOMES]
    )
    app[REJECTION_LOG] = LineBudget(log, "lines about refused requests")
    if settings.callback_tokens:
        app[SIGNATURE] = SignatureCheck(settings.callback_tokens, settings.max_clock_skew)
    app[RELOADER] = Reloader(settings, app.get(SIGNATURE))
    app.on_startup.append(_warn_if_open)
    app.on_cleanup.append(_summarize_rejections)
    # With --admin-port, /readyz, /stats and /metrics are the admin listener's only (`bridge.ingest.admin`).
    on_this_port = settings.admin_port is None
    metrics = install_metrics(
        app, app[OUTCOMES], is_ready=lambda: PUBLISHER in app and app[PUBLISHER].ready, route=on_this_port
    )
    metrics.registry.register(ReloadCollector(app[RELOADER]))
    app[DEAD_LETTERS] = DeadLetters(settings.dead_letter_topic, lambda: app[PUBLISHER], app[METRICS])
    if publisher is None:
        app.cleanup_ctx.append(_kafka_publisher)
    else:
        app[PUBLISHER] = publisher
    if (target := settings.forward_target) is not None:
        app[FORWARDER] = Forwarder.of(settings, target)
        app.cleanup_ctx.append(app[FORWARDER].lifetime)
        if settings.forward_url_file is not None:
            app[RELOADER].add(
                FORWARD_URL_FILE, reread_forward_url(settings.forward_url_file.path, app[FORWARDER])
            )
    app.router.add_route("*", settings.path, handle_callback)
    app.router.add_get("/healthz", healthz)
    if on_this_port:
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/stats", stats)
    return app


async def _warn_if_open(app: web.Application) -> None:
    if SIGNATURE not in app:
        log.warning(
            "UNSIGNED CALLBACKS ACCEPTED (--allow-unsigned): callbacks are NOT authenticated. Anyone who "
            "can reach this port can write records to Kafka, and can post a guessed MsgKey first so that "
            "Tencent's genuine callback is answered as a duplicate and never written. Set --callback-token "
            "(BRIDGE_CALLBACK_TOKEN) to the Tencent console's webhook authentication token"
        )


async def _summarize_rejections(app: web.Application) -> None:
    app[REJECTION_LOG].summarize()


async def _kafka_publisher(app: web.Application) -> AsyncIterator[None]:
    # Created here, inside the running loop, because aiokafka binds to the loop it is created on.
    metrics = app[METRICS]
    publisher = KafkaPublisher(app[SETTINGS], metrics)  # told how records end: metrics and outcomes
    await publisher.start()
    app[PUBLISHER] = publisher
    yield
    await publisher.close()


async def handle_callback(request: web.Request) -> web.Response:
    if request.method != "POST":
        raise MethodNotAllowed(f"{request.method} is not allowed here; Tencent callbacks are POSTed")
    app = request.app
    settings, publisher, admission = app[SETTINGS], app[PUBLISHER], app[ADMISSION]
    request[OUTCOME] = Outcome.FAILED  # if the handler is cancelled before it writes (see `answer_requests`)
    admission.admit()
    holds_slot = False
    try:
        query = checked_query(request.query.items(), app.get(SIGNATURE), settings.sdk_app_id)
        raw_body = await _read_body(request, settings.max_body_bytes, settings.body_timeout, admission)
        # The in-flight slot only now: a client slow to send its body holds a pending-body place, not this.
        admission.take_slot(publisher.abandoned)
        holds_slot = True
        received_at_ms = time.time_ns() // 1_000_000
        # The delivery deadline starts once the body is in: a slow client must not eat the broker's time.
        # A before-callback holds up the user's action while Tencent waits: its own, shorter deadline.
        command = query.command
        before = command is not None and runs_before(command)
        started_at = asyncio.get_running_loop().time()
        deadline = started_at + (settings.before_callback_timeout if before else settings.delivery_timeout)
        try:
            callback = parse_callback(
                query,
                raw_body,
                received_at_ms=received_at_ms,
                max_event_age_ms=settings.max_event_age_ms,
                on_command=lambda command: note_command(request, command),
            )
        except DEAD_LETTERED as refused:  # kept raw before its 400, or a 503 (`bridge.ingest.rejected`)
            keep = app[DEAD_LETTERS].keep
            await keep(request, refused, query, raw_body, received_at_ms=received_at_ms, deadline=deadline)
            raise
        if command is None and runs_before(callback.routed.command):  # the command named in the body only
            before, deadline = True, min(deadline, started_at + settings.before_callback_timeout)
        record = callback.record(app[TOPICS][callback.routed.topic_group], settings.record_format)
        # Until the write answers: a handler cancelled from here on (at shutdown) leaves a record that may
        # still land, its own or an identical callback's, and either is followed.
        request[OUTCOME] = Outcome.AMBIGUOUS
        if FORWARDER in app:
            return await relay(
                request,
                forwarder=app[FORWARDER],
                callback=callback,
                record=record,
                deadline=deadline,
                before=before,
                dedup=app[DEDUP],
                publisher=publisher,
                fail=_fail_post,
            )
        request[OUTCOME] = await write_once(
            request, app[DEDUP], publisher, record, identity=callback.identity, deadline=deadline
        )
    finally:
        admission.release(holds_slot)
    return web.Response(body=OK_BODY, content_type=_JSON)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    return readiness(request.app)


def readiness(app: web.Application) -> web.Response:
    """`/readyz` of the bridge `app`, on its own port or the admin listener's."""
    publisher = app[PUBLISHER]
    if app[ADMISSION].draining:
        return web.json_response({"status": "not ready", "detail": "shutting down"}, status=503)
    return web.json_response(
        {"status": "ready" if publisher.ready else "not ready", "detail": publisher.status},
        status=200 if publisher.ready else 503,
    )


async def stats(request: web.Request) -> web.Response:
    return statistics(request.app)


def statistics(app: web.Application) -> web.Response:
    """`/stats` of the bridge `app`: what became of every callback since start, and what is in flight now."""
    return web.json_response(
        {
            "outcomes": app[OUTCOMES].snapshot(),
            "in_flight": app[ADMISSION].in_flight,
            "pending_bodies": app[ADMISSION].pending_bodies,
            "abandoned": app[PUBLISHER].abandoned,
            "dedup_remembered": app[DEDUP].remembered,
            "dead_lettered": app[DEAD_LETTERS].kept,
        }
    )


async def _read_body(request: web.Request, limit: int, timeout: float, admission: Admission) -> bytes:
    content_length = request.content_length
    if content_length is not None and content_length > limit:
        raise _too_large(limit)
    try:
        if request.content.is_eof():  # the whole body came with the headers: no wait, no timer, no place
            return await request.read()
        with admission.waiting_for_body():
            async with asyncio.timeout(timeout):
                return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except TimeoutError:
        raise BodyTimeout(f"the body did not arrive within {timeout:g} s") from None
    except (HttpProcessingError, web.RequestPayloadError) as exc:
        detail = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
        raise UnreadableBody(f"the body could not be read: {detail}") from None
    except (ConnectionError, ClientPayloadError):
        raise UnreadableBody("the client closed the connection before the body arrived") from None


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"the body is larger than the limit of {limit} bytes")


@web.middleware
async def answer_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one middleware: the request id for the logs and the answer; every failure answered with its
    status and a Tencent-style FAIL body, and logged on one line; each callback's outcome counted, the one
    place that does; and the per-request metrics."""
    app = request.app
    request_id = request_id_of(request)
    token = REQUEST_ID.set(request_id)
    metrics = None if request.path in NOT_CALLBACKS else app[METRICS]
    if metrics is not None:
        metrics.in_flight += 1
    started = time.perf_counter()
    status = BridgeError.status  # if the handler is cancelled (the caller hung up), a 500 is what it got
    try:
        allow = "POST"
        try:
            response = await handler(request)
        except BridgeError as exc:
            error = exc
        except web.HTTPNotFound:
            error = NotFound(f"no such path {request.path!r}; callbacks go to {app[SETTINGS].path}")
        except web.HTTPMethodNotAllowed as exc:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
            allow = ",".join(sorted(exc.allowed_methods))
        except Exception:
            # A bug, not an input problem: keep the traceback in the log and out of the answer.
            log.exception("%s %s failed unexpectedly", request.method, request.path)
            error = InternalError()
            # Ambiguous, and its record (if any) cannot be followed: it ends as given up at once.
            app[OUTCOMES].ambiguous_ended(False)
        else:
            outcome = request.get(OUTCOME)
            if outcome is not None:
                response.headers[OUTCOME_HEADER] = outcome.value
            status = response.status
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        request[OUTCOME] = outcome_of(error)
        response = _fail(request, error, allow)
        status = response.status
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
    finally:
        # Also for a callback's handler cancelled at shutdown, past the drain, which sends no answer: it
        # left its outcome as far as it got (failed, or ambiguous once a write was under way).
        outcome = request.get(OUTCOME)
        if outcome is not None:
            app[OUTCOMES].record(outcome)
        REQUEST_ID.reset(token)
        if metrics is not None:
            metrics.in_flight -= 1
            count_request(metrics, request, status, time.perf_counter() - started)


def _fail(request: web.Request, error: BridgeError, allow: str) -> web.Response:
    """The FAIL answer to a request that failed with `error`, counted in the metrics and logged."""
    note_failure(request, error)
    level = logging.INFO if error.status < 500 else logging.WARNING
    # Any client can cause a 4xx: a flood of them is told in a few lines a second and a count.
    if error.status >= 500 or request.app[REJECTION_LOG].allow():
        log.log(
            level,
            "%s %r -> %d: %s",  # %r: a path may hold a newline that would forge a log line
            request.method,
            request.path,
            error.status,
            error.info,
            # fields of the JSON log line
            extra={"status": error.status, "error_code": error.error_code, "reason": error.info},
        )
    response = fail_response(error)
    if isinstance(error, MethodNotAllowed):
        response.headers["Allow"] = allow
    response.headers[OUTCOME_HEADER] = request[OUTCOME].value
    return response


def _fail_post(request: web.Request, error: BridgeError) -> web.Response:
    return _fail(request, error, "POST")


def fail_response(error: BridgeError) -> web.Response:
    """The FAIL answer to `error`: its status, a Tencent-style body, and `Retry-After` when retriable."""
    response = web.Response(status=error.status, body=fail_body(error), content_type=_JSON)
    if error.retriable:
        response.headers["Retry-After"] = "1"
    return response
