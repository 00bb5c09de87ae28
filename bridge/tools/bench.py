"""`bridge bench`: the bridge's throughput and latency under realistic load, beside a bare aiohttp baseline.

The bench starts an embedded broker (or uses `--bootstrap-servers`) and a bridge process against it (or
measures the bridge at `--url`), warms it up, and drives it with `bridge.tools.loadgen`: a closed loop of
`--connections` keep-alive connections, or with `--rate` an open loop at a constant arrival rate. With
`--baseline`, rounds alternate with a bare aiohttp server that reads the same requests (query and orjson
body) and answers OK without Kafka: the ratio of the two is the price of Kafka on the request path.

The bridge it starts takes the bench's environment, so `BRIDGE_LINGER_MS=5 bridge bench` measures that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import orjson

from bridge.errors import CommandError, ExitStatus
from bridge.settings import BenchSettings, ServeSettings
from bridge.tools.embedded import EmbeddedBroker, EmbeddedBrokerError, free_port, stop_process
from bridge.tools.loadgen import CallbackMix, LoadResult, closed_loop, open_loop, percentile

_READY_TIMEOUT_S = 30.0
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0))


@dataclass
class Target:
    """A server measured: its name, where it listens, and its process when the bench started it."""

    name: str
    host: str
    port: int
    path: str
    pid: int | None = None
    rounds: list[LoadResult] = field(default_factory=list)
    cpu_s: float = 0.0
    broker_cpu_s: float = 0.0
    rss_bytes: list[int] = field(default_factory=list)


def run_bench(settings: BenchSettings) -> int:
    """0 when every callback was answered OK, else 1. Raises `CommandError` when the bench cannot run: status
    2 for settings that do not fit, 1 when a server or the broker did not start."""
    if settings.floor and settings.url is not None and not settings.bootstrap_servers:
        raise CommandError(
            "--floor writes to Kafka: with --url, give the bridge's --bootstrap-servers too", ExitStatus.USAGE
        )
    try:
        report = _bench(settings)
    except (EmbeddedBrokerError, RuntimeError, OSError) as exc:
        raise CommandError(str(exc)) from None
    if settings.format == "json":
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(_describe(settings, report))
    failed = any(target["errors"] for target in report["targets"])
    return ExitStatus.FAILED if failed else ExitStatus.OK


def _bench(settings: BenchSettings) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        targets: list[Target] = []
        broker_pid: int | None = None
        servers = ",".join(settings.bootstrap_servers)
        if not servers and (settings.url is None or settings.floor):
            broker = stack.enter_context(EmbeddedBroker())
            servers, broker_pid = broker.bootstrap_servers, broker.process.pid if broker.process else None
        embedded = not settings.bootstrap_servers
        if settings.baseline:
            targets.append(stack.enter_context(_started("baseline", _baseline_command)))
        if settings.floor:

            def floor_command(port: int) -> list[str]:
                return [*_baseline_command(port), servers, "embedded" if embedded else "external"]

            targets.append(stack.enter_context(_started("floor", floor_command)))
        if settings.url is not None:
            url = urlsplit(settings.url)
            targets.append(Target("bridge", url.hostname or "127.0.0.1", url.port or 80, url.path or "/"))
        else:

            def bridge_command(port: int) -> list[str]:
                return _bridge_command(port, servers, embedded=embedded)

            targets.append(stack.enter_context(_started("bridge", bridge_command)))
        report: dict[str, Any] = _run(_measure(settings, targets, broker_pid))
        return report


def _bridge_command(port: int, servers: str, *, embedded: bool) -> list[str]:
    command = [sys.executable, "-m", "bridge", "serve", "--bootstrap-servers", servers]
    # The generator posts unsigned callbacks, on the loopback interface.
    command += ["--host", "127.0.0.1", "--port", str(port), "--allow-unsigned"]
    if embedded:
        command += ["--create-topics", "--replication-factor", "1"]
    return command


def _baseline_command(port: int) -> list[str]:
    return [sys.executable, "-m", "bridge.tools.bench", str(port)]


@contextlib.contextmanager
def _started(name: str, command_for: Any) -> Iterator[Target]:
    port = free_port()
    env = {"BRIDGE_LOG_LEVEL": "warning", **os.environ}
    process = subprocess.Popen(command_for(port), env=env, stdin=subprocess.DEVNULL)  # noqa: S603 - our own
    try:
        probe = "/healthz" if name == "baseline" else "/readyz"  # the others are ready once Kafka is
        _wait_ready(f"http://127.0.0.1:{port}{probe}", process)
        yield Target(name, "127.0.0.1", port, "/callback", pid=process.pid)
    finally:
        stop_process(process, timeout=15)


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with status {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:  # noqa: S310 - ours
            if answer.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {_READY_TIMEOUT_S:g} s")


async def _measure(settings: BenchSettings, targets: list[Target], broker_pid: int | None) -> dict[str, Any]:
    mixes = {
        target.name: CallbackMix(target.host, target.port, target.path, settings.accounts)
        for target in targets
    }
    for _ in range(settings.rounds):
        for target in targets:  # alternating, so a neighbour's burst on the shared machine hits both alike
            mix = mixes[target.name]
            await _load(settings, target, mix, settings.warmup)
            cpu_before, broker_before = _cpu_seconds(target.pid), _cpu_seconds(broker_pid)
            target.rounds.append(await _load(settings, target, mix, settings.duration))
            target.cpu_s += _cpu_seconds(target.pid) - cpu_before
            target.broker_cpu_s += _cpu_seconds(broker_pid) - broker_before
            target.rss_bytes.append(_rss_bytes(target.pid))
    report: dict[str, Any] = {
        "mode": "open loop" if settings.rate else "closed loop",
        "connections": settings.connections,
        "rate": settings.rate,
        "rounds": settings.rounds,
        "seconds_per_round": settings.duration,
        "accounts": settings.accounts,
        "targets": [
            _summary(target, broker_pid is not None and target.name != "baseline") for target in targets
        ],
    }
    by_name = {target["name"]: target for target in report["targets"]}
    if "baseline" in by_name:
        baseline = max(by_name["baseline"]["throughput"], 1e-9)
        if "bridge" in by_name:
            report["ratio"] = by_name["bridge"]["throughput"] / baseline
        if "floor" in by_name:
            report["floor_ratio"] = by_name["floor"]["throughput"] / baseline
    return report


async def _load(settings: BenchSettings, target: Target, mix: CallbackMix, seconds: float) -> LoadResult:
    if settings.rate:
        return await open_loop(
            target.host,
            target.port,
            mix,
            rate=settings.rate,
            connections=settings.connections,
            seconds=seconds,
        )
    return await closed_loop(target.host, target.port, mix, connections=settings.connections, seconds=seconds)


def _summary(target: Target, with_broker: bool) -> dict[str, Any]:
    seconds = sum(result.seconds for result in target.rounds)
    latencies = sorted(latency for result in target.rounds for latency in result.latencies)
    statuses: Counter[str] = Counter()
    for result in target.rounds:
        statuses.update(result.statuses)
    summary: dict[str, Any] = {
        "name": target.name,
        "requests": len(latencies),
        "throughput": len(latencies) / seconds,
        "latency_ms": {name: percentile(latencies, fraction) * 1000 for name, fraction in _PERCENTILES},
        "statuses": dict(statuses),
        "errors": {status: count for status, count in statuses.items() if status != "200"},
        "generator_cpu": sum(result.generator_cpu_s for result in target.rounds) / seconds,
        "server_cpu": target.cpu_s / seconds if target.pid is not None else None,
        "server_rss_mb": max(target.rss_bytes) / 2**20 if target.pid is not None else None,
        "broker_cpu": target.broker_cpu_s / seconds if with_broker else None,
    }
    if any(result.intended for result in target.rounds):
        summary["intended"] = sum(result.intended for result in target.rounds)
    return summary


def _describe(settings: BenchSettings, report: dict[str, Any]) -> str:
    load = (
        f"open loop at {settings.rate:g}/s over up to {settings.connections} connections"
        if settings.rate
        else f"closed loop, {settings.connections} keep-alive connections"
    )
    lines = [
        f"bridge bench: {load}; {settings.rounds} x {settings.duration:g} s per server after "
        f"{settings.warmup:g} s warm-up; {settings.accounts} accounts; the fixtures' mix, unique keys",
        "",
        f"{'server':<9} {'req/s':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>7} {'max':>7} "
        f"{'srv CPU':>7} {'RSS MB':>6} {'broker':>6} {'gen CPU':>7}  errors",
    ]
    for target in report["targets"]:
        latency = target["latency_ms"]
        lines.append(
            f"{target['name']:<9} {target['throughput']:>8.0f} "
            + " ".join(f"{latency[name]:>7.2f}" for name, _ in _PERCENTILES)
            + f" {_share(target['server_cpu']):>7} {_number(target['server_rss_mb']):>6} "
            f"{_share(target['broker_cpu']):>6} {_share(target['generator_cpu']):>7}  "
            + (", ".join(f"{status}: {count}" for status, count in target["errors"].items()) or "none")
        )
    lines.append("latencies in ms; CPU in % of one core; RSS at the end of the last round")
    if "floor_ratio" in report:
        lines.append(f"floor / baseline throughput: {report['floor_ratio']:.2f}")
    if "ratio" in report:
        lines.append(f"bridge / baseline throughput: {report['ratio']:.2f}")
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _cpu_seconds(pid: int | None) -> float:
    """User and system CPU time of a process, from /proc."""
    if pid is None:
        return 0.0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    return 0.0


def _rss_bytes(pid: int | None) -> int:
    if pid is None:
        return 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE
    return 0


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# --- the baseline server: the same parsing of the same requests, no Kafka --------------------------------
# --- and the floor: the baseline plus one write through the bridge's publisher, and nothing else ----------


def baseline_app(publisher_settings: ServeSettings | None = None) -> Any:
    """The bare server; with `publisher_settings`, the floor: each callback also written to Kafka."""
    from aiohttp import web  # noqa: PLC0415

    from bridge.kafka.publisher import KafkaPublisher  # noqa: PLC0415
    from bridge.tencent.envelope import Record  # noqa: PLC0415
    from bridge.tencent.protocol import OK_BODY, decode_body, parse_query, resolve_command  # noqa: PLC0415

    publisher = None if publisher_settings is None else KafkaPublisher(publisher_settings)

    async def handle(request: web.Request) -> web.Response:
        query = parse_query(request.query.items())
        raw_body = await request.read()
        body = decode_body(raw_body)
        resolve_command(query, body)
        if publisher is not None and publisher_settings is not None:
            record = Record(
                topic=publisher_settings.topic,
                entity=str(body.get("Official_Account", "")),
                key=str(body.get("MsgKey", "")).encode(),
                value=raw_body,
                timestamp_ms=0,
                headers=(),
            )
            deadline = asyncio.get_running_loop().time() + publisher_settings.delivery_timeout
            await publisher.publish(record, deadline)
        return web.Response(body=OK_BODY, content_type="application/json")

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_request: web.Request) -> web.Response:
        ready = publisher is not None and publisher.ready
        return web.Response(text="ready" if ready else "not ready", status=200 if ready else 503)

    async def kafka(_app: web.Application) -> AsyncIterator[None]:
        if publisher is not None:
            await publisher.start()
        yield
        if publisher is not None:
            await publisher.close()

    app = web.Application()
    app.router.add_post("/callback", handle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.cleanup_ctx.append(kafka)
    return app


def serve_baseline(port: int, bootstrap_servers: str | None = None, *, embedded: bool = False) -> None:
    from aiohttp import web  # noqa: PLC0415

    settings = None
    if bootstrap_servers is not None:
        settings = ServeSettings(bootstrap_servers=tuple(bootstrap_servers.split(",")), create_topics=True)
        if embedded:
            settings = replace(settings, replication_factor=1)
    web.run_app(baseline_app(settings), host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        serve_baseline(int(sys.argv[1]), sys.argv[2], embedded=sys.argv[3] == "embedded")
    else:
        serve_baseline(int(sys.argv[1]))
