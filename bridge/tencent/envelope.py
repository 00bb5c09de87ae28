"""The Kafka record of one callback: the envelope as its value, and its key, owning entity, timestamp,
headers; and the identity of a callback (`callback_id`), by which the bridge and its readers drop duplicates.

The envelope (`schemas/envelope.schema.json`) is
`{"schema": "tencent-chat-callback/1", "received_at": <ms>, "query": {...}, "callback": <body>}`; the body is
embedded as the exact bytes Tencent posted (already parsed and checked), so nothing is re-encoded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson

from bridge.tencent.bounded import keep

SCHEMA = "tencent-chat-callback/1"
# An EventTime further ahead of the receive time is a broken clock, and Kafka 4 refuses records more than an
# hour ahead of the broker (message.timestamp.after.max.ms): the receive time stands in for it.
MAX_EVENT_TIME_AHEAD_MS = 10 * 60 * 1000
CONTENT_TYPE = b"application/json"
SCHEMA_HEADER = SCHEMA.encode("ascii")


CallbackId = str
"""SdkAppid, CallbackCommand and record key: the identity of a callback, the same for the edge dedup and
for readers (`Event.identity`). The command is part of it because two families may key alike (an
official-account and a one-to-one message can share a MsgKey), the app because two apps may."""


def callback_id(sdk_app_id: str, command: str, key: str) -> CallbackId:
    """One string rather than a tuple: with 100,000 callbacks remembered, tuples cost the bridge 12 % more
    CPU per callback than strings (`bridge bench`, alternating runs). Unambiguous: neither an SdkAppid nor
    a command name can hold the separator."""
    return f"{sdk_app_id}\x1f{command}\x1f{key}"


@dataclass(slots=True)
class Record:
    """One record, ready for the publisher, which picks its partition from `entity`.

    Not frozen, and neither are the other values built for every callback (`CallbackQuery`,
    `RoutedCallback`, `ParsedCallback`), though nothing changes them once built: a frozen dataclass's
    `__init__` sets each field through `object.__setattr__`, 2.5 us for this one against 0.8 us, and the
    four cost the request path 6 us per callback (README, "Performance")."""

    topic: str
    entity: str
    """The account, group or app the callback belongs to: its records share a partition, in order."""
    key: bytes
    value: bytes
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...]
    size: int = field(default=-1, init=False, compare=False, repr=False)
    """`bridge.kafka.sizes.record_bytes` of this record, once computed (-1: not yet): the publisher checks
    it against the topic's limit and, for a topic of small records, each batch. Not an argument, so that
    `dataclasses.replace` never copies it to a record of another value."""


def envelope(raw_body: bytes, query: dict[str, str], received_at_ms: int) -> bytes:
    """The record value: the envelope with the posted body embedded byte for byte."""
    return orjson.dumps(
        {
            "schema": SCHEMA,
            "received_at": received_at_ms,
            "query": query,
            "callback": orjson.Fragment(raw_body),
        }
    )


DECISION_RECORD_HEADER = ("bridge-record", b"app-decision")
"""The header that marks forward mode's record of an app server's decision on a before-callback
(`bridge.ingest.forward`), written after the callback's record on its topic and partition: not a callback."""


def is_decision_record(headers: Iterable[tuple[str, bytes]]) -> bool:
    return DECISION_RECORD_HEADER in headers


_CONTENT_TYPE_PAIR = ("content-type", CONTENT_TYPE)
_SCHEMA_PAIR = ("schema", SCHEMA_HEADER)
_CACHED_PAIRS = 1024
"""At most so many commands, and so many apps, keep their headers encoded: hostile callbacks of ever new
commands (any dotted name is one) or apps (with no `--sdk-app-id`) empty the cache, not grow it."""
_COMMAND_PAIRS: dict[str, tuple[str, bytes]] = {}
_APP_PAIRS: dict[str, tuple[str, bytes]] = {}


def _pair(cache: dict[str, tuple[str, bytes]], name: str, text: str, encoding: str) -> tuple[str, bytes]:
    """The header `name` holding `text`, encoded, kept for the next record of that command or app."""
    return keep(cache, text, (name, text.encode(encoding)), _CACHED_PAIRS)


def record_headers(
    command: str, sdk_app_id: str, entity: str, received_at_ms: int
) -> tuple[tuple[str, bytes], ...]:
    """The headers of a callback's record: its command, its app, the value's content type, the owning entity,
    the receive time (epoch ms, decimal) and the envelope's version. An engine that reads headers but not
    the value (ClickHouse's `_headers`, Flink's `METADATA FROM 'headers'`) filters and groups on them.

    The command's, the app's and the constant headers are encoded once, not per callback."""
    command_pair = _COMMAND_PAIRS.get(command) or _pair(_COMMAND_PAIRS, "CallbackCommand", command, "utf-8")
    app_pair = _APP_PAIRS.get(sdk_app_id) or _pair(_APP_PAIRS, "SdkAppid", sdk_app_id, "ascii")
    return (
        command_pair,
        app_pair,
        _CONTENT_TYPE_PAIR,
        ("entity", entity.encode("utf-8")),
        ("received_at", b"%d" % received_at_ms),
        _SCHEMA_PAIR,
    )


def record_timestamp(event_time_ms: int | None, received_at_ms: int, max_event_age_ms: int) -> int:
    """The event time, so that a window of events is found by time; the receive time when there is none, when
    it is ahead of the receive time by more than a broken clock would be, or when it is older than
    `max_event_age_ms`.

    Kafka deletes by timestamp: a segment whose newest record is older than the topic's retention goes at
    the next retention check (every five minutes), the active segment included. A callback posted days after
    its event (a backfill, a replay into a bridge) and stamped with its event time would be deleted minutes
    after its 200. With the receive time it lives out the retention; a reader still finds it, as a window's
    start lookup returns the first offset at or after the window's start time.
    """
    if event_time_ms is None or event_time_ms > received_at_ms + MAX_EVENT_TIME_AHEAD_MS:
        return received_at_ms
    if event_time_ms < received_at_ms - max_event_age_ms:
        return received_at_ms
    return event_time_ms


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the envelope, shipped in the package for consumers to validate against."""
    text = resources.files("bridge.tencent").joinpath("schemas/envelope.schema.json").read_bytes()
    schema: dict[str, Any] = orjson.loads(text)
    return schema
