"""The dead-letter topic read back: its records as events, so `consume`, `replay` and jobs read it too.

`decode_any(record)` is `bridge.readback.events.decode` for the bridge's callback topics and, for a record
whose `schema` header says it is a dead-letter record (`bridge.tencent.rejected`), a `RejectedEvent`:

- its line (`consume`, `replay --to-file`, the skipped file) is the object of `schemas/rejected.schema.json`,
  with the body as a string, or in base64 when it is not UTF-8;
- `raw_callback()` is the body exactly as posted, which `replay --to-url` posts with the stored query
  (without `Sign`), so a bridge whose validation was fixed takes it as Tencent's callback;
- `replay --to-topic` copies the record as it is: value, key, headers, timestamp, the app's partition;
- its entity is the app, so `--account SDKAPPID` selects an app's records (and reads its partition only),
  its event time the receive time, and `--command` matches the command when it was known;
- two copies of one refused callback (Tencent's retry after a timeout) share their identity: the app, the
  query and the body, so `replay --dedup` posts it once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from bridge.readback.events import Event, InvalidEnvelope, KafkaRecord, coordinates_of, decode
from bridge.tencent.commands import FAMILIES
from bridge.tencent.envelope import CallbackId
from bridge.tencent.rejected import NotRejectedRecord, RejectedCallback, is_rejected_record, read_rejected


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectedEvent(Event):
    """A callback the bridge refused and kept in the dead-letter topic, read back as an event."""

    kept: RejectedCallback

    @property
    def identity(self) -> CallbackId:
        kept = self.kept
        digest = hashlib.sha256(orjson.dumps(kept.query) + b"\0" + kept.body).hexdigest()
        return f"{kept.sdk_app_id}\x1frejected\x1f{digest}"

    @property
    def envelope(self) -> dict[str, Any]:
        return self.kept.as_json()

    def json_line(self) -> bytes:
        return self.kept.json_line()

    def raw_callback(self) -> bytes:
        return self.kept.body


def decode_rejected(record: KafkaRecord) -> RejectedEvent:
    """The dead-letter record `record` as an event; raises `InvalidEnvelope` when it is not one."""
    try:
        kept = read_rejected(record.value, record.timestamp, record.headers)
    except NotRejectedRecord as exc:
        raise InvalidEnvelope(f"not a dead-letter record: {exc}") from None
    command = kept.command or ""
    callback: Any = None
    if record.value:
        try:
            callback = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            callback = None
    return RejectedEvent(
        command=command,
        sdk_app_id=kept.sdk_app_id,
        family=family if (family := command.partition(".")[0]) in FAMILIES else "unknown",
        entity=kept.sdk_app_id,
        key=kept.sdk_app_id,
        event_time_ms=kept.received_at_ms,
        received_at_ms=kept.received_at_ms,
        callback=callback if isinstance(callback, dict) else {},
        query=kept.query,
        coordinates=coordinates_of(record),
        headers=tuple(record.headers),
        value=kept.body,
        record_format="rejected",
        kept=kept,
    )


def decode_any(record: KafkaRecord) -> Event:
    """The event in `record`: a callback's envelope, or a dead-letter record; raises `InvalidEnvelope`."""
    if is_rejected_record(record.headers):
        return decode_rejected(record)
    return decode(record)
