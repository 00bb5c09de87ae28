"""Apache Flink's SQL parser, run on files of Flink SQL: its jars resolved by Maven from `flink/pom.xml` once
per machine and cached outside git (as the Kafka broker's are), the small Java driver compiled beside them."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.support.kafka.jars import cache_root, cached_folder, copy_dependencies_command, tools_present

HERE = Path(__file__).parent / "flink"
POM = HERE / "pom.xml"
DRIVER = HERE / "ParseFlinkSql.java"
_TIMEOUT_S = 600


class ParserUnavailable(RuntimeError):
    """No java, javac or mvn here, or Maven could not resolve the parser's jars."""


def available() -> bool:
    return tools_present() and shutil.which("javac") is not None


def _classpath() -> Path:
    key = hashlib.sha256(POM.read_bytes() + DRIVER.read_bytes()).hexdigest()[:16]
    target = cache_root() / f"flink-sql-parser-{key}"
    if not (target / ".complete").exists() and not available():
        raise ParserUnavailable("java, javac and mvn are needed to run Apache Flink's SQL parser")
    return cached_folder(target, _build)


def _build(staging: Path) -> None:
    """The parser's jars copied by Maven, and the driver compiled beside them."""
    _run(copy_dependencies_command(POM, staging))
    _run(["javac", "-cp", f"{staging}/*", "-d", str(staging), str(DRIVER)])


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ParserUnavailable(f"{command[0]} failed: {exc}") from None
    if result.returncode != 0:
        raise ParserUnavailable(
            f"{command[0]} exit {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}"
        )
    return result


def parse(files: Sequence[Path]) -> dict[Path, list[str]]:
    """Each file's statement kinds (`CREATE_TABLE`, `CREATE_VIEW`), or `["ERROR", message]` for one the
    parser refuses."""
    classpath = _classpath()
    command = ["java", "-cp", f"{classpath}:{classpath}/*", "ParseFlinkSql", *map(str, files)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    parsed: dict[Path, list[str]] = {path: [] for path in files}
    for line in result.stdout.splitlines():
        name, _, rest = line.partition("\t")
        parsed[Path(name)].extend(rest.split("\t", 1) if rest.startswith("ERROR") else [rest])
    if result.returncode not in (0, 1):
        raise ParserUnavailable(f"the parser crashed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return parsed
