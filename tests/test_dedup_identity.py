"""Readers drop duplicates by the bridge's own identity of a callback, SdkAppid + command + key: two apps
that send the same `MsgKey` are two callbacks, at the edge and on the read side alike."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from pathlib import Path

import orjson
from aiohttp.test_utils import TestClient, TestServer

from bridge.ingest.server import create_app
from bridge.readback.events import unique
from bridge.readback.reader import EventReader
from bridge.readback.replay import Replay
from bridge.readback.sinks import FileSink
from bridge.settings import ReplaySettings, ServeSettings
from tests.support.readback import ACCOUNTS, OA_QUERY, message
from tests.support.serve import wait_until_ready
from tests.support.settings import reading

APP_A, APP_B = "1400000000", "1400000001"


async def post_same_key_from_two_apps(settings: ServeSettings) -> bytes:
    """App A's message twice (a retry that landed twice), app B's message with the same MsgKey once."""
    callback = message(1, 30, ACCOUNTS[0], 7)
    body = orjson.dumps(callback.body)
    # The edge dedup off, so app A's retry lands twice, as after a restart or an ambiguous 503.
    async with TestClient(TestServer(create_app(replace(settings, dedup_window=0)))) as client:
        await wait_until_ready(client)
        for app in (APP_A, APP_B, APP_A):
            query = {**OA_QUERY, "SdkAppid": app, "CallbackCommand": callback.command}
            response = await client.post("/callback", params=query, data=body)
            assert response.status == 200, await response.text()
    return body


async def test_a_deduplicated_replay_keeps_both_apps_callbacks_that_share_a_msgkey(
    settings: ServeSettings, tmp_path: Path
) -> None:
    await post_same_key_from_two_apps(settings)
    out = tmp_path / "copy.jsonl"
    replay = Replay(
        reading(ReplaySettings, settings, to_file=str(out), dedup=True),
        FileSink(str(out)),
        report=io.StringIO(),
    )
    async with asyncio.timeout(60):
        await replay.run()

    copied = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert sorted(envelope["query"]["SdkAppid"] for envelope in copied) == [APP_A, APP_B]
    assert (replay.tally.copied, replay.tally.duplicates) == (2, 1)


async def test_unique_keeps_both_apps_callbacks_that_share_a_msgkey_and_drops_the_retry(
    settings: ServeSettings, kafka: str
) -> None:
    await post_same_key_from_two_apps(settings)
    async with asyncio.timeout(60), EventReader(kafka, settings.topic) as reader:
        events = [event async for event in unique(reader)]
    assert sorted(event.sdk_app_id for event in events) == [APP_A, APP_B]
    assert len({event.key for event in events}) == 1
    assert len({event.identity for event in events}) == 2
