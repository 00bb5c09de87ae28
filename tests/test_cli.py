"""The `bridge` command: help, settings from flags and environment, `serve` refusing to start blind, `dev`."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from bridge.cli import main
from bridge.settings import COMMANDS, Command, Option, SettingsError, build, values

BRIDGE = [sys.executable, "-m", "bridge"]


def run_bridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m bridge` with no BRIDGE_* variables from the outside, plus `env`."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("BRIDGE_")}
    return subprocess.run(
        [*BRIDGE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        check=False,
    )


def test_top_level_help_lists_the_commands_and_says_where_their_options_are() -> None:
    """It fits a terminal: the options are in each command's own `--help`."""
    result = run_bridge("--help")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) < 30
    assert max(len(line) for line in lines) < 100
    for name in COMMANDS:
        assert re.search(rf"^    {name}\s+\S", result.stdout, flags=re.MULTILINE), name
    assert "bridge COMMAND --help" in result.stdout
    assert "--bootstrap-servers" not in result.stdout


ALL_FLAGS = sorted({option.flag for command in COMMANDS.values() for option in command.options})


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("serve", ["serve"]),
        ("dev", ["dev"]),
        ("consume", ["consume"]),
        ("replay", ["replay"]),
        ("topics", ["topics", "ensure"]),
        ("bench", ["bench"]),
    ],
)
def test_subcommand_help_gives_every_option_its_default_and_environment_variable(
    command: str, argv: list[str]
) -> None:
    result = run_bridge(*argv, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    spec = COMMANDS[command]
    flags = {option.flag for option in spec.options}
    for flag in ALL_FLAGS:
        offered = re.search(rf"{re.escape(flag)}(?![\w-])", text) is not None  # --max, not --max-body-bytes
        assert offered == (flag in flags), flag
    for option in spec.options:
        assert f"env: {spec.env(option)}]" in text, option.flag
    assert text.count("[default: ") == len(spec.options)


def test_subcommand_help_groups_the_options() -> None:
    result = run_bridge("serve", "--help")
    titles = [line[:-1] for line in result.stdout.splitlines() if line and not line[0].isspace()]
    for title in ("Kafka connection", "topics", "HTTP", "authentication", "delivery", "logging"):
        assert title in titles, titles


@pytest.mark.parametrize("environment", [{}, {"BRIDGE_BOOTSTRAP_SERVERS": ""}], ids=["unset", "empty"])
def test_serve_without_bootstrap_servers_fails_at_once_saying_how_to_set_them(
    environment: dict[str, str],
) -> None:
    started = time.monotonic()
    result = run_bridge("serve", env=environment)
    assert time.monotonic() - started < 10
    assert result.returncode == 2
    assert "--bootstrap-servers" in result.stderr
    assert "BRIDGE_BOOTSTRAP_SERVERS" in result.stderr
    assert "bridge dev" in result.stderr


def test_a_bad_environment_value_names_the_variable() -> None:
    result = run_bridge("serve", env={"BRIDGE_BOOTSTRAP_SERVERS": "kafka:9092", "BRIDGE_PORT": "eighty"})
    assert result.returncode == 2
    assert "BRIDGE_PORT='eighty'" in result.stderr


def test_a_bad_flag_value_names_the_flag() -> None:
    result = run_bridge("serve", "--bootstrap-servers", "kafka:9092", "--delivery-timeout", "-1")
    assert result.returncode == 2
    assert "--delivery-timeout" in result.stderr


def test_flags_win_over_the_environment_and_the_environment_over_defaults() -> None:
    environ = {"BRIDGE_PORT": "9000", "BRIDGE_TOPIC": "from-env", "BRIDGE_CREATE_TOPICS": "true"}
    settings = build("serve", {"port": 9100}, environ)
    assert settings.port == 9100
    assert settings.topic == "from-env"
    assert settings.create_topics is True
    assert settings.host == "0.0.0.0"
    assert build("serve", {"create_topics": False}, environ).create_topics is False


def test_dev_defaults_to_loopback_and_creating_topics() -> None:
    dev = build("dev", {}, {})
    assert (dev.host, dev.create_topics, dev.replication_factor) == ("127.0.0.1", True, 1)
    serve = build("serve", {}, {})
    assert (serve.host, serve.create_topics, serve.replication_factor) == ("0.0.0.0", False, None)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BRIDGE_BOOTSTRAP_SERVERS", "kafka"),
        ("BRIDGE_CREATE_TOPICS", "maybe"),
        ("BRIDGE_PATH", "/healthz"),
        ("BRIDGE_PATH", "/metrics"),
        ("BRIDGE_LOG_FORMAT", "xml"),
        ("BRIDGE_RETENTION_HOURS", "0"),
        ("BRIDGE_TOPIC", "bad topic"),
        ("BRIDGE_COMPRESSION", "brotli"),
        ("BRIDGE_PARTITIONS", "0"),
    ],
)
def test_invalid_settings_are_refused_with_the_variable_named(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        build("serve", {}, {variable: value})


def test_main_without_a_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([], {}) == 2
    assert "serve" in capsys.readouterr().out


@pytest.mark.kafka  # `bridge dev` starts Tansu
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_bridge_dev_serves_the_seed_callback_and_stops_cleanly(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    """`bridge dev` prints a URL and a curl that work, says data is in memory; a stop signal ends both."""
    stdout_path, stderr_path = tmp_path / "stdout", tmp_path / "stderr"
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        process = subprocess.Popen([*BRIDGE, "dev", "--port", "0"], stdout=stdout, stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 30
        while "curl" not in stdout_path.read_text():
            assert process.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, "bridge dev did not print its curl in 30 s"
            time.sleep(0.1)
        output = stdout_path.read_text()
        assert "IN MEMORY ONLY" in output
        url = re.search(r"Callback URL:\s+(\S+)", output)
        bootstrap = re.search(r"Kafka bootstrap:\s+(\S+)", output)
        curl_body = re.search(r"-d '(\{.*\})'", output)
        assert url
        assert bootstrap
        assert curl_body
        # The URL is the loopback one `bridge dev` printed.
        request = urllib.request.Request(url.group(1), data=curl_body.group(1).encode(), method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert response.status == 200
            assert orjson.loads(response.read()) == {"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0}

        broker_pid = _pid_listening_on(int(bootstrap.group(1).rsplit(":", 1)[1]))
        assert broker_pid is not None
        process.send_signal(stop_signal)
        assert process.wait(timeout=20) == 0
        assert not _alive(broker_pid), "the embedded broker outlived bridge dev"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.kafka  # `bridge dev` starts Tansu
def test_a_killed_bridge_dev_takes_its_broker_along(tmp_path: Path) -> None:
    """Even SIGKILL, which the bridge cannot handle, leaves no orphaned broker behind."""
    stdout_path = tmp_path / "stdout"
    with stdout_path.open("w") as stdout:
        process = subprocess.Popen([*BRIDGE, "dev", "--port", "0"], stdout=stdout, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while (found := re.search(r"Kafka bootstrap:\s+\S+:(\d+)", stdout_path.read_text())) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    broker_pid = _pid_listening_on(int(found.group(1)))
    assert broker_pid is not None
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while _alive(broker_pid):
        assert time.monotonic() < deadline, "the embedded broker outlived a killed bridge dev"
        time.sleep(0.05)


def test_bridge_dev_without_its_broker_binary_says_so_in_one_line() -> None:
    result = run_bridge("dev", "--port", "0", env={"CALF_TANSU_BIN": "/nonexistent/tansu"})
    assert result.returncode == 1
    assert "embedded broker" in result.stderr
    assert "Traceback" not in result.stderr


def _pid_listening_on(port: int) -> int | None:
    """The pid of the Tansu process whose command line names `port`."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"tansu" in cmdline and f":{port}".encode() in cmdline:
                return int(entry.name)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") == -1


@pytest.mark.parametrize("command", ["serve", pytest.param("dev", marks=pytest.mark.kafka)])
def test_a_port_in_use_is_reported_in_one_line_not_a_traceback(command: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_bridge(
            command,
            "--host",
            "127.0.0.1",
            "--port",
            port,
            env={"BRIDGE_BOOTSTRAP_SERVERS": "127.0.0.1:1", "BRIDGE_ALLOW_UNSIGNED": "true"},
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [["consume"], ["replay", "--to-file", "out.jsonl"], ["topics", "ensure"]])
def test_every_command_that_needs_kafka_says_how_to_name_it(argv: list[str]) -> None:
    result = run_bridge(*argv)
    assert result.returncode == 2
    assert "no Kafka brokers given" in result.stderr
    assert "BRIDGE_BOOTSTRAP_SERVERS" in result.stderr


@pytest.mark.kafka  # `bridge dev` starts Tansu
def test_bridge_dev_with_a_token_prints_a_curl_that_is_signed_and_accepted(tmp_path: Path) -> None:
    stdout_path = tmp_path / "stdout"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    environment["BRIDGE_CALLBACK_TOKEN"] = "xxxxyyyy"  # noqa: S105 - Tencent's sample token
    with stdout_path.open("w") as stdout:
        process = subprocess.Popen(
            [*BRIDGE, "dev", "--port", "0"], stdout=stdout, stderr=subprocess.DEVNULL, env=environment
        )
    try:
        deadline = time.monotonic() + 30
        while "curl" not in stdout_path.read_text():
            assert time.monotonic() < deadline, "bridge dev did not print its curl in 30 s"
            time.sleep(0.1)
        output = stdout_path.read_text()
        target = re.search(r"curl -sS -X POST '([^']+)'", output)
        body = re.search(r"-d '(\{.*\})'", output)
        assert target
        assert body
        assert "Sign=" in target.group(1)
        request = urllib.request.Request(target.group(1), data=body.group(1).encode(), method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - the loopback URL it printed
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


def test_a_port_that_is_not_a_number_gets_the_bridges_own_one_line_message() -> None:
    result = run_bridge("serve", "--bootstrap-servers", "kafka:9092", "--port", "abc")
    assert result.returncode == 2
    assert result.stderr == (
        "bridge serve: argument --port: must be a whole number between 0 and 65535 "
        "(see `bridge serve --help`)\n"
    )
    from_env = run_bridge("serve", env={"BRIDGE_BOOTSTRAP_SERVERS": "kafka:9092", "BRIDGE_PORT": "abc"})
    assert from_env.stderr == "bridge serve: BRIDGE_PORT='abc': must be a whole number between 0 and 65535\n"


BAD_VALUES = ["abc", "", " ", "-1", "0", "1.5", "nan", "inf", "1e999", "9" * 30, "\x00", "é", "1=", "a,,b"]
PYTHONS_WORDS = ("invalid literal", "could not convert", "base 10", "embedded null", "Errno", "object")


def refusal(option: Option, value: str) -> str | None:
    """The message `option` refuses `value` with, or None if it takes it; any other exception fails."""
    try:
        option.parse(value)
    except ValueError as exc:
        return str(exc)
    return None


def first_commands() -> dict[int, tuple[Option, Command]]:
    """Every option once, with the first command that takes it."""
    found: dict[int, tuple[Option, Command]] = {}
    for name in ("serve", "dev", "consume", "replay", "bench", "topics"):
        for option in COMMANDS[name].options:
            found.setdefault(id(option), (option, COMMANDS[name]))
    return found


def exit_status(arguments: list[str], environ: dict[str, str]) -> int:
    """`main`'s exit status, whether argparse ends the process (a bad flag) or `main` returns it."""
    try:
        return main(arguments, environ)
    except SystemExit as exited:
        return exited.code if isinstance(exited.code, int) else -1


@pytest.mark.parametrize(
    ("option", "command"),
    [found for found in first_commands().values() if not found[0].is_switch],
    ids=lambda value: value.flag if isinstance(value, Option) else value.name,
)
def test_every_bad_value_of_every_option_gets_the_bridges_own_one_line_message(
    option: Option, command: Command, capsys: pytest.CaptureFixture[str]
) -> None:
    """From a flag or a variable; never Python's wording, a traceback, or a secret's value."""
    argv = command.title.split()
    env = command.env(option)
    refused = 0
    for value in BAD_VALUES:
        message = refusal(option, value)
        if message is None:
            continue
        assert not any(word in message for word in PYTHONS_WORDS), (value, message)
        refused += 1
        if refused > 2:  # the command line and the environment are tried with the first two refused
            continue
        tries: list[tuple[list[str], dict[str, str]]] = [([*argv, option.flag, value], {})]
        if value.strip():  # an empty variable counts as unset
            tries.append((argv, {env: value}))
        for arguments, environ in tries:
            assert exit_status(arguments, environ) == 2
            errors = capsys.readouterr().err
            assert errors.count("\n") == 1, errors
            assert errors.startswith(f"bridge {' '.join(argv)}: "), errors
            assert option.flag in errors or env in errors
            if option.hidden and value.strip():
                assert repr(value) not in errors
    assert refused or option.parse in {values.text, values.path}, f"{option.flag} refused no bad value"


def test_the_command_line_loads_neither_aiohttp_nor_aiokafka_until_a_command_runs() -> None:
    """`bridge --help` starts fast: the HTTP and Kafka libraries load with the commands that use them."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, bridge.cli; print(sorted({m.split('.')[0] for m in sys.modules}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'aiohttp'" not in loaded
    assert "'aiokafka'" not in loaded


@pytest.mark.parametrize("command", ["consume", "replay", "bench"])
def test_every_tool_takes_the_logging_options(command: str) -> None:
    settings = build(command, {"log_level": "debug"}, {"BRIDGE_LOG_FORMAT": "json"})
    assert (settings.log_level, settings.log_format) == ("debug", "json")


def test_consume_given_the_logging_options_goes_on_to_its_own_checks() -> None:
    result = run_bridge("consume", "--log-level", "debug", "--log-format", "json")
    assert result.returncode == 2
    assert result.stderr.startswith("bridge consume: no Kafka brokers given"), result.stderr


@pytest.mark.parametrize("command", ["consume", "replay"])
def test_each_reader_has_its_own_client_id_not_the_servers(command: str) -> None:
    assert build(command, {}, {}).client_id == f"tencent-chat-kafka-bridge-{command}"
    assert build(command, {}, {"BRIDGE_CLIENT_ID": "the-server"}).client_id.endswith(f"-{command}")
    assert build(command, {"client_id": "job-7"}, {}).client_id == "job-7"
    scoped = f"BRIDGE_{command.upper()}_CLIENT_ID"
    assert build(command, {}, {scoped: "nightly"}).client_id == "nightly"


@pytest.mark.parametrize("command", ["consume", "replay"])
def test_the_topic_a_reader_reads_is_its_own_variable_and_serves_stays(command: str) -> None:
    scoped = f"BRIDGE_{command.upper()}_TOPIC"
    assert build(command, {}, {scoped: "tim.archive"}).topic == "tim.archive"
    assert build(command, {"topic": "tim.flag"}, {scoped: "tim.archive"}).topic == "tim.flag"
    assert build("serve", {}, {scoped: "tim.archive"}).topic == "tim.official-account"
    assert build("serve", {}, {"BRIDGE_TOPIC": "tim.oa"}).topic == "tim.oa"


def test_the_rate_of_replay_and_the_rate_of_bench_are_two_variables() -> None:
    environ = {"BRIDGE_REPLAY_RATE": "50", "BRIDGE_BENCH_RATE": "2000"}
    assert build("replay", {}, environ).rate == 50.0
    assert build("bench", {}, environ).rate == 2000.0
    assert build("replay", {}, {"BRIDGE_BENCH_RATE": "2000"}).rate is None


def test_serve_settings_carry_no_option_of_the_tools() -> None:
    serve = build("serve", {}, {})
    for field in ("max", "rate", "format", "group", "since", "url"):
        assert not hasattr(serve, field), field


def test_an_old_variable_of_a_tool_is_still_read_with_a_one_line_warning_naming_its_replacement() -> None:
    warnings: list[str] = []
    settings = build("consume", {}, {"BRIDGE_GROUP": "daily"}, warnings.append)
    assert settings.group == "daily"
    assert warnings == ["BRIDGE_GROUP is deprecated for `bridge consume`: set BRIDGE_CONSUME_GROUP instead"]


def test_the_scoped_variable_wins_over_the_old_one_and_the_old_one_is_said_to_be_ignored() -> None:
    warnings: list[str] = []
    environ = {"BRIDGE_RATE": "10", "BRIDGE_REPLAY_RATE": "20"}
    assert build("replay", {}, environ, warnings.append).rate == 20.0
    assert len(warnings) == 1
    assert "BRIDGE_RATE is ignored: BRIDGE_REPLAY_RATE is set" in warnings[0]


def test_a_flag_wins_over_an_old_variable_without_a_warning() -> None:
    warnings: list[str] = []
    assert build("bench", {"rate": 5.0}, {"BRIDGE_RATE": "10"}, warnings.append).rate == 5.0
    assert warnings == []


def test_a_bad_value_of_an_old_variable_names_the_old_variable() -> None:
    with pytest.raises(SettingsError, match=r"BRIDGE_SINCE='someday'"):
        build("replay", {}, {"BRIDGE_SINCE": "someday"}, lambda _: None)


def test_a_group_left_in_the_environment_warns_on_stderr_instead_of_silently_joining_a_group() -> None:
    result = run_bridge("consume", env={"BRIDGE_GROUP": "left-over"})
    warning, error = result.stderr.splitlines()
    assert warning == (
        "bridge consume: warning: BRIDGE_GROUP is deprecated for `bridge consume`: set BRIDGE_CONSUME_GROUP "
        "instead"
    )
    assert error.startswith("bridge consume: no Kafka brokers given")
    assert result.returncode == 2


@pytest.mark.parametrize("command", ["consume", "replay", "bench"])
def test_every_old_variable_of_a_tool_is_scoped_by_the_tool(command: str) -> None:
    spec = COMMANDS[command]
    for option in spec.options:
        old = spec.old_env(option)
        if old is not None:
            assert spec.env(option) == old.replace("BRIDGE_", f"BRIDGE_{command.upper()}_", 1)
