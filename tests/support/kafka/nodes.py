"""Apache Kafka KRaft nodes as JVM subprocesses on loopback ports: one combined node, or a cluster of three.

Every node is broker and controller at once, with three listeners: CLIENT (what the bridge and the tests
use; it may advertise a fault proxy's port), INTERNAL (replication between brokers, never proxied) and
CONTROLLER (the Raft quorum). A node's data lives in its own folder, so it can be killed and started again
with its log: the restart runs Kafka's log recovery. Logs go to `server.log` and `stdout.log` there.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from bridge.tools.embedded import free_port
from tests.support.kafka import jars

START_TIMEOUT_S = 60.0
HEAP = "512m"
# Kafka's own G1 settings for a node that lives long (the session's, a benchmark's). A node a fault test
# starts for itself lives seconds: the serial collector and the quick JIT tier start it 30-40 % sooner on a
# busy two-core machine (measured 7.7-8.7 s against 11.8-18 s).
LONG_LIVED_JVM = ("-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20")
SHORT_LIVED_JVM = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")

# What keeps a test broker small and quick, after Kafka's own test utilities.
_SMALL = {
    "num.network.threads": "2",
    "num.io.threads": "2",
    "num.partitions": "1",
    "group.initial.rebalance.delay.ms": "0",
    "log.cleaner.dedupe.buffer.size": "2097152",
    "offsets.topic.num.partitions": "3",
    "transaction.state.log.num.partitions": "3",
    "share.coordinator.state.topic.num.partitions": "3",
    "log.segment.bytes": "16777216",
    "log.flush.interval.messages": str(2**63 - 1),
}


def cluster_id() -> str:
    """A Kafka cluster id: URL-safe base64 of 16 random bytes, unpadded, not starting with '-'."""
    while True:
        candidate = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not candidate.startswith("-"):
            return candidate


_CLUSTER_ID = cluster_id()
"""One cluster id for every node this process starts: separate clusters never meet, and it lets formatted
storage be reused."""
_TEMPLATES: dict[tuple[str, int], Path] = {}


def _properties_text(properties: Mapping[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in properties.items())


def _die_with_parent() -> None:
    """In the JVM's process before exec: get SIGKILL when the test process dies, however it dies."""
    import ctypes  # noqa: PLC0415 - only in the child

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


PAUSE_TIMEOUT_S = 10.0
_STOPPED_OR_GONE = frozenset("TtZX")
"""`/proc/PID/task/TID/stat` states of a thread that runs no more code: stopped (T), stopped by a tracer
(t), exited (Z, X)."""


def running_threads(pid: int) -> list[int]:
    """The threads of process `pid` not stopped (yet); none once the process is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    running = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stat:
                text = stat.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited meanwhile
        # "tid (comm) S ...": the name may hold spaces and parentheses, the state follows the last ')'.
        if chr(text[text.rindex(b")") + 2]) not in _STOPPED_OR_GONE:
            running.append(int(tid))
    return running


def freeze(pid: int, timeout: float = PAUSE_TIMEOUT_S) -> None:
    """SIGSTOP process `pid` and return only once every one of its threads is stopped.

    `kill()` returns once the signal is queued, not once the process is stopped: the kernel wakes one
    thread, which on its way back to user mode asks every other thread to stop, and each stops when it next
    runs. Meanwhile the JVM's network and request threads go on serving: measured on a two-core machine
    under load, a Kafka node's 87 threads were all stopped 4.5 ms after `kill()` at the median and 44 ms
    at worst, and a produce request sent 1.2 ms after `kill()` was acknowledged 2.4 ms later: a test that
    sends right after a plain `kill()` may find the broker still serving.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while running := running_threads(pid):
        if time.monotonic() > deadline:
            raise KafkaNodeError(
                f"process {pid}: {len(running)} threads still running {timeout:g} s after SIGSTOP "
                f"(first: {running[:5]})"
            )
        time.sleep(0.001)


class Started:
    """A context manager over `start()` and `stop()`; `stop()` runs too when `start()` fails part way."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class KafkaNodeError(RuntimeError):
    """A node could not be formatted or did not start."""


class KafkaNode(Started):
    """One combined broker+controller node. A context manager: formats, starts, waits, and kills on exit."""

    def __init__(
        self,
        directory: Path,
        *,
        node_id: int = 1,
        cluster: str | None = None,
        client_port: int | None = None,
        internal_port: int | None = None,
        controller_port: int | None = None,
        advertised_port: int | None = None,
        voters: str | None = None,
        properties: Mapping[str, str] | None = None,
        short_lived: bool = False,
        exact_properties: Mapping[str, str] | None = None,
        standalone: bool = False,
    ) -> None:
        """`voters` is the static quorum (`1@host:port,...`); without it the node is a quorum of its own.

        `advertised_port` is the client port the node tells clients to use (a proxy's); `properties` are
        laid over the defaults; `short_lived` trades peak speed for a quicker start.

        `exact_properties` replace all of that, verbatim (a configuration derived elsewhere, such as a
        compose file's); `client_port` is then the port to wait for, and the storage is formatted for that
        configuration itself: with the cluster id only (a static quorum, a broker-only node), or also with
        `--standalone` if `standalone` (a controller that bootstraps a dynamic quorum of its own).
        """
        if exact_properties is not None and properties is not None:
            raise ValueError("give `properties` (laid over the defaults) or `exact_properties`, not both")
        self.directory = directory
        self.node_id = node_id
        self.cluster = cluster or _CLUSTER_ID
        self.port = client_port or free_port()
        self.internal_port = internal_port or free_port()
        self.controller_port = controller_port or free_port()
        self.advertised_port = advertised_port or self.port
        self.voters = voters
        self.extra = dict(properties or {})
        self.short_lived = short_lived
        self.exact = None if exact_properties is None else dict(exact_properties)
        self.standalone = standalone
        self.process: subprocess.Popen[bytes] | None = None
        self.formatted = False

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    def properties(self) -> dict[str, str]:
        if self.exact is not None:
            return dict(self.exact)
        single = self.voters is None
        replication = "1" if single else "3"
        result = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "listeners": (
                f"CLIENT://127.0.0.1:{self.port},INTERNAL://127.0.0.1:{self.internal_port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": (
                f"CLIENT://127.0.0.1:{self.advertised_port},INTERNAL://127.0.0.1:{self.internal_port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "listener.security.protocol.map": "CLIENT:PLAINTEXT,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "INTERNAL",
            "controller.listener.names": "CONTROLLER",
            "log.dirs": str(self.data_dir),
            "offsets.topic.replication.factor": replication,
            "transaction.state.log.replication.factor": replication,
            "transaction.state.log.min.isr": "1" if single else "2",
            "share.coordinator.state.topic.replication.factor": replication,
            "share.coordinator.state.topic.min.isr": "1" if single else "2",
            # A node that restarts after SIGKILL registers anew; the controller accepts that only once the
            # old registration's session expired (9 s by default). Heartbeats every 0.5 s, expiry after 3 s.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
            **_SMALL,
        }
        result["controller.quorum.voters"] = self.voters or f"{self.node_id}@127.0.0.1:{self.controller_port}"
        if not single:
            result |= {
                "default.replication.factor": "3",
                "min.insync.replicas": "2",
                # ISR changes within seconds, so fault tests see them quickly.
                "replica.lag.time.max.ms": "3000",
                "controlled.shutdown.enable": "false",
            }
        return result | self.extra

    def format(self) -> None:
        """Write `server.properties` and lay out formatted storage (once: a restart keeps the data).

        Formatting runs a JVM of its own, a second or more; the result depends only on the cluster id and the
        node id (a static quorum keeps the controllers' addresses in the config, not in the storage), so it
        is done once per process for each pair and copied.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "server.properties"
        if self.exact is not None:  # its own storage layout, formatted for exactly this configuration
            config.write_text(_properties_text(self.exact))
            command = [*self._java(heap="128m"), "kafka.tools.StorageTool", "format"]
            command += ["--cluster-id", self.cluster, "--config", str(config)]
            if self.standalone:
                command.append("--standalone")
            result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
            if result.returncode != 0:
                output = result.stdout + result.stderr
                raise KafkaNodeError(f"formatting node {self.node_id} failed:\n{output}")
            self.formatted = True
            return
        config.write_text(_properties_text(self.properties()))
        shutil.copytree(self._template(), self.data_dir, dirs_exist_ok=True)
        self.formatted = True

    def _template(self) -> Path:
        key = (self.cluster, self.node_id)
        if key not in _TEMPLATES:
            template = Path(tempfile.mkdtemp(prefix=f"kafka-format-{self.node_id}-"))
            config = template / "server.properties"
            config.write_text(_properties_text(self.properties() | {"log.dirs": str(template / "data")}))
            command = [*self._java(heap="128m"), "kafka.tools.StorageTool", "format"]
            command += ["--cluster-id", self.cluster, "--config", str(config)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
            if result.returncode != 0:
                raise KafkaNodeError(
                    f"formatting node {self.node_id} failed:\n{result.stdout}{result.stderr}"
                )
            _TEMPLATES[key] = template / "data"
        return _TEMPLATES[key]

    def launch(self) -> KafkaNode:
        """Start the JVM without waiting for it (a cluster starts every node before waiting for any).

        Launch from a thread that outlives the node, such as the event loop's: the JVM gets SIGKILL when the
        thread that started it ends (PR_SET_PDEATHSIG follows the thread, not the process), and a thread
        of `asyncio.to_thread` ends with its loop. Wait for it (`wait_ready`) in any thread."""
        if not self.formatted:
            self.format()
        if self.process is not None and self.process.poll() is None:
            raise KafkaNodeError(f"node {self.node_id} is running already")
        command = [*self._java(heap=HEAP), "kafka.Kafka", str(self.directory / "server.properties")]
        with (self.directory / "stdout.log").open("ab") as output:
            self.process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - the hook only calls prctl
            )
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> KafkaNode:
        """Wait for the client port: Kafka opens it only once the broker is registered and unfenced."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise KafkaNodeError(f"node {self.node_id} exited at start:\n{self.read_log()}")
            if _port_open(self.port):
                return self
            time.sleep(0.1)
        raise KafkaNodeError(f"node {self.node_id} did not open its client port in {timeout:g} s")

    def start(self) -> KafkaNode:
        return self.launch().wait_ready()

    def pause(self) -> None:
        """Freeze the JVM (SIGSTOP): its connections stay open and nothing is answered. Returns once every
        thread of the JVM is stopped (see `freeze`), so a request sent after it reaches a frozen broker."""
        if self.process is None:
            raise KafkaNodeError(f"node {self.node_id} is not running")
        freeze(self.process.pid)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone. The data stays for `restart()`."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait(timeout=30)

    def restart(self) -> KafkaNode:
        """Kill the node if it runs, and start it again on the same ports with its data."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        """Teardown that never hangs: a test broker's data is thrown away, so no controlled shutdown."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
        self.kill()

    def read_log(self) -> str:
        texts = []
        for name in ("stdout.log", "server.log"):
            with contextlib.suppress(FileNotFoundError):
                texts.append((self.directory / name).read_text(errors="replace")[-3000:])
        return "\n".join(texts)

    def _java(self, heap: str) -> list[str]:
        return [
            "java",
            f"-Xmx{heap}",
            f"-Xms{heap}",
            *(SHORT_LIVED_JVM if self.short_lived else LONG_LIVED_JVM),
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={jars.LOG_CONFIG}",
            f"-Dkafka.logs.dir={self.directory}",
            "-cp",
            f"{jars.libs()}/*",
        ]

    def _signal(self, signum: signal.Signals) -> None:
        if self.process is None:
            raise KafkaNodeError(f"node {self.node_id} is not running")
        os.kill(self.process.pid, signum)


class KafkaCluster(Started):
    """Three combined nodes with a static quorum: replication factor 3, `min.insync.replicas` 2."""

    def __init__(
        self,
        directory: Path,
        size: int = 3,
        *,
        advertised_ports: Sequence[int] | None = None,
        properties: Mapping[str, str] | None = None,
    ) -> None:
        cluster = _CLUSTER_ID
        controller_ports = [free_port() for _ in range(size)]
        voters = ",".join(f"{n + 1}@127.0.0.1:{port}" for n, port in enumerate(controller_ports))
        self.nodes = [
            KafkaNode(
                directory / f"node{n + 1}",
                node_id=n + 1,
                cluster=cluster,
                controller_port=controller_ports[n],
                advertised_port=advertised_ports[n] if advertised_ports else None,
                voters=voters,
                properties=properties,
                short_lived=True,
            )
            for n in range(size)
        ]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(node.bootstrap_servers for node in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    def start(self) -> KafkaCluster:
        for node in self.nodes:
            node.format()
        for node in self.nodes:  # a node blocks until a majority of controllers is up: start all first
            node.launch()
        for node in self.nodes:
            node.wait_ready()
        return self

    def down(self) -> list[KafkaNode]:
        """The nodes not running now: killed, or exited."""
        return [node for node in self.nodes if node.process is None or node.process.poll() is not None]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
