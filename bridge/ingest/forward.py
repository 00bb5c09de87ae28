"""Forward mode (`--forward-url`): the bridge in front of an app's existing callback server.

Each callback the bridge accepts (authentic, of one of its apps, valid) is also POSTed to the app's own
server, with its original query (`Sign` and `RequestTime` included: the app server checks them itself) and
its body byte for byte. The forward and the Kafka write run at once, each bounded by the callback's deadline
(the forward also by `--forward-timeout`); a down or slow app server never holds up the write. Then
`relay` answers Tencent (README, "Forward mode", has the table of every combination):

- a before-callback (`commands.runs_before`) gets the app server's answer, status (a 5xx as 502) and body,
  once the write was confirmed, so the app's allow, deny (its `ErrorCode`) and modify decisions keep
  working; that answer is also written to Kafka, as a second record after the callback's on the same
  partition (`decision_record`), so the callback's write never waits for the app;
- an after-callback gets the bridge's OK once both the write and the forward succeeded;
- otherwise the answer is a FAIL, whose `ErrorInfo` and `X-Bridge-Forward` header say which part failed.

The forwarder has its own aiohttp `ClientSession`, with its own connection pool of
`--forward-max-connections`; as many forwards may be under way at once, and one more fails at once rather
than wait for a connection (the callback's deadline is short). Its session lives and dies with the app.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
from aiohttp import web

from bridge.errors import BridgeError
from bridge.ingest.dedup import EdgeDedup, write_once
from bridge.ingest.metrics import Call
from bridge.ingest.outcomes import outcome_of
from bridge.kafka.publisher import Publisher
from bridge.logs import REQUEST_ID
from bridge.settings import ServeSettings
from bridge.tencent.callback import ParsedCallback
from bridge.tencent.envelope import DECISION_RECORD_HEADER, Record
from bridge.tencent.protocol import OK_BODY

log = logging.getLogger("bridge.server")  # the request path's logger (`bridge.logs.LOGGERS`)

FORWARD_HEADER = "X-Bridge-Forward"
"""What became of the forward: the app server's status (`200`), `timeout`, `unreachable` or `busy`."""
DECISION_HEADER = "X-Bridge-Decision"
"""Before-callbacks: whether the app server's answer was written to Kafka, `written` or `unwritten`."""
DECISION_SCHEMA = "tencent-chat-kafka-bridge/app-decision/1"
_JSON = "application/json"


class ForwardFailed(BridgeError):
    """The forward did not get a usable answer; the subclass says how. Never raised out of the handler:
    `relay` answers with it, the callback's own outcome kept (its record may well be confirmed)."""

    result = "failed"


class AppServerUnreachable(ForwardFailed):
    status = 502
    error_code = 50201
    result = "unreachable"


class AppServerRefused(ForwardFailed):
    """An after-callback's forward answered with another status than 200."""

    status = 502
    error_code = 50202
    result = "refused"


class AppServerTimeout(ForwardFailed):
    status = 504
    error_code = 50401
    result = "timeout"


class ForwardsBusy(ForwardFailed):
    status = 503
    error_code = 50306
    retriable = True
    result = "busy"


class AppAnswer:
    """The app server's answer to one forward."""

    __slots__ = ("body", "content_type", "status")

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type


class Forwarder:
    """The client of the app's callback server: one session, a bounded pool, a timeout per forward."""

    def __init__(self, url: str, timeout: float, max_connections: int, max_answer_bytes: int) -> None:
        self.url = url
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_answer_bytes = max_answer_bytes
        self.in_flight = 0
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def of(cls, settings: ServeSettings, url: str) -> Forwarder:
        """The forwarder to `url` (`--forward-url`), with the settings' timeout and bounds."""
        return cls(
            url,
            settings.forward_timeout,
            settings.forward_max_connections,
            settings.max_body_bytes,
        )

    async def lifetime(self, _app: web.Application) -> AsyncIterator[None]:
        """The app's cleanup context: the session is created inside the running loop, closed at cleanup."""
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections)
        # No session-wide timeout: each forward has its own, bounded by its callback's deadline.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False)
        try:
            yield
        finally:
            await self._session.close()

    async def forward(self, raw_query: str, body: bytes, deadline: float) -> AppAnswer:
        """POST `body` with `raw_query` to the app server; its answer, by `deadline` and `self.timeout`.
        Raises a `ForwardFailed`."""
        session = self._session
        if session is None or session.closed:
            raise AppServerUnreachable("the forward client is not running")
        if self.in_flight >= self.max_connections:
            raise ForwardsBusy(
                f"{self.in_flight} forwards to the app server are under way already "
                "(--forward-max-connections)"
            )
        loop = asyncio.get_running_loop()
        ends = min(deadline, loop.time() + self.timeout)
        url = f"{self.url}?{raw_query}" if raw_query else self.url
        self.in_flight += 1
        try:
            async with asyncio.timeout_at(ends):
                async with session.post(
                    url,
                    data=body,
                    headers={"Content-Type": _JSON, "X-Request-Id": REQUEST_ID.get() or ""},
                    allow_redirects=False,
                ) as response:
                    if (response.content_length or 0) > self.max_answer_bytes:
                        raise AppServerRefused(
                            f"the app server's answer is over {self.max_answer_bytes} bytes"
                        )
                    answer = await response.content.read(self.max_answer_bytes + 1)
                    while len(answer) <= self.max_answer_bytes and not response.content.at_eof():
                        answer += await response.content.read(self.max_answer_bytes + 1 - len(answer))
                    if len(answer) > self.max_answer_bytes:
                        raise AppServerRefused(
                            f"the app server's answer is over {self.max_answer_bytes} bytes"
                        )
                    return AppAnswer(response.status, answer, response.content_type or _JSON)
        except TimeoutError:
            within = f"{self.timeout:g} s (--forward-timeout)"
            if ends >= deadline:
                within = "the callback's deadline"
            raise AppServerTimeout(f"the app server did not answer within {within}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise AppServerUnreachable(f"the app server could not be reached: {_describe(exc)}") from None
        finally:
            self.in_flight -= 1


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


Fail = Callable[[web.BaseRequest, Call, BridgeError], web.Response]


async def relay(
    request: web.BaseRequest,
    call: Call,
    *,
    forwarder: Forwarder,
    callback: ParsedCallback,
    record: Record,
    deadline: float,
    before: bool,
    dedup: EdgeDedup,
    publisher: Publisher,
    fail: Fail,
) -> web.Response:
    """The write and the forward at once, then Tencent's answer (see the module's docstring). `fail` is
    the server's FAIL answer (logged and counted there); `call` gets the outcome of the write."""
    metrics = call.metrics
    started = time.perf_counter()
    forwarding = asyncio.ensure_future(
        forwarder.forward(request.rel_url.raw_query_string, callback.body, deadline)
    )
    write_error: BridgeError | None = None
    try:
        # A duplicate is forwarded again (the app server decides again), but not written again.
        call.outcome = await write_once(
            call, dedup, publisher, record, identity=callback.identity, deadline=deadline
        )
    except BridgeError as exc:
        write_error = exc
        call.outcome = outcome_of(exc)
    except BaseException:
        forwarding.cancel()
        raise
    try:
        answer: AppAnswer | ForwardFailed = await forwarding
    except ForwardFailed as exc:
        answer = exc
    metrics.forwarded(
        answer.result if isinstance(answer, ForwardFailed) else "answered", time.perf_counter() - started
    )
    note = answer.result if isinstance(answer, ForwardFailed) else str(answer.status)
    if write_error is not None:
        told = (
            f"the app server answered {answer.status} (not relayed: the callback is not in Kafka)"
            if isinstance(answer, AppAnswer)
            else f"the forward failed too: {answer.info}"
        )
        write_error.info = f"{write_error.info}; {told}"
        response = fail(request, call, write_error)
    elif isinstance(answer, ForwardFailed):
        answer.info = f"written to Kafka, but not forwarded: {answer.info}"
        response = fail(request, call, answer)
    elif before:
        # A 5xx of the app server is relayed as 502 (its body as it is): the bridge never answers 500, and to
        # Tencent any status but 200 is the same failed callback.
        response = web.Response(status=answer.status if answer.status < 500 else 502, body=answer.body)
        response.headers["Content-Type"] = answer.content_type
        written = await _write_decision(publisher, callback, record, answer, deadline)
        metrics.decision_written(written)
        response.headers[DECISION_HEADER] = "written" if written else "unwritten"
    elif answer.status != 200:
        refused = AppServerRefused(f"written to Kafka, but the app server answered {answer.status}")
        response = fail(request, call, refused)
    else:
        response = web.Response(body=OK_BODY, content_type=_JSON)
    response.headers[FORWARD_HEADER] = note
    return response


def decision_record(
    callback: ParsedCallback, record: Record, answer: AppAnswer, decided_at_ms: int
) -> Record:
    """The app server's answer to a before-callback, as a record after the callback's: the same topic,
    entity (so partition) and key, told apart by its `bridge-record: app-decision` header."""
    command, sdk_app_id = callback.routed.command, callback.query["SdkAppid"]
    try:
        orjson.loads(answer.body)
        body: object = orjson.Fragment(answer.body)
    except orjson.JSONDecodeError:
        body = answer.body.decode("utf-8", "replace")
    value = orjson.dumps(
        {
            "schema": DECISION_SCHEMA,
            "decided_at": decided_at_ms,
            "received_at": callback.received_at_ms,
            "sdk_app_id": sdk_app_id,
            "command": command,
            "key": callback.routed.key,
            "status": answer.status,
            "answer": body,
        }
    )
    headers = (
        DECISION_RECORD_HEADER,
        # Not `CallbackCommand`: the engines that select a command's records by that header (the ClickHouse
        # view) must not take a decision for a callback.
        ("decision-of", command.encode("utf-8")),
        ("SdkAppid", sdk_app_id.encode("ascii")),
        ("content-type", b"application/json"),
        ("app-status", str(answer.status).encode("ascii")),
        # The callback's owning entity, as on its record: a reader that starts between the two still knows
        # the decision's entity (its `--account`, its partition in a copy).
        ("entity", record.entity.encode("utf-8")),
    )
    return Record(record.topic, record.entity, record.key, value, decided_at_ms, headers)


async def _write_decision(
    publisher: Publisher, callback: ParsedCallback, record: Record, answer: AppAnswer, deadline: float
) -> bool:
    decision = decision_record(callback, record, answer, time.time_ns() // 1_000_000)
    try:
        await publisher.publish(decision, deadline)
    except BridgeError as exc:
        log.warning("the app server's decision on %s was not written: %s", callback.routed.command, exc.info)
        return False
    return True
