"""The typed fields of a selection of commands, read from the command registry: the one source every
generator (JSON Schema, ClickHouse, Flink SQL, Spark) builds from.

A selection is one command, a family or a topic (by its name in the bridge's topic layout). Each documented
field of a command has a `Kind`, from the check the registry runs on it (`commands.integer` is an integer,
`commands.event_time` an integer or its decimal string...). A family or a topic covers several commands:
their fields are merged into one list, each field once, in the order the registry first names it; a field
that two commands check differently becomes `Kind.ANY` (the raw JSON text in the column formats), and a
field is required only where every command of a single-command selection requires it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from bridge.settings.parts import TopicLayout
from bridge.tencent import commands
from bridge.tencent.commands import COMMANDS, FAMILIES, UNKNOWN_FAMILY, CommandSpec, Family, TopicGroup


class Kind(StrEnum):
    """What a documented field holds, as far as the registry checks it."""

    STRING = "string"
    NON_EMPTY_STRING = "non-empty string"
    INTEGER = "integer"
    EVENT_TIME = "event time"
    """Milliseconds since the epoch, as an integer or its decimal string (some Tencent samples send one)."""
    ARRAY = "array"
    OBJECT = "object"
    MSG_BODY = "message body"
    """An array of message elements, each an object with a string `MsgType` (and a `MsgContent` object)."""
    ANY = "any"
    """Checked differently by two commands of a selection: kept as raw JSON."""


_KINDS: Mapping[Callable[[Any], str | None], Kind] = {
    commands.string: Kind.STRING,
    commands.non_empty_string: Kind.NON_EMPTY_STRING,
    commands.integer: Kind.INTEGER,
    commands.event_time: Kind.EVENT_TIME,
    commands.array: Kind.ARRAY,
    commands.json_object: Kind.OBJECT,
    commands.msg_body: Kind.MSG_BODY,
}


class SchemaError(ValueError):
    """A selection that names nothing the registry knows, or a registry check without a schema type."""


@dataclass(frozen=True, slots=True)
class TypedField:
    name: str
    kind: Kind
    required: bool


def kind_of(spec: CommandSpec, field: commands.Field) -> Kind:
    kind = _KINDS.get(field.check)
    if kind is None:
        check = getattr(field.check, "__name__", repr(field.check))
        raise SchemaError(
            f"{spec.name}: field {field.name!r} is checked by {check!r}, "
            "which has no schema type: add it to bridge/schema/model.py"
        )
    return kind


def typed_fields(spec: CommandSpec) -> tuple[TypedField, ...]:
    """The documented fields of one command, typed, in the registry's order."""
    return tuple(TypedField(field.name, kind_of(spec, field), field.required) for field in spec.fields)


def merge(specs: tuple[CommandSpec, ...], *, single: bool) -> tuple[TypedField, ...]:
    """The union of the fields of `specs`, each once; a field typed differently by two commands is `ANY`,
    a string that only some require non-empty a plain string. Required only in a `single` selection."""
    merged: dict[str, TypedField] = {}
    for spec in specs:
        for field in typed_fields(spec):
            seen = merged.get(field.name)
            if seen is None:
                merged[field.name] = TypedField(field.name, field.kind, field.required and single)
                continue
            kinds = {seen.kind, field.kind}
            if len(kinds) == 1:
                kind = seen.kind
            elif kinds == {Kind.STRING, Kind.NON_EMPTY_STRING}:
                kind = Kind.STRING
            else:
                kind = Kind.ANY
            merged[field.name] = TypedField(field.name, kind, seen.required and field.required and single)
    return tuple(merged.values())


SelectionKind = Literal["command", "family", "topic"]


@dataclass(frozen=True, slots=True)
class Selection:
    """The commands one schema covers: one command, every known command of a family, or of a topic."""

    kind: SelectionKind
    name: str
    topic: str
    """The topic these callbacks are on, in the bridge's default topic layout (or the one given)."""
    commands: tuple[CommandSpec, ...]
    families: tuple[Family, ...]
    """The families whose commands the bridge does not know also arrive (a family or topic selection)."""
    all_commands: bool = False
    """Every callback of the topic, whatever its family (the topic of unknown families)."""

    @property
    def fields(self) -> tuple[TypedField, ...]:
        return merge(self.commands, single=self.kind == "command")

    @property
    def describe(self) -> str:
        """`command C2C.CallbackAfterSendMsg on topic tim.c2c`, `topic tim.c2c`."""
        if self.kind == "topic":
            return f"topic {self.name}"
        return f"{self.kind} {self.name} on topic {self.topic}"

    @property
    def column_fields(self) -> tuple[TypedField, ...]:
        """The fields the column formats give a column: `fields`, and `EventTime` where no command of the
        selection documents it (the bridge reads it from every callback, known or not, for the timestamp)."""
        fields = self.fields
        if any(field.name == "EventTime" for field in fields):
            return fields
        return (*fields, TypedField("EventTime", Kind.EVENT_TIME, required=False))

    @property
    def slug(self) -> str:
        """A table name: `official_account_callback_after_send_msg`, `tim_official_account`."""
        out: list[str] = []
        for index, char in enumerate(self.name):
            if char.isupper() and index and self.name[index - 1].islower():  # C2C stays c2c
                out.append("_")
            out.append(char.lower() if char.isalnum() else "_")
        return "".join(out).strip("_")


TopicFor = Callable[[TopicGroup], str]


def default_topic_for(group: TopicGroup) -> str:
    """The topic of a group in serve's default layout (`tim.official-account`...)."""
    return TopicLayout().topic_for(group)


def all_families() -> tuple[Family, ...]:
    return (*FAMILIES.values(), UNKNOWN_FAMILY)


def topics(topic_for: TopicFor = default_topic_for) -> tuple[str, ...]:
    return tuple(dict.fromkeys(topic_for(family.topic_group) for family in all_families()))


def by_command(name: str, topic_for: TopicFor = default_topic_for) -> Selection:
    spec = COMMANDS.get(name)
    if spec is None:
        raise SchemaError(f"unknown command {name!r}; the known commands are: {', '.join(COMMANDS)}")
    return Selection("command", name, topic_for(spec.family.topic_group), (spec,), ())


def by_family(name: str, topic_for: TopicFor = default_topic_for) -> Selection:
    family = FAMILIES.get(name)
    if family is None:
        raise SchemaError(f"unknown command family {name!r}; the known families are: {', '.join(FAMILIES)}")
    specs = tuple(spec for spec in COMMANDS.values() if spec.family is family)
    return Selection("family", name, topic_for(family.topic_group), specs, (family,))


def by_topic(name: str, topic_for: TopicFor = default_topic_for) -> Selection:
    families = tuple(family for family in all_families() if topic_for(family.topic_group) == name)
    if not families:
        raise SchemaError(f"unknown topic {name!r}; the bridge's topics are: {', '.join(topics(topic_for))}")
    specs = tuple(spec for spec in COMMANDS.values() if spec.family in families)
    return Selection("topic", name, name, specs, families, all_commands=UNKNOWN_FAMILY in families)


def select(
    *,
    command: str | None = None,
    family: str | None = None,
    topic: str | None = None,
    topic_for: TopicFor = default_topic_for,
) -> Selection:
    """The selection named by exactly one of `command`, `family`, `topic`; raises `SchemaError`."""
    given = [
        (kind, name) for kind, name in (("command", command), ("family", family), ("topic", topic)) if name
    ]
    if len(given) != 1:
        raise SchemaError("give exactly one of --command, --family or --topic")
    kind, name = given[0]
    if kind == "command":
        return by_command(name, topic_for)
    if kind == "family":
        return by_family(name, topic_for)
    return by_topic(name, topic_for)
