"""The read side's data set (three days of official-account callbacks, posted through a bridge) and the
receiver that stands in for a second bridge for `replay --to-url`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.ingest.server import create_app
from bridge.settings import ServeSettings
from tests.support.serve import wait_until_ready

DAY_MS = 86_400_000
FIRST_DAY_MS = 1_714_521_600_000  # 2024-05-01T00:00:00Z
ACCOUNTS = ("@TOA#_news", "@TOA#_sports", "@TOA#_weather")
OA_QUERY = {
    "SdkAppid": "1400000000",
    "contenttype": "json",
    "ClientIP": "127.0.0.1",
    "OptPlatform": "RESTAPI",
}


@dataclass(frozen=True)
class Posted:
    """One callback posted to the bridge, and what it must look like when read back."""

    command: str
    body: dict[str, Any]
    key: str | None

    @property
    def account(self) -> str:
        account: str = self.body["Official_Account"]
        return account

    @property
    def event_time(self) -> int:
        event_time: int = self.body["EventTime"]
        return event_time

    @property
    def query(self) -> dict[str, str]:
        return {**OA_QUERY, "CallbackCommand": self.command}


def message(day: int, minute: int, account: str, number: int, first_day_ms: int = FIRST_DAY_MS) -> Posted:
    command = "OfficialAccount.CallbackAfterSendMsg"
    key = f"d{day}-{account[6:]}-{number}"
    body = {
        "CallbackCommand": command,
        "Official_Account": account,
        "MsgKey": key,
        "MsgTime": (first_day_ms + day * DAY_MS) // 1000 + minute * 60,
        "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": f"message {number}\nof day {day}"}}],
        "EventTime": first_day_ms + day * DAY_MS + minute * 60_000,
    }
    return Posted(command, body, key)


def subscription(day: int, minute: int, account: str, first_day_ms: int = FIRST_DAY_MS) -> Posted:
    command = "OfficialAccount.CallbackAfterAddSubscriber"
    body = {
        "CallbackCommand": command,
        "Official_Account": account,
        "SubscribeAccountList": [f"user-{day}-{minute}"],
        "EventTime": first_day_ms + day * DAY_MS + minute * 60_000,
    }
    return Posted(command, body, None)


def three_days(first_day_ms: int = FIRST_DAY_MS) -> list[Posted]:
    """Callbacks of 2024-05-01, -02 and -03 in the order they are posted: each day's messages and a
    subscription per account; days 0 and 2 posted latest first; a message of day 0 arriving late (at 23:50,
    posted after day 1's first messages at 00:30); and two messages delivered twice."""
    late = message(0, 1430, ACCOUNTS[0], 99, first_day_ms)
    posted: list[Posted] = []
    for day in range(3):
        day_posts = [
            message(day, minute, account, number, first_day_ms)
            for number, (minute, account) in enumerate((m, a) for m in (30, 400, 900, 1200) for a in ACCOUNTS)
        ]
        day_posts += [subscription(day, 600 + n, account, first_day_ms) for n, account in enumerate(ACCOUNTS)]
        if day == 1:
            day_posts[3:3] = [late, day_posts[0]]  # the late one, and Tencent's retry of a day-1 message
        else:
            day_posts.reverse()  # later event times written first
        posted += day_posts
    posted.append(posted[-5])  # a day-2 message that landed twice
    return posted


async def post_through_a_bridge(settings: ServeSettings, callbacks: Sequence[Posted]) -> None:
    """Post `callbacks` through a bridge of `settings` whose edge dedup is off, so that the callbacks posted
    twice land twice, as they do in Kafka after a restart, from two replicas, or after an ambiguous 503."""
    async with TestClient(TestServer(create_app(replace(settings, dedup_window=0)))) as client:
        await wait_until_ready(client)
        await post_all(client, callbacks)


async def post_all(client: TestClient[web.Request, web.Application], callbacks: Sequence[Posted]) -> None:
    for callback in callbacks:
        response = await client.post("/callback", params=callback.query, data=orjson.dumps(callback.body))
        assert response.status == 200, await response.text()


@dataclass
class Receiver:
    """A local HTTP endpoint standing in for a second bridge, for `replay --to-url`: records what is posted
    to `/callback`. `status` answers every post (a 302 redirects to a GET of `/moved`, which answers 200, as
    a login page or a moved endpoint would); `refuse` answers a body with its status every time,
    `fail_first` with a 503 once; `after_each` runs after each callback received."""

    status: int = 200
    refuse: dict[bytes, int] = field(default_factory=dict)
    fail_first: set[bytes] = field(default_factory=set)
    after_each: Callable[[], None] | None = None
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    redirected_gets: int = 0
    server: TestServer | None = None
    """Set while it serves (the `receiver` fixture)."""

    def url(self, path: str = "/callback") -> str:
        assert self.server is not None, "the receiver is not serving"
        return str(self.server.make_url(path))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/callback", self._post)
        app.router.add_get("/moved", self._moved)
        app.router.add_get("/get-only", self._moved)
        return app

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        if body in self.refuse:
            return web.Response(status=self.refuse[body])
        if body in self.fail_first:
            self.fail_first.discard(body)
            return web.Response(status=503)
        if self.status == 302:
            raise web.HTTPFound("/moved")
        if self.status != 200:
            return web.Response(status=self.status)
        self.received.append((dict(request.query), body))
        if self.after_each is not None:
            self.after_each()
        return web.json_response({"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0})

    async def _moved(self, _request: web.Request) -> web.Response:
        self.redirected_gets += 1
        return web.json_response({"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0})
