"""Running the bridge under test: in process through `BridgeRunner`, or as `bridge` subprocesses, and
waiting until it is ready."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from bridge.ingest.runner import BridgeRunner

READY_TIMEOUT_S = 20.0


class BridgeTestServer(TestServer):
    """aiohttp's test server, running the app through `BridgeRunner` as `bridge serve` does.

    Start it with `start_server(**request_handler_options(settings))` for the limits `bridge serve` sets.
    """

    async def _make_runner(self, **kwargs: Any) -> BridgeRunner:
        return BridgeRunner(self.app, **kwargs)


async def wait_until_ready(client: TestClient[web.Request, web.Application]) -> None:
    """Wait until the bridge under the test client answers `/readyz` with 200."""
    await until_ready(client.session, str(client.make_url("")).rstrip("/"), READY_TIMEOUT_S)


async def not_ready(client: TestClient[web.Request, web.Application], phrase: str, timeout: float) -> str:
    """Wait until the bridge under the test client answers `/readyz` with 503 and `phrase` in its detail;
    return the detail."""
    async with asyncio.timeout(timeout):
        while True:
            response = await client.get("/readyz")
            detail: str = (await response.json())["detail"]
            if response.status == 503 and phrase in detail:
                return detail
            await asyncio.sleep(0.05)


async def until_ready(session: aiohttp.ClientSession, url: str, timeout: float = 60.0) -> None:
    """Wait until the bridge at `url` answers `/readyz` with 200; refused connections are waited out."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)


async def until_stats(
    session: aiohttp.ClientSession,
    url: str | URL,
    condition: Callable[[dict[str, Any]], bool],
    timeout: float = 5.0,
) -> None:
    """Wait until the bridge's `/stats` at `url` meet `condition`: a callback in flight (its record with the
    publisher), one whose body is still arriving."""
    async with asyncio.timeout(timeout):
        while True:
            async with session.get(url) as response:
                if condition(await response.json()):
                    return
            await asyncio.sleep(0.01)


def start_serve(arguments: Sequence[str], log_path: Path, **flags: str) -> subprocess.Popen[bytes]:
    """`bridge serve` in a process of its own, logging to `log_path`; `flags` become `--name value`. The
    test's environment passes, but no BRIDGE_ variable: only what the test says configures it."""
    args = [*arguments, "--allow-unsigned", "--log-format", "text"]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", value]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", *args], stdout=log, stderr=log, env=clean
        )


@contextlib.contextmanager
def serve_listening(arguments: Sequence[str], stderr_path: Path) -> Iterator[int]:
    """`bridge serve ARGUMENTS --host 127.0.0.1 --port 0 --log-format json` in a process of its own, its
    log in `stderr_path`, and no BRIDGE_ variable: yields the port it listens on, then stops it with
    SIGTERM, which must end it with status 0 within 30 s."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("BRIDGE_")}
    command = [sys.executable, "-m", "bridge", "serve", *arguments, "--host", "127.0.0.1", "--port", "0"]
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [*command, "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=stderr, env=clean
        )
    try:
        deadline = time.monotonic() + 30
        while (listening := re.search(r"listening on port (\d+)", stderr_path.read_text())) is None:
            assert process.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, "bridge serve did not start listening in 30 s"
            time.sleep(0.05)
        yield int(listening.group(1))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_bridge(*arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m bridge ARGUMENTS` with no BRIDGE_ variable from the environment."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean,
        cwd=cwd,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a command wrote to stderr; fails on a traceback or more lines."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]
