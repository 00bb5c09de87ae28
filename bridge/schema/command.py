"""`bridge schema`: print the JSON Schema, ClickHouse DDL or query, Flink SQL table or Spark `StructType` of
one command, a family or a topic, generated from the command registry.

A topic is named as serve's topic settings name it: the defaults (`tim.official-account`...), or the names
the service's variables give (`BRIDGE_TOPIC`, `BRIDGE_C2C_TOPIC`...) when they are set here too.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import IO

import orjson

from bridge.errors import CommandError, ExitStatus
from bridge.schema import clickhouse, flink, spark
from bridge.schema.json_schema import json_schema
from bridge.schema.model import SchemaError, Selection, TopicFor, select
from bridge.settings import COMMANDS, SchemaSettings, SettingsError, TopicLayout
from bridge.settings.service_options import TOPIC_NAMES
from bridge.tencent.rejected import json_schema as rejected_schema


def topic_layout(environ: Mapping[str, str]) -> TopicLayout:
    """The topic names serve would use with this environment; the other settings are left at default."""
    topics = COMMANDS["topics"]
    names = {}
    for option in TOPIC_NAMES:
        text = environ.get(topics.env(option), "").strip()
        if text:
            try:
                names[option.field] = option.parse(text)
            except ValueError as exc:
                raise SettingsError(f"{topics.env(option)}={text!r}: {exc}") from None
    return TopicLayout(**names)


def render(settings: SchemaSettings, selection: Selection) -> str:
    """The schema of `selection` in `settings.format`, as printed."""
    servers = ",".join(settings.bootstrap_servers)
    match settings.format:
        case "json-schema":
            return orjson.dumps(json_schema(selection), option=orjson.OPT_INDENT_2).decode() + "\n"
        case "clickhouse":
            return clickhouse.ddl(selection, bootstrap_servers=servers)
        case "clickhouse-query":
            return clickhouse.extraction_query(selection, settings.source) + "\n"
        case "flink":
            return flink.ddl(selection, bootstrap_servers=servers)
        case "spark":
            return orjson.dumps(spark.struct_type(selection)).decode() + "\n"
    raise CommandError(f"unknown --format {settings.format}", ExitStatus.USAGE)


def run_schema(settings: SchemaSettings, environ: Mapping[str, str], output: IO[str] | None = None) -> int:
    try:
        layout = topic_layout(environ)
        if settings.topic is not None and settings.topic == layout.rejected_topic:
            return _dead_letter_schema(settings, output)
        topic_for: TopicFor = layout.topic_for
        selection = select(
            command=settings.command, family=settings.family, topic=settings.topic, topic_for=topic_for
        )
    except (SchemaError, SettingsError) as exc:
        raise CommandError(str(exc), ExitStatus.USAGE) from None
    (output or sys.stdout).write(render(settings, selection))
    return ExitStatus.OK


def _dead_letter_schema(settings: SchemaSettings, output: IO[str] | None) -> int:
    """The dead-letter topic's records are the refused bodies as posted, not envelopes: the one schema
    there is the JSON Schema of what `bridge consume` prints of them (`bridge.tencent.rejected`)."""
    if settings.format != "json-schema":
        raise CommandError(
            f"{settings.topic} is the dead-letter topic: its values are refused bodies as posted (maybe not "
            "JSON), so it has no column schema; --format json-schema prints the JSON Schema of the lines "
            "bridge consume prints of it",
            ExitStatus.USAGE,
        )
    (output or sys.stdout).write(orjson.dumps(rejected_schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return ExitStatus.OK
