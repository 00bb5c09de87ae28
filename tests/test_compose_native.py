"""docker-compose.yml run for real without Docker: its Kafka, its topics service and its bridge, natively.

`tests/support/compose.py` derives each Kafka node's `server.properties` from the compose service's `KAFKA_*`
environment by the `apache/kafka` image's rule, runs the `topics` service's command and the bridge with
their environments, with every host name mapped to a loopback port. The README's curl then goes to the
bridge and its record is read back through the listener the README gives for clients on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from bridge.settings import build
from tests.support import compose
from tests.support.compose import ComposeError, NativeStack
from tests.support.kafka import jars
from tests.support.kafka.view import partition_states
from tests.test_deploy import OPTION_ENVS, PLANNED_ENVS, env_of

README = (compose.ROOT / "README.md").read_text()
COMPOSE = compose.load()
PROFILES = {"default": (), "cluster": ("cluster",)}

needs_kafka = pytest.mark.skipif(
    not jars.tools_present(), reason="the local Apache Kafka needs java and mvn (tests/support/kafka)"
)


# --- the README's curl --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curl:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    answer: dict[str, object]


def readme_curl() -> Curl:
    """The quick start's curl, which the compose section says works as it is, and the answer it shows."""
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL)
    (block,) = [block for block in blocks if block.lstrip().startswith("curl ")]
    command, answer = re.sub(r"\\\n\s*", " ", block).strip().splitlines()
    words = shlex.split(command)
    assert words[0] == "curl"
    method, url, headers, body = "GET", "", {}, b""
    arguments = iter(words[1:])
    for word in arguments:
        if word == "-sS":
            continue
        if word == "-X":
            method = next(arguments)
        elif word == "-H":
            name, _, value = next(arguments).partition(":")
            headers[name.strip()] = value.strip()
        elif word == "-d":
            body = next(arguments).encode()
        elif not word.startswith("-") and not url:
            url = word
        else:
            raise AssertionError(f"the README's curl has {word!r}, which this test does not know")
    assert answer.startswith("# ")
    return Curl(method, url, headers, body, json.loads(answer[2:]))


def on_the_host(url: str, stack: NativeStack) -> str:
    """A URL as typed on the host (`http://127.0.0.1:PORT/...`), at the native port compose publishes."""
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/.*)", url)
    assert match is not None, url
    return f"http://127.0.0.1:{stack.network.published(int(match.group(1)))}{match.group(2)}"


def send(curl: Curl, stack: NativeStack) -> tuple[int, dict[str, object]]:
    """The curl as run on the host: its `127.0.0.1:port` is the port compose publishes."""
    url = on_the_host(curl.url, stack)
    request = urllib.request.Request(url, data=curl.body, headers=curl.headers, method=curl.method)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - a loopback URL
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def status_of(url: str) -> int:
    """The status of a GET of `url`, whatever it is."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a loopback URL
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def wait_for_200(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=2) as response,  # noqa: S310 - a loopback URL
        ):
            if response.status == 200:
                return True
        time.sleep(0.2)
    return False


async def read_to_the_end(
    bootstrap_servers: str, topic: str, partitions: list[int]
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic`, from the beginning to the end offsets read first."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, partition) for partition in partitions]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        ends = await consumer.end_offsets(assigned)
        records: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(20):
            while [part for part, end in ends.items() if await consumer.position(part) < end]:
                batch = await consumer.getmany(timeout_ms=200)
                records += [record for part in batch.values() for record in part]
        return records
    finally:
        await consumer.stop()


# --- the stack ------------------------------------------------------------------------------------------


@pytest.fixture(params=list(PROFILES), ids=list(PROFILES))
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NativeStack]:
    native = NativeStack(tmp_path, PROFILES[request.param])
    try:
        with native:
            yield native
    except ComposeError as error:
        pytest.fail(f"the compose stack does not run: {error}")


def test_every_bridge_variable_compose_sets_is_one_the_bridge_reads() -> None:
    for profile in PROFILES.values():
        native = NativeStack(Path("/nonexistent"), profile)
        for name in native.services:
            if native.kind(name) == "bridge":
                env = native.bridge_environment(name)
                assert set(env) <= OPTION_ENVS | set(PLANNED_ENVS), (name, set(env) - OPTION_ENVS)


@pytest.mark.kafka
@needs_kafka
def test_the_compose_stack_runs_natively_and_the_readme_curl_lands_in_kafka(stack: NativeStack) -> None:
    kafkas = [name for name in stack.services if stack.kind(name) == "kafka"]
    for name in kafkas:  # a misspelt KAFKA_ variable makes a property the broker does not know
        unknown = set(stack.kafka_properties(name)) - compose.kafka_config_names(
            stack.nodes[name].log_path.read_text()
        )
        assert not unknown, f"{name}: not Kafka properties: {sorted(unknown)}"
    topics_output = stack.completed["topics"].stdout
    settings = build("serve", {}, stack.bridge_environment("bridge"))
    assert settings.topic in topics_output

    # Healthy (/healthz) is alive, not yet connected: like a user, wait for /readyz before the curl. It is
    # on the admin port, which compose publishes on loopback; the callback port answers it 404.
    curl = readme_curl()
    callback_base = curl.url.split("?")[0].removesuffix(settings.path)
    admin_port = env_of("bridge")["BRIDGE_ADMIN_PORT"]  # as the compose file gives it, published so
    ready = on_the_host(f"http://127.0.0.1:{admin_port}/readyz", stack)
    assert wait_for_200(ready, timeout_s=30), stack.log("bridge")
    assert status_of(on_the_host(callback_base + "/readyz", stack)) == 404
    status, answer = send(curl, stack)
    assert (status, answer) == (200, curl.answer), stack.log("bridge")

    # Read back as a client on the host would: through the address the README gives (localhost:9094).
    host_port = int(re.search(r"localhost:(\d+)", README.split("### docker compose")[1]).group(1))  # type: ignore[union-attr]
    bootstrap = f"127.0.0.1:{stack.network.published(host_port)}"
    states = asyncio.run(partition_states(bootstrap, settings.topic))
    records = asyncio.run(read_to_the_end(bootstrap, settings.topic, sorted(states)))
    assert len(records) == 1
    assert records[0].value is not None
    envelope = json.loads(records[0].value)
    assert envelope["callback"] == json.loads(curl.body)
    assert envelope["query"]["CallbackCommand"] == envelope["callback"]["CallbackCommand"]

    # Every broker the profile starts holds a replica: replication factor auto is the broker count.
    brokers = {
        int(stack.kafka_properties(name)["node.id"])
        for name in kafkas
        if "broker" in stack.kafka_properties(name)["process.roles"]
    }
    assert states
    assert all(set(state.replicas) == brokers == set(state.isr) for state in states.values())


def test_the_compose_file_pins_the_kafka_the_tests_run() -> None:
    images = {
        service["image"]
        for service in COMPOSE["services"].values()
        if str(service.get("image", "")).startswith(f"{compose.KAFKA_IMAGE}:")
    }
    assert images == {f"{compose.KAFKA_IMAGE}:{jars.kafka_version()}"}


# --- the image's rule, against the image's own code -------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "name"),
    [
        ("KAFKA_ABC_DEF", "abc.def"),  # the image's README's three examples
        ("KAFKA_ABC___DEF", "abc-def"),
        ("KAFKA_ABC__DEF", "abc_def"),
        ("KAFKA_LOG_DIRS", "log.dirs"),
        ("KAFKA_HEAP_OPTS", None),  # a JVM setting, not a property
        ("KAFKA_LOG4J_LOGGERS", None),
        ("CLUSTER_ID", None),
        ("BRIDGE_PORT", None),
    ],
)
def test_the_image_rule_names_properties_as_its_readme_says(variable: str, name: str | None) -> None:
    assert compose.image_property_name(variable) == name


def properties_file(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.mark.kafka
@needs_kafka
def test_the_derived_properties_are_what_the_images_wrapper_writes(tmp_path: Path) -> None:
    """`kafka.docker.KafkaDockerWrapper setup`, the image's start step, from the pinned jars, agrees.

    The cluster profile has every Kafka service; the extra variables try the rule's corners.
    """
    native = NativeStack(tmp_path, PROFILES["cluster"])
    extra = {"KAFKA_ABC___DEF": "dash", "KAFKA_ABC__DEF": "underscore", "KAFKA_HEAP_OPTS": "-Xmx1g"}
    outside = {
        name: value for name, value in os.environ.items() if not name.startswith(("KAFKA_", "BRIDGE_"))
    }
    for name in (name for name in native.services if native.kind(name) == "kafka"):
        env = native.kafka_environment(name) | extra
        folders = {part: tmp_path / name / part for part in ("default", "mounted", "final")}
        for folder in folders.values():
            folder.mkdir(parents=True)
        (folders["default"] / "server.properties").write_text("image.default=1\n")
        command = ["java", "-Xmx128m", "-cp", f"{jars.libs()}/*", "kafka.docker.KafkaDockerWrapper", "setup"]
        command += ["-D", str(folders["default"]), "-M", str(folders["mounted"]), "-F", str(folders["final"])]
        result = subprocess.run(
            command, env=outside | env, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        written = properties_file((folders["final"] / "server.properties").read_text())
        assert written == compose.image_server_properties(env), name
        assert "image.default" not in written  # env properties replace the image's defaults, all of them


# --- what fails before anything starts ----------------------------------------------------------------


def mutated(service: str, variable: str, value: str) -> dict[str, object]:
    document = copy.deepcopy(COMPOSE)
    document["services"][service]["environment"][variable] = value
    return document


@pytest.mark.parametrize(
    ("service", "variable", "value", "error"),
    [
        ("bridge", "BRIDGE_BOOTSTRAP_SERVERS", "kafka-4:9092", "not a service"),
        ("bridge", "BRIDGE_BOOTSTRAP_SERVERS", "kafka", "not host:port"),
        ("kafka", "KAFKA_LISTENERS", "PLAINTEXT://kafka-2:9092", "not its own address"),
        (
            "kafka",
            "KAFKA_ADVERTISED_LISTENERS",
            "PLAINTEXT://kafka:9092,EXTERNAL://localhost:9099",
            "publishes",
        ),
        ("kafka", "KAFKA_CONTROLLER_QUORUM_VOTERS", "kafka:9093", "id@host:port"),
        ("kafka", "KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://localhost:9093", "loopback only"),
        ("kafka", "KAFKA_SOME_SERVERS", "kafka:9092", "not rewritten"),
    ],
)
def test_an_address_that_cannot_work_in_compose_fails_here(
    service: str, variable: str, value: str, error: str
) -> None:
    native = NativeStack(Path("/nonexistent"), ("cluster",), compose=mutated(service, variable, value))
    with pytest.raises(ComposeError, match=error):
        every_environment(native)


def every_environment(native: NativeStack) -> list[dict[str, str]]:
    return [
        native.kafka_environment(name) if native.kind(name) == "kafka" else native.bridge_environment(name)
        for name in native.services
    ]


# --- the file, loaded by the Compose Specification's reference loader ------------------------------------

COMPOSE_CHECK = Path(__file__).parent / "compose_check"


def compose_check() -> Path:
    """tests/compose_check built with Go (compose-go, which `docker compose config` uses), cached by hash."""
    sources = [*sorted(COMPOSE_CHECK.glob("*.go")), COMPOSE_CHECK / "go.mod", COMPOSE_CHECK / "go.sum"]
    key = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]
    target = jars.cache_root() / f"composecheck-{key}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f"{target.name}.{os.getpid()}")
        env = os.environ | {"GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"}
        result = subprocess.run(
            ["go", "build", "-o", str(staging), "."],  # noqa: S607 - go from PATH, as a developer runs it
            cwd=COMPOSE_CHECK,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"go build failed:\n{result.stdout}{result.stderr}"
        staging.rename(target)
    return target


@pytest.mark.skipif(shutil.which("go") is None, reason="the compose-go check needs Go (tests/compose_check)")
@pytest.mark.parametrize("profile", list(PROFILES))
def test_compose_go_loads_the_file_and_resolves_what_the_native_run_starts(profile: str) -> None:
    clean = {name: value for name, value in os.environ.items() if not name.startswith(("BRIDGE_", "KAFKA_"))}
    profiles = PROFILES[profile]
    result = subprocess.run(
        [str(compose_check()), str(compose.COMPOSE_FILE), *profiles],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded = yaml.safe_load(result.stdout)["services"]
    native = NativeStack(Path("/nonexistent"), profiles)
    assert set(loaded) == set(native.services)
    for name, service in native.services.items():
        resolved = compose.service_environment(service, {})
        assert (loaded[name].get("environment") or {}) == resolved, name
