"""One callback, from what was posted to what Kafka is given: the pure part of the path, no I/O.

`checked_query` decides what can be decided before the body is read (the query, the signature, the app);
`parse_callback` turns the body into a `ParsedCallback`: its command, where it goes (topic group, owning
entity, key), its identity for the edge dedup, and the record's value, timestamp and headers. The topic is
the settings' choice for the topic group, and the partition the publisher's, from the entity and the topic's
partition count at start. Every refusal is a `BridgeError`. The fuzz target (`tests/fuzz_target.py`) drives
these two functions as the handler does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bridge.errors import ForbiddenApp
from bridge.tencent import cloudevents
from bridge.tencent.commands import RoutedCallback, route
from bridge.tencent.envelope import (
    CallbackId,
    Record,
    callback_id,
    envelope,
    record_headers,
    record_timestamp,
)
from bridge.tencent.protocol import CallbackQuery, decode_body, parse_query, resolve_command
from bridge.tencent.signature import SignatureCheck


def checked_query(
    pairs: Iterable[tuple[str, str]] | CallbackQuery,
    signature: SignatureCheck | None,
    sdk_app_ids: tuple[str, ...],
) -> CallbackQuery:
    """The query of a callback, checked, signed (when `signature` is set) and of one of `sdk_app_ids`
    (any app when empty): everything the bridge decides before it reads the body. Raises `BridgeError`.
    `pairs` are the query's (name, value) pairs, or the query already parsed (`parse_raw_query`)."""
    query = pairs if isinstance(pairs, CallbackQuery) else parse_query(pairs)
    if signature is not None:
        signature.verify(query.sign, query.params.get("RequestTime"), query.sdk_app_id)
    if sdk_app_ids and query.sdk_app_id not in sdk_app_ids:
        raise ForbiddenApp(f"SdkAppid {query.sdk_app_id} is not an app of this bridge (--sdk-app-id)")
    return query


@dataclass(slots=True)  # not frozen: see `bridge.tencent.envelope.Record`
class ParsedCallback:
    """A callback checked and routed: all its record is made of, but the topic and the format."""

    routed: RoutedCallback
    """The command, its family and topic group, the owning entity, the key and the event time."""
    identity: CallbackId
    timestamp_ms: int
    body: bytes = field(repr=False)
    """The body as posted, byte for byte: inside the envelope, or the value of the `cloudevents` format."""
    query: dict[str, str] = field(repr=False)
    """The query as received, without `Sign`."""
    received_at_ms: int

    def record(self, topic: str, record_format: str = "envelope") -> Record:
        """The record of this callback on `topic`, in `record_format` (`--record-format`): `envelope`, or
        `cloudevents` (the body as the value, the metadata in `ce_*` headers, see `cloudevents`)."""
        routed = self.routed
        received_at_ms = self.received_at_ms
        if record_format == "envelope":  # each built here, for the format chosen only
            value = envelope(self.body, self.query, received_at_ms)
            headers = record_headers(routed.command, self.query["SdkAppid"], routed.entity, received_at_ms)
        else:
            value = self.body
            headers = cloudevents.headers(
                command=routed.command,
                sdk_app_id=self.query["SdkAppid"],
                entity=routed.entity,
                key=routed.key,
                query=self.query,
                received_at_ms=received_at_ms,
                timestamp_ms=self.timestamp_ms,
            )
        # Positional: a dataclass's keyword arguments cost more, and this runs for every callback.
        return Record(topic, routed.entity, routed.key.encode("utf-8"), value, self.timestamp_ms, headers)


def parse_callback(
    query: CallbackQuery,
    raw_body: bytes,
    *,
    received_at_ms: int,
    max_event_age_ms: int,
    on_command: Callable[[str], None] = lambda _command: None,
) -> ParsedCallback:
    """The callback posted as `raw_body` with the checked `query`: body, command, fields, route, envelope.

    `on_command` is told the command as soon as it is known (the metrics label a refusal of its fields by
    it); `max_event_age_ms` bounds how old an `EventTime` may be and still be the record's timestamp (see
    `record_timestamp`). Every refusal is a `BridgeError`.
    """
    body = decode_body(raw_body)
    command = resolve_command(query, body)
    on_command(command)
    routed = route(command, query.sdk_app_id, body)
    return ParsedCallback(
        routed,
        callback_id(query.sdk_app_id, command, routed.key),
        record_timestamp(routed.event_time_ms, received_at_ms, max_event_age_ms),
        raw_body,
        query.params,
        received_at_ms,
    )
