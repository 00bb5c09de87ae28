"""Settings per command, each with a flag and an environment variable, built once at start and passed down.

`parts` holds the settings classes (a command's class composed from shared parts), `options` the one
declarative table of their flags, variables, help and `--help` groups (`option`, `service_options`,
`tool_options`), and `values` the parsers of their values. `build` makes a command's settings from its flags,
the environment and the defaults.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

from bridge.secret import HIDDEN
from bridge.settings.options import COMMANDS, Command, Option
from bridge.settings.parts import (
    BenchSettings,
    ConsumeSettings,
    KafkaConnection,
    ReaderSettings,
    ReplaySettings,
    SchemaSettings,
    ServeSettings,
    SettingsError,
    TopicLayout,
    TopicsSettings,
)

__all__ = [
    "COMMANDS",
    "BenchSettings",
    "Command",
    "ConsumeSettings",
    "KafkaConnection",
    "Option",
    "ReaderSettings",
    "ReplaySettings",
    "SchemaSettings",
    "ServeSettings",
    "SettingsError",
    "TopicLayout",
    "TopicsSettings",
    "build",
    "describe_default",
    "require_authentication",
]

Warn = Callable[[str], None]


def describe_default(value: Any, unset: str = "auto") -> str:
    match value:
        case None:
            return unset
        case bool():
            return "true" if value else "false"
        case tuple():
            return ",".join(value) or "(none)"
    return str(value)


def parse_value(option: Option, text: str, source: str) -> Any:
    try:
        return option.parse(text)
    except ValueError as exc:
        shown = HIDDEN if option.hidden else repr(text)
        raise SettingsError(f"{source}={shown}: {exc}") from None


def require_authentication(command: str, settings: ServeSettings) -> None:
    """`serve` does not start open to anyone by accident: a token, or `--allow-unsigned` said out loud."""
    if command == "serve" and not settings.callback_tokens and not settings.allow_unsigned:
        raise SettingsError(
            "no callback token: set --callback-token (BRIDGE_CALLBACK_TOKEN) or --callback-token-file to "
            "the webhook authentication token of the Tencent Cloud Chat console, or pass --allow-unsigned "
            "(BRIDGE_ALLOW_UNSIGNED=true) to accept callbacks anyone can forge"
        )


def _warn_on_stderr(command: Command) -> Warn:
    def warn(message: str) -> None:
        print(f"bridge {command.title}: warning: {message}", file=sys.stderr)

    return warn


def _set(text: str | None) -> bool:
    return bool(text and text.strip())  # an empty variable counts as unset, as in compose files


def _from_environment(command: Command, option: Option, environ: Mapping[str, str], warn: Warn) -> Any:
    """The option's value from its variable, else from its old unscoped name (with a warning), else None."""
    name, old = command.env(option), command.old_env(option)
    if old is not None and _set(environ.get(old)):
        if _set(environ.get(name)):
            warn(f"{old} is ignored: {name} is set (and {old} is no longer read from the next release)")
        else:
            warn(f"{old} is deprecated for `bridge {command.title}`: set {name} instead")
            return parse_value(option, environ[old], old)
    if _set(environ.get(name)):
        return parse_value(option, environ[name], name)
    return None


@overload
def build(
    command: Literal["serve", "dev"],
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    warn: Warn | None = None,
) -> ServeSettings: ...
@overload
def build(
    command: Literal["topics"], flags: Mapping[str, Any], environ: Mapping[str, str], warn: Warn | None = None
) -> TopicsSettings: ...
@overload
def build(
    command: Literal["consume"],
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    warn: Warn | None = None,
) -> ConsumeSettings: ...
@overload
def build(
    command: Literal["replay"], flags: Mapping[str, Any], environ: Mapping[str, str], warn: Warn | None = None
) -> ReplaySettings: ...
@overload
def build(
    command: Literal["bench"], flags: Mapping[str, Any], environ: Mapping[str, str], warn: Warn | None = None
) -> BenchSettings: ...
@overload
def build(
    command: str, flags: Mapping[str, Any], environ: Mapping[str, str], warn: Warn | None = None
) -> Any: ...
def build(
    command: str, flags: Mapping[str, Any], environ: Mapping[str, str], warn: Warn | None = None
) -> Any:
    """Settings for `command`: each from its flag (None where not given), else its variable, else default.

    A tool's option set only by its old unscoped variable (`BRIDGE_GROUP` for `BRIDGE_CONSUME_GROUP`) is
    taken, and `warn` (stderr by default) is told so in one line; the scoped variable wins over it.
    """
    spec = COMMANDS[command]
    warn = _warn_on_stderr(spec) if warn is None else warn
    values: dict[str, Any] = {}
    for option in spec.options:
        if flags.get(option.field) is not None:
            values[option.field] = flags[option.field]
        elif (value := _from_environment(spec, option, environ, warn)) is not None:
            values[option.field] = value
        else:
            values[option.field] = spec.default(option)
    return spec.settings(**values)
