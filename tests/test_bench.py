"""`bridge bench`: its callbacks are valid and distinct, and a short run reports sane figures."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from bridge.tencent.protocol import decode_body
from bridge.tools.loadgen import CallbackMix, percentile


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
