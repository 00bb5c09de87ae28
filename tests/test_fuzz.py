"""Hostile input, generated: arbitrary bytes, arbitrary JSON and mutated Tencent fixtures, signed or not.

Every answer is one of the documented statuses with a Tencent-style JSON body, never a 500, and exactly the
callbacks answered 200 are in Kafka. The bridge runs in a thread with its own event loop, so hypothesis can
drive it from a plain function; the broker is the session's real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.ingest.runner import BridgeRunner, request_handler_options
from bridge.ingest.server import create_app
from bridge.secret import Secret
from bridge.settings import ServeSettings
from bridge.tencent.signature import expected_sign
from tests.support.records import read_records
from tests.support.requests import load_fixtures
from tests.support.settings import unique_settings

TOKEN = "fuzz-token"  # noqa: S105 - a test token
APP = "1400000000"
ANSWERS = frozenset({200, 400, 401, 403, 405, 408, 413})
FIXTURES = load_fixtures()


@contextlib.contextmanager
def bridge_in_a_thread(bridge_settings: ServeSettings) -> Iterator[int]:
    """The bridge, as `bridge serve` runs it, on its own loop in a thread; yields its port once ready."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = BridgeRunner(create_app(bridge_settings), **request_handler_options(bridge_settings))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    port: int = runner.addresses[0][1]
    try:
        deadline = time.monotonic() + 30
        while exchange(port, "GET", "/readyz", b"")[0] != 200:
            assert time.monotonic() < deadline, "the bridge did not become ready"
            time.sleep(0.05)
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def exchange(port: int, method: str, target: str, body: bytes) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request(method, target, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass(frozen=True)
class Request:
    method: str
    query: dict[str, str]
    signing: str
    body: bytes

    def target(self) -> str:
        query = dict(self.query)
        now = int(time.time())
        request_time = str(now - 3600 if self.signing == "stale" else now)
        sign = {"good": expected_sign(TOKEN, request_time), "wrong": expected_sign("guess", request_time)}
        if self.signing in {"good", "stale"}:
            query |= {"RequestTime": request_time, "Sign": sign["good"]}
        elif self.signing == "wrong":
            query |= {"RequestTime": request_time, "Sign": sign["wrong"]}
        elif self.signing == "malformed":
            query |= {"RequestTime": "soon", "Sign": "xyz"}
        return "/callback?" + urlencode(query)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


@st.composite
def mutated_fixture(draw: st.DrawFn) -> tuple[dict[str, str], bytes]:
    original = draw(st.sampled_from(FIXTURES))
    body = dict(original.body)
    query = dict(original.query)
    for _ in range(draw(st.integers(0, 2))):
        match draw(st.sampled_from(["drop", "replace", "add", "query"])):
            case "drop" if body:
                del body[draw(st.sampled_from(sorted(body)))]
            case "replace" if body:
                body[draw(st.sampled_from(sorted(body)))] = draw(json_values)
            case "add":
                body[draw(st.text(max_size=12))] = draw(json_values)
            case "query":
                query[draw(st.sampled_from([*sorted(query), "Extra"]))] = draw(st.text(max_size=20))
    return query, dumps(body)


seed_query = FIXTURES[0].query
bodies = st.one_of(
    mutated_fixture(),
    st.tuples(st.just(seed_query), st.binary(max_size=1500)),
    # a valid callback padded with whitespace: still valid JSON, and sometimes over the size limit
    st.tuples(st.just(seed_query), st.integers(0, 1000).map(lambda n: b" " * n + FIXTURES[0].raw_body)),
    st.tuples(st.just(seed_query), json_values.map(dumps)),
)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    query, body = draw(bodies)
    if draw(st.integers(0, 9)) == 9:
        query = {**query, "SdkAppid": draw(st.sampled_from(["1400000001", "0", "x", APP]))}
    return Request(
        method=draw(st.sampled_from(["POST"] * 8 + ["GET", "PUT"])),
        query=query,
        signing=draw(st.sampled_from(["good"] * 6 + ["none", "wrong", "stale", "malformed"])),
        body=body,
    )


def canonical(raw: bytes) -> bytes:
    return orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)


def test_every_generated_request_gets_a_documented_answer_and_only_the_200s_land_in_kafka(kafka: str) -> None:
    bridge_settings = replace(
        unique_settings(kafka),
        callback_token=(Secret(TOKEN),),
        sdk_app_id=(APP,),
        max_body_bytes=1000,
        dedup_window=0,  # every 200 is its own write, so Kafka must hold exactly the 200s
    )
    accepted: list[bytes] = []
    with bridge_in_a_thread(bridge_settings) as port:

        @settings(
            max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
        )
        @given(request=requests())
        def post(request: Request) -> None:
            status, raw_answer = exchange(port, request.method, request.target(), request.body)
            assert status in ANSWERS, (status, raw_answer)
            answer = orjson.loads(raw_answer)
            assert set(answer) == {"ActionStatus", "ErrorInfo", "ErrorCode"}
            assert isinstance(answer["ErrorInfo"], str)
            assert (answer["ActionStatus"], answer["ErrorCode"] == 0) == (
                ("OK", True) if status == 200 else ("FAIL", False)
            )
            if status == 200:
                assert request.signing == "good", "a request without a valid signature was accepted"
                assert request.query.get("SdkAppid") == APP, "a request of another app was accepted"
                accepted.append(request.body)
            if request.method == "POST" and request.signing in {"none", "wrong", "stale", "malformed"}:
                assert status in {400, 401}, (status, raw_answer)  # a bad query may be told first

        post()
    records = asyncio.run(read_records(kafka, bridge_settings.callback_topics, expect=len(accepted)))
    envelopes = [orjson.loads(record.value) for record in records]
    assert all("Sign" not in envelope["query"] for envelope in envelopes)
    landed = Counter(orjson.dumps(e["callback"], option=orjson.OPT_SORT_KEYS) for e in envelopes)
    assert landed == Counter(canonical(body) for body in accepted)
    assert accepted, "no generated request was a valid callback: the generators are broken"
