"""Choosing and starting the broker the tests run on, and the brokers fault tests start of their own.

The broker is chosen as the README's Development section says: `KAFKA_BOOTSTRAP_SERVERS` if set;
testcontainers' Apache Kafka when a Docker daemon answers; the local Apache Kafka (tests/support/kafka/)
when java and mvn are present; the embedded Tansu last, and never in CI (`CI` set) unless asked for with
`BRIDGE_TEST_BROKER=tansu`, the fast second lane.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.tools.embedded import EmbeddedBroker, EmbeddedBrokerError
from tests.support.kafka import jars
from tests.support.kafka.nodes import KafkaNode, freeze

CONTAINER_IMAGE = "confluentinc/cp-kafka:8.1.0"


def _docker_answers() -> bool:
    """Whether a Docker daemon answers `/_ping` on its socket (DOCKER_HOST or the default Unix socket)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        family, address = socket.AF_UNIX, host.removeprefix("unix://")
    elif host.startswith("tcp://"):
        name, _, port = host.removeprefix("tcp://").rpartition(":")
        family, address = socket.AF_INET, (name, int(port))  # type: ignore[assignment]
    else:
        return False
    with socket.socket(family) as sock:
        sock.settimeout(3)
        try:
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
        except OSError:
            return False
    return status_line.startswith(b"HTTP/1.") and b" 200" in status_line


class NoTestBroker(RuntimeError):
    """No broker the tests may use: in CI only Apache Kafka will do."""


@dataclass(frozen=True)
class BrokerChoice:
    """Which broker the session runs on, as the pytest header prints it."""

    kind: str
    """"external", "testcontainers", "apache-kafka" or "tansu"."""
    description: str


@functools.cache
def broker_choice() -> BrokerChoice:
    """The broker the session will use, in the documented order; raises NoTestBroker in CI without Kafka.

    Decided once per process: `read_records` asks at every call, and asking Docker is a socket round trip."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        return BrokerChoice("external", f"KAFKA_BOOTSTRAP_SERVERS={configured}")
    forced = os.environ.get("BRIDGE_TEST_BROKER", "")
    if forced not in ("", "tansu", "apache-kafka"):
        raise NoTestBroker(f"BRIDGE_TEST_BROKER={forced!r}: use 'apache-kafka' or 'tansu'")
    if forced == "tansu":
        return BrokerChoice("tansu", "embedded Tansu (BRIDGE_TEST_BROKER=tansu: no guarantee rests on it)")
    if not forced and _docker_answers():
        return BrokerChoice("testcontainers", f"{CONTAINER_IMAGE} (Apache Kafka 4.1) in a container")
    if jars.tools_present():
        return BrokerChoice(
            "apache-kafka", f"Apache Kafka {jars.kafka_version()}, local KRaft node (tests/support/kafka)"
        )
    if forced or os.environ.get("CI"):
        raise NoTestBroker(
            "no Apache Kafka for the tests: java and mvn are missing (.ci/run installs them); "
            "set BRIDGE_TEST_BROKER=tansu to run on the embedded Tansu instead"
        )
    return BrokerChoice("tansu", "embedded Tansu (no java/mvn here: no guarantee rests on it)")


def _kafka_container() -> Any:
    try:  # testcontainers 4.15 moved the module; the old path warns, which the suite makes an error
        from testcontainers.community.kafka import KafkaContainer  # noqa: PLC0415
    except ImportError:
        from testcontainers.kafka import KafkaContainer  # noqa: PLC0415
    # testcontainers' KafkaContainer drives Confluent's image scripts, so it cannot run apache/kafka; cp-kafka
    # 8.1 is Confluent's build of Apache Kafka 4.1, the line the local broker pins. Not run here (no Docker).
    return KafkaContainer(CONTAINER_IMAGE).with_kraft()


@contextlib.contextmanager
def kafka_broker(directory: Path) -> Iterator[str]:
    """A broker for the test session, as `broker_choice()` picks it; yields its bootstrap servers."""
    choice = broker_choice()
    if choice.kind == "external":
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    elif choice.kind == "testcontainers":
        with _kafka_container() as container:
            yield container.get_bootstrap_server()
    elif choice.kind == "apache-kafka":
        with KafkaNode(directory) as node:
            yield node.bootstrap_servers
    else:
        with EmbeddedBroker() as broker:
            yield broker.bootstrap_servers


class FaultTansu(EmbeddedBroker):
    """The embedded Tansu as a fault test's broker: `pause()` returns once all its threads are stopped."""

    def pause(self) -> None:
        if self.process is None:
            raise EmbeddedBrokerError("the embedded broker is not running")
        freeze(self.process.pid)


FaultBroker = KafkaNode | EmbeddedBroker
"""A broker a test may pause, kill or restart: both have `start`, `pause`, `resume`, `stop` and `port`."""


def fault_broker(
    directory: Path, *, port: int | None = None, advertised_port: int | None = None
) -> FaultBroker:
    """A broker of the test's own, not yet started: an Apache Kafka node, or Tansu on the Tansu lane.

    A restart keeps its data: `stop()` then `start()` brings the same node back on the same port.
    """
    if broker_choice().kind == "tansu" or not jars.tools_present():
        return FaultTansu(port=port, advertised_port=advertised_port)
    return KafkaNode(directory, client_port=port, advertised_port=advertised_port, short_lived=True)
