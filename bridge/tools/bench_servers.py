"""The servers `bridge bench` measures beside the bridge: the bare baseline and the plain aiokafka floor.

- baseline: a bare aiohttp handler that parses the request as the bridge does (query, orjson body, command)
  and answers OK, without Kafka.
- floor: the same handler plus one plain `await producer.send_and_wait(topic, value, key=MsgKey)` per
  callback (aiokafka, acks=all, linger 0) and nothing else: what anyone would write in ten lines. It writes
  the raw bodies to a topic of its own (`FLOOR_TOPIC`), created at start with the bridge's topic shape.

Run as `python -m bridge.tools.bench_servers baseline PORT` or `... floor PORT SERVERS TOPIC
embedded|external`; both listen on 127.0.0.1 and answer `/healthz` and `/readyz`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

FLOOR_TOPIC = "bridge-bench.floor"


def baseline_app(floor: tuple[str, str, bool] | None = None) -> Any:
    """The bare server; with `floor` (bootstrap servers, topic, embedded broker), the plain aiokafka floor."""
    from aiohttp import web  # noqa: PLC0415
    from aiokafka import AIOKafkaProducer  # noqa: PLC0415

    from bridge.tencent.protocol import OK_BODY, decode_body, parse_query, resolve_command  # noqa: PLC0415

    producer_key = web.AppKey("producer", AIOKafkaProducer)

    async def handle(request: web.Request) -> web.Response:
        query = parse_query(request.query.items())
        raw_body = await request.read()
        body = decode_body(raw_body)
        resolve_command(query, body)
        return web.Response(body=OK_BODY, content_type="application/json")

    async def handle_and_write(request: web.Request) -> web.Response:
        query = parse_query(request.query.items())
        raw_body = await request.read()
        body = decode_body(raw_body)
        resolve_command(query, body)
        producer = request.app[producer_key]
        await producer.send_and_wait(topic, raw_body, key=str(body.get("MsgKey", "")).encode())
        return web.Response(body=OK_BODY, content_type="application/json")

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(request: web.Request) -> web.Response:
        ready = producer_key in request.app
        return web.Response(text="ready" if ready else "not ready", status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if floor is None:
        app.router.add_post("/callback", handle)
        return app
    servers, topic, embedded = floor

    async def kafka(app: web.Application) -> AsyncIterator[None]:
        producer = AIOKafkaProducer(bootstrap_servers=servers.split(","), acks="all", linger_ms=0)
        await producer.start()
        try:
            await _create_topic(servers, topic, embedded, len(producer.client.cluster.brokers()))
            app[producer_key] = producer
            yield
        finally:
            await producer.stop()

    app.router.add_post("/callback", handle_and_write)
    app.cleanup_ctx.append(kafka)
    return app


async def _create_topic(servers: str, topic: str, embedded: bool, broker_count: int) -> None:
    """The floor's topic, shaped as the bridge shapes its own (12 partitions, up to 3 replicas)."""
    from bridge.kafka.topics import await_leaders, create_topics  # noqa: PLC0415
    from bridge.settings import TopicsSettings  # noqa: PLC0415

    settings = TopicsSettings(bootstrap_servers=tuple(servers.split(",")))
    if embedded:
        settings = TopicsSettings(bootstrap_servers=settings.bootstrap_servers, replication_factor=1)
    await create_topics(settings, [topic], broker_count)
    await await_leaders(settings, [topic])


def serve(port: int, floor: tuple[str, str, bool] | None = None) -> None:
    from aiohttp import web  # noqa: PLC0415

    web.run_app(baseline_app(floor), host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    if sys.argv[1] == "floor":
        serve(int(sys.argv[2]), (sys.argv[3], sys.argv[4], sys.argv[5] == "embedded"))
    else:
        serve(int(sys.argv[2]))
