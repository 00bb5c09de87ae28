"""Prometheus metrics at `GET /metrics`, the request id, and the hooks the HTTP and publish paths call.

Labels are bounded: a command family (the known ones, `unknown`, or `none` before the command is known),
an HTTP status, an outcome, an error kind drawn from a fixed set of exception classes. Never an account,
a group, a `MsgKey` or a topic name typed by a caller.

Each callback ends in one `bridge.outcomes.Outcome` (confirmed, a duplicate, rejected, failed, overloaded,
ambiguous), counted by family in `bridge_callbacks`; `bridge_outcomes` adds how ambiguous records ended.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.process_collector import ProcessCollector

from bridge.commands import FAMILIES
from bridge.envelope import Record
from bridge.errors import BridgeError, BrokerNotReady, DeliveryTimeout, PublishError
from bridge.logs import REQUEST_ID, new_request_id
from bridge.outcomes import OUTCOME, Outcome, Outcomes
from bridge.values import RESERVED_PATHS

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# Requests that are not callbacks: probes and scrapes would drown the callback counts.
_NOT_CALLBACKS = RESERVED_PATHS
NO_FAMILY = "none"
UNKNOWN_FAMILY = "unknown"
# Tencent waits 2 s; the delivery deadline is 5 s by default: buckets around both.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

_FAMILY = web.RequestKey("metrics_family", str)


def _children(metric: MetricWrapperBase) -> Callable[..., Any]:
    """`metric.labels(*values)`, remembered: the labels are bounded, and `labels()` costs microseconds."""
    known: dict[tuple[str, ...], Any] = {}

    def child(*values: str) -> Any:
        found = known.get(values)
        if found is None:
            found = known[values] = metric.labels(*values)
        return found

    return child


class Metrics:
    """Every metric of one bridge, in its own registry (several bridges may share a process in tests)."""

    def __init__(self, outcomes: Outcomes, is_ready: Callable[[], bool]) -> None:
        self._outcomes = outcomes
        self._is_ready = is_ready
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "bridge_requests",
            "Callback requests answered, by command family and HTTP status.",
            ["family", "status"],
            registry=r,
        )
        self.callbacks = Counter(
            "bridge_callbacks",
            "Callbacks by command family and outcome.",
            ["family", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "bridge_request_duration_seconds",
            "Time from receiving a callback to answering it.",
            ["family"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ack_seconds = Histogram(
            "bridge_broker_ack_duration_seconds",
            "Time from handing a record to the producer to its acks=all confirmation.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.records = Counter(
            "bridge_records_published",
            "Records the broker confirmed, by command family.",
            ["family"],
            registry=r,
        )
        self.bytes = Counter(
            "bridge_published_bytes",
            "Bytes of key and value of confirmed records, by command family.",
            ["family"],
            registry=r,
        )
        self.publish_errors = Counter(
            "bridge_publish_errors",
            "Writes to Kafka that failed, by kind: not_ready, delivery_timeout, a Kafka error.",
            ["kind"],
            registry=r,
        )
        self.overloaded = Counter(
            "bridge_overloaded_requests",
            "Callbacks refused at once because too many were in flight.",
            registry=r,
        )
        self.in_flight = Gauge(
            "bridge_requests_in_flight", "Callback requests being handled now.", registry=r
        )
        self.queued = Gauge(
            "bridge_producer_queued_records",
            "Records handed to the producer and not yet acknowledged or failed: the producer's buffer use.",
            registry=r,
        )
        self.broker_ready = Gauge(
            "bridge_broker_ready",
            "1 when the producer is connected and every topic exists, else 0.",
            registry=r,
        )
        self.last_request = Gauge(
            "bridge_last_request_timestamp_seconds",
            "When the last callback arrived (Unix time): a request whose command could be read; the start "
            "time until one does.",
            registry=r,
        )
        self.last_request_at = time.time()
        """Set per callback and copied into `last_request` at scrape time: a gauge's set() takes a lock."""
        self.outcomes = Gauge(
            "bridge_outcomes",
            "Callbacks since start by outcome, and ambiguous records by how they ended (landed, lost).",
            ["outcome"],
            registry=r,
        )
        # The labelled series of the request path, each looked up once.
        self.requests_of = _children(self.requests)
        self.callbacks_of = _children(self.callbacks)
        self.request_seconds_of = _children(self.request_seconds)
        self.records_of = _children(self.records)
        self.bytes_of = _children(self.bytes)

    def exposition(self) -> bytes:
        self.broker_ready.set(1 if self._is_ready() else 0)
        self.last_request.set(self.last_request_at)
        for outcome, count in self._outcomes.snapshot().items():
            self.outcomes.labels(outcome=outcome).set(count)
        return generate_latest(self.registry)

    def count_queued(self, records: int) -> None:
        """Records handed to the producer (`records` > 0) or settled by it, whatever the answer (< 0)."""
        self.queued.inc(records)


METRICS = web.AppKey("metrics", Metrics)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install_metrics(app: web.Application, outcomes: Outcomes, is_ready: Callable[[], bool]) -> Metrics:
    """Give `app` its metrics and the `/metrics` route; `is_ready` says whether Kafka is usable."""
    metrics = Metrics(outcomes, is_ready)
    app[METRICS] = metrics
    app.router.add_get(METRICS_PATH, _serve_metrics)
    return metrics


async def _serve_metrics(request: web.Request) -> web.Response:
    response = web.Response(body=request.app[METRICS].exposition())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def family_of(command: str) -> str:
    """The bounded label of a command: its family when the bridge knows it, else `unknown`."""
    family = command.partition(".")[0]
    return family if family in FAMILIES else UNKNOWN_FAMILY


def note_command(request: web.Request, command: str) -> None:
    """Hook: the callback's command is known; its family labels the request's metrics.

    Only then does the request count as a callback received: a scanner's 404 or garbage does not.
    """
    request[_FAMILY] = family_of(command)
    request.app[METRICS].last_request_at = time.time()


def publish_error_kind(error: BaseException) -> str:
    """A bounded name for what went wrong in a write: the bridge's error, or the Kafka error behind it."""
    if isinstance(error, BrokerNotReady):
        return "not_ready"
    if isinstance(error, DeliveryTimeout):
        return "delivery_timeout"
    cause = error.__cause__ or error.__context__
    if cause is not None and type(cause).__module__.startswith("aiokafka"):
        return type(cause).__name__
    return type(error).__name__


def note_failure(request: web.Request, error: BridgeError) -> None:
    """Hook: the request failed with `error`; a failed write counts by kind."""
    if isinstance(error, PublishError):
        request.app[METRICS].publish_errors.labels(kind=publish_error_kind(error)).inc()


class observe_publish:  # lower case: called like the function it replaced, `async with observe_publish(...)`
    """Hook around one `publisher.publish(record)`: on success, acknowledgement time, records and bytes.

    A class rather than an `asynccontextmanager`, whose generator costs more than the metrics it keeps.
    """

    __slots__ = ("_record", "_request", "_started")

    def __init__(self, request: web.Request, record: Record) -> None:
        self._request, self._record = request, record
        self._started = 0.0

    async def __aenter__(self) -> None:
        self._started = time.perf_counter()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            return
        metrics = self._request.app[METRICS]
        family = self._request.get(_FAMILY, UNKNOWN_FAMILY)
        metrics.ack_seconds.observe(time.perf_counter() - self._started)
        metrics.records_of(family).inc()
        metrics.bytes_of(family).inc(len(self._record.key) + len(self._record.value))


def _outcome_of(status: int) -> Outcome:
    """The outcome of a request that left none: one cancelled before the error middleware answered."""
    if status < 400:
        return Outcome.CONFIRMED
    return Outcome.REJECTED if status < 500 else Outcome.AMBIGUOUS


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.fullmatch(given) else new_request_id()


@web.middleware
async def observe_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: a request id for the logs and the answer, and the per-request metrics."""
    request_id = _request_id(request)
    token = REQUEST_ID.set(request_id)
    try:
        if request.path in _NOT_CALLBACKS:
            response = await handler(request)
        else:
            response = await _observe_callback(request, handler)
        response.headers["X-Request-Id"] = request_id
        return response
    finally:
        REQUEST_ID.reset(token)


async def _observe_callback(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    started = time.perf_counter()
    metrics.in_flight.inc()
    status = BridgeError.status  # if the handler is cancelled (the caller hung up), a 500 is what it got
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        metrics.in_flight.dec()
        elapsed = time.perf_counter() - started
        family = request.get(_FAMILY, NO_FAMILY)
        outcome = request.get(OUTCOME, _outcome_of(status))
        if outcome is Outcome.OVERLOADED:
            metrics.overloaded.inc()
        metrics.requests_of(family, str(status)).inc()
        metrics.callbacks_of(family, outcome.value).inc()
        metrics.request_seconds_of(family).observe(elapsed)
        if status < 400:
            log.debug("%s %s -> %d in %.3f s", request.method, request.path, status, elapsed)
