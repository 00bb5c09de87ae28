"""docker-compose.yml run without Docker: the same services, as local processes on loopback ports.

There is no container engine here, so this reads the compose file and starts what it describes natively: each
`apache/kafka` service as a local Kafka node (`tests/support/kafka/`) whose `server.properties` is derived
from the service's environment by the image's own rule, each service built from `deploy/Dockerfile` as the
`bridge` command with the image's and the service's environment, in `depends_on` order.

Each service has a network of its own in compose, natively they all share 127.0.0.1: every (service, port)
gets a free port of its own, and each `host:port` in a listener, an advertised listener, the quorum voters,
`BRIDGE_BOOTSTRAP_SERVERS`, `BRIDGE_PORT`, the healthchecks and the README's curl is rewritten to it - the
one change, with volume paths to folders. A host that is not a service of the profile, a port the service
does not listen on, or a listener only the container's own loopback can reach fails here, as it would fail
in compose.

The image's rule (Apache Kafka's `docker/` folder and `kafka.docker.KafkaDockerWrapper`, 4.1.1; the
image's README, docker/examples/README.md):

- every variable `KAFKA_*` except the excluded ones below is a property: drop `KAFKA_`, lower-case, then
  `_` -> `.`, and in the result `...` -> `-`, `..` -> `_` (`KAFKA_ABC___DEF` is `abc-def`,
  `KAFKA_ABC__DEF` is `abc_def`);
- when the variables give any property, the image's default `server.properties` is not used at all (only
  the properties from the variables are written); only with none does it fall back to those defaults;
- `KAFKA_LISTENERS`, when unset on a node that is not controller-only, is `KAFKA_ADVERTISED_LISTENERS`
  with every host replaced by 0.0.0.0; a controller-only node may not set advertised listeners;
- the storage is formatted with `CLUSTER_ID` and the properties, without `--standalone` (the image keeps
  static voters, `controller.quorum.voters`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bridge.tools.embedded import free_port
from tests.support.kafka.nodes import KafkaNode, Started

ROOT = Path(__file__).parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
KAFKA_IMAGE = "apache/kafka"

# Variables the image's wrapper never turns into properties (JVM, logging and image settings).
IMAGE_EXCLUDED = frozenset(
    {
        "KAFKA_VERSION",
        "KAFKA_HEAP_OPTS",
        "KAFKA_LOG4J_OPTS",
        "KAFKA_OPTS",
        "KAFKA_JMX_OPTS",
        "KAFKA_JVM_PERFORMANCE_OPTS",
        "KAFKA_GC_LOG_OPTS",
        "KAFKA_LOG4J_ROOT_LOGLEVEL",
        "KAFKA_LOG4J_LOGGERS",
        "KAFKA_TOOLS_LOG4J_LOGLEVEL",
        "KAFKA_JMX_HOSTNAME",
    }
)
# Kafka variables whose values are addresses, in the forms each takes.
LISTENER_ENVS = ("KAFKA_LISTENERS",)
ADVERTISED_ENVS = ("KAFKA_ADVERTISED_LISTENERS",)
VOTER_ENVS = ("KAFKA_CONTROLLER_QUORUM_VOTERS",)
BOOTSTRAP_ENVS = ("KAFKA_CONTROLLER_QUORUM_BOOTSTRAP_SERVERS", "BRIDGE_BOOTSTRAP_SERVERS")
_LOOPBACK = ("localhost", "127.0.0.1")
_ANY = ("", "0.0.0.0", "[::]")  # the wildcard addresses: rewritten, never bound
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class ComposeError(ValueError):
    """The compose file describes something that could not work: the message says what and where."""


def image_property_name(variable: str) -> str | None:
    """The `server.properties` key the image makes of an environment variable, None if it makes none."""
    if not variable.startswith("KAFKA_") or variable in IMAGE_EXCLUDED:
        return None
    dotted = variable.removeprefix("KAFKA_").lower().replace("_", ".")
    return dotted.replace("...", "-").replace("..", "_")


def image_server_properties(environment: Mapping[str, str]) -> dict[str, str]:
    """The properties the `apache/kafka` image writes for a container with `environment`."""
    env = dict(environment)
    roles = env.get("KAFKA_PROCESS_ROLES")
    if roles is not None:
        if not env.get("CLUSTER_ID"):
            raise ComposeError("a KRaft node needs CLUSTER_ID (the image refuses to start without it)")
        if roles == "controller":
            if env.get("KAFKA_ADVERTISED_LISTENERS"):
                raise ComposeError("KAFKA_ADVERTISED_LISTENERS is not supported on a KRaft controller")
            env.pop("KAFKA_ADVERTISED_LISTENERS", None)
    if not env.get("KAFKA_LISTENERS") and roles != "controller" and env.get("KAFKA_ADVERTISED_LISTENERS"):
        env["KAFKA_LISTENERS"] = re.sub(r"://[^:]*:", "://0.0.0.0:", env["KAFKA_ADVERTISED_LISTENERS"])
    result = {
        name: value for variable, value in env.items() if (name := image_property_name(variable)) is not None
    }
    if not result:
        raise ComposeError("no KAFKA_ property set: the image would run its bundled defaults instead")
    return result


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `$NAME` and `$$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, default = match.group(2), match.group(3) or ""
        if operator == ":-":
            return variables.get(name) or default
        if operator == "-":
            return variables.get(name, default)
        return variables.get(name, "")

    result = _VARIABLE.sub(replace, value)
    if "${" in result.replace("$$", ""):
        raise ComposeError(f"unsupported interpolation in {value!r}")
    return result


def load(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def active_services(compose: Mapping[str, Any], profiles: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The services `docker compose --profile P...` starts: those without profiles and those of P."""
    services: dict[str, dict[str, Any]] = compose["services"]
    return {
        name: service
        for name, service in services.items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def start_waves(services: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The services in `depends_on` order, in waves: each wave needs only the ones before it."""
    needs: dict[str, set[str]] = {}
    for name, service in services.items():
        needs[name] = set()
        for dependency, spec in (service.get("depends_on") or {}).items():
            if dependency in services:
                needs[name].add(dependency)
            elif spec.get("required", True):
                raise ComposeError(f"{name} depends on {dependency}, which this profile does not start")
    waves: list[list[str]] = []
    started: set[str] = set()
    while len(started) < len(services):
        wave = sorted(name for name in services if name not in started and needs[name] <= started)
        if not wave:
            raise ComposeError(f"depends_on has a cycle among {sorted(set(services) - started)}")
        waves.append(wave)
        started |= set(wave)
    return waves


def image_bridge_environment(dockerfile: Path = DOCKERFILE) -> dict[str, str]:
    """The `BRIDGE_*` variables the bridge image's final stage sets with ENV."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    stages: list[dict[str, str]] = []
    for line in text.splitlines():
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append({})
        elif instruction.upper() == "ENV":
            for pair in shlex.split(arguments):
                variable, _, value = pair.partition("=")
                stages[-1][variable] = value
    return {name: value for name, value in stages[-1].items() if name.startswith("BRIDGE_")}


@dataclass
class NativeNetwork:
    """Compose's per-service networks flattened onto 127.0.0.1: one free port for each (service, port)."""

    services: Mapping[str, Mapping[str, Any]]
    allocate: Any  # () -> int, a free port
    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    loopback_only: set[tuple[str, int]] = field(default_factory=set)

    def port(self, service: str, port: int, *, from_service: str | None = None) -> int:
        """The native port of `service`'s container port; `from_service` is who connects (None: itself)."""
        if service not in self.services:
            raise ComposeError(f"host {service!r} is not a service this profile starts")
        if from_service not in (None, service) and (service, port) in self.loopback_only:
            raise ComposeError(f"{service}:{port} listens on its container's loopback only")
        key = (service, port)
        if key not in self.ports:
            self.ports[key] = self.allocate()
        return self.ports[key]

    def published(self, host_port: int) -> int:
        """The native port behind a port the compose file publishes on the host (`ports: ["H:C"]`)."""
        for name, service in self.services.items():
            for mapping in service.get("ports") or ():
                *host, container = str(mapping).split(":")
                if int((host or [container])[-1]) == host_port:
                    return self.port(name, int(container))
        raise ComposeError(f"no service publishes port {host_port} on the host")

    def address(self, host: str, port: int, *, seen_from: str | None) -> str:
        """`host:port` as written in a service (`seen_from`) or on the host (None), rewritten."""
        if host in _LOOPBACK:
            native = self.published(port) if seen_from is None else self.port(seen_from, port)
        elif seen_from is None:
            raise ComposeError(f"{host}:{port}: service names resolve inside compose's network only")
        else:
            native = self.port(host, port, from_service=seen_from)
        return f"127.0.0.1:{native}"

    def rewrite(self, service: str, variable: str, value: str) -> str:
        """`value` of `variable` in `service` with every address made native; other values unchanged."""
        if variable in LISTENER_ENVS:
            return ",".join(self._listener(service, item) for item in _items(value))
        if variable in ADVERTISED_ENVS:
            return ",".join(self._advertised(service, item) for item in _items(value))
        if variable in VOTER_ENVS:
            return ",".join(self._voter(service, item) for item in _items(value))
        if variable in BOOTSTRAP_ENVS:
            return ",".join(self.address(*_host_port(item), seen_from=service) for item in _items(value))
        if variable in ("BRIDGE_PORT", "BRIDGE_ADMIN_PORT"):
            return str(self.port(service, int(value)))
        for name in self.services:  # any other address to a service would escape the rewrite
            if re.search(rf"(^|[^\w.-]){re.escape(name)}:\d", value):
                raise ComposeError(f"{service}: {variable} names {name}:port, which is not rewritten")
        return value

    def _listener(self, service: str, item: str) -> str:
        name, host, port = _listener_parts(item)
        if host in _LOOPBACK:
            self.loopback_only.add((service, port))
        elif host not in (*_ANY, service, self.services[service].get("hostname")):
            raise ComposeError(f"{service} cannot listen on {host!r}: it is not its own address")
        return f"{name}://127.0.0.1:{self.port(service, port)}"

    def _advertised(self, service: str, item: str) -> str:
        name, host, port = _listener_parts(item)
        if host in _LOOPBACK:  # for clients on the host, through a published port
            return f"{name}://127.0.0.1:{self.published(port)}"
        return f"{name}://{self.address(host, port, seen_from=service)}"

    def _voter(self, service: str, item: str) -> str:
        node, at, address = item.partition("@")
        if not at:
            raise ComposeError(f"{service}: voter {item!r} is not id@host:port")
        return f"{node}@{self.address(*_host_port(address), seen_from=service)}"


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _host_port(address: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        raise ComposeError(f"{address!r} is not host:port")
    return host, int(port)


def _listener_parts(item: str) -> tuple[str, str, int]:
    name, separator, address = item.partition("://")
    if not separator:
        raise ComposeError(f"listener {item!r} is not NAME://host:port")
    host, port = _host_port(address)
    return name, host, port


def service_environment(service: Mapping[str, Any], variables: Mapping[str, str]) -> dict[str, str]:
    """The service's `environment`, interpolated; values as compose passes them (YAML numbers as text)."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(str(item).split("=", 1) for item in environment)
    result = {}
    for name, value in environment.items():
        if isinstance(value, bool) or value is None:
            raise ComposeError(f"{name}: compose wants a string, a number or nothing quoted, not {value!r}")
        result[name] = interpolate(str(value), variables)
    return result


def volume_paths(service: Mapping[str, Any], volumes_root: Path) -> dict[str, Path]:
    """Each mount target of the service and the native folder that stands for it."""
    result = {}
    for volume in service.get("volumes") or ():
        source, target, *_ = str(volume).split(":")
        result[target] = (ROOT / source).resolve() if source.startswith((".", "/")) else volumes_root / source
    return result


def native_path(path: str, mounts: Mapping[str, Path], container_root: Path) -> str:
    """A container path as a native one: under its mount's folder, else under the container's root."""
    for target, source in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return str(source / path[len(target) :].lstrip("/"))
    return str(container_root / path.lstrip("/"))


# --- running the stack -------------------------------------------------------------------------------------

START_TIMEOUT_S = 60.0
ONE_SHOT_TIMEOUT_S = 60.0


class NativeStack(Started):
    """The services of `profiles`, started natively in `directory`: Kafka nodes and bridge processes.

    A context manager: `start()` on entry, `stop()` on exit, whatever happened.
    """

    def __init__(
        self,
        directory: Path,
        profiles: Sequence[str] = (),
        *,
        compose: Mapping[str, Any] | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.compose = compose if compose is not None else load()
        self.services = active_services(self.compose, profiles)
        self.variables = dict(variables or {})  # the shell's variables compose interpolates: none by default
        self.network = NativeNetwork(self.services, free_port)
        self.nodes: dict[str, KafkaNode] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.completed: dict[str, subprocess.CompletedProcess[str]] = {}

    # what each service is, natively

    def kind(self, name: str) -> str:
        service = self.services[name]
        if str(service.get("image", "")).startswith(f"{KAFKA_IMAGE}:"):
            return "kafka"
        build = service.get("build") or {}
        if (ROOT / build.get("context", "?") / build.get("dockerfile", "Dockerfile")) == DOCKERFILE:
            return "bridge"
        raise ComposeError(f"{name}: no native stand-in for {service.get('image') or build}")

    def kafka_environment(self, name: str) -> dict[str, str]:
        env = service_environment(self.services[name], self.variables)
        mounts = volume_paths(self.services[name], self.directory / "volumes")
        result = {}
        for variable, value in env.items():
            native = self.network.rewrite(name, variable, value)
            if variable.endswith(("_DIR", "_DIRS")):
                root = self.directory / "containers" / name
                native = ",".join(native_path(item, mounts, root) for item in _items(native))
            result[variable] = native
        return result

    def kafka_properties(self, name: str) -> dict[str, str]:
        return image_server_properties(self.kafka_environment(name))

    def bridge_environment(self, name: str) -> dict[str, str]:
        env = image_bridge_environment() | service_environment(self.services[name], self.variables)
        return {variable: self.network.rewrite(name, variable, value) for variable, value in env.items()}

    def bridge_command(self, name: str) -> list[str]:
        service = self.services[name]
        entrypoint: Any = service.get("entrypoint") or _dockerfile_entrypoint()
        command: Any = service.get("command") or []
        if not isinstance(entrypoint, list) or not isinstance(command, list):
            raise ComposeError(f"{name}: write entrypoint and command as lists")
        program, *arguments = [str(part) for part in [*entrypoint, *command]]
        if program != "bridge":
            raise ComposeError(f"{name}: the image runs {program!r}, not the bridge")
        return [str(Path(sys.executable).with_name("bridge")), *arguments]

    def healthcheck(self, name: str) -> list[str]:
        """The healthcheck's command with its addresses rewritten (from inside the service's container)."""
        test = list(self.services[name].get("healthcheck", {}).get("test") or [])
        if not test or test[0] not in ("CMD", "CMD-SHELL"):
            raise ComposeError(f"{name}: no healthcheck to wait for")

        def native(match: re.Match[str]) -> str:
            return self.network.address(match.group(1), int(match.group(2)), seen_from=name)

        return [re.sub(r"\b(localhost|127\.0\.0\.1):(\d+)", native, part) for part in test[1:]]

    def kafka_client_port(self, name: str) -> int:
        """The port the Kafka healthcheck asks (`--bootstrap-server`), natively."""
        match = re.search(r"--bootstrap-server\s+127\.0\.0\.1:(\d+)", " ".join(self.healthcheck(name)))
        if match is None:
            raise ComposeError(f"{name}: the healthcheck names no --bootstrap-server")
        return int(match.group(1))

    # starting and stopping

    def start(self) -> NativeStack:
        kinds = {name: self.kind(name) for name in self.services}
        for name in (name for name in self.services if kinds[name] == "kafka"):
            self.nodes[name] = self._kafka_node(name)
        # Formatting is a JVM run per node and needs no other node: all of them at once, at the start.
        with ThreadPoolExecutor() as pool:
            formatted = {name: pool.submit(node.format) for name, node in self.nodes.items()}
            for wave in start_waves(self.services):
                for name in (name for name in wave if kinds[name] == "kafka"):
                    formatted[name].result()
                    self.nodes[name].launch()
                for name in (name for name in wave if kinds[name] == "bridge"):
                    self._start_bridge(name)
                for name in wave:
                    self._wait(name, kinds[name])
        return self

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for node in self.nodes.values():
            node.stop()

    def log(self, name: str) -> str:
        if name in self.nodes:
            return self.nodes[name].read_log()
        with contextlib.suppress(FileNotFoundError):
            return (self.directory / "containers" / name / "output.log").read_text(errors="replace")[-4000:]
        return ""

    def _kafka_node(self, name: str) -> KafkaNode:
        env = self.kafka_environment(name)
        properties = image_server_properties(env)
        return KafkaNode(
            self.directory / "containers" / name,
            node_id=int(properties["node.id"]),
            cluster=env["CLUSTER_ID"],
            client_port=self.kafka_client_port(name),
            exact_properties=properties,
            standalone=False,  # the image formats with the cluster id only, never --standalone
            short_lived=True,  # a stack lives for one test: the quicker start (nodes.py), not the image's G1
        )

    def _start_bridge(self, name: str) -> None:
        folder = self.directory / "containers" / name
        folder.mkdir(parents=True, exist_ok=True)
        outside = {
            variable: value
            for variable, value in os.environ.items()
            if not variable.startswith(("BRIDGE_", "KAFKA_"))
        }
        command, env = self.bridge_command(name), outside | self.bridge_environment(name)
        with (folder / "output.log").open("wb") as output:
            if self.services[name].get("restart") == "no":  # a one-shot service: run it to its end
                result = subprocess.run(
                    command, env=env, capture_output=True, text=True, timeout=ONE_SHOT_TIMEOUT_S, check=False
                )
                output.write((result.stdout + result.stderr).encode())
                self.completed[name] = result
                return
            self.processes[name] = subprocess.Popen(
                command, env=env, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def _wait(self, name: str, kind: str) -> None:
        if kind == "kafka":
            self.nodes[name].wait_ready(START_TIMEOUT_S)
            return
        if name in self.completed:
            result = self.completed[name]
            if result.returncode != 0:
                raise ComposeError(f"{name} exited {result.returncode}:\n{result.stdout}{result.stderr}")
            return
        check = self.healthcheck(name)
        if check[0] == "python":
            check[0] = sys.executable
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise ComposeError(f"{name} exited at start:\n{self.log(name)}")
            if subprocess.run(check, capture_output=True, timeout=10, check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise ComposeError(f"{name} was not healthy in {START_TIMEOUT_S:g} s:\n{self.log(name)}")


def _dockerfile_entrypoint() -> list[str]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    entrypoints = re.findall(r"^ENTRYPOINT\s+(.+)$", text, flags=re.MULTILINE)
    result: list[str] = json.loads(entrypoints[-1])
    return result


def kafka_config_names(log: str) -> set[str]:
    """Every property name the broker knows, from the `KafkaConfig values:` block it logs at start."""
    match = re.search(r"KafkaConfig values:\s*\n((?:\t.*\n)+)", log)
    if match is None:
        raise ComposeError("the broker's log has no 'KafkaConfig values:' block")
    return {line.strip().split(" = ", 1)[0] for line in match.group(1).splitlines()}
