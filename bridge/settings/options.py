"""The one declarative source of the settings: every command, its settings class and its options in their
`--help` groups, from the tables of `service_options` and `tool_options`. The command line, `--help`, the
environment and the README's configuration tables (checked by tests/test_docs.py) are all made from
`COMMANDS`.

`--delivery-timeout` is `BRIDGE_DELIVERY_TIMEOUT` is `ServeSettings.delivery_timeout`. The service's
settings (serve, dev, topics ensure) and the Kafka connection and logging options every command takes are
`BRIDGE_<NAME>`; a tool's own options are scoped by command (`--group` of consume is
`BRIDGE_CONSUME_GROUP`), and their old unscoped names are still read, with a warning, for one release.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.settings.option import ENV_PREFIX, Option
from bridge.settings.parts import (
    BenchSettings,
    ConsumeSettings,
    ReplaySettings,
    SchemaSettings,
    ServeSettings,
    TopicsSettings,
)
from bridge.settings.service_options import (
    ADMIN,
    AUTHENTICATION,
    CREATE_TOPICS,
    DELIVERY,
    FORWARD,
    HTTP,
    KAFKA_CONNECTION,
    LOGGING,
    SERVE_BOOTSTRAP,
    SHUTDOWN,
    TOPIC_NAMES,
    TOPIC_SHAPE,
    TOPICS_MAX_BODY_BYTES,
)
from bridge.settings.tool_options import (
    BENCH,
    BENCH_BOOTSTRAP,
    CONSUME,
    READING,
    REPLAY,
    REPLAY_TOPIC_SINK,
    SCHEMA,
)

__all__ = ["COMMANDS", "Command", "Option"]


def _only(options: tuple[Option, ...], *fields: str) -> tuple[Option, ...]:
    return tuple(option for option in options if option.field in fields)


def _but(options: tuple[Option, ...], *fields: str) -> tuple[Option, ...]:
    return tuple(option for option in options if option.field not in fields)


# Settings every command reads under their service names, whatever the command: which cluster, how to
# connect to it, how to log.
SHARED_FIELDS = frozenset(
    {option.field for option in (SERVE_BOOTSTRAP, *KAFKA_CONNECTION, *LOGGING)} - {"client_id"}
)
# A tool's options that had no variable before they were scoped: nothing to stay compatible with.
_NEW_IN_TOOLS = frozenset({"client_id", "compression", "max_record_bytes", "driver", "decisions"})
Group = tuple[str, tuple[Option, ...]]


@dataclass(frozen=True)
class Command:
    """A command's settings class, its options in their `--help` groups, and its defaults where they are not
    the class's."""

    name: str
    title: str
    """How the command is named to the user: `topics ensure`."""
    settings: type[Any]
    groups: tuple[Group, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    scoped: bool = False
    """A tool: its own options are `BRIDGE_<COMMAND>_<NAME>`, not `BRIDGE_<NAME>`."""
    unscoped_before: bool = True
    """A scoped tool whose options had unscoped variables before, still read for one release."""

    @property
    def options(self) -> tuple[Option, ...]:
        return tuple(option for _, options in self.groups for option in options)

    def env(self, option: Option) -> str:
        if self.scoped and option.field not in SHARED_FIELDS:
            return f"{ENV_PREFIX}{self.name.upper()}_{option.field.upper()}"
        return ENV_PREFIX + option.field.upper()

    def old_env(self, option: Option) -> str | None:
        """The variable this option had before it was scoped, still read for one release, with a warning."""
        if self.scoped and self.unscoped_before and option.field not in SHARED_FIELDS | _NEW_IN_TOOLS:
            return ENV_PREFIX + option.field.upper()
        return None

    def default(self, option: Option) -> Any:
        if option.field in self.defaults:
            return self.defaults[option.field]
        return next(f.default for f in dataclasses.fields(self.settings) if f.name == option.field)


_SERVE_GROUPS: tuple[Group, ...] = (
    ("Kafka connection", (SERVE_BOOTSTRAP, *KAFKA_CONNECTION)),
    ("topics", (*TOPIC_NAMES, CREATE_TOPICS, *TOPIC_SHAPE)),
    ("HTTP", HTTP),
    # serve only: dev is one local process on one port.
    ("admin listener", ADMIN),
    ("authentication", AUTHENTICATION),
    ("delivery", DELIVERY),
    ("forward mode", FORWARD),
    ("shutdown", SHUTDOWN),
    ("logging", LOGGING),
)
_READER_CONNECTION = ("Kafka connection", (SERVE_BOOTSTRAP, *KAFKA_CONNECTION))
COMMANDS: Mapping[str, Command] = {
    command.name: command
    for command in (
        Command("serve", "serve", ServeSettings, _SERVE_GROUPS),
        Command(
            "dev",
            "dev",
            ServeSettings,
            # dev's embedded broker is plain and local: of the Kafka connection, only the client id.
            (
                ("Kafka connection", _only(KAFKA_CONNECTION, "client_id")),
                *(group for group in _SERVE_GROUPS[1:] if group[1] is not ADMIN),
            ),
            # Loopback only, topics created on a single in-memory broker, and unsigned callbacks accepted,
            # so the quick start's curl works as it is.
            {"host": "127.0.0.1", "create_topics": True, "replication_factor": 1, "allow_unsigned": True},
        ),
        Command(
            "topics",
            "topics ensure",
            TopicsSettings,
            (
                ("Kafka connection", (SERVE_BOOTSTRAP, *KAFKA_CONNECTION)),
                ("topics", (*TOPIC_NAMES, *TOPIC_SHAPE, TOPICS_MAX_BODY_BYTES)),
                ("logging", LOGGING),
            ),
        ),
        Command(
            "consume",
            "consume",
            ConsumeSettings,
            (_READER_CONNECTION, ("events read", READING), ("consume", CONSUME), ("logging", LOGGING)),
            scoped=True,
        ),
        Command(
            "replay",
            "replay",
            ReplaySettings,
            (
                _READER_CONNECTION,
                ("events read", READING),
                ("replay", REPLAY),
                ("the --to-topic destination", REPLAY_TOPIC_SINK),
                ("logging", LOGGING),
            ),
            scoped=True,
        ),
        Command(
            "bench",
            "bench",
            BenchSettings,
            (("bench", BENCH), ("Kafka connection", (BENCH_BOOTSTRAP,)), ("logging", LOGGING)),
            scoped=True,
        ),
        # New with its scoped names: nothing to stay compatible with.
        Command(
            "schema",
            "schema",
            SchemaSettings,
            (("schema", SCHEMA), ("logging", LOGGING)),
            scoped=True,
            unscoped_before=False,
        ),
    )
}
