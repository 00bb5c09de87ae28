"""`bridge bench`: its callbacks are valid and distinct in every run, from either driver, and a short run
reports sane figures, CPU per callback, and records that really reached Kafka."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
import pytest
from aiohttp import web

from bridge.tencent.commands import route
from bridge.tencent.envelope import callback_id
from bridge.tencent.protocol import decode_body, parse_query, resolve_command
from bridge.tools.bench_servers import FLOOR_TOPIC
from bridge.tools.embedded import free_port
from bridge.tools.loadgen import CallbackMix, percentile
from bridge.tools.wrk import run_wrk, write_mix
from tests.support.records import count_records, read_records
from tests.support.serve import start_serve, until_ready

_LONG_DIGITS = re.compile(rb"\d{19,}")


def needs_wrk() -> None:
    """wrk is on the PATH; skipped without it, except under CI, where `.ci/run` installs it."""
    if shutil.which("wrk") is None and not os.environ.get("CI"):
        pytest.skip("wrk is not installed (apt-get install wrk); .ci/run installs it")


def clean_environment(**extra: str) -> dict[str, str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("BRIDGE_")}
    return {**clean, **extra}


def run_bench(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "bench", *argv],
        capture_output=True,
        timeout=150,
        env=clean_environment() if env is None else env,
        check=False,
    )


def identity(request_line: bytes, body: bytes) -> str:
    """The bridge's dedup identity of a posted callback (SdkAppid, command, key)."""
    target = request_line.split(b" ")[1].decode()
    query = parse_query(parse_qsl(target.split("?", 1)[1], keep_blank_values=True))
    decoded = decode_body(body)
    command = resolve_command(query, decoded)
    return callback_id(query.sdk_app_id, command, route(command, query.sdk_app_id, decoded).key)


def test_the_callback_mix_gives_every_request_a_distinct_key_and_a_valid_json_body() -> None:
    mix = CallbackMix("127.0.0.1", 8080, "/callback", accounts=3)
    requests = [mix.next_request() for _ in range(300)]
    bodies = [request.split(b"\r\n\r\n", 1)[1] for request in requests]
    decoded = [decode_body(body) for body in bodies]
    assert len({body["MsgKey"] for body in decoded}) == len(requests)
    assert all(request.startswith(b"POST /callback?SdkAppid=") for request in requests)
    assert max(len(body) for body in bodies) > 30_000 > min(len(body) for body in bodies)
    commands = {body["CallbackCommand"] for body in decoded}
    assert {"C2C.CallbackAfterSendMsg", "Group.CallbackAfterSendMsg", "State.StateChange"} <= commands


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100


@pytest.mark.kafka  # the floor and the bridge write to Tansu
def test_a_short_bench_with_baseline_and_floor_reports_the_three_servers_without_errors() -> None:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("BRIDGE_")}
    argv = ["bench", "--baseline", "--floor", "--duration", "1", "--warmup", "0.3", "--rounds", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "bridge", *argv, "--connections", "4", "--format", "json"],
        capture_output=True,
        timeout=120,
        env=clean,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    report = orjson.loads(result.stdout)
    assert [target["name"] for target in report["targets"]] == ["baseline", "floor", "bridge"]
    for target in report["targets"]:
        assert target["requests"] > 0
        assert target["errors"] == {}
        latency = target["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
        assert target["server_cpu"] > 0
        assert target["server_rss_mb"] > 0
        assert target["generator_cpu"] > 0
    assert report["targets"][0]["broker_cpu"] is None
    assert report["targets"][1]["broker_cpu"] is not None
    assert report["targets"][2]["broker_cpu"] is not None
    assert report["ratio"] > 0
    assert report["floor_ratio"] > 0
    assert report["driver"] == "python"
    for target in report["targets"]:
        assert target["loop_cpu_us"] > 0
        assert target["cpu_us"] >= target["loop_cpu_us"]
    floor, bridge = report["targets"][1], report["targets"][2]
    assert report["bridge_own_us"] == pytest.approx(bridge["loop_cpu_us"] - floor["loop_cpu_us"])


def test_two_runs_of_the_mix_give_every_callback_a_new_identity_with_keys_like_tencents() -> None:
    """A second run against the same bridge must not be answered from its dedup window: MsgKey and a
    group message's MsgSeq (its identity is GroupId:MsgSeq) are new in every run, with no digit run of 19."""
    identities: set[str] = set()
    for _ in range(2):
        mix = CallbackMix("127.0.0.1", 8080, "/callback", accounts=3)
        for _ in range(700):
            head, body = mix.next_request().split(b"\r\n\r\n", 1)
            identities.add(identity(head.split(b"\r\n", 1)[0], body))
            assert not _LONG_DIGITS.search(str(decode_body(body)["MsgKey"]).encode())
    assert len(identities) == 1400


async def test_wrk_posts_the_same_mix_with_identities_new_in_every_run(tmp_path: Path) -> None:
    """The Lua script posts the fixtures' commands, padded bodies and accounts, every callback new, also
    across two wrk runs of one mix file."""
    needs_wrk()
    posted: list[tuple[bytes, bytes]] = []

    async def capture(request: web.Request) -> web.Response:
        posted.append((f"POST {request.path_qs} HTTP/1.1".encode(), await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/callback", capture)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        mix = CallbackMix("127.0.0.1", port, "/callback", accounts=5)
        mix_file = write_mix(mix, tmp_path)
        results = [
            await asyncio.to_thread(run_wrk, "127.0.0.1", port, mix_file, 5, connections=2, seconds=1)
            for _ in range(2)
        ]
    finally:
        await runner.cleanup()
    assert all(set(result.statuses) == {"below 400"} for result in results)
    assert sum(result.requests for result in results) <= len(posted)
    assert len(posted) >= 300, "wrk posted too few callbacks to check the mix"
    assert len({identity(line, body) for line, body in posted}) == len(posted)
    decoded = [decode_body(body) for _, body in posted]
    commands = {body["CallbackCommand"] for body in decoded}
    assert {"C2C.CallbackAfterSendMsg", "Group.CallbackAfterSendMsg", "State.StateChange"} <= commands
    assert max(len(body) for _, body in posted) > 30_000 > min(len(body) for _, body in posted)
    owners = {
        body.get("Official_Account")
        or body.get("GroupId")
        or body.get("From_Account")
        or body["Info"]["To_Account"]
        for body in decoded
    }
    assert owners <= {f"bench_account_{number}" for number in range(5)}
    assert len(owners) == 5
    assert not any(_LONG_DIGITS.search(str(body["MsgKey"]).encode()) for body in decoded)


def test_without_wrk_the_wrk_driver_is_a_clear_error_before_anything_starts(tmp_path: Path) -> None:
    result = run_bench("--driver", "wrk", env=clean_environment(PATH=str(tmp_path)))
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        "bridge bench: --driver wrk needs wrk, which is not on the PATH: install it (Debian and Ubuntu: "
        "apt-get install wrk), or use --driver python"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--driver", "wrk", "--rate", "100"), "--rate is the Python generator's open loop"),
        (("--driver", "both", "--duration", "1.5"), "--duration must be whole seconds with --driver both"),
    ],
)
def test_what_wrk_cannot_do_is_refused_as_usage(argv: tuple[str, ...], message: str) -> None:
    needs_wrk()
    result = run_bench(*argv)
    assert result.returncode == 2
    assert message in result.stderr.decode()


@pytest.mark.kafka  # the floor and the bridge write to the embedded Tansu
def test_a_short_wrk_bench_prints_cpu_per_callback_and_the_bridges_own_cost() -> None:
    needs_wrk()
    result = run_bench("--floor", "--driver", "wrk", "--duration", "1", "--warmup", "0", "--rounds", "1")
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    assert text.startswith("bridge bench (wrk -t1 -c64): closed loop, 64 keep-alive connections")
    rows = {
        line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("floor ", "bridge "))
    }
    header = next(line.split() for line in text.splitlines() if line.startswith("server "))
    loop = header.index("loop") - 1  # "loop us" is two words; the rows have one cell per column
    floor_us, bridge_us = float(rows["floor"][loop]), float(rows["bridge"][loop])
    assert floor_us > 0
    assert bridge_us > 0
    own = re.search(
        r"^the bridge's own cost \(bridge minus floor, event-loop CPU per callback\): (-?[\d.]+) us$",
        text,
        flags=re.MULTILINE,
    )
    assert own is not None, text
    assert float(own.group(1)) == pytest.approx(bridge_us - floor_us, abs=0.11)
    writes = re.search(
        r"^the bridge's /stats over the measured rounds: (\d+) new records confirmed, (\d+) "
        r"answered as duplicates, for (\d+) answers "
        r"\(wrk stops with up to one request per connection unanswered\)$",
        text,
        flags=re.MULTILINE,
    )
    assert writes is not None, text
    confirmed, duplicates, answers = (int(number) for number in writes.groups())
    assert duplicates == 0
    assert answers <= confirmed <= answers + 64  # wrk stops with up to one request per connection unanswered


@pytest.mark.kafka  # the bridge, the floor and the readback use the session's broker
async def test_both_drivers_against_a_running_bridge_write_every_callback_as_a_new_record(
    kafka: str, tmp_path: Path
) -> None:
    """With --url: every answer was a new record in Kafka (the bridge's /stats, the floor's topic read back),
    no duplicate from either driver or any round, and the bridge's CPU is said to be unknown."""
    needs_wrk()
    port = free_port()
    args = ["--bootstrap-servers", kafka, "--host", "127.0.0.1", "--port", str(port), "--create-topics"]
    args += ["--topic", f"bench-{port}.official-account", "--c2c-topic", f"bench-{port}.c2c"]
    args += ["--group-topic", f"bench-{port}.group", "--user-topic", f"bench-{port}.user"]
    bridge = start_serve(args, tmp_path / "bridge.log")
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, f"http://127.0.0.1:{port}", timeout=60)
        before = await count_records(kafka, [FLOOR_TOPIC])
        argv = ["--url", f"http://127.0.0.1:{port}/callback", "--bootstrap-servers", kafka, "--floor"]
        argv += [
            "--driver",
            "both",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--rounds",
            "2",
            "--connections",
            "8",
        ]
        result = await asyncio.to_thread(run_bench, *argv, "--format", "json")
        assert result.returncode == 0, result.stderr.decode()
        report: dict[str, Any] = orjson.loads(result.stdout)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/stats") as answer,
        ):
            stats = await answer.json()
    finally:
        bridge.terminate()
        bridge.wait(timeout=30)
    by_driver = {
        run["driver"]: {target["name"]: target for target in run["targets"]} for run in report["drivers"]
    }
    assert set(by_driver) == {"python", "wrk"}
    for driver, targets in by_driver.items():
        slack = 0 if driver == "python" else 8 * 2  # wrk leaves up to one request per connection unanswered
        bridge_target, floor_target = targets["bridge"], targets["floor"]
        assert bridge_target["errors"] == {}
        assert floor_target["errors"] == {}
        assert bridge_target["requests"] > 0
        assert bridge_target["writes"]["duplicates"] == 0
        answers = bridge_target["requests"]
        assert answers <= bridge_target["writes"]["confirmed"] <= answers + slack
        assert bridge_target["loop_cpu_us"] is None  # no pid for a bridge at --url
        assert floor_target["loop_cpu_us"] > 0
        assert floor_target["topic"] == FLOOR_TOPIC
    assert stats["outcomes"]["duplicate_in_flight"] == stats["outcomes"]["duplicate_confirmed"] == 0
    answered = sum(targets["floor"]["requests"] for targets in by_driver.values())
    records = await read_records(kafka, [FLOOR_TOPIC], expect=before + answered)
    assert answered <= len(records) - before <= answered + 8 * 2
    keys = [record.key for record in records]
    assert len(set(keys)) == len(keys), "a MsgKey was posted twice, in one run or across runs"
    assert all(
        record.value is not None and decode_body(record.value)["MsgKey"].encode() == record.key
        for record in records
    )
