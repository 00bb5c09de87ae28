"""Logging: one JSON object per line when stderr is not a terminal (a container, a service), else text.

Every line logged while a request is handled carries that request's id (`request_id`), which is also the
`X-Request-Id` of the answer, so a log line and a caller's report of a failure can be matched. Successful
callbacks are logged only at debug level; a failed one is logged once, where it is answered, with its
status and reason. The lines of 4xx answers, which any client can cause, pass a `LineBudget`.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import logging
import sys
import time
from collections.abc import Callable
from random import getrandbits
from typing import Any, TextIO

import orjson

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

LOGGERS = {
    "bridge": "the start: the port it listens on",
    "bridge.server": "callbacks refused or failed, one line each; an open (unsigned) bridge at start",
    "bridge.runner": "the stop, phase by phase; the admin listener's port",
    "bridge.reload": "SIGHUP: the token file read again, or why not",
    "bridge.parser_errors": "connections answered 503 and closed over --max-connections",
    "bridge.metrics": "every callback, at debug level",
    "bridge.publisher": "Kafka: connecting, readiness and why not, the producer rebuilt",
    "bridge.batching": "a failure while handing batches to the producer",
    "bridge.topics": "topics created",
    "bridge.consumer": "the reader of consume and replay: bad records, commits, lookups by time",
}
"""The bridge's loggers: the `logger` of every log line, which log filters and alerts select by. They keep
the names of the flat layout of 0.1 (`bridge.publisher`, not `bridge.kafka.publisher`), whatever package
the module that logs now lives in."""

# Attributes every LogRecord has; anything else on a record came through `extra=` and is worth a field.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "request_id"}
)


def new_request_id() -> str:
    """A fresh request id, for a request that brought no usable one of its own: 16 hex digits.

    From `random`, not `os.urandom`: an id is no secret (a caller may bring its own), and the system call
    cost 0.7 us per callback against 0.17 us (`random` reseeds itself in a forked child)."""
    return getrandbits(64).to_bytes(8).hex()


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being handled, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRIBUTES and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return text if request_id is None else f"{text} [request {request_id}]"


class LineBudget:
    """At most `per_second` lines a second of one kind; the rest are counted and told in one line.

    A flood of bad requests then costs the log a few lines a second, not one per request: the disk cannot
    fill however fast a client sends. The summary is logged at the end of each second that went over
    (`loop.call_later`), or, off an event loop, with the next line allowed.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        per_second: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self.per_second = per_second
        self._clock = clock
        self._window_end = 0.0
        self._used = 0
        self.suppressed = 0
        self._flush: asyncio.TimerHandle | None = None

    def allow(self) -> bool:
        """Whether to log the next line; if not, it is counted for the summary."""
        now = self._clock()
        if now >= self._window_end:
            self.summarize()
            self._window_end, self._used = now + 1.0, 0
        if self._used < self.per_second:
            self._used += 1
            return True
        self.suppressed += 1
        if self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                self._flush = loop.call_later(max(self._window_end - now, 0.0), self.summarize)
        return False

    def summarize(self) -> None:
        """Log how many lines were left out since the last summary, if any."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.suppressed:
            count, self.suppressed = self.suppressed, 0
            self._logger.info(
                "%d more %s were not logged (at most %d lines a second)",
                count,
                self._what,
                self.per_second,
                extra={"suppressed": count},
            )


def _quiet_bad_requests(record: logging.LogRecord) -> bool:
    # Imported here, not at the top: aiohttp is loaded by the time its server logs, and every command that
    # configures logging (`bridge --help` too) would otherwise load it, doubling the start-up.
    from aiohttp.http_exceptions import HttpProcessingError, LineTooLong  # noqa: PLC0415

    error = record.exc_info[1] if record.exc_info else None
    if record.levelno >= logging.ERROR and isinstance(error, HttpProcessingError):
        if isinstance(error, LineTooLong):
            # aiohttp's message quotes the start of the line: a query string, perhaps with its `Sign`.
            limit = error.args[1] if len(error.args) > 1 else "?"
            detail = f"a request or header line over the limit of {limit} bytes"
        else:
            detail = (error.message or type(error).__name__).splitlines()[0][:200]
        record.msg, record.args = "malformed request answered 400: %s", (detail,)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
    return True


def wants_json(log_format: str, stream: TextIO) -> bool:
    if log_format == "auto":
        return not stream.isatty()
    return log_format == "json"


def log_handler(log_format: str, stream: TextIO) -> logging.Handler:
    """A handler writing to `stream` as `log_format` says, each line with its request id."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if wants_json(log_format, stream) else TextFormatter())
    return handler


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Send every log line to `stream` (stderr), formatted as `log_format` says, at `level` and above."""
    handler = log_handler(log_format, sys.stderr if stream is None else stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiokafka logs every failed connection attempt at ERROR; the bridge reports broker trouble itself, in
    # words, so aiokafka's own lines are kept for debugging.
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)
    # At DEBUG, aiokafka.conn logs every request it sends, the SASL authentication request and its
    # password or SCRAM proof included: never below INFO.
    logging.getLogger("aiokafka.conn").setLevel(logging.INFO if level == "debug" else logging.CRITICAL)
    # aiohttp logs every malformed request (a line too long, a bad header) at ERROR with a traceback: any
    # scanner could flood the alerts. One line at INFO says it; the client got its 400.
    logging.getLogger("aiohttp.server").addFilter(_quiet_bad_requests)
