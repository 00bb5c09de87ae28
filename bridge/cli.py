"""The `bridge` command line: `serve` and `dev` run the bridge; `topics ensure` readies its topics; `consume`
and `replay` read them; `bench` measures the bridge; `schema` prints the typed schemas of the records.

Each command has its own settings (`bridge.settings`); `main` builds them, runs the command, and turns a
`CommandError` into `bridge COMMAND: message` on stderr and its exit status, here and nowhere else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from bridge import __version__
from bridge.errors import CommandError, ExitStatus
from bridge.logs import configure_logging
from bridge.settings import (
    COMMANDS,
    BenchSettings,
    Command,
    ConsumeSettings,
    KafkaConnection,
    Option,
    ReplaySettings,
    SchemaSettings,
    ServeSettings,
    SettingsError,
    TopicsSettings,
    build,
    describe_default,
    require_authentication,
)

_DESCRIPTION = """\
Receive Tencent Cloud Chat webhook callbacks over HTTP and publish each one to Kafka, answering
Tencent only after the broker has confirmed the write (acks=all)."""
_EPILOG = """\
Each command has its own options, grouped, each with the environment variable that sets it:
see `bridge COMMAND --help` (and `bridge topics ensure --help`). A flag wins over the
environment, the environment over the default."""

# Every command but `dev`, which starts its own broker, and `bench`, which can.
_NEED_BROKERS = frozenset({"serve", "consume", "replay", "topics"})
_SUMMARIES = {
    "serve": "run the bridge against a Kafka cluster",
    "dev": "run the bridge against an embedded in-memory broker, for trying it out",
    "consume": "print a topic's callbacks as JSON Lines, filtered, optionally as a consumer group",
    "replay": "copy a window of a topic's callbacks to another topic, a JSON Lines file or a URL",
    "bench": "measure the bridge's throughput and latency under realistic load, beside a bare baseline",
    "schema": "print the typed schema of a command's, a family's or a topic's records: JSON Schema, "
    "ClickHouse, Flink SQL or Spark",
}
_DETAILS = {
    "schema": " Give exactly one of --command, --family or --topic; a name the bridge does not know exits "
    "with status 2 and the list of the known ones. A family's or a topic's fields are merged (see the "
    "README's record section).",
}
_TOPICS_HELP = "manage the bridge's topics on a Kafka cluster (`bridge topics ensure`)"
_ENSURE_HELP = (
    "create the bridge's missing topics and check the existing ones against the intended partitions, "
    "replication factor and configs; report any drift and change nothing that exists "
    "(exit status 0: all as intended, 1: drift, 3: the cluster could not be reached or refused)"
)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    parser = _parser()
    args = parser.parse_args(argv)
    if args.subcommand is None:
        parser.print_help()
        return ExitStatus.USAGE
    command = COMMANDS[args.subcommand]
    try:
        return _run(command, vars(args), environ)
    except CommandError as exc:
        print(f"bridge {command.title}: {exc.message}", file=sys.stderr)
        return exc.exit_status


def _run(command: Command, flags: Mapping[str, Any], environ: Mapping[str, str]) -> int:
    try:
        settings = build(command.name, flags, environ)
        if isinstance(settings, KafkaConnection) and command.name != "dev":
            settings.client_options()  # TLS and SASL settings that do not fit fail here, at once
    except SettingsError as exc:
        raise CommandError(str(exc), ExitStatus.USAGE) from None
    if command.name in _NEED_BROKERS and not settings.bootstrap_servers:
        hint = " To try the bridge without Kafka, run `bridge dev`, which starts an in-memory broker."
        raise CommandError(
            "no Kafka brokers given. Pass --bootstrap-servers HOST:PORT[,HOST:PORT...] or set "
            f"BRIDGE_BOOTSTRAP_SERVERS.{hint if command.name == 'serve' else ''}",
            ExitStatus.USAGE,
        )
    try:
        if isinstance(settings, ServeSettings):
            require_authentication(command.name, settings)
    except SettingsError as exc:
        raise CommandError(str(exc), ExitStatus.USAGE) from None
    configure_logging(settings.log_level, settings.log_format)
    if isinstance(settings, SchemaSettings):
        return _schema(settings, environ)
    runners: dict[str, Callable[[Any], int]] = {
        "serve": _serve,
        "dev": _dev,
        "consume": _consume,
        "replay": _replay,
        "topics": _topics,
        "bench": _bench,
    }
    return runners[command.name](settings)


# Each command's module is imported only when it runs: `bridge --help` stays fast.


def _serve(settings: ServeSettings) -> int:
    from bridge.ingest.runner import ListenError, run_server  # noqa: PLC0415
    from bridge.process import run_loop  # noqa: PLC0415

    try:
        run_loop(run_server(settings, on_started=_announce_serve))
    except ListenError as exc:
        raise CommandError(str(exc)) from None
    return ExitStatus.OK


async def _announce_serve(_app: Any, port: int) -> None:
    logging.getLogger("bridge").info("listening on port %d", port)


def _dev(settings: ServeSettings) -> int:
    from bridge.tools.dev import start_dev  # noqa: PLC0415

    return start_dev(settings)


def _topics(settings: TopicsSettings) -> int:
    from bridge.kafka.topics import run_ensure  # noqa: PLC0415

    return run_ensure(settings)


def _consume(settings: ConsumeSettings) -> int:
    from bridge.readback.consume import run_consume  # noqa: PLC0415

    return run_consume(settings)


def _replay(settings: ReplaySettings) -> int:
    from bridge.readback.replay import run_replay  # noqa: PLC0415

    return run_replay(settings)


def _schema(settings: SchemaSettings, environ: Mapping[str, str]) -> int:
    from bridge.schema.command import run_schema  # noqa: PLC0415

    return run_schema(settings, environ)


def _bench(settings: BenchSettings) -> int:
    from bridge.tools.bench import run_bench  # noqa: PLC0415

    return run_bench(settings)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag or value told in one line, the bridge's own, not after the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitStatus.USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bridge",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Not dest="command": `--command` is an option of consume and replay.
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    for name in ("serve", "dev", "topics", "consume", "replay", "bench", "schema"):
        if name == "topics":
            topics = commands.add_parser(
                name, help=_TOPICS_HELP, description=f"bridge topics: {_TOPICS_HELP}."
            )
            actions = topics.add_subparsers(dest="action", metavar="ACTION", required=True)
            sub = actions.add_parser(
                "ensure", help=_ENSURE_HELP, description=f"bridge topics ensure: {_ENSURE_HELP}."
            )
        else:
            summary = _SUMMARIES[name]
            sub = commands.add_parser(
                name, help=summary, description=f"bridge {name}: {summary}.{_DETAILS.get(name, '')}"
            )
        _add_options(sub, COMMANDS[name])
    return parser


def _add_options(parser: argparse.ArgumentParser, command: Command) -> None:
    for title, options in command.groups:
        group = parser.add_argument_group(title)
        for option in options:
            _add_option(group, option, command)


def _add_option(group: argparse._ArgumentGroup, option: Option, command: Command) -> None:
    shown = describe_default(command.default(option), option.unset)
    # argparse expands %-formats in help: a help or default that shows a percent-escape keeps its "%".
    help_text = f"{option.help} [default: {shown}; env: {command.env(option)}]".replace("%", "%%")
    if option.is_switch:
        group.add_argument(option.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        return
    group.add_argument(
        option.flag,
        dest=option.field,
        metavar=option.metavar,
        default=None,
        type=_argparse_type(option),
        action=_Extend if option.repeatable else "store",
        help=help_text + (" (repeatable)" if option.repeatable else ""),
    )


class _Extend(argparse.Action):
    """A repeatable flag whose values (each parsed to a tuple) add up: `--sdk-app-id 1 --sdk-app-id 2,3`."""

    def __call__(
        self,
        _parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        _option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, (getattr(namespace, self.dest, None) or ()) + tuple(values))


def _argparse_type(option: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return option.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = option.flag  # argparse names the option in its error message
    return convert
