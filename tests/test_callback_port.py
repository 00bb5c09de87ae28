"""The callback path as `bridge serve` serves it: `BridgeRunner` calls `CallbackPort.handle` straight from
aiohttp's low-level server, without the application. Each case is posted to that server and to the
application through its router (as the test client serves it), and both must answer alike: status, body,
`X-Request-Id`, `X-Bridge-Outcome`, `Retry-After`, `Allow`; and count alike in `/metrics` and `/stats`. The
other paths still answer on the callback port, with and without `--admin-port`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from bridge.errors import DeliveryTimeout
from bridge.ingest.admin import create_admin_app
from bridge.ingest.runner import request_handler_options
from bridge.ingest.server import PORT, create_app
from bridge.secret import Secret
from bridge.settings import ServeSettings
from bridge.tencent.signature import expected_sign
from tests.conftest import BridgeClient
from tests.support.fakes import FakePublisher
from tests.support.requests import fixture
from tests.support.serve import BridgeTestServer

SEED = fixture("oa-after-send-text")
TOKEN = "port-token"  # noqa: S105 - a test token
SETTINGS = ServeSettings(callback_token=(Secret(TOKEN),), max_body_bytes=4096)
COMPARED_HEADERS = ("Content-Type", "X-Bridge-Outcome", "Retry-After", "Allow")


def signed(query: dict[str, str], token: str = TOKEN) -> dict[str, str]:
    request_time = str(int(time.time()))
    return {**query, "RequestTime": request_time, "Sign": expected_sign(token, request_time)}


@dataclass
class Served:
    """One bridge on the fake publisher, and the requests its application saw (not the callback path's,
    on `BridgeRunner`)."""

    client: BridgeClient
    publisher: FakePublisher
    seen_by_application: list[str]


async def _served(server: TestServer, publisher: FakePublisher, seen: list[str]) -> AsyncIterator[Served]:
    async with TestClient(server) as client:
        yield Served(client, publisher, seen)


def _app(settings: ServeSettings, publisher: FakePublisher, seen: list[str]) -> web.Application:
    app = create_app(settings, publisher=publisher)

    async def note(request: web.Request, _response: web.StreamResponse) -> None:
        seen.append(request.path)  # fired only for requests that went through the application's router

    app.on_response_prepare.append(note)
    return app


@pytest.fixture
async def direct() -> AsyncIterator[Served]:
    """`bridge serve`'s way: `BridgeRunner`, the callback path first."""
    publisher, seen = FakePublisher(), list[str]()
    publisher.confirm.set()
    server = BridgeTestServer(_app(SETTINGS, publisher, seen))
    await server.start_server(**request_handler_options(SETTINGS))
    async for served in _served(server, publisher, seen):
        yield served


@pytest.fixture
async def routed() -> AsyncIterator[Served]:
    """The application's own way: aiohttp's runner, the router, the middleware."""
    publisher, seen = FakePublisher(), list[str]()
    publisher.confirm.set()
    async for served in _served(TestServer(_app(SETTINGS, publisher, seen)), publisher, seen):
        yield served


async def _post(served: Served, params: dict[str, str], body: bytes, **headers: str) -> dict[str, Any]:
    async with served.client.post("/callback", params=params, data=body, headers=headers) as response:
        answer: dict[str, Any] = {
            "status": response.status,
            "body": orjson.loads(await response.read()),
            "request_id": response.headers.get("X-Request-Id"),
        }
        answer.update({name: response.headers.get(name) for name in COMPARED_HEADERS})
        return answer


async def _scrape(served: Served) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = await (await served.client.get("/metrics")).text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("bridge_") and "seconds" not in sample.name
    }


async def _cases(served: Served) -> list[dict[str, Any]]:
    """OK, a duplicate, a bad signature, a body too large, a body not JSON, a field of the wrong type, the
    broker failing and not ready, a method not allowed: each with a request id of the caller's."""
    answers: list[dict[str, Any]] = []
    body = SEED.raw_body
    for name, params, data, failure, ready in [
        ("ok", signed(SEED.query), body, None, True),
        ("duplicate", signed(SEED.query), body, None, True),
        ("bad signature", signed(SEED.query, "a guess"), body, None, True),
        ("too large", signed(SEED.query), body + b" " * 5000, None, True),
        ("not json", signed(SEED.query), b"{not json", None, True),
        ("bad field", signed(SEED.query), orjson.dumps({**SEED.body, "MsgTime": "x"}), None, True),
        ("broker failed", signed(SEED.query), orjson.dumps({**SEED.body, "MsgKey": "71_2_1"}), "fail", True),
        ("not ready", signed(SEED.query), orjson.dumps({**SEED.body, "MsgKey": "71_3_1"}), None, False),
    ]:
        timeout = DeliveryTimeout("Kafka did not confirm", ambiguous=True)
        served.publisher.failure = timeout if failure else None
        served.publisher.partitions = 12 if ready else None
        answer = await _post(served, params, data, **{"X-Request-Id": f"case-{len(answers)}"})
        answers.append({"case": name, **answer})
    served.publisher.failure, served.publisher.partitions = None, 12
    async with served.client.get("/callback", headers={"X-Request-Id": "case-get"}) as response:
        answers.append(
            {
                "case": "GET",
                "status": response.status,
                "body": orjson.loads(await response.read()),
                "request_id": response.headers.get("X-Request-Id"),
                **{name: response.headers.get(name) for name in COMPARED_HEADERS},
            }
        )
    return answers


async def test_the_callback_path_served_directly_answers_and_counts_exactly_as_through_the_router(
    direct: Served, routed: Served
) -> None:
    direct_answers, routed_answers = await _cases(direct), await _cases(routed)

    assert direct_answers == routed_answers
    statuses = {answer["case"]: answer["status"] for answer in direct_answers}
    assert statuses == {
        "ok": 200,
        "duplicate": 200,
        "bad signature": 401,
        "too large": 413,
        "not json": 400,
        "bad field": 400,
        "broker failed": 503,
        "not ready": 503,
        "GET": 405,
    }
    outcomes = {answer["case"]: answer["X-Bridge-Outcome"] for answer in direct_answers}
    assert outcomes["duplicate"] == "duplicate_confirmed"
    assert outcomes["broker failed"] == "ambiguous"
    assert all(answer["request_id"] == f"case-{i}" for i, answer in enumerate(direct_answers[:-1]))
    assert direct_answers[-1]["Allow"] == "POST"
    assert direct_answers[6]["Retry-After"] == "1"
    assert await _scrape(direct) == await _scrape(routed)
    direct_stats = await (await direct.client.get("/stats")).json()
    assert direct_stats == await (await routed.client.get("/stats")).json()
    assert direct_stats["outcomes"]["confirmed"] == 1
    assert direct_stats["dead_lettered"] == 2  # the body not JSON and the bad field, before their 400
    assert [len(direct.publisher.records), len(routed.publisher.records)] == [3, 3]
    # The callbacks never reached the application on BridgeRunner; the probes and scrapes did.
    assert "/callback" not in direct.seen_by_application
    assert "/stats" in direct.seen_by_application
    assert "/callback" in routed.seen_by_application


async def test_a_callback_asking_for_100_continue_is_served_on_the_direct_path_too(direct: Served) -> None:
    answer = await _post(direct, signed(SEED.query), SEED.raw_body, Expect="100-continue")
    assert (answer["status"], answer["X-Bridge-Outcome"]) == (200, "confirmed")
    assert len(direct.publisher.records) == 1


async def test_the_other_paths_still_answer_on_the_callback_port(direct: Served) -> None:
    client = direct.client
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/stats")).status == 200
    missing = await client.post("/elsewhere", data=b"x")
    assert missing.status == 404
    assert missing.headers["X-Request-Id"]
    assert (await missing.json())["ActionStatus"] == "FAIL"
    wrong_method = await client.post("/healthz")
    assert (wrong_method.status, wrong_method.headers["Allow"]) == (405, "GET,HEAD")
    assert (await wrong_method.json())["ActionStatus"] == "FAIL"
    samples = await _scrape(direct)
    assert samples[("bridge_requests_total", frozenset({("family", "none"), ("status", "404")}))] == 1


async def test_with_an_admin_port_the_callback_port_serves_the_callback_path_and_healthz_only() -> None:
    settings = replace(SETTINGS, admin_port=0)
    publisher, seen = FakePublisher(), list[str]()
    publisher.confirm.set()
    app = _app(settings, publisher, seen)
    server = BridgeTestServer(app)
    await server.start_server(**request_handler_options(settings))
    async with TestClient(server) as client, TestClient(TestServer(create_admin_app(app))) as admin:
        answer = await client.post("/callback", params=signed(SEED.query), data=SEED.raw_body)
        assert (answer.status, answer.headers["X-Bridge-Outcome"]) == (200, "confirmed")
        assert (await client.get("/healthz")).status == 200
        for moved in ("/readyz", "/metrics", "/stats"):
            refused = await client.get(moved)
            assert refused.status == 404, moved
            assert (await refused.json())["ActionStatus"] == "FAIL"
        stats = await (await admin.get("/stats")).json()
        assert stats["outcomes"]["confirmed"] == 1
        assert (await admin.get("/metrics")).status == 200
    assert "/callback" not in seen
    assert app[PORT].publisher is publisher
