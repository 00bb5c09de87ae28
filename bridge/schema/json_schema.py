"""JSON Schemas (draft 2020-12) of the record value: the envelope's schema with a typed `callback`.

Each documented field of a command is typed as the bridge checks it; unknown fields stay allowed (Tencent
adds fields), so a schema accepts what the bridge accepts and refuses a documented field of the wrong type.
A family's or a topic's schema applies each known command's callback schema to the records of that command
(`if` the envelope names it, `then` its callback is typed), and lets the family's other commands through
with the envelope's checks alone.
"""

from __future__ import annotations

import copy
from typing import Any

from bridge.schema.model import Kind, Selection, TypedField, by_command
from bridge.tencent.commands import CommandSpec
from bridge.tencent.envelope import json_schema as envelope_schema

_ID = "urn:tencent-chat-kafka-bridge:callback:1"


_FIELD_SCHEMAS: dict[Kind, dict[str, Any]] = {
    Kind.STRING: {"type": "string"},
    Kind.NON_EMPTY_STRING: {"type": "string", "minLength": 1},
    Kind.INTEGER: {"type": "integer"},
    Kind.EVENT_TIME: {
        "description": "Milliseconds since the Unix epoch, as an integer or its decimal string.",
        "type": ["integer", "string"],
        "pattern": "^[0-9]{1,19}$",
    },
    Kind.ARRAY: {"type": "array"},
    Kind.OBJECT: {"type": "object"},
    Kind.MSG_BODY: {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["MsgType"],
            "properties": {"MsgType": {"type": "string"}},
        },
    },
    Kind.ANY: {},
}


def field_schema(kind: Kind) -> dict[str, Any]:
    """The JSON Schema of one field of a kind, as strict as the bridge's check."""
    return copy.deepcopy(_FIELD_SCHEMAS[kind])


def callback_schema(spec: CommandSpec, fields: tuple[TypedField, ...]) -> dict[str, Any]:
    """The schema of the callback body of one command: its documented fields typed, others allowed."""
    properties: dict[str, Any] = {"CallbackCommand": {"const": spec.name}}
    properties.update({field.name: field_schema(field.kind) for field in fields})
    schema: dict[str, Any] = {
        "description": f"The body of a {spec.name} callback, as Tencent posted it.",
        "type": "object",
        "properties": properties,
        "additionalProperties": True,
    }
    if required := [field.name for field in fields if field.required]:
        schema["required"] = required
    return schema


def _names_command(command: str) -> dict[str, Any]:
    """An envelope whose query or callback names `command` (the bridge takes either; they must agree)."""
    named = {"required": ["CallbackCommand"], "properties": {"CallbackCommand": {"const": command}}}
    return {"anyOf": [{"properties": {"query": named}}, {"properties": {"callback": named}}]}


def _family_pattern(selection: Selection) -> str | None:
    if selection.all_commands:
        return None
    names = "|".join(sorted(family.name for family in selection.families))
    return f"^({names})\\." if names else None


def json_schema(selection: Selection) -> dict[str, Any]:
    """The schema of the record value of every callback in `selection`."""
    schema = copy.deepcopy(envelope_schema())
    schema["$id"] = f"{_ID}:{selection.kind}:{selection.name}"
    properties = schema["properties"]
    if selection.kind == "command":
        (spec,) = selection.commands
        schema["title"] = f"{spec.name} callback record, envelope version 1"
        schema["description"] = (
            f"The value of a record of a {spec.name} callback on {selection.topic}: the bridge's envelope, "
            "with the callback's documented fields typed. Fields Tencent adds are allowed."
        )
        properties["query"]["properties"]["CallbackCommand"] = {"const": spec.name}
        properties["callback"] = callback_schema(spec, selection.fields)
        return schema
    schema["title"] = f"Callback records of {selection.kind} {selection.name}, envelope version 1"
    schema["description"] = (
        f"The value of a record on {selection.topic} from {selection.kind} {selection.name}: the bridge's "
        "envelope; the callback of each known command is typed as that command's schema says, other "
        "commands of these families pass with the envelope's checks. Fields Tencent adds are allowed."
    )
    if (pattern := _family_pattern(selection)) is not None:
        command = {"CallbackCommand": {"type": "string", "pattern": pattern}}
        properties["query"]["properties"].update(command)
        properties["callback"] = {**properties["callback"], "properties": command}
    typed = [
        {
            "if": _names_command(spec.name),
            "then": {"properties": {"callback": callback_schema(spec, by_command(spec.name).fields)}},
        }
        for spec in selection.commands
    ]
    if typed:  # JSON Schema wants a non-empty allOf; a family the registry knows no command of has none
        schema["allOf"] = typed
    return schema
