"""The typed schemas generated from the command registry (`bridge.schema`, `bridge schema`): each known
command has a JSON Schema, ClickHouse, Flink and Spark form; every fixture's record, built by the bridge's
own code (and, in one test, read back from Kafka), validates against its command's, family's and topic's
schema; a field of the wrong type fails, as the bridge refuses it; the ClickHouse DDL and extraction run in
chDB.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from bridge.cli import main
from bridge.errors import InvalidField
from bridge.schema import clickhouse, flink, shipped, spark
from bridge.schema.entity import entity_shape
from bridge.schema.json_schema import json_schema
from bridge.schema.model import (
    Kind,
    SchemaError,
    Selection,
    by_command,
    by_family,
    by_topic,
    merge,
    select,
    topics,
    typed_fields,
)
from bridge.settings import ServeSettings, TopicLayout
from bridge.tencent import commands
from bridge.tencent.callback import parse_callback
from bridge.tencent.commands import COMMANDS, FAMILIES, CommandSpec, TopicGroup
from bridge.tencent.partitioner import partition_for
from bridge.tencent.protocol import parse_query
from bridge.tencent.rejected import json_schema as rejected_json_schema
from tests.conftest import BridgeClient
from tests.support import flink_parser
from tests.support.records import read_records
from tests.support.requests import FIXTURES

# chDB ships no type hints for its functions: used through Any.
CHDB: Any = importlib.import_module("chdb")
CHDB_SESSION: Any = importlib.import_module("chdb.session")
RECEIVED_AT_MS = 1_764_143_520_123
SAMPLES = Path(__file__).parent.parent / "bridge" / "tencent" / "samples"
QUERY = {"SdkAppid": "1400000000", "contenttype": "json", "ClientIP": "127.0.0.1", "OptPlatform": "RESTAPI"}


# --- the callbacks: the fixtures, Tencent's samples, and a body per known command ----------------------


def fixture_callbacks() -> list[tuple[str, dict[str, str], bytes]]:
    """(name, query, raw body) of every fixture (tests/fixtures, the same as the shared realistic requests)
    and every sample shipped in bridge/tencent/samples."""
    callbacks = []
    for path in sorted(FIXTURES.glob("*.json")):
        data = orjson.loads(path.read_bytes())
        callbacks.append((data["name"], data["query"], orjson.dumps(data["body"])))
    for path in sorted(SAMPLES.glob("*.json")):
        data = orjson.loads(path.read_bytes())
        callbacks.append((f"sample {path.stem}", data["query"], orjson.dumps(data["body"])))
    return callbacks


FIXTURE_CALLBACKS = fixture_callbacks()

_GOOD: dict[Kind, Any] = {
    Kind.STRING: "text",
    Kind.NON_EMPTY_STRING: "text",
    Kind.INTEGER: 7,
    Kind.EVENT_TIME: 1_764_143_400_000,
    Kind.ARRAY: [{"From_Account": "pair-from", "To_Account": "pair-to"}],
    Kind.OBJECT: {"Action": "Login", "To_Account": "info-user"},
    Kind.MSG_BODY: [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hello"}}],
}
_WRONG: dict[Kind, tuple[Any, ...]] = {
    Kind.STRING: (5, None, ["text"]),
    Kind.NON_EMPTY_STRING: ("", 5, {"a": 1}),
    Kind.INTEGER: ("7", 1.5, True, None),
    Kind.EVENT_TIME: ("soon", 1.5, False, "12 34", [1]),
    Kind.ARRAY: ({}, "[]", 3),
    Kind.OBJECT: ([], "{}", 3),
    Kind.MSG_BODY: ({}, [5], [{"MsgContent": {}}], [{"MsgType": 1}]),
}


def body_of(spec: CommandSpec) -> dict[str, Any]:
    """A body with every documented field of `spec`, each of its type, the strings told apart by field."""
    body: dict[str, Any] = {"CallbackCommand": spec.name}
    for field in typed_fields(spec):
        good = _GOOD[field.kind]
        body[field.name] = f"{field.name.lower()}-1" if isinstance(good, str) else good
    return body


def record_value(query: dict[str, str], raw_body: bytes) -> tuple[bytes, str]:
    """The record value the bridge builds for a callback, and the owning entity it routes it by."""
    parsed = parse_callback(
        parse_query(query.items()),
        raw_body,
        received_at_ms=RECEIVED_AT_MS,
        max_event_age_ms=TopicLayout().max_event_age_ms,
    )
    return parsed.record("any-topic").value, parsed.routed.entity


def record_key(query: dict[str, str], raw_body: bytes) -> str:
    parsed = parse_callback(
        parse_query(query.items()), raw_body, received_at_ms=RECEIVED_AT_MS, max_event_age_ms=3_600_000
    )
    return parsed.routed.key


def command_query(command: str) -> dict[str, str]:
    return {**QUERY, "CallbackCommand": command}


def family_of(command: str) -> str:
    return command.partition(".")[0]


def selections_of(command: str) -> list[Selection]:
    """The command's own schema, its family's and its topic's."""
    selections = [by_topic(TopicLayout().topic_for(_group(command)))]
    if command in COMMANDS:
        selections.append(by_command(command))
    if family_of(command) in FAMILIES:
        selections.append(by_family(family_of(command)))
    return selections


def _group(command: str) -> TopicGroup:
    family = FAMILIES.get(family_of(command))
    return family.topic_group if family is not None else TopicGroup.UNKNOWN


def validator(selection: Selection) -> jsonschema.Draft202012Validator:
    return _validator(selection.kind, selection.name)


@functools.cache
def _validator(kind: str, name: str) -> jsonschema.Draft202012Validator:
    by_kind = {"command": by_command, "family": by_family, "topic": by_topic}
    schema = json_schema(by_kind[kind](name))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# --- JSON Schema -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "query", "raw_body"), FIXTURE_CALLBACKS, ids=[c[0] for c in FIXTURE_CALLBACKS]
)
def test_every_fixtures_record_validates_against_its_commands_familys_and_topics_schema(
    name: str, query: dict[str, str], raw_body: bytes
) -> None:
    value, _ = record_value(query, raw_body)
    command = query["CallbackCommand"]
    assert command in COMMANDS, f"{name}: a fixture of a command the registry does not know"
    for selection in selections_of(command):
        errors = [error.message for error in validator(selection).iter_errors(orjson.loads(value))]
        assert errors == [], f"{name} against {selection.kind} {selection.name}"


def _fixture_fields() -> Iterator[tuple[str, dict[str, str], dict[str, Any], str, Kind]]:
    for name, query, raw_body in FIXTURE_CALLBACKS:
        body = orjson.loads(raw_body)
        for field in typed_fields(COMMANDS[query["CallbackCommand"]]):
            if field.name in body:
                yield name, query, body, field.name, field.kind


FIXTURE_FIELDS = list(_fixture_fields())


@pytest.mark.parametrize(
    ("name", "query", "body", "field", "kind"), FIXTURE_FIELDS, ids=[f"{f[0]}-{f[3]}" for f in FIXTURE_FIELDS]
)
def test_a_fixture_with_a_field_of_the_wrong_type_fails_validation_as_the_bridge_refuses_it(
    name: str, query: dict[str, str], body: dict[str, Any], field: str, kind: Kind
) -> None:
    good_value, _ = record_value(query, orjson.dumps(body))
    for selection in selections_of(query["CallbackCommand"]):
        check = validator(selection)
        for wrong in _WRONG[kind]:
            with pytest.raises(InvalidField):
                record_value(query, orjson.dumps({**body, field: wrong}))
            # The same record value with the field swapped: the bridge would never have written it.
            envelope = orjson.loads(good_value)
            envelope["callback"][field] = wrong
            assert not check.is_valid(envelope), (
                f"{name}: {field}={wrong!r} passes {selection.kind} {selection.name}"
            )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_known_commands_schema_accepts_what_the_bridge_accepts_and_refuses_what_it_refuses(
    command: str,
) -> None:
    spec = COMMANDS[command]
    query, body = command_query(command), body_of(spec)
    value, _ = record_value(query, orjson.dumps(body))
    checks = [validator(selection) for selection in selections_of(command)]
    for check in checks:
        assert list(check.iter_errors(orjson.loads(value))) == []
        extra = orjson.loads(value)
        extra["callback"]["FieldTencentAddsLater"] = {"any": ["thing"]}
        assert check.is_valid(extra), "a field the registry does not know is allowed"
    for field in typed_fields(spec):
        for wrong in _WRONG[field.kind]:
            with pytest.raises(InvalidField):
                record_value(query, orjson.dumps({**body, field.name: wrong}))
            changed = orjson.loads(value)
            changed["callback"][field.name] = wrong
            assert not any(check.is_valid(changed) for check in checks), f"{field.name}={wrong!r}"
        if field.required:
            missing = orjson.loads(value)
            del missing["callback"][field.name]
            assert not validator(by_command(command)).is_valid(missing), f"{field.name} missing"


ALL_SELECTIONS = [
    *(by_topic(topic) for topic in topics()),
    *(by_family(family) for family in FAMILIES),
    *(by_command(command) for command in COMMANDS),
]


@pytest.mark.parametrize(
    "selection", ALL_SELECTIONS, ids=lambda selection: f"{selection.kind}-{selection.name}"
)
def test_every_commands_familys_and_topics_json_schema_is_a_valid_draft_2020_12_schema(
    selection: Selection,
) -> None:
    jsonschema.Draft202012Validator.check_schema(json_schema(selection))


def test_an_unknown_command_of_a_family_passes_the_familys_and_topics_schema_on_the_envelope_alone() -> None:
    query = command_query("OfficialAccount.CallbackAfterSomethingNew")
    value, _ = record_value(query, b'{"Official_Account": 12, "MsgTime": "not checked"}')
    for selection in (by_family("OfficialAccount"), by_topic("tim.official-account")):
        assert validator(selection).is_valid(orjson.loads(value))
    other = orjson.loads(value)
    other["query"]["CallbackCommand"] = other["callback"]["CallbackCommand"] = "C2C.CallbackAfterSendMsg"
    assert not validator(by_family("OfficialAccount")).is_valid(other), "a C2C record is not of the family"


def test_the_shipped_files_are_the_generators_output_and_none_is_stale() -> None:
    """After a change, `python -m bridge.schema.shipped` writes them again."""
    expected = shipped.expected()
    on_disk = {path.relative_to(shipped.FOLDER).as_posix() for path in shipped.FOLDER.glob("*/*")}
    assert on_disk == set(expected)
    for relative, content in expected.items():
        assert (shipped.FOLDER / relative).read_text(encoding="utf-8") == content, relative
    assert shipped.command_schema("State.StateChange") == json_schema(by_command("State.StateChange"))


# --- the merge of a family's or a topic's fields ---------------------------------------------------------


def test_a_field_two_commands_type_differently_is_any_and_a_string_required_by_one_is_a_plain_string() -> (
    None
):
    one = CommandSpec(
        "OfficialAccount.A",
        commands.OFFICIAL_ACCOUNT,
        commands.OFFICIAL_ACCOUNT.entity,
        (commands.required("Who"), commands.optional("Count", commands.integer)),
    )
    other = CommandSpec(
        "OfficialAccount.B",
        commands.OFFICIAL_ACCOUNT,
        commands.OFFICIAL_ACCOUNT.entity,
        (commands.optional("Who", commands.string), commands.optional("Count", commands.string)),
    )
    fields = {field.name: field for field in merge((one, other), single=False)}
    assert (fields["Who"].kind, fields["Who"].required) == (Kind.STRING, False)
    assert fields["Count"].kind is Kind.ANY
    selection = Selection("family", "OfficialAccount", "tim.official-account", (one, other), ())
    types = {column.name: column.type for column in clickhouse.columns(selection)}
    assert types["Count"] == "Nullable(String)"
    assert types["Who"] == "Nullable(String)"
    assert "`Count` STRING" in flink.callback_row(selection)


def test_a_command_selection_keeps_required_fields_and_a_family_selection_makes_every_field_optional() -> (
    None
):
    assert {f.name for f in by_command("C2C.CallbackAfterSendMsg").fields if f.required} == {
        "From_Account",
        "To_Account",
    }
    assert not any(field.required for field in by_family("C2C").fields)
    assert not any(field.required for field in by_topic("tim.c2c").fields)


def test_a_registry_check_without_a_schema_type_is_refused_by_name() -> None:
    spec = CommandSpec("Group.X", commands.GROUP, commands.GROUP.entity, (commands.optional("Odd", len),))  # type: ignore[arg-type]
    with pytest.raises(SchemaError, match="'Odd' is checked by 'len'"):
        typed_fields(spec)


@pytest.mark.parametrize("command", COMMANDS)
def test_the_entity_rule_read_from_the_registry_gives_the_bridges_entity(command: str) -> None:
    spec = COMMANDS[command]
    body = body_of(spec)
    shape = entity_shape(spec.entity)
    _, entity = record_value(command_query(command), orjson.dumps(body))

    def at(path: tuple[str | int, ...]) -> Any:
        value: Any = body
        for step in path:
            value = value[step]
        return value

    parts = [at(path) for path in shape.paths]
    assert entity == (":".join(sorted(parts)) if parts else QUERY["SdkAppid"])


# --- ClickHouse, run in chDB --------------------------------------------------------------------------------


def _jsonl(values: list[bytes], path: Path) -> str:
    path.write_bytes(b"".join(value + b"\n" for value in values))
    return f"file('{path}', 'JSONAsString')"


def _rows(query: str) -> list[dict[str, Any]]:
    text = CHDB.query(query, "JSONEachRow").data()
    return [orjson.loads(line) for line in text.splitlines() if line]


# Commands the bridge does not know, in known families and in none: they still reach a topic's tables.
UNKNOWN_COMMANDS: dict[str, dict[str, Any]] = {
    "OfficialAccount.CallbackAfterSomethingNew": {
        "Official_Account": "@TOA#_new",
        "EventTime": "1764143400000",
    },
    "Alert.CallbackOnQuota": {"Quota": 3},
    "Bot.CallbackAfterReply": {"From_Account": "bot-user"},
    "Mystery.CallbackSomething": {"Anything": [1, 2]},
}


@pytest.mark.parametrize("command", UNKNOWN_COMMANDS)
def test_a_callback_of_a_command_the_bridge_does_not_know_validates_against_its_familys_and_topics_schema(
    command: str,
) -> None:
    raw = orjson.dumps({"CallbackCommand": command, **UNKNOWN_COMMANDS[command]})
    envelope = orjson.loads(record_value(command_query(command), raw)[0])
    for selection in selections_of(command):
        assert list(validator(selection).iter_errors(envelope)) == [], selection.name


def _all_callbacks() -> list[tuple[str, dict[str, str], bytes]]:
    synthetic = [(c, command_query(c), orjson.dumps(body_of(s))) for c, s in COMMANDS.items()]
    unknown = [
        (c, command_query(c), orjson.dumps({"CallbackCommand": c, **b})) for c, b in UNKNOWN_COMMANDS.items()
    ]
    return FIXTURE_CALLBACKS + synthetic + unknown


def in_selection(selection: Selection, command: str) -> bool:
    """Whether a callback of `command` is one of the selection's records."""
    if selection.kind == "command":
        return command == selection.name
    return selection.all_commands or any(family_of(command) == family.name for family in selection.families)


def selection_id(selection: Selection) -> str:
    return f"{selection.kind}-{selection.name}"


@pytest.mark.parametrize("topic", topics())
def test_the_clickhouse_extraction_gives_the_bridges_entity_and_the_fields_typed(
    topic: str, tmp_path: Path
) -> None:
    """Over JSON Lines of envelopes, as `bridge consume` writes them and the chDB recipe reads them."""
    selection = by_topic(topic)
    callbacks = [
        c for c in _all_callbacks() if TopicLayout().topic_for(_group(c[1]["CallbackCommand"])) == topic
    ]
    built = [record_value(query, raw) for _, query, raw in callbacks]
    keys = [record_key(query, raw) for _, query, raw in callbacks]
    source = _jsonl([value for value, _ in built], tmp_path / "events.jsonl")
    rows = _rows(clickhouse.extraction_query(selection, source))
    assert len(rows) == len(callbacks)
    names = [column.name for column in clickhouse.columns(selection)]
    for row, (name, query, raw), (_, entity), key in zip(rows, callbacks, built, keys, strict=True):
        assert list(row) == names
        body = orjson.loads(raw)
        assert row["entity"] == entity, name
        assert row["key"] == (None if ":sha256:" in key else key), name
        assert row["CallbackCommand"] == query["CallbackCommand"]
        assert row["SdkAppid"] == query["SdkAppid"]
        assert orjson.loads(row["callback"]) == body
        for field in selection.fields:
            value = row[field.name]
            if field.name not in body:
                assert value in (None, ""), f"{name}: {field.name}"
            elif field.kind in (Kind.STRING, Kind.NON_EMPTY_STRING, Kind.INTEGER):
                assert value == body[field.name] or int(value) == body[field.name], f"{name}: {field.name}"
            elif field.kind is Kind.EVENT_TIME:
                assert int(value) == int(body[field.name]), name
            else:
                assert orjson.loads(value) == body[field.name], f"{name}: {field.name}"
        event_ms = int(body["EventTime"]) if "EventTime" in body else RECEIVED_AT_MS
        assert row["event_time"].replace(" ", "T") == _iso(event_ms), name


def _iso(ms: int) -> str:
    import datetime  # noqa: PLC0415

    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}"


def test_a_commands_extraction_keeps_its_records_only(tmp_path: Path) -> None:
    values = [record_value(q, raw)[0] for _, q, raw in FIXTURE_CALLBACKS]
    source = _jsonl(values, tmp_path / "events.jsonl")
    command = "OfficialAccount.CallbackAfterSendMsg"
    rows = _rows(clickhouse.extraction_query(by_command(command), source))
    expected = sum(1 for _, query, _ in FIXTURE_CALLBACKS if query["CallbackCommand"] == command)
    assert expected >= 2
    assert [row["CallbackCommand"] for row in rows] == [command] * expected
    assert len(_rows(clickhouse.extraction_query(by_family("OfficialAccount"), source))) == sum(
        1 for _, query, _ in FIXTURE_CALLBACKS if query["CallbackCommand"].startswith("OfficialAccount.")
    )


@pytest.fixture(scope="module")
def clickhouse_session() -> Iterator[Any]:
    session = CHDB_SESSION.Session()
    yield session
    session.close()


_STAND_IN = """CREATE TABLE {name} (`value` String, `_key` String, `_timestamp_ms` Nullable(DateTime64(3)),
`_partition` UInt64, `_offset` UInt64, `_headers.name` Array(String), `_headers.value` Array(String))
ENGINE = Memory"""


@pytest.mark.parametrize(
    "selection", [*(by_topic(t) for t in topics()), *(by_command(c) for c in COMMANDS)], ids=selection_id
)
def test_the_clickhouse_pipeline_is_created_and_its_view_fills_the_mergetree_target(
    selection: Selection, clickhouse_session: Any
) -> None:
    """chDB has the Kafka engine but runs no consumer: creating the Kafka table registers it (its settings
    are checked, its virtual columns there) and then fails with 'Shutdown was called'. The view is created
    on it, so its query is analysed against the engine's real virtual columns; the same query then runs
    over a stand-in table with those columns and fills the MergeTree target."""
    database = f"db_{selection.kind}_{re.sub(r'[^a-z0-9]', '_', selection.slug)}"
    session = clickhouse_session
    session.query(f"DROP DATABASE IF EXISTS {database}")
    session.query(f"CREATE DATABASE {database}")
    pipeline = clickhouse.pipeline(selection, database=database)
    with pytest.raises(RuntimeError, match="Shutdown was called"):  # chDB's own limit, not the DDL's
        session.query(pipeline.kafka_table)
    described = _session_rows(session, f"DESCRIBE TABLE {pipeline.kafka_source}")
    assert [(row["name"], row["type"]) for row in described] == [("value", "String")]
    session.query(pipeline.target_table)
    session.query(pipeline.view)
    stand_in = f"{database}.stand_in"
    session.query(_STAND_IN.format(name=stand_in))
    callbacks = [c for c in _all_callbacks() if in_selection(selection, c[1]["CallbackCommand"])]
    rows_in = []
    for offset, (_, query, raw) in enumerate(callbacks):
        value, _ = record_value(query, raw)
        command = clickhouse.literal(query["CallbackCommand"])
        rows_in.append(
            f"({clickhouse.literal(value.decode())}, 'key-{offset}', "
            f"fromUnixTimestamp64Milli(toInt64({RECEIVED_AT_MS})), 3, {offset}, "
            f"['CallbackCommand', 'SdkAppid'], [{command}, '1400000000'])"
        )
    # Forward mode's record of an app's decision shares the callbacks' topic: no view may take it.
    decision = clickhouse.literal('{"schema":"tencent-chat-kafka-bridge/app-decision/1","status":200}')
    rows_in.append(
        f"({decision}, 'key-decision', fromUnixTimestamp64Milli(toInt64({RECEIVED_AT_MS})), 3, "
        f"{len(callbacks)}, ['bridge-record', 'SdkAppid'], ['app-decision', '1400000000'])"
    )
    session.query(f"INSERT INTO {stand_in} VALUES {', '.join(rows_in)}")  # noqa: S608 - test SQL, values quoted
    target = pipeline.view.split(" TO ", 1)[1].split(" AS\n", 1)[0]
    session.query(f"INSERT INTO {target} {pipeline.view_query.replace(pipeline.kafka_source, stand_in)}")
    rows = _session_rows(session, f"SELECT entity, CallbackCommand, record_key, kafka_offset FROM {target}")  # noqa: S608 - test SQL
    assert len(rows) == len(callbacks) > 0
    assert all(row["entity"] for row in rows)
    assert sorted(int(row["kafka_offset"]) for row in rows) == list(range(len(callbacks)))
    session.query(f"DROP DATABASE {database}")


def _session_rows(session: Any, query: str) -> list[dict[str, Any]]:
    text = session.query(query, "JSONEachRow").data()
    return [orjson.loads(line) for line in text.splitlines() if line]


# --- Flink SQL: a parser of its column types and the connector's rules -------------------------------------

_SCALARS = {"STRING", "BIGINT", "INT", "BYTES", "TIMESTAMP_LTZ(3)"}
_KAFKA_METADATA = {
    "headers": "MAP<STRING, BYTES>",
    "timestamp": "TIMESTAMP_LTZ(3)",
    "partition": "INT",
    "offset": "BIGINT",
}


def flink_type(text: str) -> tuple[Any, str]:
    """Parse one Flink type at the start of `text`: (the type as nested tuples, the rest)."""
    text = text.lstrip()
    for scalar in sorted(_SCALARS, key=len, reverse=True):
        if text.startswith(scalar) and not text[len(scalar) : len(scalar) + 1].isalnum():
            return scalar, text[len(scalar) :]
    for composite in ("ARRAY<", "MAP<", "ROW<"):
        if text.startswith(composite):
            rest, items = text[len(composite) :], []
            while True:
                rest = rest.lstrip()
                if composite == "ROW<":
                    match = re.match(r"`((?:[^`]|``)+)`\s+", rest)
                    assert match, f"a ROW field needs a quoted name: {rest[:40]!r}"
                    item_type, rest = flink_type(rest[match.end() :])
                    items.append((match.group(1), item_type))
                else:
                    item_type, rest = flink_type(rest)
                    items.append(item_type)
                rest = rest.lstrip()
                if rest.startswith(","):
                    rest = rest[1:]
                    continue
                assert rest.startswith(">"), f"unclosed {composite}: {rest[:40]!r}"
                arity = {"ARRAY<": 1, "MAP<": 2}.get(composite)
                assert arity is None or len(items) == arity, composite
                return (composite[:-1], tuple(items)), rest[1:]
    raise AssertionError(f"not a Flink type: {text[:40]!r}")


def _flink_decodes(flink_type_: Any, value: Any) -> bool:
    """Whether Flink's json format reads `value` into the type (a decimal string into a BIGINT; any JSON,
    containers as their text, into a STRING)."""
    if value is None or flink_type_ == "STRING":
        return True
    if flink_type_ == "BIGINT":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and value.isdigit()
        )
    kind, items = flink_type_
    if kind == "ARRAY":
        return isinstance(value, list) and all(_flink_decodes(items[0], item) for item in value)
    if kind == "ROW":
        return isinstance(value, dict) and all(_flink_decodes(t, value.get(name)) for name, t in items)
    return False


@pytest.mark.parametrize(
    "selection", [*(by_topic(t) for t in topics()), *(by_command(c) for c in COMMANDS)], ids=selection_id
)
def test_the_flink_ddl_is_a_kafka_json_table_with_metadata_a_watermark_and_types_that_read_the_records(
    selection: Selection,
) -> None:
    ddl = flink.ddl(selection)
    body = re.search(r"CREATE TABLE `(\w+)` \(\n(.*)\n\) WITH \(\n(.*?)\n\);", ddl, re.DOTALL)
    assert body, ddl[:300]
    options = dict(re.findall(r"'([^']+)' = '([^']*)'", body.group(3)))
    assert options["connector"] == "kafka"
    assert options["format"] == "json"
    assert options["topic"] == selection.topic
    assert {"properties.bootstrap.servers", "properties.group.id", "scan.startup.mode"} <= set(options)
    physical: dict[str, Any] = {}
    computed, watermark = {}, None
    for column in body.group(2).split(",\n"):
        line = column.strip()
        if line.startswith("WATERMARK FOR "):
            watermark = re.fullmatch(r"WATERMARK FOR `(\w+)` AS `\1` - INTERVAL '\d+' (SECOND|MINUTE)", line)
            assert watermark, line
            continue
        name, rest = re.fullmatch(r"`(\w+)` (.*)", line, re.DOTALL).groups()  # type: ignore[union-attr]
        if rest.startswith("AS "):
            computed[name] = rest
            continue
        parsed, tail = flink_type(rest)
        if tail.strip():
            key = re.fullmatch(r"METADATA FROM '(\w+)' VIRTUAL", tail.strip())
            assert key, tail
            assert rest[: len(rest) - len(tail)] == _KAFKA_METADATA[key.group(1)]
        else:
            physical[name] = parsed
    assert watermark is not None
    assert watermark.group(1) in computed
    assert computed["event_time"].startswith(
        "AS TO_TIMESTAMP_LTZ(COALESCE(`callback`.`EventTime`, `received_at`), 3)"
    )
    callback = dict(physical["callback"][1])
    assert callback["EventTime"] == "BIGINT"
    assert list(physical) == ["schema", "received_at", "query", "callback"]
    for _, query, raw in _all_callbacks():
        if in_selection(selection, query["CallbackCommand"]):
            envelope = orjson.loads(record_value(query, raw)[0])
            for name, column_type in physical.items():
                assert _flink_decodes(column_type, envelope[name]), (query["CallbackCommand"], name)
    if selection.kind == "command":
        view = f"CREATE VIEW `{selection.slug}` AS SELECT * FROM `{body.group(1)}` WHERE "  # noqa: S608 - expected text
        assert view in ddl


@pytest.mark.skipif(
    not flink_parser.available(), reason="Apache Flink's SQL parser needs java, javac and mvn"
)
def test_apache_flinks_own_sql_parser_parses_every_generated_ddl_and_refuses_a_broken_one(
    tmp_path: Path,
) -> None:
    """Flink's parser (flink-sql-parser from Maven Central, tests/support/flink/): the table and view
    statements of every command, family and topic parse; the same DDL with a type broken does not."""
    selections = [
        *(by_topic(topic) for topic in topics()),
        *(by_family(family) for family in FAMILIES),
        *(by_command(command) for command in COMMANDS),
    ]
    files = {}
    for selection in selections:
        path = tmp_path / f"{selection_id(selection)}.sql"
        path.write_text(flink.ddl(selection), encoding="utf-8")
        files[path] = ["CREATE_TABLE"] if selection.kind == "topic" else ["CREATE_TABLE", "CREATE_VIEW"]
    broken = tmp_path / "broken.sql"
    broken.write_text(flink.ddl(by_topic("tim.c2c")).replace("BIGINT", "BIGINT<", 1), encoding="utf-8")
    parsed = flink_parser.parse([*files, broken])
    assert {path: parsed[path] for path in files} == files
    assert parsed[broken][0] == "ERROR"


# --- Spark: the StructType's JSON ---------------------------------------------------------------------

_SPARK_ATOMIC = {"string", "long", "integer", "boolean", "double", "binary", "timestamp"}


def spark_type_is_valid(data_type: Any) -> bool:
    """The shape `DataType.fromJson` reads: an atomic name, or an array, map or struct object."""
    if isinstance(data_type, str):
        return data_type in _SPARK_ATOMIC
    match data_type:
        case {"type": "array", "elementType": element, "containsNull": bool()}:
            return spark_type_is_valid(element)
        case {"type": "struct", "fields": list(fields)}:
            return all(
                set(field) == {"name", "type", "nullable", "metadata"}
                and isinstance(field["name"], str)
                and isinstance(field["nullable"], bool)
                and isinstance(field["metadata"], dict)
                and spark_type_is_valid(field["type"])
                for field in fields
            ) and len({field["name"] for field in fields}) == len(fields)
    return False


def _spark_reads(data_type: Any, value: Any) -> bool:
    """Whether Spark's JSON reader fills the type from `value` without a null: a string field takes any
    JSON (a number's or container's text), a long only an integer."""
    if value is None or data_type == "string":
        return True
    if data_type == "long":
        return isinstance(value, int) and not isinstance(value, bool)
    if data_type["type"] == "array":
        return isinstance(value, list) and all(_spark_reads(data_type["elementType"], v) for v in value)
    return isinstance(value, dict) and all(
        _spark_reads(f["type"], value.get(f["name"])) for f in data_type["fields"]
    )


@pytest.mark.parametrize(
    "selection", [*(by_topic(t) for t in topics()), *(by_command(c) for c in COMMANDS)], ids=selection_id
)
def test_the_spark_struct_type_has_the_shape_spark_reads_and_reads_every_record(selection: Selection) -> None:
    struct = spark.struct_type(selection)
    assert spark_type_is_valid(struct)
    assert [field["name"] for field in struct["fields"]] == ["schema", "received_at", "query", "callback"]
    for _, query, raw in _all_callbacks():
        if in_selection(selection, query["CallbackCommand"]):
            assert _spark_reads(struct, orjson.loads(record_value(query, raw)[0])), query["CallbackCommand"]
    try:
        from pyspark.sql.types import StructType  # noqa: PLC0415
    except ImportError:
        return  # without pyspark (the `spark` extra) the shape and reading checks above are all
    assert StructType.fromJson(struct).jsonValue() == struct


# --- `bridge schema` ---------------------------------------------------------------------------------------


def run(
    argv: list[str], capsys: pytest.CaptureFixture[str], environ: dict[str, str] | None = None
) -> tuple[int, str, str]:
    status = main(["schema", *argv], environ or {})
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_bridge_schema_prints_the_json_schema_that_validates_a_whole_record(
    capsys: pytest.CaptureFixture[str],
) -> None:
    command = "OfficialAccount.CallbackAfterSendMsg"
    status, out, _ = run(["--format", "json-schema", "--command", command], capsys)
    assert status == 0
    schema = orjson.loads(out)
    assert schema == json_schema(by_command(command))
    _, query, raw = next(c for c in FIXTURE_CALLBACKS if c[1]["CallbackCommand"] == command)
    jsonschema.validate(orjson.loads(record_value(query, raw)[0]), schema)


def test_bridge_schema_of_the_dead_letter_topic_is_the_json_schema_of_what_consume_prints_of_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its values are refused bodies as posted, maybe not JSON: no columns to give, one JSON Schema; the
    topic's name follows --rejected-topic's variable as the callback topics follow theirs."""
    environ = {"BRIDGE_REJECTED_TOPIC": "app7.rejected"}
    status, out, _ = run(["--format", "json-schema", "--topic", "app7.rejected"], capsys, environ)
    assert (status, orjson.loads(out)) == (0, rejected_json_schema())
    status, _, err = run(["--format", "clickhouse", "--topic", "app7.rejected"], capsys, environ)
    assert status == 2
    assert "app7.rejected is the dead-letter topic" in err


@pytest.mark.parametrize("output_format", ["json-schema", "clickhouse", "clickhouse-query", "flink", "spark"])
def test_bridge_schema_prints_every_format_for_a_topic(
    output_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(["--format", output_format, "--topic", "tim.official-account"], capsys)
    assert (status, err) == (0, "")
    selection = by_topic("tim.official-account")
    expected = {
        "json-schema": lambda: (
            orjson.dumps(json_schema(selection), option=orjson.OPT_INDENT_2).decode() + "\n"
        ),
        "clickhouse": lambda: clickhouse.ddl(selection),
        "clickhouse-query": lambda: (
            clickhouse.extraction_query(selection, "file('events.jsonl', 'JSONAsString')") + "\n"
        ),
        "flink": lambda: flink.ddl(selection),
        "spark": lambda: orjson.dumps(spark.struct_type(selection)).decode() + "\n",
    }[output_format]()
    assert out == expected


def test_bridge_schema_resolves_a_topic_by_serves_topic_settings_and_writes_the_brokers_given(
    capsys: pytest.CaptureFixture[str],
) -> None:
    environ = {"BRIDGE_C2C_TOPIC": "chat.one-to-one", "BRIDGE_BOOTSTRAP_SERVERS": "kafka-1:9092,kafka-2:9092"}
    status, out, _ = run(["--format", "flink", "--topic", "chat.one-to-one"], capsys, environ)
    assert status == 0
    assert "'topic' = 'chat.one-to-one'" in out
    assert "'properties.bootstrap.servers' = 'kafka-1:9092,kafka-2:9092'" in out
    assert "`From_Account` STRING" in out
    status, _, err = run(["--topic", "tim.c2c"], capsys, environ)
    assert status == 2
    assert "unknown topic 'tim.c2c'" in err
    assert "chat.one-to-one" in err


@pytest.mark.parametrize(
    ("argv", "message", "listed"),
    [
        (
            ["--command", "OfficialAccount.Nope"],
            "unknown command 'OfficialAccount.Nope'",
            "C2C.CallbackAfterSendMsg",
        ),
        (["--family", "Nope"], "unknown command family 'Nope'", "OfficialAccount, C2C, Group"),
        (["--topic", "tim.nope"], "unknown topic 'tim.nope'", "tim.official-account, tim.c2c"),
        ([], "give exactly one of --command, --family or --topic", "--family"),
        (["--family", "C2C", "--topic", "tim.c2c"], "give exactly one of", "--command"),
    ],
)
def test_bridge_schema_exits_2_naming_the_known_commands_families_or_topics(
    argv: list[str], message: str, listed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(argv, capsys)
    assert (status, out) == (2, "")
    assert err.startswith(f"bridge schema: {message}")
    assert listed in err


def test_bridge_schema_refuses_an_unknown_format_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["schema", "--format", "avro", "--command", "C2C.CallbackAfterSendMsg"], {})
    assert exit_info.value.code == 2
    assert "json-schema, clickhouse, clickhouse-query, flink, spark" in capsys.readouterr().err


def test_bridge_schema_help_names_each_format_and_the_one_of_rule(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["schema", "--help"], {})
    text = " ".join(capsys.readouterr().out.split())
    for part in (
        "json-schema",
        "clickhouse-query",
        "flink",
        "spark",
        "exactly one of --command, --family or --topic",
    ):
        assert part in text
    assert "BRIDGE_SCHEMA_FORMAT" in text


def test_every_selection_is_named_by_exactly_one_flag() -> None:
    assert select(command="C2C.CallbackAfterSendMsg").kind == "command"
    assert select(family="Group").commands == tuple(
        s for s in COMMANDS.values() if s.family is commands.GROUP
    )
    assert {spec.family.name for spec in select(topic="tim.user").commands} == {
        "State",
        "Profile",
        "Sns",
        "Follow",
    }
    assert select(topic="tim.unknown").commands == ()


# --- records read back from Apache Kafka ----------------------------------------------------------------


async def test_records_read_back_from_kafka_validate_and_the_clickhouse_entity_is_their_partitions(
    bridge: BridgeClient, settings: ServeSettings, tmp_path: Path
) -> None:
    """Every fixture, through a bridge into Apache Kafka and read back: each record value validates against
    its command's and its topic's schema, and the entity ClickHouse extracts from it hashes to the
    partition the record is on."""
    posted = []
    for name, query, raw in FIXTURE_CALLBACKS:
        if name.startswith("sample "):
            continue  # the samples are the fixtures' sources: one of each is enough through Kafka
        response = await bridge.post("/callback", params=query, data=raw)
        assert response.status == 200, await response.text()
        posted.append(query["CallbackCommand"])
    records = await read_records(",".join(settings.bootstrap_servers), settings.topics, expect=len(posted))
    assert sorted(r.headers[0][1].decode() for r in records if r.headers) == sorted(posted)
    topic_names = {settings.topic_for(group): TopicLayout().topic_for(group) for group in TopicGroup}
    for record in records:
        assert record.value is not None
        envelope = orjson.loads(record.value)
        command = envelope["query"]["CallbackCommand"]
        jsonschema.validate(envelope, json_schema(by_command(command)))
        topic = by_topic(topic_names[record.topic])
        jsonschema.validate(envelope, json_schema(topic))
        source = _jsonl([record.value], tmp_path / f"{record.topic}-{record.offset}.jsonl")
        (row,) = _rows(clickhouse.extraction_query(topic, source))
        assert partition_for(row["entity"], settings.partitions) == record.partition
        broken = orjson.loads(record.value)
        broken["callback"]["EventTime"] = "yesterday"
        assert not jsonschema.Draft202012Validator(json_schema(by_command(command))).is_valid(broken)
