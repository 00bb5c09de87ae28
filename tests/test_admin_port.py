"""`--admin-port`: the probes and the metrics on a listener of their own, the callback port serving only the
callback path and `/healthz`; without it, everything on one port as before.

The end-to-end test runs a real `bridge serve` process against the session's Apache Kafka; the others run
the applications in process, on the fake publisher.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from bridge.ingest.admin import create_admin_app
from bridge.ingest.server import create_app
from bridge.settings import COMMANDS, ServeSettings, build
from bridge.tools.embedded import free_port
from tests.conftest import BridgeClient
from tests.support.fakes import FakePublisher
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import one_line_error, run_bridge, start_serve, until_ready
from tests.support.settings import unique_settings

SEED = fixture("oa-after-send-text")
MOVED = ("/readyz", "/metrics", "/stats")
"""What the callback port no longer serves once the admin port is set."""


def fail_code(body: bytes) -> int:
    answer = orjson.loads(body)
    assert answer["ActionStatus"] == "FAIL"
    return int(answer["ErrorCode"])


def sample(metrics_text: str, name: str) -> float:
    """The value of the unlabelled sample `name` in a `/metrics` text."""
    for family in text_string_to_metric_families(metrics_text):
        for found in family.samples:
            if found.name == name:
                return float(found.value)
    raise AssertionError(f"{name} is not exported")


async def test_serve_with_an_admin_port_serves_probes_and_metrics_there_and_only_callbacks_on_the_other(
    kafka: str, tmp_path: Path
) -> None:
    """A real `bridge serve`: the admin port answers /healthz, /readyz, /metrics, /stats (which count the
    callback the other port confirmed), and no callback; the callback port writes the callback to Kafka,
    answers /healthz, and 404s the rest in Tencent's shape."""
    names = unique_settings(kafka)
    port, admin_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    process = start_serve(
        ["--bootstrap-servers", kafka, "--create-topics", "--partitions", "1"],
        log_path,
        host="127.0.0.1",
        port=str(port),
        admin_port=str(admin_port),
        topic=names.topic,
        rejected_topic=names.rejected_topic,
    )
    public, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, admin, timeout=60)
            async with session.post(f"{public}/callback", params=SEED.query, data=SEED.raw_body) as response:
                assert response.status == 200, await response.text()
            async with session.get(f"{public}/healthz") as response:
                assert response.status == 200
            for path in MOVED:
                async with session.get(f"{public}{path}") as response:
                    assert response.status == 404, path
                    assert fail_code(await response.read()) == 40400
                    assert response.content_type == "application/json"

            async with session.get(f"{admin}/healthz") as response:
                assert response.status == 200
            async with session.get(f"{admin}/stats") as response:
                assert (await response.json())["outcomes"]["confirmed"] == 1
            async with session.get(f"{admin}/metrics") as response:
                metrics = await response.text()
            assert sample(metrics, "bridge_broker_ready") == 1
            published = [
                s
                for family in text_string_to_metric_families(metrics)
                for s in family.samples
                if s.name == "bridge_records_published_total"
            ]
            assert [s.value for s in published] == [1]
            async with session.post(f"{admin}/callback", params=SEED.query, data=SEED.raw_body) as response:
                assert response.status in {404, 405}  # the admin listener takes no callback
                fail_code(await response.read())
        (record,) = await read_records(kafka, [names.topic], expect=1)
        assert orjson.loads(record.value or b"")["callback"] == SEED.body

        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
        log = log_path.read_text()
        assert f"admin listener on 127.0.0.1 port {admin_port}" in log
        assert "Traceback" not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def split_settings() -> ServeSettings:
    return replace(ServeSettings(), admin_port=0)


@pytest.fixture
async def callback_port(split_settings: ServeSettings) -> AsyncIterator[BridgeClient]:
    publisher = FakePublisher()
    publisher.confirm.set()
    async with TestClient(TestServer(create_app(split_settings, publisher=publisher))) as client:
        yield client


@pytest.mark.parametrize("path", MOVED)
async def test_with_an_admin_port_the_callback_port_answers_the_moved_paths_404_in_tencents_shape(
    callback_port: BridgeClient, path: str
) -> None:
    response = await callback_port.get(path)
    assert response.status == 404
    assert fail_code(await response.read()) == 40400
    assert "X-Request-Id" in response.headers


async def test_with_an_admin_port_the_callback_port_keeps_healthz_and_the_callback_path(
    callback_port: BridgeClient,
) -> None:
    assert (await callback_port.get("/healthz")).status == 200
    response = await callback_port.post("/callback", params=SEED.query, data=SEED.raw_body)
    assert response.status == 200


async def test_the_admin_app_reports_the_bridge_apps_state_and_404s_the_rest(
    callback_port: BridgeClient,
) -> None:
    """/stats and /metrics of the admin listener are the callback app's: the callback sent to the one
    is counted by the other; anything else gets a Tencent-style 404 or 405."""
    await callback_port.post("/callback", params=SEED.query, data=SEED.raw_body)
    async with TestClient(TestServer(create_admin_app(callback_port.app))) as admin:
        assert (await admin.get("/healthz")).status == 200
        stats = await (await admin.get("/stats")).json()
        assert stats["outcomes"]["confirmed"] == 1
        ready = await admin.get("/readyz")
        assert ready.status == 200
        assert (await ready.json())["status"] == "ready"
        metrics = await (await admin.get("/metrics")).text()
        assert sample(metrics, "bridge_callback_tokens") == 0  # unsigned: no token
        missing = await admin.get("/callback")
        assert missing.status == 404
        assert fail_code(await missing.read()) == 40400
        wrong = await admin.post("/stats")
        assert wrong.status == 405
        assert fail_code(await wrong.read()) == 40500
        assert "GET" in wrong.headers["Allow"]


async def test_without_an_admin_port_every_probe_and_the_metrics_stay_on_the_one_port(
    publisher: FakePublisher,
) -> None:
    async with TestClient(TestServer(create_app(ServeSettings(), publisher=publisher))) as client:
        for path in ("/healthz", *MOVED):
            assert (await client.get(path)).status == 200, path


def test_the_admin_listener_binds_where_the_callbacks_do_unless_told() -> None:
    """Never wider than the callback port by default: `bridge serve` on loopback keeps its admin port
    there too."""
    settings = build("serve", {"host": "127.0.0.1", "admin_port": 9001}, {})
    assert settings.admin_host is None
    assert build("serve", {}, {"BRIDGE_ADMIN_PORT": "9001", "BRIDGE_ADMIN_HOST": "10.0.0.1"}).admin_host == (
        "10.0.0.1"
    )
    assert build("serve", {}, {}).admin_port is None


def test_dev_has_no_admin_port() -> None:
    """`bridge dev` is one local process on one port: the option is serve's only."""
    assert "admin_port" in {option.field for option in COMMANDS["serve"].options}
    assert "admin_port" not in {option.field for option in COMMANDS["dev"].options}


def test_an_admin_port_equal_to_the_callback_port_is_refused_in_one_line() -> None:
    port = str(free_port())
    result = run_bridge(
        "serve",
        "--bootstrap-servers",
        "127.0.0.1:1",
        "--allow-unsigned",
        "--port",
        port,
        "--admin-port",
        port,
    )
    assert result.returncode != 0
    assert "--admin-port" in one_line_error(result)
