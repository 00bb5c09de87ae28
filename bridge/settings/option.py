"""One option: its field, help, parser and how `--help` shows it; and the value sets several options share.

The tables of options are `service_options` (serve, dev, topics ensure, and the Kafka connection and
logging options every command takes) and `tool_options` (consume, replay, bench); `options` assembles them
per command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.settings import values

ENV_PREFIX = "BRIDGE_"
COMPRESSION_TYPES = ("none", "gzip", "lz4", "zstd", "snappy")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "text")
RECORD_FORMATS = ("envelope", "cloudevents")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True, slots=True)
class Option:
    field: str
    help: str
    parse: Callable[[str], Any]
    metavar: str | None = None
    unset: str = "auto"
    """What a default of None means, in `--help` and the README."""
    repeatable: bool = False
    """A flag that may be given several times, each adding to the list (the variable is comma-separated)."""
    hidden: bool = False
    """A secret: a message about a bad value names the variable, never repeats the value."""

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def is_switch(self) -> bool:
        """An on/off option: `--name` / `--no-name` on the command line, true/false in the environment."""
        return self.parse is values.boolean
