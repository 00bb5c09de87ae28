"""Prometheus metrics at `GET /metrics`, the request id, and the hooks the HTTP and publish paths call.

Labels are bounded: a command family (the known ones, `unknown`, or `none` before the command is known),
an HTTP status, an outcome, an error kind drawn from a fixed set of exception classes, one of the bridge's
own topics (from its settings). Never an account, a group, a `MsgKey` or a topic name typed by a caller.

Each callback ends in one `bridge.ingest.outcomes.Outcome` (confirmed, a duplicate, rejected, failed,
overloaded, ambiguous), counted by family in `bridge_callbacks`; `bridge_outcomes` adds how ambiguous records
ended.

The request path makes one call per callback: `Metrics.answered`, with the callback's `Call` (its family,
outcome and write), its status and its duration. It adds one to a single count by (family, status,
outcome) and observes the duration; the per-family, per-status and per-outcome counters are sums of that
count, made when scraped."""

from __future__ import annotations

import logging
import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from itertools import accumulate
from typing import Any

from aiohttp import web
from multidict import istr
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from bridge.errors import BridgeError, BrokerNotReady, DeliveryTimeout, PublishError
from bridge.ingest.outcomes import Outcome, Outcomes
from bridge.logs import new_request_id
from bridge.settings.values import RESERVED_PATHS
from bridge.tencent.commands import FAMILIES
from bridge.tencent.envelope import Record

log = logging.getLogger("bridge.metrics")  # see `bridge.logs.LOGGERS`

METRICS_PATH = "/metrics"
# Requests that are not callbacks: probes and scrapes would drown the callback counts.
NOT_CALLBACKS = RESERVED_PATHS
NO_FAMILY = "none"
UNKNOWN_FAMILY = "unknown"
# Tencent waits 2 s; the delivery deadline is 5 s by default: buckets around both.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
_BUCKET_BOUNDS = (*map(floatToGoString, LATENCY_BUCKETS), "+Inf")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
REQUEST_ID_HEADER = istr("X-Request-Id")
"""An `istr`: multidict folds a plain string's case on every lookup (0.46 us against 0.03 us)."""


class _Histogram:
    """Latency counts by bucket and their sum, kept in plain numbers on the request path."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # a bucket counts values <= its bound
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        return list(zip(_BUCKET_BOUNDS, accumulate(self.counts), strict=True))


class Metrics:
    """Every metric of one bridge, in its own registry (several bridges may share a process in tests).

    The request path only adds to plain ints and floats, on the event loop's thread; they become metric
    families when scraped. prometheus-client's own metrics take a lock per update: measured with
    `bridge bench`, they and the hooks around them cost 18 % of the bridge's CPU per callback.
    """

    def __init__(self, outcomes: Outcomes, is_ready: Callable[[], bool]) -> None:
        self._outcomes = outcomes
        self._is_ready = is_ready
        self.answers: dict[tuple[str, int, Outcome], int] = {}
        """Callback requests answered, by (family, status, outcome): `requests` and `callbacks` are its
        sums."""
        self.request_seconds: dict[str, _Histogram] = {}
        self.ack_seconds = _Histogram()
        self.records: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.publish_errors: dict[str, int] = {}
        self.broker_errors: dict[str, int] = {}
        self.below_min_isr: dict[str, int] = {}
        self.dead_letters: dict[str, int] = {}
        """Refused callbacks kept in the dead-letter topic, by reason (`bridge.tencent.rejected.REASONS`)."""
        self.dead_letter_failures: dict[str, int] = {}
        self.forwards: dict[str, int] = {}
        """Forwards to the app server (`--forward-url`) by result: answered, timeout, unreachable, busy."""
        self.forward_seconds = _Histogram()
        self.decisions: dict[str, int] = {}
        """The app server's answers to before-callbacks, by whether their record was written."""
        self.in_flight = 0
        self.queued = 0
        self._started_at = (time.time(), time.perf_counter())
        self.last_request_perf = self._started_at[1]
        """When the last callback whose command could be read arrived, on `time.perf_counter`'s clock."""
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_Collector(self))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def answered(self, call: Call, status: int, elapsed: float) -> None:
        """A callback's request was answered with `status` after `elapsed` seconds: the one call the
        request path makes (its write's acknowledgement, records and bytes included)."""
        family, outcome = call.family, call.outcome
        answers, key = self.answers, (family, status, outcome)
        answers[key] = answers.get(key, 0) + 1
        self._outcomes.counts[outcome] += 1
        histogram = self.request_seconds.get(family)
        if histogram is None:
            histogram = self.request_seconds[family] = _Histogram()
        histogram.observe(elapsed)
        if call.published_bytes:  # its own write was confirmed
            self.ack_seconds.observe(call.ack_seconds)
            records, published = self.records, self.bytes
            records[family] = records.get(family, 0) + 1
            published[family] = published.get(family, 0) + call.published_bytes

    def refused(self, status: int, outcome: Outcome) -> None:
        """A request was answered `status` before any handler ran: aiohttp's parser refused it (400, outcome
        rejected) or its connection was one over `--max-connections` (503, overloaded). Its command is not
        known and no duration is observed: its request was never read whole."""
        answers, key = self.answers, (NO_FAMILY, status, outcome)
        answers[key] = answers.get(key, 0) + 1
        self._outcomes.counts[outcome] += 1

    @property
    def requests(self) -> dict[tuple[str, str], int]:
        """Callback requests answered, by (family, status)."""
        counts: dict[tuple[str, str], int] = {}
        for (family, status, _), count in self.answers.items():
            _count(counts, (family, str(status)), count)
        return counts

    @property
    def callbacks(self) -> dict[tuple[str, str], int]:
        """Callbacks by (family, outcome)."""
        counts: dict[tuple[str, str], int] = {}
        for (family, _, outcome), count in self.answers.items():
            _count(counts, (family, outcome.value), count)
        return counts

    @property
    def overloaded(self) -> int:
        """Callbacks refused at once because too many were in flight or connections open."""
        return sum(count for (_, _, outcome), count in self.answers.items() if outcome is Outcome.OVERLOADED)

    @property
    def last_request_at(self) -> float:
        """When the last callback whose command could be read arrived (Unix time); the start until one
        did. Kept on the performance counter's clock, turned into Unix time when read: no `time.time()`
        per callback."""
        wall, perf = self._started_at
        return wall + (self.last_request_perf - perf)

    # The publisher's `DeliveryListener`.

    def records_queued(self, records: int) -> None:
        """Records handed to the producer (`records` > 0) or settled by it, whatever the answer (< 0)."""
        self.queued += records

    def broker_refused(self, error: str, records: int) -> None:
        """`records` in a batch the broker refused with the Kafka error `error` (a class name)."""
        _count(self.broker_errors, error, records)

    def partitions_below_min_isr(self, counts: Mapping[str, int]) -> None:
        """Each topic's count of partitions with fewer replicas in sync than its `min.insync.replicas`."""
        self.below_min_isr = dict(counts)

    def ambiguous_ended(self, landed: bool) -> None:
        """A record answered ambiguous has ended: it landed, or it was given up."""
        self._outcomes.ambiguous_ended(landed)

    # The dead-letter topic's (`bridge.ingest.rejected`).

    def dead_lettered(self, reason: str) -> None:
        """A refused callback was kept: the broker confirmed its dead-letter record. (Not in the callback
        metrics `bridge_records_published` and `bridge_broker_ack_duration_seconds`: those are the records
        answered 200.)"""
        _count(self.dead_letters, reason)

    def dead_letter_failed(self, reason: str) -> None:
        """A refused callback could not be kept: it was answered 503 (or 413) instead of its 400."""
        _count(self.dead_letter_failures, reason)

    # Forward mode's (`bridge.ingest.forward`).

    def forwarded(self, result: str, seconds: float) -> None:
        """A callback's forward ended with `result` after `seconds` (the write's and the forward's time)."""
        _count(self.forwards, result)
        self.forward_seconds.observe(seconds)

    def decision_written(self, written: bool) -> None:
        _count(self.decisions, "written" if written else "unwritten")

    def families(self) -> Iterator[Metric]:
        """The metric families, from the numbers as they are now."""
        yield _counter(
            "bridge_forwards",
            "Callbacks forwarded to the app server (--forward-url), by result: answered (any status), "
            "timeout, unreachable, busy.",
            ("result",),
            {(result,): count for result, count in self.forwards.items()},
        )
        forward_seconds = HistogramMetricFamily(
            "bridge_forward_duration_seconds",
            "Time from starting a callback's Kafka write and forward to both having ended.",
        )
        forward_seconds.add_metric((), self.forward_seconds.buckets(), self.forward_seconds.total)
        yield forward_seconds
        yield _counter(
            "bridge_app_decisions",
            "The app server's answers to before-callbacks, by whether their decision record was written.",
            ("record",),
            {(record,): count for record, count in self.decisions.items()},
        )
        yield _counter(
            "bridge_requests",
            "Callback requests answered, by command family and HTTP status.",
            ("family", "status"),
            self.requests,
        )
        yield _counter(
            "bridge_callbacks",
            "Callbacks by command family and outcome.",
            ("family", "outcome"),
            self.callbacks,
        )
        request_seconds = HistogramMetricFamily(
            "bridge_request_duration_seconds",
            "Time from receiving a callback to answering it.",
            labels=("family",),
        )
        for family, histogram in self.request_seconds.items():
            request_seconds.add_metric((family,), histogram.buckets(), histogram.total)
        yield request_seconds
        ack_seconds = HistogramMetricFamily(
            "bridge_broker_ack_duration_seconds",
            "Time from handing a record to the producer to its acks=all confirmation.",
        )
        ack_seconds.add_metric((), self.ack_seconds.buckets(), self.ack_seconds.total)
        yield ack_seconds
        yield _counter(
            "bridge_records_published",
            "Records the broker confirmed, by command family.",
            ("family",),
            {(family,): count for family, count in self.records.items()},
        )
        yield _counter(
            "bridge_published_bytes",
            "Bytes of key and value of confirmed records, by command family.",
            ("family",),
            {(family,): count for family, count in self.bytes.items()},
        )
        yield _counter(
            "bridge_publish_errors",
            "Writes Kafka did not confirm, by kind: not_ready, delivery_timeout, a Kafka error.",
            ("kind",),
            {(kind,): count for kind, count in self.publish_errors.items()},
        )
        yield _counter(
            "bridge_broker_errors",
            "Records in batches the broker refused, by its error (NotEnoughReplicasError, ...), once the "
            "producer's retries ran out at the delivery deadline.",
            ("error",),
            {(error,): count for error, count in self.broker_errors.items()},
        )
        below_min_isr = GaugeMetricFamily(
            "bridge_partitions_below_min_isr",
            "Partitions whose in-sync replicas are fewer than their topic's min.insync.replicas, by topic: "
            "their leaders refuse acks=all writes, and the bridge is not ready.",
            labels=("topic",),
        )
        for topic, count in self.below_min_isr.items():
            below_min_isr.add_metric((topic,), count)
        yield below_min_isr
        yield _counter(
            "bridge_overloaded_requests",
            "Callbacks refused at once because too many were in flight, or too many connections open.",
            (),
            {(): self.overloaded},
        )
        yield _counter(
            "bridge_dead_lettered",
            "Callbacks refused by validation and kept in the dead-letter topic before their 400, by reason: "
            "invalid_json, invalid_field, command_mismatch.",
            ("reason",),
            {(reason,): count for reason, count in self.dead_letters.items()},
        )
        yield _counter(
            "bridge_dead_letter_failures",
            "Callbacks refused by validation that could not be kept in the dead-letter topic (answered 503, "
            "or 413 for a record too large), by reason.",
            ("reason",),
            {(reason,): count for reason, count in self.dead_letter_failures.items()},
        )
        yield GaugeMetricFamily(
            "bridge_requests_in_flight", "Callback requests being handled now.", value=self.in_flight
        )
        yield GaugeMetricFamily(
            "bridge_producer_queued_records",
            "Records handed to the producer and not yet acknowledged or failed: the producer's buffer use.",
            value=self.queued,
        )
        yield GaugeMetricFamily(
            "bridge_broker_ready",
            "1 when the producer is connected, every topic exists as at start and every partition has enough "
            "replicas in sync, else 0.",
            value=1 if self._is_ready() else 0,
        )
        yield GaugeMetricFamily(
            "bridge_last_request_timestamp_seconds",
            "When the last callback arrived (Unix time): a request whose command could be read; the start "
            "time until one does.",
            value=self.last_request_at,
        )
        outcomes = GaugeMetricFamily(
            "bridge_outcomes",
            "Callbacks since start by outcome, and ambiguous records by how they ended (landed, lost).",
            labels=("outcome",),
        )
        for outcome, count in self._outcomes.snapshot().items():
            outcomes.add_metric((outcome,), count)
        yield outcomes


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.families()


def _counter(name: str, documentation: str, labels: tuple[str, ...], counts: dict[Any, int]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in counts.items():
        family.add_metric(values, count)
    return family


def _count(counts: dict[Any, int], key: Any, amount: int = 1) -> None:
    counts[key] = counts.get(key, 0) + amount


METRICS = web.AppKey("metrics", Metrics)


def install_metrics(
    app: web.Application, outcomes: Outcomes, is_ready: Callable[[], bool], *, route: bool = True
) -> Metrics:
    """Give `app` its metrics and, with `route`, the `/metrics` route; `is_ready` says whether Kafka is
    usable. (Without `route`, `/metrics` is the admin listener's: `bridge.ingest.admin`.)"""
    metrics = Metrics(outcomes, is_ready)
    app[METRICS] = metrics
    if route:
        app.router.add_get(METRICS_PATH, _serve_metrics)
    return metrics


async def _serve_metrics(request: web.Request) -> web.Response:
    return metrics_response(request.app[METRICS])


def metrics_response(metrics: Metrics) -> web.Response:
    """The answer to a scrape of `metrics`."""
    response = web.Response(body=metrics.exposition())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def family_of(command: str) -> str:
    """The bounded label of a command: its family when the bridge knows it, else `unknown`."""
    family = command.partition(".")[0]
    return family if family in FAMILIES else UNKNOWN_FAMILY


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


def note_failure(metrics: Metrics, error: BridgeError) -> None:
    """Hook: a request failed with `error`; a failed write counts by kind."""
    if isinstance(error, PublishError):
        _count(metrics.publish_errors, publish_error_kind(error))


def request_id_of(request: web.BaseRequest) -> str:
    """The request's id: the caller's `X-Request-Id` when it is a usable one, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER)
    return given if given is not None and _REQUEST_ID.fullmatch(given) else new_request_id()


class Call:
    """One callback's request as the metrics and outcomes see it: plain attributes, not the request's
    mapping, set along the request path and counted once, by `Metrics.answered`."""

    __slots__ = ("ack_seconds", "family", "metrics", "outcome", "published_bytes", "started")

    def __init__(self, metrics: Metrics, started: float) -> None:
        self.metrics = metrics
        self.started = started
        """When it arrived, on `time.perf_counter`'s clock."""
        self.family = NO_FAMILY
        """Its command family once its command is known (`command_known`)."""
        self.outcome = Outcome.FAILED
        """What became of it: failed until it gets further (the handler cancelled before it writes)."""
        self.ack_seconds = 0.0
        self.published_bytes = 0
        """The key and value bytes of its own write once the broker confirmed it (after `ack_seconds`);
        0 while it has none."""

    def command_known(self, command: str) -> None:
        """Its command is known: its family labels its metrics, and it counts as a callback received (a
        scanner's 404 or garbage does not)."""
        self.family = family_of(command)
        self.metrics.last_request_perf = self.started

    def published(self, record: Record, seconds: float) -> None:
        """The broker confirmed its `record` after `seconds`."""
        self.ack_seconds = seconds
        self.published_bytes = len(record.key) + len(record.value)
