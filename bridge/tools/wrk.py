"""The `wrk` driver of `bridge bench`: the same callback mix, posted by wrk (C) instead of the Python
generator.

The Python generator shares the machine's cores with the server it measures and takes CPU from it, which
flatters the ratio of a slow server to a fast one; wrk costs several times less per request. wrk runs with
`-t1 -c<connections> -d<seconds>` and `wrk_mix.lua` (package data), which posts `CallbackMix`'s templates in
its order with every `MsgKey` (and group `MsgSeq`) new in every run, and writes its totals and latency
histogram in `done()`, which `run_wrk` reads. wrk has no constant arrival rate: the open loop (`--rate`)
stays with the Python generator.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bridge.tools.loadgen import CallbackMix, LoadResult

SCRIPT = Path(__file__).with_name("wrk_mix.lua")
INSTALL_HINT = "install it (Debian and Ubuntu: apt-get install wrk), or use --driver python"
_RUNS = itertools.count()


class WrkMissing(RuntimeError):
    """`wrk` is not on the PATH."""


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise WrkMissing(f"--driver wrk needs wrk, which is not on the PATH: {INSTALL_HINT}")
    return path


def write_mix(mix: CallbackMix, directory: Path) -> Path:
    """The mix file `wrk_mix.lua` reads: one line per template, then the order line."""
    path = directory / "mix.tsv"
    with path.open("wb") as out:
        for target, body in mix.templates:
            # orjson writes no raw tab or newline: a tab and a newline can separate the fields and lines.
            out.write(b"T\t" + target.encode() + b"\t" + body + b"\n")
        out.write(b"O\t" + " ".join(str(index) for index in mix.order).encode() + b"\n")
    return path


def run_wrk(
    host: str, port: int, mix_file: Path, accounts: int, *, connections: int, seconds: int
) -> LoadResult:
    """One wrk run of `seconds` against `host:port`; blocks (the bench runs it in a thread)."""
    # New in every run, whatever ran before: this process, the time, and the count of runs in this process.
    salt = f"{os.getpid()}_{time.time_ns() // 1_000_000}_{next(_RUNS)}"
    seq_base = time.time_ns() // 1000
    command = [wrk_binary(), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(SCRIPT)]
    command += [f"http://{host}:{port}/", "--", str(mix_file), salt, str(seq_base), str(accounts)]
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)  # noqa: S603 - ours
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited with status {process.returncode}: {text.strip()[-500:]}")
    return parse_output(text, usage.ru_utime + usage.ru_stime)


def parse_output(text: str, cpu_s: float) -> LoadResult:
    """The `LoadResult` of wrk's output: `done()`'s totals and latency histogram (microseconds)."""
    totals: dict[str, int] | None = None
    result = LoadResult(0.0, generator_cpu_s=cpu_s)
    for line in text.splitlines():
        if line.startswith("bench-summary "):
            totals = {name: int(value) for name, value in (part.split("=") for part in line.split()[1:])}
        elif line.startswith("bench-latency "):
            _, value, count = line.split()
            result.latencies += [int(value) / 1e6] * int(count)
    if totals is None:
        raise RuntimeError(
            f"wrk wrote no summary (is {SCRIPT.name} installed with the package?): {text[-500:]}"
        )
    result.seconds = totals["duration_us"] / 1e6
    result.latencies.sort()
    result.answered = answered = totals["requests"]
    result.statuses["below 400"] = answered - totals["status"]
    for name, label in (
        ("status", "400 or above"),
        ("timeout", "timeout"),
        ("connect", "connect error"),
        ("read", "read error"),
        ("write", "write error"),
    ):
        if totals[name]:
            result.statuses[label] = totals[name]
    return result
