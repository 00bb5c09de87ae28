"""The fuzz target of the request path: from the bytes of a query and a body to the record, or a refusal.

`one_input(data)` turns the fuzzer's bytes into one request with atheris' `FuzzedDataProvider`. It starts from
a Tencent fixture or from a valid body of any command the bridge knows, then mutates it: query parameters
dropped, repeated or given fuzzed values; a command put in the query, the body or both; fields dropped or
given fuzzed JSON; a signature good, wrong, stale or fuzzed; bytes of the JSON text edited; now and then raw
bytes as the query or the body. The query string becomes (name, value) pairs as aiohttp makes them (`yarl`,
from the request target decoded as UTF-8 with surrogateescape, as aiohttp's pure-Python parser does), then the
bridge's own `checked_query` and `parse_callback` (`bridge.tencent.callback`) run, and the record is put on
its topic and partition as the handler and the publisher do: the pure functions of the path. Every input
must end in a record or in a `BridgeError` with a 4xx status whose FAIL body encodes; anything else escapes
and is a crash. An accepted request is checked too: signed with a configured token within the allowed skew
(when signing is on), of an allowed app, and its record's value is the envelope of the body and the query
(without `Sign`).

`tests/fuzz_request.py` runs it under libFuzzer; the test suite replays the committed corpus with it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import atheris
import orjson
from yarl import URL

from bridge.errors import BadCallback, BridgeError, ForbiddenApp, Unauthorized
from bridge.secret import Secret
from bridge.settings import ServeSettings
from bridge.tencent import commands
from bridge.tencent.callback import checked_query, parse_callback
from bridge.tencent.commands import COMMANDS, RoutedCallback
from bridge.tencent.envelope import SCHEMA, Record
from bridge.tencent.partitioner import partition_for
from bridge.tencent.protocol import EXCLUDED_FROM_ENVELOPE, CallbackQuery, fail_body
from bridge.tencent.signature import SignatureCheck, expected_sign

FIXTURES_DIR = Path(__file__).parent / "fixtures"
NOW_S = 1_700_000_000
"""The bridge's clock during fuzzing, so that an input means the same thing at every run."""
NOW_MS = NOW_S * 1000
MAX_SKEW_S = 300
TOKENS = ("fuzz-token", "rotated-token")
APP = "1400000000"
PARTITIONS = 12
# The statuses a refusal on this path may have: a bad query, body or field, a signature, an app.
REFUSALS = frozenset({400, 401, 403})
SIGNATURE = SignatureCheck(tuple(Secret(token) for token in TOKENS), MAX_SKEW_S, clock=lambda: NOW_S)
APP_LISTS: tuple[tuple[str, ...], ...] = ((), (APP,), ("1400000001", APP))
TOPIC_FOR = ServeSettings().topic_for
MAX_EVENT_AGE_MS = ServeSettings().max_event_age_ms
# What the request target may not hold (aiohttp's parser refuses controls, and a space ends the target).
_NOT_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")

QUERY_NAMES = ("SdkAppid", "CallbackCommand", "contenttype", "ClientIP", "OptPlatform", "Sign", "RequestTime")
COMMAND_NAMES = (
    *sorted(COMMANDS),
    "OfficialAccount.CallbackSomethingNew",
    "Group.CallbackSomethingNew",
    "Alert.CallbackOnSomething",
    "Bot.Callback",
    "Unknown.Thing",
    "a.b",
    "C2C.",
    ".C2C",
    "C2C",
    "C2C.Callback After",
    "X" * 200 + ".Y",
)
APP_IDS = (APP, "1400000001", "0", "01400000000", "9223372036854775807", "9223372036854775808", "-1", " 1")
TIMES = ("", "soon", "-1", "1e9", "0" * 13, "١٢٣", str(NOW_S), str(NOW_S + MAX_SKEW_S + 1))
FIELD_NAMES = sorted(
    {field.name for spec in COMMANDS.values() for field in spec.fields}
    | {"CallbackCommand", "MsgKey", "MsgSeq", "EventTime", "Info", "PairList", "MsgBody", "Report_Account"}
)
STRINGS = ("", " ", "0", "123", "-5", "1.5", "@TGS#2J4SZEAEL", "a" * 300, "\u00e9\u4e2d\U0001f600", "\ufeff")


class DataProvider(Protocol):
    """The part of atheris' `FuzzedDataProvider` the target uses (atheris ships no type information, and
    types-atheris has no `FuzzedDataProvider`)."""

    def ConsumeBool(self) -> bool: ...
    def ConsumeBytes(self, count: int) -> bytes: ...
    def ConsumeFloat(self) -> float: ...
    def ConsumeInt(self, byte_size: int) -> int: ...
    def ConsumeIntInRange(self, low: int, high: int) -> int: ...
    def ConsumeUnicode(self, count: int) -> str: ...
    def ConsumeUnicodeNoSurrogates(self, count: int) -> str: ...
    def remaining_bytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Fixture:
    query: dict[str, str]
    body: dict[str, Any]


def _load_fixtures() -> tuple[Fixture, ...]:
    loaded = (orjson.loads(path.read_bytes()) for path in sorted(FIXTURES_DIR.glob("*.json")))
    return tuple(Fixture(query=data["query"], body=data["body"]) for data in loaded)


FIXTURES = _load_fixtures()
# A plausible value for each kind of field check, so that every command the bridge knows has a valid body.
_PLAUSIBLE: dict[Any, Any] = {
    commands.string: "text",
    commands.non_empty_string: "account_1",
    commands.integer: 7,
    commands.event_time: 1670574414123,
    commands.array: [{"From_Account": "account_1", "To_Account": "account_2"}],
    commands.json_object: {"To_Account": "account_1", "Action": "Login"},
    commands.msg_body: [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "red packet"}}],
}


def template(command: str) -> dict[str, Any]:
    """A valid body of a command the bridge knows: every documented field, with a plausible value."""
    body: dict[str, Any] = {"CallbackCommand": command}
    for field in COMMANDS[command].fields:
        body[field.name] = copy.deepcopy(_PLAUSIBLE[field.check])
    return body


TEMPLATES = tuple(
    Fixture(query={**FIXTURES[0].query, "CallbackCommand": name}, body=template(name))
    for name in sorted(COMMANDS)
)


@dataclass(frozen=True, slots=True)
class Case:
    """One request as the bridge's handler sees it."""

    query_string: str
    """The query part of the request target, as aiohttp hands it to yarl (surrogateescape-decoded)."""
    body: bytes
    signature: SignatureCheck | None
    sdk_app_ids: tuple[str, ...]


T = TypeVar("T")


def pick(data: DataProvider, choices: tuple[T, ...] | list[T]) -> T:
    return choices[data.ConsumeIntInRange(0, len(choices) - 1)]


# --- the query -----------------------------------------------------------------------------------------


def fuzzed_text(data: DataProvider, limit: int = 24) -> str:
    """A short string: sometimes one of the values that matter to the bridge, else fuzzed Unicode."""
    match data.ConsumeIntInRange(0, 5):
        case 0:
            return pick(data, COMMAND_NAMES)
        case 1:
            return pick(data, APP_IDS)
        case 2:
            return pick(data, TIMES)
        case 3:
            return pick(data, STRINGS)
        case 4:
            return data.ConsumeUnicode(data.ConsumeIntInRange(0, limit))
        case _:
            return data.ConsumeUnicodeNoSurrogates(data.ConsumeIntInRange(0, limit))


def signed(data: DataProvider, params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The parameters with `Sign` and `RequestTime` added in one of the ways a caller may add them."""
    skew = data.ConsumeIntInRange(-MAX_SKEW_S - 5, MAX_SKEW_S + 5)
    request_time = str(NOW_S + skew)
    match data.ConsumeIntInRange(0, 6):
        case 0:
            return params
        case 1 | 2:
            sign = expected_sign(pick(data, TOKENS), request_time)
        case 3:
            sign = expected_sign(pick(data, TOKENS), request_time).upper()
        case 4:
            sign = expected_sign("a guess", request_time)
        case 5:
            sign = hashlib.sha256(data.ConsumeBytes(8)).hexdigest()
        case _:
            request_time, sign = fuzzed_text(data), fuzzed_text(data, 70)
    pairs = [("RequestTime", request_time), ("Sign", sign)]
    if data.ConsumeBool():
        pairs.reverse()
    return [*params, *pairs]


def mutated_params(data: DataProvider, params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    for _ in range(data.ConsumeIntInRange(0, 3)):
        match data.ConsumeIntInRange(0, 3):
            case 0 if params:
                del params[data.ConsumeIntInRange(0, len(params) - 1)]
            case 1 if params:
                index = data.ConsumeIntInRange(0, len(params) - 1)
                params[index] = (params[index][0], fuzzed_text(data))
            case 2:
                name = pick(data, QUERY_NAMES) if data.ConsumeBool() else fuzzed_text(data, 12)
                params.insert(data.ConsumeIntInRange(0, len(params)), (name, fuzzed_text(data)))
            case _ if params:  # a repeat
                params.append(pick(data, params))
    return params


def encoded(text: str, data: DataProvider) -> str:
    """`text` in the request target: percent-encoded, or its bytes as they are (a lone surrogate as the
    bytes UTF-8 would give it), as aiohttp decodes them."""
    raw = text.encode("utf-8", "surrogatepass")
    return quote(raw, safe="") if data.ConsumeBool() else raw.decode("utf-8", "surrogateescape")


def query_string(data: DataProvider, params: list[tuple[str, str]]) -> str:
    if data.ConsumeIntInRange(0, 15) == 0:  # raw bytes, as a scanner would send
        return data.ConsumeBytes(data.ConsumeIntInRange(0, 200)).decode("utf-8", "surrogateescape")
    text = "&".join(f"{encoded(name, data)}={encoded(value, data)}" for name, value in params)
    if data.ConsumeIntInRange(0, 7) == 0:
        text += data.ConsumeBytes(data.ConsumeIntInRange(0, 16)).decode("utf-8", "surrogateescape")
    return text


# --- the body ------------------------------------------------------------------------------------------


def json_value(data: DataProvider, depth: int = 0) -> Any:
    value: Any
    match data.ConsumeIntInRange(0, 10 if depth < 3 else 7):
        case 0:
            value = None
        case 1:
            value = data.ConsumeBool()
        case 2:
            value = data.ConsumeIntInRange(-1000, 2**31)
        case 3:
            value = data.ConsumeInt(9)  # up to 72 bits: past both ends of what Kafka and orjson keep
        case 4:
            value = data.ConsumeFloat()
        case 5:
            value = fuzzed_text(data, 32)
        case 6:
            value = str(data.ConsumeIntInRange(0, 2**64))  # EventTime's string form, sometimes too large
        case 7:
            value = pick(data, STRINGS)
        case 8:
            value = [json_value(data, depth + 1) for _ in range(data.ConsumeIntInRange(0, 3))]
        case 9:
            count = data.ConsumeIntInRange(0, 3)
            value = {fuzzed_text(data, 10): json_value(data, depth + 1) for _ in range(count)}
        case _:  # deep nesting, around the bridge's limit
            value = data.ConsumeIntInRange(0, 9)
            for _ in range(data.ConsumeIntInRange(100, 300)):
                value = [value] if data.ConsumeBool() else {"k": value}
    return value


def mutated_body(data: DataProvider, body: dict[str, Any]) -> dict[str, Any]:
    for _ in range(data.ConsumeIntInRange(0, 4)):
        match data.ConsumeIntInRange(0, 4):
            case 0 if body:
                del body[pick(data, sorted(body))]
            case 1:
                body[pick(data, FIELD_NAMES)] = json_value(data)
            case 2:
                body[fuzzed_text(data, 12)] = json_value(data)
            case 3:  # inside a message element, the state change's Info, a relationship pair
                parent = body.get(pick(data, ("MsgBody", "Info", "PairList")))
                inner = parent[0] if isinstance(parent, list) and parent else parent
                if isinstance(inner, dict):
                    name = pick(data, ("MsgType", "To_Account", "From_Account", "MsgContent"))
                    inner[name] = json_value(data)
                else:
                    body[pick(data, ("MsgBody", "Info", "PairList"))] = [{"From_Account": fuzzed_text(data)}]
            case _ if body:
                body[pick(data, sorted(body))] = json_value(data)
    return body


def serialised(data: DataProvider, body: Any) -> bytes:
    match data.ConsumeIntInRange(0, 3):
        case 0:
            try:
                raw = orjson.dumps(body)
            except TypeError:  # nesting orjson does not encode: the standard library's json does
                raw = json.dumps(body).encode()
        case 1:
            raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
        case 2:
            raw = json.dumps(body, indent=data.ConsumeIntInRange(0, 2)).encode()  # lone surrogates as \\ud800
        case _:
            raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return edited(data, raw)


def edited(data: DataProvider, raw: bytes) -> bytes:
    """A few byte edits of a JSON text: the parser's paths that whole values never reach."""
    for _ in range(data.ConsumeIntInRange(0, 2) if data.ConsumeIntInRange(0, 3) == 0 else 0):
        at = data.ConsumeIntInRange(0, len(raw))
        match data.ConsumeIntInRange(0, 3):
            case 0:
                raw = raw[:at] + data.ConsumeBytes(data.ConsumeIntInRange(1, 4)) + raw[at:]
            case 1:
                raw = raw[:at] + raw[at + data.ConsumeIntInRange(1, 8) :]
            case 2:
                raw = raw[:at] + data.ConsumeBytes(1) + raw[at + 1 :]
            case _:
                raw = (
                    pick(data, (b"", b" ", b"\xef\xbb\xbf", b"\n\t"))
                    + raw
                    + pick(data, (b"", b" \n", b"\x00"))
                )
    return raw


# --- one request ---------------------------------------------------------------------------------------


def case_from(data: DataProvider) -> Case:
    fixture = pick(data, FIXTURES if data.ConsumeBool() else TEMPLATES)
    params = list(fixture.query.items())
    body = copy.deepcopy(fixture.body)
    if data.ConsumeIntInRange(0, 2) == 0:  # another command, where the query and the body give it
        command = pick(data, COMMAND_NAMES)
        in_query, in_body = pick(data, ((True, True), (True, False), (False, True)))
        params = [(name, value) for name, value in params if name != "CallbackCommand"]
        if in_query:
            params.append(("CallbackCommand", command))
        body.pop("CallbackCommand", None)
        if in_body:
            body["CallbackCommand"] = command
    signature = SIGNATURE if data.ConsumeIntInRange(0, 3) != 0 else None
    params = signed(data, mutated_params(data, params))
    sdk_app_ids = pick(data, APP_LISTS)
    text = query_string(data, params)
    if data.ConsumeIntInRange(0, 15) == 0:
        raw_body = data.ConsumeBytes(data.ConsumeIntInRange(0, 2000))
    else:
        raw_body = serialised(data, mutated_body(data, body))
    return Case(query_string=text, body=raw_body, signature=signature, sdk_app_ids=sdk_app_ids)


def handler_query(query_string: str) -> list[tuple[str, str]] | None:
    """`request.query.items()` for a request target whose query part is `query_string`, as aiohttp builds
    it; None when aiohttp's parser would refuse the target before any handler ran."""
    target = "/callback?" + _NOT_IN_TARGET.sub("", query_string)
    path_and_query, _, fragment = target.partition("#")
    path, _, text = path_and_query.partition("?")
    try:
        url = URL.build(path=path, query_string=text, fragment=fragment, encoded=True)
    except ValueError:
        return None
    return list(url.query.items())  # in the handler: an error here is the bridge's to answer


def one_input(data: bytes) -> None:
    """The fuzz target: one request from `data`; an exception escaping is a crash."""
    outcome(data)


def outcome(data: bytes) -> Record | BridgeError | None:
    """What became of the request made of `data`: its record, its refusal, or None if aiohttp's parser
    refuses it before the bridge sees it."""
    case = case_from(atheris.FuzzedDataProvider(data))
    pairs = handler_query(case.query_string)
    return None if pairs is None else check(case, pairs)


class Crash(AssertionError):
    """The request path broke its contract on an input (raised, not asserted, so that -O keeps it)."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Crash(what)


def check(case: Case, pairs: list[tuple[str, str]]) -> Record | BridgeError:
    """Run the request path on one request; it must end in a record or a 4xx `BridgeError`."""
    try:
        query = checked_query(pairs, case.signature, case.sdk_app_ids)
        callback = parse_callback(query, case.body, received_at_ms=NOW_MS, max_event_age_ms=MAX_EVENT_AGE_MS)
        routed = callback.routed
        record = callback.record(TOPIC_FOR(routed.topic_group))
    except BridgeError as error:
        check_refused(case, error)
        return error
    check_accepted(case, query, routed, record)
    return record


def check_refused(case: Case, error: BridgeError) -> None:
    """A refusal is a bad callback, a failed signature check (only when signing is on) or another app
    (only with a list of apps), answered 4xx with a FAIL body that encodes."""
    if isinstance(error, BadCallback):
        expect(error.status == 400, f"a bad callback answered {error.status}")
    elif isinstance(error, Unauthorized):
        expect(case.signature is not None, "a signature refused while signing is off")
    elif isinstance(error, ForbiddenApp):
        expect(bool(case.sdk_app_ids), "an app refused while every app is allowed")
    else:
        raise Crash(f"answered {error.status}: {error!r}")
    expect(error.status in REFUSALS, f"answered {error.status}: {error!r}")
    expect(orjson.loads(fail_body(error))["ErrorInfo"] == error.info, "the FAIL body lost the reason")


def expected_topic(command: str) -> str:
    """The README's table of topics, by the command's family (restated here, not read from the bridge)."""
    match command.partition(".")[0]:
        case "OfficialAccount":
            return "tim.official-account"
        case "C2C":
            return "tim.c2c"
        case "Group":
            return "tim.group"
        case "State" | "Profile" | "Sns" | "Follow":
            return "tim.user"
        case "Alert" | "Push" | "ContentCallback" | "Bot":
            return "tim.app"
        case _:
            return "tim.unknown"


def check_accepted(case: Case, query: CallbackQuery, routed: RoutedCallback, record: Record) -> None:
    """An accepted request was allowed in, and its record holds what was posted."""
    if case.signature is not None:
        request_time, sign = query.params.get("RequestTime"), query.sign
        if request_time is None or sign is None:
            raise Crash("an unsigned request was accepted")
        expect(abs(int(request_time) - NOW_S) <= MAX_SKEW_S, "a stale signature was accepted")
        expected = {expected_sign(token, request_time) for token in TOKENS}
        expect(sign.lower() in expected, "a request with a wrong Sign was accepted")
    if case.sdk_app_ids:
        expect(query.sdk_app_id in case.sdk_app_ids, "a request of another app was accepted")
    expect(record.topic == expected_topic(routed.command), "the record is not on its family's topic")
    partition = partition_for(record.entity, PARTITIONS)  # as the publisher picks it
    expect(0 <= partition < PARTITIONS, f"partition {partition} of {PARTITIONS}")
    expect(bool(record.key), "the record has an empty key")
    expect(0 <= record.timestamp_ms < 2**63, f"timestamp {record.timestamp_ms}")
    envelope = orjson.loads(record.value)
    expect(envelope["schema"] == SCHEMA, "the envelope's schema")
    expect(envelope["received_at"] == NOW_MS, "the envelope's received_at")
    expect(envelope["query"] == query.params, "the envelope's query is not the request's")
    expect(not EXCLUDED_FROM_ENVELOPE & set(envelope["query"]), "Sign reached the envelope")
    expect(envelope["callback"] == orjson.loads(case.body), "the envelope's callback is not the body")
    expect(dict(record.headers)["CallbackCommand"] == routed.command.encode(), "the command header")
