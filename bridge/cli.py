"""The `bridge` command line: `serve` and `dev` run the bridge; `consume` and `replay` read its topics."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bridge import __version__
from bridge.settings import OPTIONS, Option, Settings, SettingsError, build, default, describe_default

_DESCRIPTION = """\
Receive Tencent Cloud Chat webhook callbacks over HTTP and publish each one to Kafka, answering
Tencent only after the broker has confirmed the write (acks=all).

Every option can also be set through the environment variable named beside it; a flag wins over the
environment, the environment over the default."""

_SERVE_HELP = "run the bridge against a Kafka cluster"
_DEV_HELP = "run the bridge against an embedded in-memory broker, for trying it out"
_CONSUME_HELP = "print a topic's callbacks as JSON Lines, filtered, optionally as a consumer group"
_REPLAY_HELP = "copy a window of a topic's callbacks to another topic, a JSON Lines file or a URL"
_COMMANDS = (("serve", _SERVE_HELP), ("dev", _DEV_HELP), ("consume", _CONSUME_HELP), ("replay", _REPLAY_HELP))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    parser = _parser()
    args = parser.parse_args(argv)
    if args.subcommand is None:
        parser.print_help()
        return 2
    try:
        settings = build(args.subcommand, vars(args), environ)
    except SettingsError as exc:
        parser.exit(2, f"bridge {args.subcommand}: {exc}\n")
    _configure_logging(settings.log_level)
    runners: dict[str, Callable[[Settings], int]] = {
        "serve": _serve,
        "dev": _dev,
        "consume": _consume,
        "replay": _replay,
    }
    return runners[args.subcommand](settings)


def _consume(settings: Settings) -> int:
    from bridge.consume import run_consume  # noqa: PLC0415 - keeps `--help` fast

    return run_consume(settings)


def _replay(settings: Settings) -> int:
    from bridge.replay import run_replay  # noqa: PLC0415 - keeps `--help` fast

    return run_replay(settings)


def _serve(settings: Settings) -> int:
    if not settings.bootstrap_servers:
        print(
            "bridge serve: no Kafka brokers given. Pass --bootstrap-servers HOST:PORT[,HOST:PORT...] "
            "or set BRIDGE_BOOTSTRAP_SERVERS. To try the bridge without Kafka, run `bridge dev`, "
            "which starts an in-memory broker.",
            file=sys.stderr,
        )
        return 2
    from bridge.runner import ListenError, run_server  # noqa: PLC0415 - keeps `--help` fast

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

    from bridge.dev import run_dev  # noqa: PLC0415
    from bridge.embedded import EmbeddedBroker, EmbeddedBrokerError  # noqa: PLC0415
    from bridge.runner import ListenError  # noqa: PLC0415

    try:
        with EmbeddedBroker() as broker:
            run_dev(replace(settings, bootstrap_servers=(broker.bootstrap_servers,)), broker)
    except (EmbeddedBrokerError, ListenError) as exc:
        print(f"bridge dev: {exc}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        for option in OPTIONS:
            if name in option.commands:
                _add_option(sub, option, name)
    return parser


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
        help=help_text,
    )


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
        names = [name for name, _ in _COMMANDS if name in option.commands]
        shown = describe_default(default(option, names[0]), option.unset)
        dev = describe_default(default(option, "dev"), option.unset) if "dev" in names else shown
        rows.append((option.flag, option.env, ",".join(names), shown if shown == dev else f"{shown} / {dev}"))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        f"  {flag:<{width[0]}}  {env:<{width[1]}}  {names:<{width[2]}}  {value}"
        for flag, env, names, value in rows
    ]
    return "options of the commands (see `bridge COMMAND --help`):\n" + "\n".join(lines)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiokafka logs every failed connection attempt at ERROR; the bridge reports broker trouble itself, in
    # words, so aiokafka's own lines are kept for debugging.
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)
