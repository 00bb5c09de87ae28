"""`GET /metrics` and the logs: counters after good, bad and failed callbacks; one JSON line per failure.

Good and bad callbacks go through the real broker; broker failures come from a fake publisher, so each
failure kind is produced exactly once.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.errors import KafkaConnectionError, KafkaError, NotEnoughReplicasError
from prometheus_client.parser import text_string_to_metric_families

from bridge.errors import BrokerRejected, DeliveryTimeout
from bridge.ingest.server import create_app
from bridge.logs import log_handler
from bridge.settings import ServeSettings
from tests.conftest import BridgeClient
from tests.support.fakes import FakePublisher
from tests.support.requests import fixture

OA = fixture("oa-after-send-text")
C2C = fixture("c2c-after-send")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: BridgeClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(await response.text())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_good_and_bad_callbacks_by_family_status_and_outcome(
    bridge: BridgeClient,
) -> None:
    for callback in (OA, OA, C2C):
        assert (await bridge.post("/callback", params=callback.query, data=callback.raw_body)).status == 200
    assert (await bridge.post("/callback", params=OA.query, data=b"{not json")).status == 400
    assert (await bridge.post("/elsewhere", params=OA.query, data=OA.raw_body)).status == 404
    bad_field = {**OA.body, "MsgTime": "yesterday"}
    assert (await bridge.post("/callback", params=OA.query, data=orjson.dumps(bad_field))).status == 400
    await bridge.get("/readyz")
    await bridge.get("/stats")

    samples = await scrape(bridge)

    assert value(samples, "bridge_requests_total", family="OfficialAccount", status="200") == 2
    assert value(samples, "bridge_requests_total", family="C2C", status="200") == 1
    # The second OA is a copy of the first, answered 200 by the edge dedup without a second write.
    assert (
        value(samples, "bridge_callbacks_total", family="OfficialAccount", outcome="duplicate_confirmed") == 1
    )
    assert value(samples, "bridge_requests_total", family="none", status="400") == 1
    assert value(samples, "bridge_requests_total", family="none", status="404") == 1
    assert value(samples, "bridge_requests_total", family="OfficialAccount", status="400") == 1
    assert value(samples, "bridge_callbacks_total", family="OfficialAccount", outcome="confirmed") == 1
    assert value(samples, "bridge_callbacks_total", family="OfficialAccount", outcome="rejected") == 1
    assert sum(v for (name, _), v in samples.items() if name == "bridge_requests_total") == 6, (
        "probes or /stats counted"
    )
    assert value(samples, "bridge_request_duration_seconds_count", family="OfficialAccount") == 3
    assert value(samples, "bridge_records_published_total", family="OfficialAccount") == 1
    assert value(samples, "bridge_records_published_total", family="C2C") == 1
    assert value(samples, "bridge_published_bytes_total", family="C2C") > len(C2C.raw_body)
    assert value(samples, "bridge_broker_ack_duration_seconds_count") == 2
    assert value(samples, "bridge_broker_ack_duration_seconds_bucket", le="+Inf") == 2
    assert value(samples, "bridge_outcomes", outcome="duplicate_confirmed") == 1
    assert value(samples, "bridge_broker_ready") == 1
    assert value(samples, "bridge_requests_in_flight") == 0
    assert value(samples, "bridge_producer_queued_records") == 0
    assert not any(name == "bridge_publish_errors_total" for name, _ in samples)


@pytest.fixture
async def client(publisher: FakePublisher) -> AsyncIterator[BridgeClient]:
    async with TestClient(TestServer(create_app(ServeSettings(), publisher=publisher))) as test_client:
        yield test_client


def refused_by_kafka(error: KafkaError, *, ambiguous: bool) -> BrokerRejected:
    """A `BrokerRejected` as the publisher raises it: `from None` inside the handler of the Kafka error."""
    rejected = BrokerRejected(f"Kafka refused the write: {type(error).__name__}", ambiguous=ambiguous)
    rejected.__context__, rejected.__suppress_context__ = error, True
    return rejected


async def test_failed_writes_count_by_kind_and_those_that_may_have_landed_are_ambiguous(
    client: BridgeClient, publisher: FakePublisher
) -> None:
    failures = [
        DeliveryTimeout("Kafka did not confirm the write within 1.5 s", ambiguous=True),
        refused_by_kafka(KafkaConnectionError("connection lost"), ambiguous=True),
        refused_by_kafka(NotEnoughReplicasError(), ambiguous=False),
    ]
    for failure in failures:
        publisher.failure = failure
        assert (await client.post("/callback", params=OA.query, data=OA.raw_body)).status == 503
    publisher.failure, publisher.partitions, publisher.ready = None, None, False
    assert (await client.post("/callback", params=OA.query, data=OA.raw_body)).status == 503

    samples = await scrape(client)

    assert value(samples, "bridge_publish_errors_total", kind="delivery_timeout") == 1
    assert value(samples, "bridge_publish_errors_total", kind="KafkaConnectionError") == 1
    assert value(samples, "bridge_publish_errors_total", kind="NotEnoughReplicasError") == 1
    assert value(samples, "bridge_publish_errors_total", kind="not_ready") == 1
    assert value(samples, "bridge_callbacks_total", family="OfficialAccount", outcome="ambiguous") == 2
    assert value(samples, "bridge_callbacks_total", family="OfficialAccount", outcome="failed") == 2
    assert value(samples, "bridge_requests_total", family="OfficialAccount", status="503") == 4
    assert value(samples, "bridge_records_published_total", family="OfficialAccount") == 0
    assert value(samples, "bridge_broker_ready") == 0


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the `bridge` loggers write, as JSON lines, at info level."""
    stream = io.StringIO()
    handler = log_handler("json", stream)
    logger = logging.getLogger("bridge")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(previous)


async def test_a_failed_callback_logs_one_json_line_with_its_request_id_and_a_good_one_none(
    client: BridgeClient, json_log: io.StringIO
) -> None:
    good = await client.post("/callback", params=OA.query, data=OA.raw_body)
    bad = await client.post("/callback", params=OA.query, data=b"[]", headers={"X-Request-Id": "tencent-42"})
    assert (good.status, bad.status) == (200, 400)
    assert good.headers["X-Request-Id"]
    assert bad.headers["X-Request-Id"] == "tencent-42"

    lines = [orjson.loads(line) for line in json_log.getvalue().splitlines()]

    assert len(lines) == 1, lines
    (line,) = lines
    assert line["request_id"] == "tencent-42"
    assert line["status"] == 400
    assert line["error_code"] == 40002
    assert "object" in line["reason"]
    assert line["level"] == "info"


async def test_a_request_id_that_could_forge_log_lines_is_replaced(client: BridgeClient) -> None:
    response = await client.get("/nowhere", headers={"X-Request-Id": 'x"\\ninjected'})
    assert response.status == 404
    assert response.headers["X-Request-Id"] != 'x"\\ninjected'
    assert len(response.headers["X-Request-Id"]) == 16


async def test_only_a_callback_moves_the_last_received_time(client: BridgeClient) -> None:
    """Scanners, probes and /stats must not hide the "nothing received" alert."""
    before = value(await scrape(client), "bridge_last_request_timestamp_seconds")
    await client.get("/stats")
    await client.post("/wp-login.php", data=b"x")
    await client.post("/callback", params=OA.query, data=b"garbage")
    assert value(await scrape(client), "bridge_last_request_timestamp_seconds") == before
    assert (await client.post("/callback", params=OA.query, data=OA.raw_body)).status == 200
    assert value(await scrape(client), "bridge_last_request_timestamp_seconds") > before
