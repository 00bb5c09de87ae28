"""Forward mode's decision records read back: an app server's answer to a before-callback, as its own event.

In forward mode the bridge writes, after a before-callback's record and on the same topic, partition and
key, a second record holding what the app server answered (`bridge.ingest.forward.decision_record`):
headers `bridge-record: app-decision`, `decision-of` (the command), `SdkAppid`, `content-type`,
`app-status`, and a value of schema `tencent-chat-kafka-bridge/app-decision/1` (`decided_at`,
`received_at`, `sdk_app_id`, `command`, `key`, `status`, `answer`). `decode_decision(record)` turns one
into a `DecisionEvent`, or raises `InvalidEnvelope`.

A decision names its callback by `identity` (SdkAppid, command, key: the callback's own `Event.identity`),
which is how a job joins the two. The value holds no owning entity (it cannot be worked out from the key),
so a decision takes its entity and event time from its callback when the reader read that callback before
it (`CallbackSeen`, `DecisionEvent.following`); a decision whose callback was not read in the same run (it
started between the two) has no entity, and its receive time (the callback's, kept in the value) as its
event time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from bridge.readback.events import Coordinates, InvalidEnvelope, KafkaRecord, coordinates_of, json_value
from bridge.tencent.commands import FAMILIES
from bridge.tencent.envelope import CallbackId, callback_id

DECISION_SCHEMA = "tencent-chat-kafka-bridge/app-decision/1"
"""The `schema` of a decision record's value, as `bridge.ingest.forward` writes it."""
_FIELDS = frozenset(
    {"schema", "decided_at", "received_at", "sdk_app_id", "command", "key", "status", "answer"}
)


@dataclass(frozen=True, slots=True)
class CallbackSeen:
    """What a decision takes from its callback, when the reader read that callback before it."""

    entity: str
    event_time_ms: int
    coordinates: Coordinates
    selected: bool
    """Whether the reader's filter selected the callback: its decision goes with it."""


@dataclass(frozen=True, slots=True)
class DecisionEvent:
    """An app server's answer to a before-callback (forward mode), decoded."""

    command: str
    """The before-callback decided (`decision-of`), so `--command` and `EventFilter` select by it."""
    sdk_app_id: str
    family: str
    key: str
    status: int
    """The app server's HTTP status."""
    answer: Any
    """The app server's body: JSON when it was JSON (`{"ErrorCode": 1, ...}` denies), else its text."""
    decided_at_ms: int
    received_at_ms: int
    """When the bridge received the callback decided."""
    entity: str | None
    """The callback's owning entity: from its `entity` header, or from its callback when that was read
    before it in this run; None for a decision of an older bridge (no header) read without its callback."""
    event_time_ms: int
    """The callback's event time, when its callback was read before it; else `received_at_ms`."""
    callback_coordinates: Coordinates | None
    """Where the callback decided is, when it was read before this decision."""
    coordinates: Coordinates
    headers: tuple[tuple[str, bytes], ...]
    record_key: bytes | None
    value: bytes = field(repr=False)
    """The record value exactly as stored."""

    @property
    def identity(self) -> CallbackId:
        """The identity of the callback decided (its `Event.identity`): what a job joins the two on."""
        return callback_id(self.sdk_app_id, self.command, self.key)

    @property
    def error_code(self) -> int | None:
        """The answer's `ErrorCode` (0 allows, 1 denies), when the app answered a JSON object holding one."""
        code = self.answer.get("ErrorCode") if isinstance(self.answer, dict) else None
        return code if isinstance(code, int) and not isinstance(code, bool) else None

    def following(self, callback: CallbackSeen) -> DecisionEvent:
        """This decision with its entity and event time from its callback, read before it."""
        return replace(
            self,
            entity=callback.entity,
            event_time_ms=callback.event_time_ms,
            callback_coordinates=callback.coordinates,
        )

    def json_line(self) -> bytes:
        """The record value on one line, byte for byte (re-serialized if the app's body held a line
        break): `"schema": "tencent-chat-kafka-bridge/app-decision/1"` tells it from a callback's envelope."""
        if b"\n" in self.value or b"\r" in self.value:
            return orjson.dumps(orjson.loads(self.value)) + b"\n"
        return self.value + b"\n"


def decode_decision(record: KafkaRecord) -> DecisionEvent:
    """The decision record `record` as an event, of no entity yet (`DecisionEvent.following` gives it its
    callback's); raises `InvalidEnvelope` when it is not a decision record the bridge writes."""
    raw, value = json_value(record, "decision record")
    if not isinstance(value, dict) or value.get("schema") != DECISION_SCHEMA:
        raise InvalidEnvelope(f"a decision record whose value is not of schema {DECISION_SCHEMA!r}")
    if set(value) != _FIELDS:
        raise InvalidEnvelope(f"a decision record with the fields {sorted(value)}, not {sorted(_FIELDS)}")
    texts = [value[name] for name in ("sdk_app_id", "command", "key")]
    numbers = [value[name] for name in ("decided_at", "received_at", "status")]
    if not all(isinstance(text, str) and text for text in texts):
        raise InvalidEnvelope("a decision record whose sdk_app_id, command or key is not a text")
    if not all(isinstance(number, int) and not isinstance(number, bool) for number in numbers):
        raise InvalidEnvelope("a decision record whose decided_at, received_at or status is not an integer")
    sdk_app_id, command, key = texts
    headers = dict(record.headers)
    if headers.get("decision-of") != command.encode("utf-8"):
        raise InvalidEnvelope("the decision record's decision-of header is not its value's command")
    family = command.partition(".")[0]
    return DecisionEvent(
        command=command,
        sdk_app_id=sdk_app_id,
        family=family if family in FAMILIES else "unknown",
        key=key,
        status=value["status"],
        answer=value["answer"],
        decided_at_ms=value["decided_at"],
        received_at_ms=value["received_at"],
        entity=_entity_header(headers),
        event_time_ms=value["received_at"],
        callback_coordinates=None,
        coordinates=coordinates_of(record),
        headers=tuple(record.headers),
        record_key=record.key,
        value=raw,
    )


def _entity_header(headers: dict[str, bytes]) -> str | None:
    """The owning entity a decision record names (written since forward mode's decisions carry it), or None
    for one written before, or one whose header is not UTF-8."""
    entity = headers.get("entity")
    if entity is None:
        return None
    try:
        return entity.decode("utf-8") or None
    except UnicodeDecodeError:
        return None
