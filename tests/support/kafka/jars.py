"""The Apache Kafka broker's jars: resolved by Maven from `pom.xml` once per machine, cached outside git."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
POM = HERE / "pom.xml"
LOG_CONFIG = HERE / "log4j2.properties"
_RESOLVE_TIMEOUT_S = 600


class KafkaUnavailable(RuntimeError):
    """The local Apache Kafka cannot be had here: no java or mvn, or Maven could not resolve the jars."""


def kafka_version() -> str:
    """The Kafka version the pom pins (the tests and docker-compose.yml pin the same one)."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if match is None:
        raise KafkaUnavailable(f"{POM} names no kafka.version")
    return match.group(1)


def tools_present() -> bool:
    """Whether this machine has what the local Apache Kafka needs: a JVM and Maven."""
    return shutil.which("java") is not None and shutil.which("mvn") is not None


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tencent-chat-kafka-bridge"


def libs() -> Path:
    """The folder holding every jar the broker needs; resolved by Maven on first use, then reused.

    Keyed by the pom's hash, so changing the pinned version resolves anew. A lock file keeps two test
    processes from resolving at once, and the folder appears only when complete.
    """
    target = cache_root() / f"kafka-{kafka_version()}-{hashlib.sha256(POM.read_bytes()).hexdigest()[:16]}"
    if not (target / ".complete").exists() and not tools_present():
        raise KafkaUnavailable("java and mvn are needed to run the local Apache Kafka")
    return cached_folder(target, _copy_dependencies)


def cached_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, made by `build` (into a staging folder) unless a complete one is there already. A lock file
    keeps two test processes from building it at once, and the folder appears only when complete."""
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f"{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=target.parent))
        try:
            build(staging)
            (staging / ".complete").touch()
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def copy_dependencies_command(pom: Path, output: Path) -> list[str]:
    """Maven's command copying the runtime jars `pom` depends on into `output`."""
    return [
        "mvn",
        "--batch-mode",
        "--quiet",
        "--file",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={output}",
        "-DincludeScope=runtime",
    ]


def _copy_dependencies(output: Path) -> None:
    command = copy_dependencies_command(POM, output)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_RESOLVE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KafkaUnavailable(f"mvn could not resolve Apache Kafka's jars: {exc}") from None
    if result.returncode != 0 or not any(output.glob("kafka_2.13-*.jar")):
        tail = (result.stdout + result.stderr)[-3000:]
        raise KafkaUnavailable(
            f"mvn could not resolve Apache Kafka's jars (exit {result.returncode}):\n{tail}"
        )
