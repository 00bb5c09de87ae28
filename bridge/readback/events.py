"""Callbacks read back from Kafka as typed events: the record checked and decoded, filters, duplicates.

`decode(record)` turns one Kafka record the bridge wrote, in either record format (`envelope`, or
`cloudevents`: a record with a `ce_specversion` header), into the same `Event`, or raises
`InvalidEnvelope` saying what is wrong (a foreign producer wrote to the topic). `EventFilter` selects
events by command or family, owning entity and event-time window; `Deduplicator` and `unique()` drop a
callback delivered twice.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from bridge.errors import InvalidField
from bridge.settings.values import parse_instant
from bridge.tencent import cloudevents
from bridge.tencent.commands import route
from bridge.tencent.envelope import SCHEMA, CallbackId, callback_id, envelope

_SDK_APP_ID = re.compile(r"[1-9][0-9]{0,18}")


class KafkaRecord(Protocol):
    """What is read from a record: aiokafka's `ConsumerRecord[bytes, bytes]` fits."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Coordinates:
    """Where a record is in Kafka."""

    topic: str
    partition: int
    offset: int
    timestamp: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"


@dataclass(frozen=True, slots=True)
class Event:
    """One callback as the bridge wrote it, decoded."""

    command: str
    sdk_app_id: str
    family: str
    """The command family, the word before the first dot (`OfficialAccount`), or `unknown`."""
    entity: str
    """The owning entity that picked the partition (the official account, the conversation, the group...)."""
    key: str
    event_time_ms: int
    """`EventTime` when usable, else when the bridge received the callback: the record timestamp."""
    received_at_ms: int
    callback: dict[str, Any]
    query: dict[str, str]
    coordinates: Coordinates
    headers: tuple[tuple[str, bytes], ...]
    value: bytes = field(repr=False)
    """The record value exactly as stored: the envelope, or the body in the `cloudevents` format."""
    record_format: str = "envelope"
    """`envelope` or `cloudevents`: how the bridge wrote the record (`--record-format`)."""

    @property
    def identity(self) -> CallbackId:
        """What makes two records copies of one callback: SdkAppid, command and key, as at the edge."""
        return callback_id(self.sdk_app_id, self.command, self.key)

    @property
    def envelope(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "received_at": self.received_at_ms,
            "query": self.query,
            "callback": self.callback,
        }

    def json_line(self) -> bytes:
        """The envelope on one line, whatever the record format: for a `cloudevents` record, the envelope
        the `envelope` format would have written, byte for byte. (A posted body may hold line breaks, so it
        is re-serialized then.)"""
        if b"\n" in self.value or b"\r" in self.value:
            return orjson.dumps(self.envelope) + b"\n"
        if self.record_format == "cloudevents":
            return envelope(self.value, self.query, self.received_at_ms) + b"\n"
        return self.value + b"\n"

    def raw_callback(self) -> bytes:
        """The callback body as Tencent posted it: the value of a `cloudevents` record, or cut out of the
        envelope (re-serialized if that fails)."""
        if self.record_format == "cloudevents":
            return self.value
        head = orjson.dumps({"schema": SCHEMA, "received_at": self.received_at_ms, "query": self.query})
        prefix = head[:-1] + b',"callback":'
        if self.value.startswith(prefix) and self.value.endswith(b"}"):
            return self.value[len(prefix) : -1]
        return orjson.dumps(self.callback)


class InvalidEnvelope(ValueError):
    """A record that is not an envelope of this version; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that failed the envelope check, with where it is and why."""

    coordinates: Coordinates
    reason: str

    def __str__(self) -> str:
        return f"{self.coordinates}: not a callback envelope: {self.reason}"


def coordinates_of(record: KafkaRecord) -> Coordinates:
    return Coordinates(record.topic, record.partition, record.offset, record.timestamp)


def json_value(record: KafkaRecord, what: str) -> tuple[bytes, Any]:
    """`record`'s value and its JSON; raises `InvalidEnvelope` naming `what` the record is meant to be
    ("record", "decision record") when it has no value or the value is not UTF-8 JSON."""
    if record.value is None:
        raise InvalidEnvelope(f"the {what} has no value")
    try:
        return record.value, orjson.loads(record.value)
    except orjson.JSONDecodeError as exc:
        raise InvalidEnvelope(f"the {what}'s value is not UTF-8 JSON: {exc}") from None


def decode(record: KafkaRecord) -> Event:
    """The event in `record`, in either record format; raises `InvalidEnvelope` when the record is not one
    the bridge writes."""
    raw, value = json_value(record, "record")
    if cloudevents.is_cloudevent(record.headers):
        return _decode_cloudevent(record, raw, value)
    received_at, query, callback = _check_envelope(value)
    return _event(
        record,
        raw,
        received_at=received_at,
        query=query,
        callback=callback,
        record_format="envelope",
    )


def _decode_cloudevent(record: KafkaRecord, raw: bytes, callback: Any) -> Event:
    """A `cloudevents` record: the body as the value, the envelope's query and receive time in headers."""
    try:
        attributes = cloudevents.read_headers(record.headers)
    except ValueError as exc:
        raise InvalidEnvelope(f"a CloudEvent the bridge did not write: {exc}") from None
    if not isinstance(callback, dict):
        raise InvalidEnvelope("the CloudEvent's data is not a JSON object")
    if "Sign" in attributes.query:
        raise InvalidEnvelope("ce_query holds Sign")
    if callback.get("CallbackCommand", attributes.command) != attributes.command:
        raise InvalidEnvelope("ce_type's and the callback's CallbackCommand differ")
    event = _event(
        record,
        raw,
        received_at=attributes.received_at_ms,
        query=attributes.query,
        callback=callback,
        record_format="cloudevents",
    )
    if event.entity != attributes.entity:
        raise InvalidEnvelope(
            f"ce_partitionkey {attributes.entity!r} is not the owning entity {event.entity!r}"
        )
    if event.key != attributes.key:
        raise InvalidEnvelope(f"ce_id names the key {attributes.key!r}, the record's key is {event.key!r}")
    return event


def _event(
    record: KafkaRecord,
    raw: bytes,
    *,
    received_at: int,
    query: dict[str, str],
    callback: dict[str, Any],
    record_format: str,
) -> Event:
    command = query.get("CallbackCommand") or callback.get("CallbackCommand")
    if not isinstance(command, str) or not command:
        raise InvalidEnvelope("no CallbackCommand in the query or the callback")
    if callback.get("CallbackCommand", command) != command:
        raise InvalidEnvelope("the query's and the callback's CallbackCommand differ")
    try:
        routed = route(command, query["SdkAppid"], callback)
    except InvalidField as exc:
        raise InvalidEnvelope(f"the callback fails its command's checks: {exc.info}") from None
    key = record.key.decode("utf-8", "replace") if record.key is not None else routed.key
    return Event(
        command=command,
        sdk_app_id=query["SdkAppid"],
        family=routed.family,
        entity=routed.entity,
        key=key,
        event_time_ms=routed.event_time_ms if routed.event_time_ms is not None else received_at,
        received_at_ms=received_at,
        callback=callback,
        query=query,
        coordinates=coordinates_of(record),
        headers=tuple(record.headers),
        value=raw,
        record_format=record_format,
    )


def _check_envelope(envelope: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    """The checks of `schemas/envelope.schema.json`, by hand: the package does not depend on jsonschema."""
    if not isinstance(envelope, dict):
        raise InvalidEnvelope("the value is not a JSON object")
    if envelope.get("schema") != SCHEMA:
        raise InvalidEnvelope(f"'schema' is {envelope.get('schema')!r}, not {SCHEMA!r}")
    extra = set(envelope) - {"schema", "received_at", "query", "callback"}
    missing = {"received_at", "query", "callback"} - set(envelope)
    if extra or missing:
        raise InvalidEnvelope(f"unexpected fields {sorted(extra)}, missing fields {sorted(missing)}")
    received_at, query, callback = envelope["received_at"], envelope["query"], envelope["callback"]
    if not isinstance(received_at, int) or isinstance(received_at, bool) or received_at < 0:
        raise InvalidEnvelope("'received_at' is not a non-negative integer")
    if not isinstance(query, dict) or not all(isinstance(v, str) for v in query.values()):
        raise InvalidEnvelope("'query' is not an object of strings")
    if not _SDK_APP_ID.fullmatch(query.get("SdkAppid", "")) or "Sign" in query:
        raise InvalidEnvelope("'query' lacks a valid SdkAppid, or holds Sign")
    if not isinstance(callback, dict):
        raise InvalidEnvelope("'callback' is not an object")
    return received_at, query, callback


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a job wants; an empty selection selects everything.

    `commands` holds full command names (`OfficialAccount.CallbackAfterSendMsg`) or families
    (`OfficialAccount`, or `OfficialAccount.*`). The window is `since_ms <= event_time_ms < until_ms`.
    """

    commands: frozenset[str] = frozenset()
    entities: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None

    @classmethod
    def of(
        cls,
        commands: Iterable[str] = (),
        entities: Iterable[str] = (),
        since: int | str | None = None,
        until: int | str | None = None,
    ) -> EventFilter:
        """A filter from command or family names, entities, and instants as epoch ms or ISO 8601 text."""
        return cls(
            frozenset(name.removesuffix(".*") for name in commands),
            frozenset(entities),
            parse_instant(since) if isinstance(since, str) else since,
            parse_instant(until) if isinstance(until, str) else until,
        )

    def in_window(self, event_time_ms: int) -> bool:
        return (self.since_ms is None or event_time_ms >= self.since_ms) and (
            self.until_ms is None or event_time_ms < self.until_ms
        )

    def matches(self, event: Event) -> bool:
        if self.commands and not ({event.command, event.family} & self.commands):
            return False
        if self.entities and event.entity not in self.entities:
            return False
        return self.in_window(event.event_time_ms)


class Deduplicator:
    """Remembers the callbacks seen (`Event.identity`), the most recent `max_keys` of them, to drop a
    callback delivered twice. Two apps, or two commands, that use the same key are different callbacks."""

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self._seen: OrderedDict[CallbackId, None] = OrderedDict()
        self._max_keys = max_keys
        self.duplicates = 0

    def first_time(self, event: Event) -> bool:
        """True the first time this callback is seen, False (and counted as a duplicate) after that."""
        identity = event.identity
        if identity in self._seen:
            self._seen.move_to_end(identity)
            self.duplicates += 1
            return False
        self._seen[identity] = None
        if len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        return True


async def unique(
    events: AsyncIterable[Event], deduplicator: Deduplicator | None = None
) -> AsyncIterator[Event]:
    """`events` without the repeats of a callback already seen (Tencent's retries, a 503'd write that
    landed): the same SdkAppid, command and key."""
    deduplicator = deduplicator or Deduplicator()
    async for event in events:
        if deduplicator.first_time(event):
            yield event
