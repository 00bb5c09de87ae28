"""The HTTP side: the callback port, the aiohttp application around it, and the probes.

The path of a callback, as `CallbackPort.handle` reads from top to bottom: the request id -> `checked_query`
(the query, the signature and the app, before the body is read, so an unauthenticated request costs next to
nothing) -> the body (a body still arriving holds one of `--max-pending-bodies` places) -> an in-flight slot
(`admission`) -> `parse_callback` (body, command, fields, route, envelope: pure, in `bridge.tencent.callback`)
(a callback it refuses is first kept in the dead-letter topic: `bridge.ingest.rejected`)
-> `ParsedCallback.record` on the topic of its topic group -> a claim on the callback's identity (`dedup`: a
duplicate is answered without writing) -> `publisher.publish(record, deadline)`, which picks the partition
and answers once the broker confirmed with acks=all -> the answer. The deadline is one instant on the event
loop's clock, set once the body is in (`--before-callback-timeout` after it for a before-callback, else
`--delivery-timeout`); with `--forward-url`, `bridge.ingest.forward.relay` does the claim and the write while
it forwards the callback, and makes the answer. Every failure is a `BridgeError`, turned into a
Tencent-style FAIL answer in the same method, which also counts the callback's outcome and its metrics
(`Metrics.answered`, once).

`CallbackPort` holds everything that path reads, made once in `create_app`: no `request.app`, no request
mapping, no middleware. `bridge.ingest.runner.BridgeRunner` calls its `handle` straight from aiohttp's
low-level server for the callback path (no `Application._handle`, no router); the application routes the
same path to the same method (the test client serves it so), and keeps one middleware, `answer_others`, for
every other path: the probes, `/metrics`, `/stats`, and the router's 404 and 405 in Tencent's shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import istr
from yarl import URL

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
    Call,
    Metrics,
    install_metrics,
    note_failure,
    request_id_of,
)
from bridge.ingest.outcomes import Outcome, Outcomes, outcome_of
from bridge.ingest.rejected import DeadLetters
from bridge.ingest.reload import (
    FORWARD_URL_FILE,
    SASL_PASSWORD_FILE,
    ReloadCollector,
    Reloader,
    reread_forward_url,
    reread_sasl_password,
)
from bridge.kafka.publisher import KafkaPublisher, Publisher
from bridge.logs import REQUEST_ID, LineBudget
from bridge.secret import SecretFile
from bridge.settings import ServeSettings
from bridge.tencent.callback import checked_query, parse_callback
from bridge.tencent.commands import TopicGroup, runs_before
from bridge.tencent.protocol import OK_BODY, fail_body, parse_raw_query
from bridge.tencent.rejected import DEAD_LETTERED
from bridge.tencent.signature import SignatureCheck

log = logging.getLogger("bridge.server")  # see `bridge.logs.LOGGERS`

_JSON = "application/json"
# Each answer to a callback says what became of it: confirmed, a duplicate, rejected, failed, ambiguous.
OUTCOME_HEADER = istr("X-Bridge-Outcome")  # an `istr`: see `bridge.ingest.metrics.REQUEST_ID_HEADER`
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class CallbackPort:
    """The callback path of one bridge: what it reads, made once, and `handle`, which serves a callback
    from the request id to the answer, its outcome and its metrics, in one coroutine."""

    __slots__ = (
        "admission",
        "before_callback_timeout",
        "body_timeout",
        "dead_letters",
        "dedup",
        "delivery_timeout",
        "forwarder",
        "max_body_bytes",
        "max_event_age_ms",
        "metrics",
        "outcomes",
        "path",
        "publisher",
        "record_format",
        "rejection_log",
        "sdk_app_ids",
        "signature",
        "topics",
    )

    def __init__(
        self,
        settings: ServeSettings,
        *,
        outcomes: Outcomes,
        admission: Admission,
        dedup: EdgeDedup,
        metrics: Metrics,
        dead_letters: DeadLetters,
        rejection_log: LineBudget,
        signature: SignatureCheck | None,
        forwarder: Forwarder | None,
    ) -> None:
        self.path = matched_path(settings.path)
        self.sdk_app_ids = settings.sdk_app_id
        self.max_body_bytes = settings.max_body_bytes
        self.body_timeout = settings.body_timeout
        self.delivery_timeout = settings.delivery_timeout
        self.before_callback_timeout = settings.before_callback_timeout
        self.max_event_age_ms = settings.max_event_age_ms
        self.record_format = settings.record_format
        self.topics = {group: settings.topic_for(group) for group in TopicGroup}
        """Each topic group's topic, from the settings once."""
        self.outcomes = outcomes
        self.admission = admission
        self.dedup = dedup
        self.metrics = metrics
        self.dead_letters = dead_letters
        self.rejection_log = rejection_log
        self.signature = signature
        self.forwarder = forwarder
        self.publisher: Publisher | None = None
        """Given once the application has started (`create_app`); no callback is served before."""

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:  # noqa: PLR0915 - one coroutine: layers cost
        """Serve one request to the callback path: its answer, with `X-Request-Id` and `X-Bridge-Outcome`;
        every failure a Tencent-style FAIL answer, logged once; the outcome and the metrics counted once,
        also for a handler cancelled at shutdown (which sends no answer)."""
        request_id = request_id_of(request)
        token = REQUEST_ID.set(request_id)
        metrics, admission = self.metrics, self.admission
        metrics.in_flight += 1
        call = Call(metrics, time.perf_counter())
        status = BridgeError.status  # if the handler is cancelled (the caller hung up), a 500 is what it got
        admitted = holds_slot = False
        try:
            try:
                if request.method != "POST":
                    _refuse_method(request.method)
                publisher = self.publisher
                assert publisher is not None  # noqa: S101 - given before the application serves
                admission.admit()
                admitted = True
                # The raw query string split by the bridge; yarl's decoded `query` only when it holds a `%`.
                parsed = parse_raw_query(request.rel_url.raw_query_string)
                pairs = request.query.items() if parsed is None else parsed
                query = checked_query(pairs, self.signature, self.sdk_app_ids)
                raw_body = await _read_body(request, self.max_body_bytes, self.body_timeout, admission)
                # The in-flight slot only now: a client slow to send its body holds a pending-body place.
                admission.take_slot(publisher.abandoned)
                holds_slot = True
                received_at_ms = time.time_ns() // 1_000_000
                # The delivery deadline starts once the body is in: a slow client must not eat the broker's
                # time. A before-callback holds up the user's action while Tencent waits: a shorter deadline.
                command = query.command
                before = command is not None and runs_before(command)
                started_at = asyncio.get_running_loop().time()
                deadline = started_at + (self.before_callback_timeout if before else self.delivery_timeout)
                try:
                    callback = parse_callback(
                        query,
                        raw_body,
                        received_at_ms=received_at_ms,
                        max_event_age_ms=self.max_event_age_ms,
                        on_command=call.command_known,
                    )
                except DEAD_LETTERED as refused:  # kept raw before its 400, or a 503 (`ingest.rejected`)
                    keep, at_ms = self.dead_letters.keep, received_at_ms
                    await keep(call, refused, query, raw_body, received_at_ms=at_ms, deadline=deadline)
                    raise
                if command is None and runs_before(callback.routed.command):  # named in the body only
                    before, deadline = True, min(deadline, started_at + self.before_callback_timeout)
                record = callback.record(self.topics[callback.routed.topic_group], self.record_format)
                # Until the write answers: a handler cancelled from here on (at shutdown) leaves a record that
                # may still land, its own or an identical callback's, and either is followed.
                call.outcome = Outcome.AMBIGUOUS
                if self.forwarder is not None:
                    response = await relay(
                        request,
                        call,
                        forwarder=self.forwarder,
                        callback=callback,
                        record=record,
                        deadline=deadline,
                        before=before,
                        dedup=self.dedup,
                        publisher=publisher,
                        fail=self.fail,
                    )
                else:
                    identity = callback.identity
                    call.outcome = await write_once(
                        call, self.dedup, publisher, record, identity=identity, deadline=deadline
                    )
                    response = web.Response(body=OK_BODY, content_type=_JSON)
            except BridgeError as exc:
                error: BridgeError = exc
            except Exception:
                # A bug, not an input problem: keep the traceback in the log and out of the answer.
                log.exception("%s %s failed unexpectedly", request.method, request.path)
                error = InternalError()
                # Ambiguous, and its record (if any) cannot be followed: it ends as given up at once.
                self.outcomes.ambiguous_ended(False)
            else:
                headers = response.headers
                headers[OUTCOME_HEADER] = call.outcome.value
                headers[REQUEST_ID_HEADER] = request_id
                status = response.status
                return response
            call.outcome = outcome_of(error)
            response = self.fail(request, call, error)
            status = response.status
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        finally:
            # Also for a handler cancelled at shutdown, past the drain, which sends no answer: it left its
            # outcome as far as it got (failed, or ambiguous once a write was under way).
            if admitted:
                admission.release(holds_slot)
            REQUEST_ID.reset(token)
            metrics.in_flight -= 1
            elapsed = time.perf_counter() - call.started
            metrics.answered(call, status, elapsed)
            if status < 400 and log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s -> %d in %.3f s", request.method, request.path, status, elapsed)

    def fail(self, request: web.BaseRequest, call: Call, error: BridgeError) -> web.Response:
        """The FAIL answer to a callback that failed with `error` (its outcome in `call`), counted in the
        metrics and logged."""
        response = _fail(request, error, "POST", self.metrics, self.rejection_log)
        response.headers[OUTCOME_HEADER] = call.outcome.value
        return response


def _refuse_method(method: str) -> NoReturn:
    raise MethodNotAllowed(f"{method} is not allowed here; Tencent callbacks are POSTed")


SETTINGS = web.AppKey("settings", ServeSettings)
PORT = web.AppKey("callback_port", CallbackPort)
"""The callback path's state and handler (`CallbackPort`), which `bridge.ingest.runner` serves directly."""
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
"""The budget of the log lines any client can cause: the 4xx answers of the callback port, of the other
paths and of the HTTP parser, and the connections refused over `--max-connections`."""


def create_app(settings: ServeSettings, publisher: Publisher | None = None) -> web.Application:
    """The bridge's application; with no `publisher`, a `KafkaPublisher` lives and dies with the app."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[answer_others])
    app[SETTINGS] = settings
    app[OUTCOMES] = outcomes = Outcomes()
    app[ADMISSION] = admission = Admission(settings.max_in_flight, settings.max_pending_bodies)
    app[DEDUP] = dedup = EdgeDedup(
        settings.dedup_window, settings.dedup_max_keys, settings.dedup_max_bytes, outcomes=outcomes
    )
    app[REJECTION_LOG] = rejection_log = LineBudget(log, "lines about refused requests")
    if settings.callback_tokens:
        app[SIGNATURE] = SignatureCheck(settings.callback_tokens, settings.max_clock_skew)
    app[RELOADER] = Reloader(settings, app.get(SIGNATURE))
    app.on_startup.append(_warn_if_open)
    app.on_cleanup.append(_summarize_rejections)
    # With --admin-port, /readyz, /stats and /metrics are the admin listener's only (`bridge.ingest.admin`).
    on_this_port = settings.admin_port is None
    metrics = install_metrics(
        app, outcomes, is_ready=lambda: PUBLISHER in app and app[PUBLISHER].ready, route=on_this_port
    )
    metrics.registry.register(ReloadCollector(app[RELOADER]))
    dead_letters = DeadLetters(settings.dead_letter_topic, lambda: app[PUBLISHER], metrics)
    app[DEAD_LETTERS] = dead_letters
    forwarder = None
    if (target := settings.forward_target) is not None:
        app[FORWARDER] = forwarder = Forwarder.of(settings, target)
        app.cleanup_ctx.append(forwarder.lifetime)
        if settings.forward_url_file is not None:
            path = settings.forward_url_file.path
            app[RELOADER].add(FORWARD_URL_FILE, reread_forward_url(path, forwarder), path)
    app[PORT] = port = CallbackPort(
        settings,
        outcomes=outcomes,
        admission=admission,
        dedup=dedup,
        metrics=metrics,
        dead_letters=dead_letters,
        rejection_log=rejection_log,
        signature=app.get(SIGNATURE),
        forwarder=forwarder,
    )
    app[TOPICS] = port.topics
    if publisher is None:
        app.cleanup_ctx.append(_kafka_publisher)
    else:
        app[PUBLISHER] = port.publisher = publisher
    app.cleanup_ctx.append(app[RELOADER].polling)  # --reload-interval; last: it stops first
    # A resource of the exact path, never a pattern: a `{` in --path is a character, not a variable.
    callback_path = web.PlainResource(port.path)
    app.router.register_resource(callback_path)
    callback_path.add_route("*", port.handle)
    app.router.add_get("/healthz", healthz)
    if on_this_port:
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/stats", stats)
    return app


def matched_path(path: str) -> str:
    """The callback path (`--path`, escaped as in a URL) as requests are compared with it: the request's
    `rel_url.path_safe`, which aiohttp's router compares too, decoded but for `%2F` and `%25`. The direct
    dispatch (`bridge.ingest.runner.callback_first`), the router and `answer_others` match the same
    requests: `/tencent%2Fim` only `/tencent%2Fim` (or `%2f`), `/a%20b` `/a%20b`, `/%E5%9B%9E` `/回`."""
    return URL.build(path=path, encoded=True).path_safe


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
    if isinstance(password := app[SETTINGS].sasl_password_file, SecretFile):
        app[RELOADER].add(SASL_PASSWORD_FILE, reread_sasl_password(password.path, publisher), password.path)
    await publisher.start()
    app[PUBLISHER] = app[PORT].publisher = publisher
    yield
    await publisher.close()


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


async def _read_body(request: web.BaseRequest, limit: int, timeout: float, admission: Admission) -> bytes:
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
async def answer_others(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The middleware of every path but the callback's (which `CallbackPort.handle` answers itself, and
    passes here untouched when the router serves it): the request id for the logs and the answer; the
    router's 404 and 405 and every failure answered with a Tencent-style FAIL body, logged on one line and
    counted as a rejected callback; and the metrics of a request that is not a probe or a scrape.

    A middleware rather than a catch-all route: the router refuses paths (and methods of the probes) that
    no route sees, and only a middleware turns those refusals into FAIL answers. Off the hot path: on
    `bridge serve` the callback path never reaches the application (`bridge.ingest.runner`)."""
    app = request.app
    port = app[PORT]
    if request.rel_url.path_safe == port.path:
        return await handler(request)
    request_id = request_id_of(request)
    token = REQUEST_ID.set(request_id)
    # Probes and scrapes are not counted in the callback metrics: no `Call` for them.
    call = None if request.path in NOT_CALLBACKS else Call(app[METRICS], time.perf_counter())
    if call is not None:
        call.metrics.in_flight += 1
    status = BridgeError.status
    try:
        allow = "POST"
        try:
            response = await handler(request)
        except BridgeError as exc:
            error = exc
        except web.HTTPNotFound:
            error = NotFound(f"no such path {request.path!r}; callbacks go to {port.path}")
        except web.HTTPMethodNotAllowed as exc:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
            allow = ",".join(sorted(exc.allowed_methods))
        except Exception:
            log.exception("%s %s failed unexpectedly", request.method, request.path)
            error = InternalError()
            app[OUTCOMES].ambiguous_ended(False)
        else:
            status = response.status
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        outcome = outcome_of(error)
        if call is None:
            app[OUTCOMES].record(outcome)  # a request counted in the metrics counts it there
        else:
            call.outcome = outcome
        response = _fail(request, error, allow, app[METRICS], port.rejection_log)
        response.headers[OUTCOME_HEADER] = outcome.value
        status = response.status
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
    finally:
        REQUEST_ID.reset(token)
        if call is not None:
            call.metrics.in_flight -= 1
            call.metrics.answered(call, status, time.perf_counter() - call.started)


def _fail(
    request: web.BaseRequest, error: BridgeError, allow: str, metrics: Metrics, rejection_log: LineBudget
) -> web.Response:
    """The FAIL answer to a request that failed with `error`, counted in the metrics and logged."""
    note_failure(metrics, error)
    level = logging.INFO if error.status < 500 else logging.WARNING
    # Any client can cause a 4xx: a flood of them is told in a few lines a second and a count.
    if error.status >= 500 or rejection_log.allow():
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
    return response


def fail_response(error: BridgeError) -> web.Response:
    """The FAIL answer to `error`: its status, a Tencent-style body, and `Retry-After` when retriable."""
    response = web.Response(status=error.status, body=fail_body(error), content_type=_JSON)
    if error.retriable:
        response.headers["Retry-After"] = "1"
    return response
