"""The `bridge` command line: `serve` and `dev` run the bridge; `consume` and `replay` read its topics;
`bench` measures it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from bridge import __version__
from bridge.errors import describe
from bridge.logs import configure_logging
from bridge.settings import (
    KAFKA_CLIENTS,
    OPTIONS,
    Option,
    Settings,
    SettingsError,
    build,
    default,
    describe_default,
    require_authentication,
)

_DESCRIPTION = """\
Receive Tencent Cloud Chat webhook callbacks over HTTP and publish each one to Kafka, answering
Tencent only after the broker has confirmed the write (acks=all).

Every option can also be set through the environment variable named beside it; a flag wins over the
environment, the environment over the default."""

# Every command but `dev`, which starts its own broker.
_NEED_BROKERS = frozenset({"serve", "consume", "replay", "topics"})
_SERVE_HELP = "run the bridge against a Kafka cluster"
_DEV_HELP = "run the bridge against an embedded in-memory broker, for trying it out"
_CONSUME_HELP = "print a topic's callbacks as JSON Lines, filtered, optionally as a consumer group"
_REPLAY_HELP = "copy a window of a topic's callbacks to another topic, a JSON Lines file or a URL"
_BENCH_HELP = "measure the bridge's throughput and latency under realistic load, beside a bare baseline"
_COMMANDS = (
    ("serve", _SERVE_HELP),
    ("dev", _DEV_HELP),
    ("consume", _CONSUME_HELP),
    ("replay", _REPLAY_HELP),
    ("bench", _BENCH_HELP),
)
_TOPICS_HELP = "manage the bridge's topics on a Kafka cluster"
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
        return 2
    try:
        settings = build(args.subcommand, vars(args), environ)
        if args.subcommand in KAFKA_CLIENTS:
            from bridge.kafka.security import kafka_connection_options  # noqa: PLC0415 - keeps `--help` fast

            kafka_connection_options(settings)  # TLS and SASL settings that do not fit fail here, at once
    except SettingsError as exc:
        parser.exit(2, f"bridge {args.subcommand}: {exc}\n")
    if args.subcommand in _NEED_BROKERS and not settings.bootstrap_servers:
        name = "topics ensure" if args.subcommand == "topics" else args.subcommand
        hint = " To try the bridge without Kafka, run `bridge dev`, which starts an in-memory broker."
        print(
            f"bridge {name}: no Kafka brokers given. Pass --bootstrap-servers HOST:PORT[,HOST:PORT...] "
            f"or set BRIDGE_BOOTSTRAP_SERVERS.{hint if args.subcommand == 'serve' else ''}",
            file=sys.stderr,
        )
        return 2
    try:
        require_authentication(args.subcommand, settings)
    except SettingsError as exc:
        parser.exit(2, f"bridge {args.subcommand}: {exc}\n")
    configure_logging(settings.log_level, settings.log_format)
    runners: dict[str, Callable[[Settings], int]] = {
        "serve": _serve,
        "dev": _dev,
        "consume": _consume,
        "replay": _replay,
        "topics": _topics,
        "bench": _bench,
    }
    return runners[args.subcommand](settings)


def _consume(settings: Settings) -> int:
    from bridge.readback.consume import run_consume  # noqa: PLC0415 - keeps `--help` fast

    return run_consume(settings)


def _replay(settings: Settings) -> int:
    from bridge.readback.replay import run_replay  # noqa: PLC0415 - keeps `--help` fast

    return run_replay(settings)


def _bench(settings: Settings) -> int:
    from bridge.tools.bench import run_bench  # noqa: PLC0415 - keeps `--help` fast
    from bridge.tools.embedded import EmbeddedBrokerError  # noqa: PLC0415

    try:
        return run_bench(settings)
    except (EmbeddedBrokerError, RuntimeError, OSError) as exc:
        print(f"bridge bench: {exc}", file=sys.stderr)
        return 1


def _serve(settings: Settings) -> int:
    from bridge.ingest.runner import ListenError, run_server  # noqa: PLC0415 - keeps `--help` fast

    try:
        asyncio.run(run_server(settings, on_started=_announce_serve))
    except ListenError as exc:
        print(f"bridge serve: {exc}", file=sys.stderr)
        return 1
    return 0


async def _announce_serve(_app: Any, port: int) -> None:
    logging.getLogger("bridge").info("listening on port %d", port)


def _dev(settings: Settings) -> int:
    from dataclasses import replace  # noqa: PLC0415

    from bridge.ingest.runner import ListenError  # noqa: PLC0415
    from bridge.tools.dev import run_dev  # noqa: PLC0415
    from bridge.tools.embedded import EmbeddedBroker, EmbeddedBrokerError  # noqa: PLC0415

    try:
        with EmbeddedBroker() as broker:
            run_dev(replace(settings, bootstrap_servers=(broker.bootstrap_servers,)), broker)
    except (EmbeddedBrokerError, ListenError) as exc:
        print(f"bridge dev: {exc}", file=sys.stderr)
        return 1
    return 0


def _topics(settings: Settings) -> int:
    from aiokafka.errors import KafkaError  # noqa: PLC0415 - keeps `--help` fast

    from bridge.kafka.topics import describe_reports, ensure_topics  # noqa: PLC0415

    try:
        reports = asyncio.run(ensure_topics(settings))
    except (KafkaError, OSError, TimeoutError, ValueError) as exc:
        print(
            f"bridge topics ensure: {describe(exc)} (brokers: {','.join(settings.bootstrap_servers)})",
            file=sys.stderr,
        )
        return 3
    for line in describe_reports(settings, reports):
        print(line)
    return 1 if any(report.drifts for report in reports) else 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag or value told in one line, the bridge's own, not after the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bridge",
        description=_DESCRIPTION,
        epilog=_options_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Not dest="command": `--command` is an option of consume and replay.
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    for name, summary in _COMMANDS:
        sub = commands.add_parser(name, help=summary, description=f"bridge {name}: {summary}.")
        _add_options(sub, name)
    topics = commands.add_parser("topics", help=_TOPICS_HELP, description=f"bridge topics: {_TOPICS_HELP}.")
    actions = topics.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_options(
        actions.add_parser("ensure", help=_ENSURE_HELP, description=f"bridge topics ensure: {_ENSURE_HELP}."),
        "topics",
    )
    return parser


def _add_options(parser: argparse.ArgumentParser, command: str) -> None:
    for option in OPTIONS:
        if command in option.commands:
            _add_option(parser, option, command)


def _add_option(parser: argparse.ArgumentParser, option: Option, command: str) -> None:
    shown = describe_default(default(option, command), option.unset)
    help_text = f"{option.help} [default: {shown}; env: {option.env}]"
    if option.is_switch:
        parser.add_argument(option.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        return
    parser.add_argument(
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


def _options_table() -> str:
    rows = [("option", "environment", "commands", "default (dev's where it differs)")]
    for option in OPTIONS:
        names = [name for name in (*(name for name, _ in _COMMANDS), "topics") if name in option.commands]
        shown = describe_default(default(option, names[0]), option.unset)
        dev = describe_default(default(option, "dev"), option.unset) if "dev" in names else shown
        rows.append((option.flag, option.env, ",".join(names), shown if shown == dev else f"{shown} / {dev}"))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        f"  {flag:<{width[0]}}  {env:<{width[1]}}  {names:<{width[2]}}  {value}"
        for flag, env, names, value in rows
    ]
    return "options of the commands (see `bridge COMMAND --help`):\n" + "\n".join(lines)
