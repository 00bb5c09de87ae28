"""ClickHouse: the column extraction of a selection's records, and the DDL of a Kafka ingestion pipeline.

`columns(selection, json_column)` is the typed column list, each with the `JSONExtract*` expression that
computes it from a String column holding one record value (the envelope); `select_list` and
`extraction_query` are that list as SQL, to run as they are over any such column: the Kafka engine
table's `value`, or `bridge consume`'s JSON Lines read with `file('events.jsonl', 'JSONAsString')` (whose
column is `json`). Every expression stands alone (none refers to another's alias), so a job may take any
subset of the list.

`ddl(selection, ...)` is the pipeline: a Kafka engine table reading the topic's values as raw strings, a
MergeTree table ordered by (owning entity, event time), and a materialized view from one to the other that
runs the extraction and adds the record's key, timestamp, partition, offset and headers from the Kafka
engine's virtual columns.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.schema.entity import EntityShape, entity_shape
from bridge.schema.model import Kind, Selection
from bridge.tencent.commands import (
    UNKNOWN_FAMILY,
    KeyRule,
    event_key,
    group_message_key,
    message_key,
)

DEFAULT_BOOTSTRAP = "localhost:9092"
ENVELOPE_COLUMNS = (
    "schema",
    "received_at",
    "SdkAppid",
    "CallbackCommand",
    "entity",
    "key",
    "event_time",
    "query",
)
"""The columns of every selection, before the callback's fields; `callback` (the raw body) comes last."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    expression: str
    """Computes the column from the JSON String column the extraction was made for."""


def quote(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _path(json_column: str, *path: str | int) -> str:
    """The arguments of a JSONExtract* call: the column and the keys (1-based indexes for arrays)."""
    steps = [str(step + 1) if isinstance(step, int) else literal(step) for step in path]
    return ", ".join([quote(json_column), *steps])


def _command(json_column: str) -> str:
    """The command the bridge resolved: the query's `CallbackCommand`, else the body's (they agree when
    both are there)."""
    query = f"JSONExtractString({_path(json_column, 'query', 'CallbackCommand')})"
    body = f"JSONExtractString({_path(json_column, 'callback', 'CallbackCommand')})"
    return f"coalesce(nullIf({query}, ''), {body})"


def _entity_of(shape: EntityShape, json_column: str) -> str:
    """The owning entity as the bridge computes it, without the fallback to the app ('' when absent)."""
    parts = [f"JSONExtractString({_path(json_column, 'callback', *path)})" for path in shape.paths]
    if not parts:
        return "''"
    if len(parts) == 1:
        return parts[0]
    both = " AND ".join(f"{part} != ''" for part in parts)
    return f"if({both}, arrayStringConcat(arraySort([{', '.join(parts)}]), ':'), '')"


def _entity(selection: Selection, json_column: str) -> str:
    """The owning entity: each known command's rule, then its family's for the others, then the app."""
    command = _command(json_column)
    branches: dict[str, list[str]] = {}
    for spec in selection.commands:
        branches.setdefault(_entity_of(entity_shape(spec.entity), json_column), []).append(literal(spec.name))
    cases = [f"{command} IN ({', '.join(names)}), {expression}" for expression, names in branches.items()]
    for family in selection.families:
        if family is not UNKNOWN_FAMILY:
            expression = _entity_of(entity_shape(family.entity), json_column)
            cases.append(f"startsWith({command}, {literal(family.name + '.')}), {expression}")
    sdk_app_id = f"JSONExtractString({_path(json_column, 'query', 'SdkAppid')})"
    if not cases:
        return sdk_app_id
    return f"ifNull(nullIf(multiIf({', '.join(cases)}, ''), ''), {sdk_app_id})"


def _key_of(rule: KeyRule, json_column: str) -> str:
    """The record key as the registry's key rule makes it, NULL where it would hash the body (SQL cannot
    redo the bridge's canonical JSON): `<command>:sha256:...` keys come only from Kafka, `_key`."""
    msg_key = f"JSONExtractString({_path(json_column, 'callback', 'MsgKey')})"
    command_key = f"if({msg_key} != '', concat({_command(json_column)}, ':', {msg_key}), NULL)"
    if rule is message_key:
        return f"if({msg_key} != '', {msg_key}, {command_key})"
    if rule is group_message_key:
        group_id = f"JSONExtractString({_path(json_column, 'callback', 'GroupId')})"
        msg_seq = _path(json_column, "callback", "MsgSeq")
        return (
            f"if({group_id} != '' AND JSONType({msg_seq}) IN ('Int64', 'UInt64'), "
            f"concat({group_id}, ':', JSONExtractRaw({msg_seq})), {command_key})"
        )
    if rule is not event_key:
        raise ValueError(f"the key rule {rule!r} has no SQL form: add it to bridge/schema/clickhouse.py")
    return command_key


def _key(selection: Selection, json_column: str) -> str:
    """The record key, each known command by its rule, the others as the bridge keys unknown commands."""
    branches: dict[str, list[str]] = {}
    for spec in selection.commands:
        branches.setdefault(_key_of(spec.key, json_column), []).append(literal(spec.name))
    if not branches:
        return f"CAST({_key_of(event_key, json_column)}, 'Nullable(String)')"
    command = _command(json_column)
    cases = [f"{command} IN ({', '.join(names)}), {expression}" for expression, names in branches.items()]
    return f"multiIf({', '.join(cases)}, {_key_of(event_key, json_column)})"


def _event_time_ms(json_column: str) -> str:
    """`EventTime` in milliseconds when it is a non-negative integer or decimal string, else NULL."""
    at = _path(json_column, "callback", "EventTime")
    return (
        f"multiIf(JSONType({at}) IN ('Int64', 'UInt64') AND JSONExtract({at}, 'Int64') >= 0, "
        f"JSONExtract({at}, 'Nullable(Int64)'), "
        f"JSONType({at}) = 'String' AND match(JSONExtractString({at}), '^[0-9]{{1,19}}$'), "
        f"toInt64OrNull(JSONExtractString({at})), NULL)"
    )


def _callback_columns(selection: Selection, json_column: str) -> list[Column]:
    out: list[Column] = []
    for field in selection.column_fields:
        name = field.name if field.name not in (*ENVELOPE_COLUMNS, "callback") else f"callback_{field.name}"
        at = _path(json_column, "callback", field.name)
        match field.kind:
            case Kind.STRING | Kind.NON_EMPTY_STRING if field.required:
                out.append(Column(name, "String", f"JSONExtractString({at})"))
            case Kind.STRING | Kind.NON_EMPTY_STRING:
                out.append(Column(name, "Nullable(String)", f"JSONExtract({at}, 'Nullable(String)')"))
            case Kind.INTEGER if field.required:
                out.append(Column(name, "Int64", f"JSONExtractInt({at})"))
            case Kind.INTEGER:
                out.append(Column(name, "Nullable(Int64)", f"JSONExtract({at}, 'Nullable(Int64)')"))
            case Kind.EVENT_TIME:
                out.append(Column(name, "Nullable(Int64)", _event_time_ms(json_column)))
            case Kind.MSG_BODY:
                out.append(Column(name, "Nullable(String)", f"nullIf(JSONExtractRaw({at}), '')"))
                out.append(
                    Column(
                        f"{name}_MsgType",
                        "Array(String)",
                        "arrayMap(element -> JSONExtractString(element, 'MsgType'), "
                        f"JSONExtractArrayRaw({at}))",
                    )
                )
            case _:  # arrays, objects, and fields two commands type differently: their JSON text
                out.append(Column(name, "Nullable(String)", f"nullIf(JSONExtractRaw({at}), '')"))
    return out


def columns(selection: Selection, json_column: str = "json") -> tuple[Column, ...]:
    """The typed columns of the selection's records, computed from `json_column` (one envelope each)."""
    received_at_ms = f"JSONExtract({_path(json_column, 'received_at')}, 'Int64')"
    envelope = [
        Column("schema", "LowCardinality(String)", f"JSONExtractString({_path(json_column, 'schema')})"),
        Column("received_at", "DateTime64(3, 'UTC')", f"fromUnixTimestamp64Milli({received_at_ms}, 'UTC')"),
        Column(
            "SdkAppid",
            "LowCardinality(String)",
            f"JSONExtractString({_path(json_column, 'query', 'SdkAppid')})",
        ),
        Column("CallbackCommand", "LowCardinality(String)", _command(json_column)),
        Column("entity", "String", _entity(selection, json_column)),
        Column("key", "Nullable(String)", _key(selection, json_column)),
        Column(
            "event_time",
            "DateTime64(3, 'UTC')",
            f"fromUnixTimestamp64Milli(ifNull({_event_time_ms(json_column)}, {received_at_ms}), 'UTC')",
        ),
        Column(
            "query",
            "Map(String, String)",
            f"JSONExtract({_path(json_column, 'query')}, 'Map(String, String)')",
        ),
    ]
    raw = Column("callback", "String", f"JSONExtractRaw({_path(json_column, 'callback')})")
    return (*envelope, *_callback_columns(selection, json_column), raw)


def select_list(selection: Selection, json_column: str = "json") -> str:
    """The extraction as a SELECT list (`expression AS name`, one a line) over `json_column`."""
    return ",\n".join(
        f"    {column.expression} AS {quote(column.name)}" for column in columns(selection, json_column)
    )


def command_filter(selection: Selection, json_column: str = "json") -> str | None:
    """The condition that keeps the selection's records, None for a topic's (all of them)."""
    command = _command(json_column)
    if selection.kind == "command":
        return f"{command} = {literal(selection.name)}"
    if selection.kind == "family":
        return f"startsWith({command}, {literal(selection.name + '.')})"
    return None


def extraction_query(selection: Selection, source: str, json_column: str = "json") -> str:
    """The whole extraction over `source` (a table or a table function, used as given), with the filter
    of a command's or family's records."""
    where = command_filter(selection, json_column)
    query = f"SELECT\n{select_list(selection, json_column)}\nFROM {source}"
    return query + (f"\nWHERE {where}" if where else "")


_KAFKA_COLUMNS = (
    Column("record_key", "String", "_key"),
    Column("kafka_timestamp", "DateTime64(3, 'UTC')", "toDateTime64(_timestamp_ms, 3, 'UTC')"),
    Column("kafka_partition", "UInt64", "_partition"),
    Column("kafka_offset", "UInt64", "_offset"),
    Column("headers", "Map(String, String)", "mapFromArrays(`_headers.name`, `_headers.value`)"),
)


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The three statements of a ClickHouse ingestion of a topic, and the view's query on its own."""

    kafka_table: str
    target_table: str
    view: str
    view_query: str
    """The view's SELECT, reading `kafka_source` (the Kafka engine table), to run over a stand-in."""
    kafka_source: str

    def sql(self, header: str = "") -> str:
        return header + "\n\n".join((self.kafka_table, self.target_table, self.view)) + "\n"


def pipeline(
    selection: Selection, *, bootstrap_servers: str = DEFAULT_BOOTSTRAP, database: str | None = None
) -> Pipeline:
    """The Kafka engine table, the MergeTree target and the materialized view between them."""
    prefix = f"{quote(database)}." if database else ""
    table = f"{prefix}{quote(selection.slug)}"
    kafka = f"{prefix}{quote(selection.slug + '_kafka')}"
    view = f"{prefix}{quote(selection.slug + '_mv')}"
    target_columns = (*columns(selection, "value"), *_KAFKA_COLUMNS)
    definitions = ",\n".join(f"    {quote(column.name)} {column.type}" for column in target_columns)
    select = ",\n".join(f"    {column.expression} AS {quote(column.name)}" for column in target_columns)
    # The record's CallbackCommand header says which command it is without parsing the value.
    header = "`_headers.value`[indexOf(`_headers.name`, 'CallbackCommand')]"
    if selection.kind == "command":
        where = f"\nWHERE {header} = {literal(selection.name)}"
    elif selection.kind == "family":
        where = f"\nWHERE startsWith({header}, {literal(selection.name + '.')})"
    else:  # a topic: its callbacks, not forward mode's decision records, which have no CallbackCommand
        where = "\nWHERE has(`_headers.name`, 'CallbackCommand')"
    view_query = f"SELECT\n{select}\nFROM {kafka}{where}"
    return Pipeline(
        kafka_table=f"""\
-- 1. The Kafka engine table: each record's value (the envelope, JSON) as one raw string.
CREATE TABLE IF NOT EXISTS {kafka}
(
    `value` String
)
ENGINE = Kafka
SETTINGS
    kafka_broker_list = {literal(bootstrap_servers)},
    kafka_topic_list = {literal(selection.topic)},
    kafka_group_name = {literal("clickhouse-" + selection.slug)},
    kafka_format = 'JSONAsString';""",
        target_table=f"""\
-- 2. The target: one row per record, ordered by owning entity and event time. Kafka delivers at least
-- once and Tencent retries: a copy of a callback has the same SdkAppid, CallbackCommand and record_key
-- (ReplacingMergeTree(received_at) with ORDER BY (entity, event_time, record_key) keeps one of them).
CREATE TABLE IF NOT EXISTS {table}
(
{definitions}
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (entity, event_time);""",
        view=f"""\
-- 3. The materialized view: the extraction, plus the record's key, timestamp, partition, offset, headers.
CREATE MATERIALIZED VIEW IF NOT EXISTS {view} TO {table} AS
{view_query};""",
        view_query=view_query,
        kafka_source=kafka,
    )


def ddl(
    selection: Selection, *, bootstrap_servers: str = DEFAULT_BOOTSTRAP, database: str | None = None
) -> str:
    """The pipeline's three statements as one script, with a header naming what it is for."""
    flag = f"--{selection.kind} {selection.name}"
    header = (
        f"-- {selection.describe}: generated by\n"
        f"-- `bridge schema --format clickhouse {flag}` from the bridge's command registry.\n\n"
    )
    return pipeline(selection, bootstrap_servers=bootstrap_servers, database=database).sql(header)
