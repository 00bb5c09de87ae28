"""The `bridge` command line: `serve` against a Kafka cluster, `dev` with an embedded in-memory broker."""

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


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        settings = build(args.command, vars(args), environ)
    except SettingsError as exc:
        parser.exit(2, f"bridge {args.command}: {exc}\n")
    _configure_logging(settings.log_level)
    runners: dict[str, Callable[[Settings], int]] = {"serve": _serve, "dev": _dev}
    return runners[args.command](settings)


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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in (("serve", _SERVE_HELP), ("dev", _DEV_HELP)):
        sub = commands.add_parser(name, help=summary, description=f"bridge {name}: {summary}.")
        for option in OPTIONS:
            if name in option.commands:
                _add_option(sub, option, name)
    return parser


def _add_option(parser: argparse.ArgumentParser, option: Option, command: str) -> None:
    shown = describe_default(default(option, command))
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
    rows = [("option", "environment", "default (serve / dev)")]
    for option in OPTIONS:
        serve = describe_default(default(option, "serve"))
        dev = describe_default(default(option, "dev")) if "dev" in option.commands else "-"
        rows.append((option.flag, option.env, serve if serve == dev else f"{serve} / {dev}"))
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"  {flag:<{width[0]}}  {env:<{width[1]}}  {value}" for flag, env, value in rows]
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
