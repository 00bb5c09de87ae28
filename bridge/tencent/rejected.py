"""The dead-letter record: an authentic callback that failed validation, kept raw so that nothing is lost.

Tencent never retries a callback that got an answer, so a callback the bridge answers 400 is gone unless the
bridge keeps it; a field Tencent changes the type of tomorrow would otherwise lose a day of callbacks. The
record (pure, no I/O; written by `bridge.ingest.rejected`):

- value: the body **exactly as posted**, byte for byte: it may not be JSON, nor even UTF-8, so it is not
  wrapped in JSON (which would have to re-encode it, and base64 would make it a third larger than the
  bridge's `max.message.bytes`);
- key: the `SdkAppid`, and the partition is the app's (`partition_for(SdkAppid)`), as for `tim.app`;
- timestamp: when the bridge received it;
- headers: `schema` (`tencent-chat-rejected/1`), `rejected-reason` (the answer's `ErrorInfo`),
  `rejected-error-code` (its `ErrorCode`, such as `40003`), `query` (the query string as a JSON object of
  strings, in the order received, without `Sign`), `SdkAppid`, `CallbackCommand` (when known: the query's,
  else the body's when only a field was refused), `content-type: application/octet-stream`.

`bridge consume` prints each as one JSON object, the shape of `schemas/rejected.schema.json` (`json_line`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson

from bridge.errors import BadCallback, CommandMismatch, InvalidField, InvalidJson
from bridge.tencent.envelope import Record
from bridge.tencent.protocol import CallbackQuery

SCHEMA = "tencent-chat-rejected/1"
CONTENT_TYPE = b"application/octet-stream"
SCHEMA_HEADER = "schema"
_SCHEMA_FAMILY = SCHEMA.encode("ascii").rpartition(b"/")[0] + b"/"
REASON_HEADER = "rejected-reason"
ERROR_CODE_HEADER = "rejected-error-code"
QUERY_HEADER = "query"

REASONS: Mapping[type[BadCallback], str] = {
    InvalidJson: "invalid_json",
    InvalidField: "invalid_field",
    CommandMismatch: "command_mismatch",
}
"""The validation failures kept, each with its bounded label (the metrics' `reason`). Every other refusal
(the query, the signature, the app, the body's size or arrival) is kept nowhere: it is not known to be
Tencent's, or there is no body to keep."""
DEAD_LETTERED: tuple[type[BadCallback], ...] = tuple(REASONS)


def reason_of(error: BadCallback) -> str:
    """The bounded label of a kept refusal: `invalid_json`, `invalid_field` or `command_mismatch`."""
    return next(label for kind, label in REASONS.items() if isinstance(error, kind))


def known_command(query: CallbackQuery, raw_body: bytes, error: BadCallback) -> str | None:
    """The callback's command when known: the query's (checked to be a dotted name before the body is read),
    else, for a refused field, the body's, which was then read and checked. None otherwise."""
    if query.command is not None:
        return query.command
    if isinstance(error, InvalidField):
        command = orjson.loads(raw_body).get("CallbackCommand")
        return command if isinstance(command, str) else None
    return None


def rejected_record(
    topic: str, query: CallbackQuery, raw_body: bytes, error: BadCallback, received_at_ms: int
) -> Record:
    """The dead-letter record of the callback posted as `raw_body` with `query`, refused with `error`."""
    headers = [
        (SCHEMA_HEADER, SCHEMA.encode("ascii")),
        (REASON_HEADER, error.info.encode("utf-8")),
        (ERROR_CODE_HEADER, str(error.error_code).encode("ascii")),
        (QUERY_HEADER, orjson.dumps(query.params)),  # `params` never holds Sign
        ("SdkAppid", query.sdk_app_id.encode("ascii")),
    ]
    command = known_command(query, raw_body, error)
    if command is not None:
        headers.append(("CallbackCommand", command.encode("utf-8")))
    headers.append(("content-type", CONTENT_TYPE))
    return Record(
        topic=topic,
        entity=query.sdk_app_id,
        key=query.sdk_app_id.encode("ascii"),
        value=raw_body,
        timestamp_ms=received_at_ms,
        headers=tuple(headers),
    )


class NotRejectedRecord(ValueError):
    """A record that is not a dead-letter record of this version; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class RejectedCallback:
    """A dead-letter record read back: the callback as posted and why it was refused."""

    sdk_app_id: str
    command: str | None
    query: dict[str, str]
    reason: str
    error_code: int
    received_at_ms: int
    body: bytes

    def as_json(self) -> dict[str, Any]:
        """The object `bridge consume` prints (`schemas/rejected.schema.json`): the body as a string when it
        is UTF-8, else as `body_base64`; either gives back the posted bytes exactly."""
        shown: dict[str, Any] = {
            "schema": SCHEMA,
            "received_at": self.received_at_ms,
            "query": self.query,
            "command": self.command,
            "reason": self.reason,
            "error_code": self.error_code,
        }
        try:
            shown["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            shown["body_base64"] = base64.b64encode(self.body).decode("ascii")
        return shown

    def json_line(self) -> bytes:
        return orjson.dumps(self.as_json()) + b"\n"


def is_rejected_record(headers: Sequence[tuple[str, bytes]]) -> bool:
    """Whether a record's headers say it is a dead-letter record (of any version)."""
    return any(name == SCHEMA_HEADER and value.startswith(_SCHEMA_FAMILY) for name, value in headers)


def read_rejected(
    value: bytes | None, timestamp_ms: int, headers: Sequence[tuple[str, bytes]]
) -> RejectedCallback:
    """The dead-letter record of `value`, `timestamp_ms` and `headers`; raises `NotRejectedRecord`."""
    named = dict(headers)
    if named.get(SCHEMA_HEADER) != SCHEMA.encode("ascii"):
        raise NotRejectedRecord(f"the schema header is {named.get(SCHEMA_HEADER)!r}, not {SCHEMA!r}")
    try:
        query = orjson.loads(named[QUERY_HEADER])
        reason = named[REASON_HEADER].decode("utf-8")
        error_code = int(named[ERROR_CODE_HEADER])
        command = named["CallbackCommand"].decode("utf-8") if "CallbackCommand" in named else None
    except (KeyError, ValueError) as exc:  # orjson's and the decoders' errors are ValueErrors
        raise NotRejectedRecord(f"a header is missing or malformed: {exc!r}") from None
    if not isinstance(query, dict) or not all(isinstance(v, str) for v in query.values()):
        raise NotRejectedRecord("the query header is not a JSON object of strings")
    sdk_app_id = query.get("SdkAppid")
    if sdk_app_id is None or "Sign" in query or named.get("SdkAppid") != sdk_app_id.encode("utf-8"):
        raise NotRejectedRecord("the query lacks the SdkAppid of the SdkAppid header, or holds Sign")
    return RejectedCallback(
        sdk_app_id=sdk_app_id,
        command=command,
        query=query,
        reason=reason,
        error_code=error_code,
        received_at_ms=timestamp_ms,
        body=b"" if value is None else value,
    )


def json_schema() -> dict[str, Any]:
    """The JSON Schema of what `bridge consume` prints for a dead-letter record."""
    text = resources.files("bridge.tencent").joinpath("schemas/rejected.schema.json").read_bytes()
    schema: dict[str, Any] = orjson.loads(text)
    return schema
