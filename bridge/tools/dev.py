"""`bridge dev`: an embedded in-memory broker, the bridge against it, and a ready-to-paste curl."""

from __future__ import annotations

import asyncio
import dataclasses
import shlex
import sys
import time
from urllib.parse import urlencode

import orjson
from aiohttp import web

from bridge.errors import CommandError, ExitStatus
from bridge.ingest.runner import ListenError, run_server
from bridge.ingest.server import PUBLISHER
from bridge.process import run_loop
from bridge.secret import CallbackToken
from bridge.settings import ServeSettings
from bridge.tencent.samples import SEED_CALLBACK, SEED_QUERY
from bridge.tencent.signature import expected_sign
from bridge.tools.embedded import EmbeddedBroker, EmbeddedBrokerError

_READY_TIMEOUT_S = 30.0


_WARNING = """\
************************************************************************************
*  bridge dev: the embedded Kafka broker keeps data IN MEMORY ONLY.                *
*  Every record is lost when this process stops. Not for real traffic:             *
*  use `bridge serve --bootstrap-servers HOST:PORT` against a real Kafka cluster.  *
************************************************************************************"""


def base_url(host: str, port: int) -> str:
    shown_host = "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host  # noqa: S104 - display only
    return f"http://{shown_host}:{port}"


def banner(settings: ServeSettings, port: int, bootstrap_servers: str) -> str:
    query = dict(SEED_QUERY)
    signed = ""
    if settings.callback_tokens:
        # Signed as Tencent would, with the first token (for its app, if it is one app's); the signature
        # goes stale after --max-clock-skew.
        token = settings.callback_tokens[0]
        if isinstance(token, CallbackToken) and token.sdk_app_id is not None:
            query["SdkAppid"] = token.sdk_app_id
        request_time = str(int(time.time()))
        query |= {"RequestTime": request_time, "Sign": expected_sign(token.reveal(), request_time)}
        signed = f" (signed with the first token: valid for {settings.max_clock_skew:g} s from now)"
    unsigned = {name: value for name, value in query.items() if name not in {"RequestTime", "Sign"}}
    url = f"{base_url(settings.host, port)}{settings.path}?{urlencode(unsigned)}"
    target = f"{base_url(settings.host, port)}{settings.path}?{urlencode(query)}"
    body = orjson.dumps(SEED_CALLBACK).decode()
    curl = (
        f"curl -sS -X POST {shlex.quote(target)} -H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )
    return "\n".join(
        (
            _WARNING,
            f"Callback URL:     {url}",
            f"Kafka bootstrap:  {bootstrap_servers}  (in memory)",
            f"Topics:           {', '.join(settings.topics)}",
            f"Ready probe:      {base_url(settings.host, port)}/readyz",
            f"Send the seed callback{signed}:",
            f"  {curl}",
            "Press Ctrl-C to stop the bridge and the broker.",
        )
    )


def run_dev(settings: ServeSettings, broker: EmbeddedBroker) -> None:
    """Serve against `broker` (already started) until Ctrl-C; the caller stops the broker."""
    print(_WARNING, file=sys.stderr, flush=True)

    async def announce(app: web.Application, port: int) -> None:
        publisher = app[PUBLISHER]
        try:
            async with asyncio.timeout(_READY_TIMEOUT_S):
                # Readiness is derived from the producer's metadata; there is no event to wait on.
                while not publisher.ready:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            print(f"bridge dev: Kafka is still not ready: {publisher.status}", file=sys.stderr, flush=True)
            return
        print(banner(settings, port, broker.bootstrap_servers), flush=True)

    run_loop(run_server(settings, on_started=announce, hangup_stops=True))  # a closed terminal stops dev


def start_dev(settings: ServeSettings) -> int:
    """`bridge dev`: start the embedded broker, serve against it until Ctrl-C, stop it. Raises `CommandError`
    when the broker or the server cannot start."""
    try:
        with EmbeddedBroker() as broker:
            run_dev(dataclasses.replace(settings, bootstrap_servers=(broker.bootstrap_servers,)), broker)
    except (EmbeddedBrokerError, ListenError) as exc:
        raise CommandError(str(exc)) from None
    return ExitStatus.OK
