"""The `cloudevents` record format: the CloudEvents 1.0 Kafka protocol binding, binary content mode.

The record value is the callback body byte for byte, as Tencent posted it; every attribute is a header
named `ce_<attribute>`, and the data's content type the `content-type` header. The key, the partition and
the timestamp are those of the `envelope` format. The mapping (the README's record section has it too, and
`schemas/cloudevents-headers.schema.json` describes the headers):

- `ce_specversion`: `1.0`.
- `ce_id`: `<SdkAppid>/<CallbackCommand>/<key>`, the bridge's identity of a callback (`callback_id`): the
  same for a callback Tencent sends twice, so that `ce_source` and `ce_id` name duplicates, as the spec says.
- `ce_source`: `/tencent-cloud-chat/<SdkAppid>`, the app.
- `ce_type`: `com.tencentcloud.chat.<CallbackCommand>`, the command.
- `ce_time`: the record timestamp (`EventTime` when usable, else the receive time), RFC 3339 in UTC with
  milliseconds.
- `content-type`: `application/json`, the body's (`datacontenttype`).
- `ce_partitionkey`: the owning entity, which picked the partition (the Partitioning extension).
- `ce_receivedat`: the receive time (the envelope's `received_at`), RFC 3339 in UTC with milliseconds.
- `ce_query`: the query (the envelope's `query`: in the order received, without `Sign`), form-urlencoded.

Extension names follow the spec's rule (lowercase a-z and 0-9, at most 20 characters). The HTTP request id
is not mapped: it names one delivery attempt, not the event (a callback Tencent sends again comes with
another one, and only the first write is kept), so it stays in the logs.

This module is pure: `headers` builds the headers of a callback, `read_headers` takes them apart again and
raises `ValueError` saying what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson

from bridge.tencent.bounded import keep

SPEC_VERSION = "1.0"
TYPE_PREFIX = "com.tencentcloud.chat."
SOURCE_PREFIX = "/tencent-cloud-chat/"
CONTENT_TYPE = "application/json"
SPEC_VERSION_HEADER = "ce_specversion"
HEADER_NAMES = (
    "ce_specversion",
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_time",
    "content-type",
    "ce_partitionkey",
    "ce_receivedat",
    "ce_query",
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_SDK_APP_ID = re.compile(r"[1-9][0-9]{0,18}")


_CACHED_SECONDS = 4096
_SECONDS: dict[int, str] = {}
"""The text up to the milliseconds (`2024-05-01T00:30:00.`) of the seconds recently written, by seconds
since the epoch: `datetime` and `strftime` cost 3-4 us, twice per record of this format, and the records
of one second share it."""
_MILLISECONDS = tuple(f"{n:03d}Z" for n in range(1000))


def rfc3339(epoch_ms: int) -> str:
    """`epoch_ms` as an RFC 3339 timestamp in UTC with milliseconds: `2024-05-01T00:30:00.000Z`."""
    second, millisecond = divmod(epoch_ms, 1000)
    head = _SECONDS.get(second)
    if head is None:
        head = _second(second)
    return head + _MILLISECONDS[millisecond]


def _second(second: int) -> str:
    """The text of `second` (since the epoch) up to its milliseconds, as `strftime` writes it (which
    raises for a time beyond the years `datetime` has), remembered for the next records."""
    head = (_EPOCH + timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%S.")
    return keep(_SECONDS, second, head, _CACHED_SECONDS)


def epoch_ms(text: str) -> int:
    """An RFC 3339 timestamp as milliseconds since the epoch (exact: no float on the way); `ValueError`
    when it is not one, or has no time zone."""
    instant = datetime.fromisoformat(text)
    if instant.tzinfo is None or "T" not in text.upper():
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp with a time zone")
    return (instant - _EPOCH) // _MILLISECOND


def event_id(sdk_app_id: str, command: str, key: str) -> str:
    """`ce_id`: the app, the command and the record key, the same identity as `envelope.callback_id`.
    Neither an SdkAppid nor a command name holds a `/`, so the first two split it again."""
    return f"{sdk_app_id}/{command}/{key}"


_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")
"""What `quote(text, safe="")` leaves as it is: a name or value of only these is its own encoding."""
_CACHED = 4096
_QUOTED: dict[str, str] = {}
"""Query names and values recently encoded (most repeat from callback to callback), emptied past
`_CACHED` entries rather than grown."""
_SOURCE_PAIRS: dict[str, tuple[str, bytes]] = {}
_TYPE_PAIRS: dict[str, tuple[str, bytes]] = {}
_SPEC_VERSION_PAIR = ("ce_specversion", SPEC_VERSION.encode("ascii"))
_CONTENT_TYPE_PAIR = ("content-type", CONTENT_TYPE.encode("ascii"))


def _pair(
    cache: dict[str, tuple[str, bytes]], of: str, name: str, value: str, encoding: str
) -> tuple[str, bytes]:
    """The header `name` holding `value`, encoded once per app or command (`of`); the cache emptied, not
    grown, past `_CACHED` (any dotted name is a command)."""
    return keep(cache, of, (name, value.encode(encoding)), _CACHED)


def _quote(text: str) -> str:
    return keep(_QUOTED, text, text if _UNRESERVED.fullmatch(text) else quote(text, safe=""), _CACHED)


def form_urlencoded(query: Mapping[str, str]) -> str:
    """`ce_query`: what `urlencode(query, quote_via=quote, safe="")` gives, at a fifth of its cost."""
    quoted = _QUOTED.get
    return "&".join(
        [
            (quoted(name) or _quote(name)) + "=" + (quoted(value) or _quote(value))
            for name, value in query.items()
        ]
    )


def headers(
    *,
    command: str,
    sdk_app_id: str,
    entity: str,
    key: str,
    query: Mapping[str, str],
    received_at_ms: int,
    timestamp_ms: int,
) -> tuple[tuple[str, bytes], ...]:
    """The headers of a callback's record in the `cloudevents` format, in `HEADER_NAMES` order."""
    source = _SOURCE_PAIRS.get(sdk_app_id) or _pair(
        _SOURCE_PAIRS, sdk_app_id, "ce_source", SOURCE_PREFIX + sdk_app_id, "ascii"
    )
    kind = _TYPE_PAIRS.get(command) or _pair(_TYPE_PAIRS, command, "ce_type", TYPE_PREFIX + command, "utf-8")
    return (
        _SPEC_VERSION_PAIR,
        ("ce_id", event_id(sdk_app_id, command, key).encode("utf-8")),
        source,
        kind,
        ("ce_time", rfc3339(timestamp_ms).encode("ascii")),
        _CONTENT_TYPE_PAIR,
        ("ce_partitionkey", entity.encode("utf-8")),
        ("ce_receivedat", rfc3339(received_at_ms).encode("ascii")),
        ("ce_query", form_urlencoded(query).encode("ascii")),
    )


def _known_headers(record_headers: Iterable[tuple[str, bytes | None]]) -> dict[str, str]:
    """Each of `HEADER_NAMES` once, as text; other headers are left alone."""
    found: dict[str, str] = {}
    for name, raw in record_headers:
        if name not in HEADER_NAMES:
            continue
        if name in found:
            raise ValueError(f"header {name} appears twice")
        try:
            found[name] = (raw or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"header {name} is not UTF-8") from None
    missing = [name for name in HEADER_NAMES if name not in found]
    if missing:
        raise ValueError(f"missing headers {', '.join(missing)}")
    return found


@dataclass(frozen=True, slots=True)
class CloudEventHeaders:
    """What the `ce_*` headers of a record say, checked against one another."""

    command: str
    sdk_app_id: str
    key: str
    """The record key, from `ce_id`."""
    entity: str
    time_ms: int
    received_at_ms: int
    query: dict[str, str]


def is_cloudevent(record_headers: Iterable[tuple[str, bytes | None]]) -> bool:
    """Whether a record is in the binary CloudEvents format: it has a `ce_specversion` header."""
    return any(name == SPEC_VERSION_HEADER for name, _ in record_headers)


def read_headers(record_headers: Iterable[tuple[str, bytes | None]]) -> CloudEventHeaders:
    """The attributes of a record the bridge wrote in the `cloudevents` format; `ValueError` naming what
    is missing, repeated or inconsistent (another producer's events, a spec version this reader does not
    know)."""
    found = _known_headers(record_headers)
    if found["ce_specversion"] != SPEC_VERSION:
        raise ValueError(f"ce_specversion is {found['ce_specversion']!r}, not {SPEC_VERSION!r}")
    if found["content-type"].partition(";")[0].strip().lower() != CONTENT_TYPE:
        raise ValueError(f"content-type is {found['content-type']!r}, not {CONTENT_TYPE}")
    source, kind = found["ce_source"], found["ce_type"]
    sdk_app_id = source.removeprefix(SOURCE_PREFIX)
    if not source.startswith(SOURCE_PREFIX) or not _SDK_APP_ID.fullmatch(sdk_app_id):
        raise ValueError(f"ce_source {source!r} is not {SOURCE_PREFIX}<SdkAppid>")
    command = kind.removeprefix(TYPE_PREFIX)
    if not kind.startswith(TYPE_PREFIX) or not command:
        raise ValueError(f"ce_type {kind!r} is not {TYPE_PREFIX}<CallbackCommand>")
    id_prefix = event_id(sdk_app_id, command, "")
    if not found["ce_id"].startswith(id_prefix):
        raise ValueError(f"ce_id {found['ce_id']!r} does not start with {id_prefix!r}")
    try:
        time_ms, received_at_ms = epoch_ms(found["ce_time"]), epoch_ms(found["ce_receivedat"])
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"ce_time or ce_receivedat: {exc}") from None
    query = dict(parse_qsl(found["ce_query"], keep_blank_values=True, strict_parsing=bool(found["ce_query"])))
    if query.get("SdkAppid") != sdk_app_id:
        raise ValueError("ce_query's SdkAppid is not the app of ce_source")
    if query.get("CallbackCommand", command) != command:
        raise ValueError("ce_query's CallbackCommand is not the command of ce_type")
    return CloudEventHeaders(
        command=command,
        sdk_app_id=sdk_app_id,
        key=found["ce_id"].removeprefix(id_prefix),
        entity=found["ce_partitionkey"],
        time_ms=time_ms,
        received_at_ms=received_at_ms,
        query=query,
    )


def headers_schema() -> dict[str, Any]:
    """The JSON Schema of a `cloudevents` record's headers (an object of name to UTF-8 value), shipped in
    the package beside the envelope's."""
    text = resources.files("bridge.tencent").joinpath("schemas/cloudevents-headers.schema.json").read_bytes()
    schema: dict[str, Any] = orjson.loads(text)
    return schema
