"""The `logger` of every log line is one of the names log filters and alerts know (`bridge.logs.LOGGERS`),
the names of the flat layout, whichever package the module that logs lives in."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bridge.logs import LOGGERS
from tests.support.settings import NO_BROKER

BRIDGE = Path(__file__).parent.parent / "bridge"
_GET_LOGGER = re.compile(r"logging\.getLogger\(([^)]*)\)")
_OWN = re.compile(r'"(bridge(?:\.[a-z_]+)?)"')


def test_every_logger_of_the_bridge_is_a_documented_name() -> None:
    """No module logs under its module path (`__name__` would say `bridge.kafka.publisher`)."""
    found: dict[str, str] = {}
    for path in sorted(BRIDGE.rglob("*.py")):
        for argument in _GET_LOGGER.findall(path.read_text()):
            if not argument or argument.startswith('"aio'):  # the root logger, aiohttp's and aiokafka's
                continue
            match = _OWN.fullmatch(argument)
            assert match is not None, f"{path}: getLogger({argument}) is not a fixed name"
            found[match.group(1)] = str(path)
    assert set(found) <= set(LOGGERS), {name: where for name, where in found.items() if name not in LOGGERS}
    assert {"bridge.server", "bridge.runner", "bridge.publisher"} <= set(found)


def test_serve_logs_under_the_names_of_the_flat_layout() -> None:
    """`bridge serve` that cannot reach Kafka: its start, its attempts to connect and its stop, each line
    under the logger it had before the package was split (`bridge.publisher`, not
    `bridge.kafka.publisher`)."""
    command = [sys.executable, "-m", "bridge", "serve", "--bootstrap-servers", NO_BROKER]
    command += ["--allow-unsigned", "--port", "0", "--log-format", "json"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    try:
        # Until it listens and has failed to connect once: the publisher says so while it retries.
        while not {"bridge", "bridge.publisher"} <= seen:
            assert time.monotonic() < deadline, f"only {seen} within 60 s"
            line = process.stderr.readline()
            assert line, f"serve ended early, having logged under {seen}"
            seen.add(json.loads(line)["logger"])
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=30)[1]
    seen |= {json.loads(line)["logger"] for line in rest.splitlines() if line.startswith("{")}
    assert seen == {"bridge", "bridge.server", "bridge.publisher", "bridge.runner"}
