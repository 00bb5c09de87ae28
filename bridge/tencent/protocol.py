"""Tencent's webhook protocol: the query string, the JSON body and the answers Tencent expects.

Facts from Tencent's "Webhook Overview": parameters are read by name; `Sign` and `RequestTime` appear only
when webhook authentication is on; the body repeats `CallbackCommand`; success is HTTP 200 with
`{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}` and anything else counts as a failure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from bridge.errors import BridgeError, CommandMismatch, InvalidJson, InvalidQuery
from bridge.tencent.bounded import keep

OK_BODY = b'{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}'

# Query parameters that are secrets or signature material and never reach Kafka.
EXCLUDED_FROM_ENVELOPE = frozenset({"Sign"})

_SDK_APP_ID = re.compile(r"[1-9][0-9]{0,18}")
_INT64_MAX = 2**63 - 1
# Tencent's commands are dotted words (`OfficialAccount.CallbackAfterSendMsg`); anything else is not a
# command Tencent sends and would make a poor Kafka header.
_COMMAND = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)+")
_MAX_COMMAND_LENGTH = 128
# orjson turns integers outside [-2**63, 2**64 - 1] into floats without a word. Such a literal has at least
# 19 digits, so a cheap search for 19 digits in a row decides whether the exact tokenizer below must run:
# every digit becomes "0" and every other byte " ", then one substring search. A regular expression
# (`[0-9]{19}`) tries a match at every digit: 5 us for a 1 KB body against 0.3 us.
# The same pass also maps both opening brackets to "[", so one count of the result bounds the nesting.
_DIGITS_AS_ZEROS = bytes(
    0x30 if 0x30 <= byte <= 0x39 else 0x5B if byte in b"[{" else 0x20 for byte in range(256)
)
_LONG_DIGIT_RUN = b"0" * 19
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|(-?[0-9]+)([.eE])?')
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# orjson parses 1024 levels but encodes only about 250, and some keys are a digest of the re-encoded body;
# Tencent's bodies nest a handful of levels. A body with fewer brackets than the limit cannot exceed it.
MAX_DEPTH = 128
# bool before int: True is an int to Python and a boolean to JSON.
_JSON_TYPE_NAMES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "boolean"),
    ((int, float), "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
    (type(None), "null"),
)


def fail_body(error: BridgeError) -> bytes:
    """The Tencent-style FAIL body for an error."""
    return orjson.dumps({"ActionStatus": "FAIL", "ErrorInfo": error.info, "ErrorCode": error.error_code})


@dataclass(slots=True)  # not frozen: see `bridge.tencent.envelope.Record`
class CallbackQuery:
    """The query string of one callback, checked."""

    sdk_app_id: str
    command: str | None
    params: dict[str, str]
    """Every parameter as received, except those in `EXCLUDED_FROM_ENVELOPE`."""
    sign: str | None = field(default=None, repr=False)
    """`Sign`, for the signature check only: it never reaches Kafka or a log."""


def parse_query(pairs: Iterable[tuple[str, str]]) -> CallbackQuery:
    """Check the query of a callback, given as (name, value) pairs in the order received, repeats included."""
    query: dict[str, str] = {}
    for name, value in pairs:
        # ASCII is text: the check that encodes runs only for the rest.
        if not ((name.isascii() or _is_text(name)) and (value.isascii() or _is_text(value))):
            raise InvalidQuery(f"query parameter {_shorten(name)!r} is not UTF-8 text")
        if name in query:
            raise InvalidQuery(f"query parameter {name!r} is given more than once")
        query[name] = value
    return _checked_query(query)


def parse_raw_query(raw: str) -> CallbackQuery | None:
    """`parse_query` of the raw (still percent-encoded) query string `raw` of a request, when nothing in it
    is percent-encoded; None when something is: the caller then gives `parse_query` the request's decoded
    pairs (aiohttp's `request.query`, decoded by yarl).

    Split as yarl's `URL.query` splits (the same as `urllib.parse.parse_qsl` keeping blank values): `&`
    separates the parameters, empty ones are skipped, the first `=` ends the name (none: an empty value),
    and `+` is a space. Without a `%` that is all the decoding there is, so the pairs are the same as
    `request.query`'s; the saving is yarl's list of pairs, its `MultiDict` and its proxy, built for every
    request whose URL yarl has not cached (a signed callback's is new every second: `Sign`, `RequestTime`).
    A query string seen before (the same command, client and second) is answered from a bounded map of
    the last ones parsed: parsing is pure, and nothing changes a `CallbackQuery` once made."""
    known = _PARSED.get(raw)
    if known is not None:
        return known
    if "%" in raw:
        return None
    text = raw.replace("+", " ") if "+" in raw else raw
    # (name, value) pairs, checked by `parse_query` as the decoded ones are: no second copy of its checks.
    parsed = parse_query(part.partition("=")[::2] for part in text.split("&") if part)
    return keep(_PARSED, raw, parsed, _PARSED_QUERIES)


_PARSED_QUERIES = 1024
"""At most so many raw query strings are remembered with their `CallbackQuery` (a few hundred bytes each);
new ones past that empty the map rather than grow it."""
_PARSED: dict[str, CallbackQuery] = {}


def _checked_query(query: dict[str, str]) -> CallbackQuery:
    """The checks of a query given as a dict of its parameters (each name once), past the pairs' own."""
    sdk_app_id = query.get("SdkAppid")
    if sdk_app_id is None:
        raise InvalidQuery("query parameter 'SdkAppid' is missing")
    if sdk_app_id not in _CHECKED_APPS:
        if not _SDK_APP_ID.fullmatch(sdk_app_id) or int(sdk_app_id) > _INT64_MAX:
            raise InvalidQuery(
                f"query parameter 'SdkAppid' must be a positive decimal integer, got {_shorten(sdk_app_id)!r}"
            )
        keep(_CHECKED_APPS, sdk_app_id, None, _CHECKED)
    command = query.get("CallbackCommand")
    if command is not None and command not in _CHECKED_COMMANDS:
        _check_command(command, "query parameter 'CallbackCommand'")
    params = (
        query
        if EXCLUDED_FROM_ENVELOPE.isdisjoint(query)
        else {name: value for name, value in query.items() if name not in EXCLUDED_FROM_ENVELOPE}
    )
    return CallbackQuery(sdk_app_id, command, params, query.get("Sign"))


_CHECKED = 1024
"""At most so many app ids, and so many commands, are remembered as checked (the regular expressions cost
0.3 us each, three per callback); new ones past that empty the set rather than grow it."""
_CHECKED_APPS: dict[str, None] = {}
_CHECKED_COMMANDS: dict[str, None] = {}
"""Dicts used as sets, to be kept by the one rule of bounded caches (`bridge.tencent.bounded.keep`)."""


def _is_text(text: str) -> bool:
    """Whether `text` has no lone surrogate. aiohttp's pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS, or
    no C extension) decodes the request target with surrogateescape, so a byte that is not UTF-8 reaches
    the query as one, and the envelope's JSON cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_body(raw: bytes) -> dict[str, Any]:
    """Parse a callback body: strict UTF-8 JSON holding one object, every number exactly representable."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if not raw.strip():
            raise InvalidJson("the body is empty; a callback carries a JSON object") from None
        raise InvalidJson(f"the body is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidJson(f"the body must be a JSON object, got a JSON {json_type(body)}")
    shape = raw.translate(_DIGITS_AS_ZEROS)
    if _LONG_DIGIT_RUN in shape:
        _reject_unrepresentable_integers(raw)
    if shape.count(b"[") > MAX_DEPTH and _depth(body) > MAX_DEPTH:
        raise InvalidJson(f"the body nests deeper than {MAX_DEPTH} levels")
    return body


def resolve_command(query: CallbackQuery, body: Mapping[str, Any]) -> str:
    """The callback's command: from the query and the body, which must agree when both give it."""
    in_body = body.get("CallbackCommand")
    if in_body is not None and not isinstance(in_body, str):
        raise CommandMismatch(f"body field 'CallbackCommand' must be a string, got {json_type(in_body)}")
    if in_body is not None and in_body not in _CHECKED_COMMANDS:
        _check_command(in_body, "body field 'CallbackCommand'")
    command = query.command if query.command is not None else in_body
    if command is None:
        raise CommandMismatch("'CallbackCommand' is missing from both the query and the body")
    if in_body is not None and command != in_body:
        raise CommandMismatch(
            f"'CallbackCommand' differs between the query ({command!r}) and the body ({in_body!r})"
        )
    return command


def _check_command(command: str, where: str) -> None:
    if len(command) > _MAX_COMMAND_LENGTH or not _COMMAND.fullmatch(command):
        raise CommandMismatch(
            f"{where} must be a dotted command name such as 'OfficialAccount.CallbackAfterSendMsg', "
            f"got {_shorten(command)!r}"
        )
    keep(_CHECKED_COMMANDS, command, None, _CHECKED)


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in a decoded value, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def _reject_unrepresentable_integers(raw: bytes) -> None:
    for match in _JSON_TOKEN.finditer(raw):
        digits, fraction_or_exponent = match.groups()
        if digits is None or fraction_or_exponent is not None:
            continue
        if not _INT_MIN <= int(digits) <= _INT_MAX:
            raise InvalidJson(
                f"the body holds the integer {_shorten(digits.decode())}, beyond 64 bits; "
                "it cannot be represented exactly"
            )


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    for types, name in _JSON_TYPE_NAMES:
        if isinstance(value, types):
            return name
    return type(value).__name__


def _shorten(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
