"""Before-callbacks hold up a user's action while Tencent waits: they get their own, short deadline
(`--before-callback-timeout`), answered 200 only once the broker confirmed, and 503 past it, while an
after-callback keeps the longer `--delivery-timeout`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.ingest.server import create_app
from bridge.settings import ServeSettings
from bridge.tencent.commands import BEFORE_COMMANDS, COMMANDS, runs_before
from bridge.tencent.envelope import Record
from tests.conftest import BridgeClient
from tests.support.app_server import ALLOW, AppServer
from tests.support.broker import FaultBroker
from tests.support.fakes import FakePublisher
from tests.support.records import read_records
from tests.support.requests import fixture
from tests.support.serve import wait_until_ready
from tests.support.settings import NO_BROKER, unique_settings

BEFORE_DEADLINE_S = 0.5
DELIVERY_TIMEOUT_S = 2.0
SLACK_S = 0.35
C2C = fixture("c2c-after-send")
BEFORE = "C2C.CallbackBeforeSendMsg"
AFTER = "C2C.CallbackAfterSendMsg"


def c2c(command: str, msg_key: str) -> tuple[dict[str, str], bytes]:
    body = {**C2C.body, "CallbackCommand": command, "MsgKey": msg_key}
    return {**C2C.query, "CallbackCommand": command}, orjson.dumps(body)


# --- which commands ------------------------------------------------------------------------------------


def test_the_registrys_before_callbacks_are_the_callbackbefore_and_callbackprev_commands() -> None:
    assert BEFORE_COMMANDS == (
        "OfficialAccount.CallbackBeforeSendMsg",
        "OfficialAccount.CallbackBeforeAddSubscriber",
        "OfficialAccount.CallbackBeforeCreateOfficialAccount",
        "C2C.CallbackBeforeSendMsg",
        "Group.CallbackBeforeSendMsg",
        "Group.CallbackBeforeCreateGroup",
        "Sns.CallbackPrevFriendAdd",
        "Sns.CallbackPrevFriendResponse",
    )
    assert all(not runs_before(name) for name in COMMANDS if name not in BEFORE_COMMANDS)


@pytest.mark.parametrize(
    ("command", "before"),
    [
        ("Group.CallbackBeforeApplyJoinGroup", True),  # a before-callback the registry does not know
        ("Group.CallbackBeforeInviteJoinGroup", True),
        ("Sns.CallbackPrevSomethingNew", True),
        ("Group.CallbackAfterSendMsg", False),
        ("CallbackBeforeSendMsg", False),  # no family: not a Tencent command name
        ("Bot.Message", False),
    ],
)
def test_a_command_runs_before_by_its_name_known_or_not(command: str, before: bool) -> None:
    assert runs_before(command) is before


# --- the deadline each callback gets (a publisher that notes it) -------------------------------------------


class NotingPublisher(FakePublisher):
    """Confirms at once, noting how long each write was given."""

    def __init__(self) -> None:
        super().__init__()
        self.confirm.set()
        self.given: list[float] = []

    async def publish(self, record: Record, deadline: float) -> None:
        self.given.append(deadline - asyncio.get_running_loop().time())
        await super().publish(record, deadline)


@pytest.fixture
async def noting() -> AsyncIterator[tuple[BridgeClient, NotingPublisher]]:
    publisher = NotingPublisher()
    settings = unique_settings(
        NO_BROKER, before_callback_timeout=BEFORE_DEADLINE_S, delivery_timeout=DELIVERY_TIMEOUT_S
    )
    async with TestClient(TestServer(create_app(settings, publisher))) as client:
        yield client, publisher


async def test_a_before_callback_is_given_its_own_deadline_and_an_after_callback_the_delivery_timeout(
    noting: tuple[BridgeClient, NotingPublisher],
) -> None:
    client, publisher = noting
    for command, key in ((BEFORE, "b"), (AFTER, "a")):
        query, body = c2c(command, key)
        assert (await client.post("/callback", params=query, data=body)).status == 200
    before, after = publisher.given
    assert BEFORE_DEADLINE_S - 0.1 < before <= BEFORE_DEADLINE_S
    assert DELIVERY_TIMEOUT_S - 0.1 < after <= DELIVERY_TIMEOUT_S


async def test_a_before_callback_named_in_the_body_only_gets_the_short_deadline(
    noting: tuple[BridgeClient, NotingPublisher],
) -> None:
    client, publisher = noting
    query, body = c2c(BEFORE, "body-only")
    del query["CallbackCommand"]
    assert (await client.post("/callback", params=query, data=body)).status == 200
    [given] = publisher.given
    assert BEFORE_DEADLINE_S - 0.1 < given <= BEFORE_DEADLINE_S


async def test_a_confirmed_before_callback_is_answered_ok_and_in_kafka(
    bridge: BridgeClient, settings: ServeSettings
) -> None:
    query, body = c2c(BEFORE, "confirmed")
    response = await bridge.post("/callback", params=query, data=body)
    assert response.status == 200
    assert await response.json() == ALLOW
    [record] = await read_records(settings.bootstrap_servers[0], [settings.c2c_topic], expect=1)
    assert orjson.loads(record.value)["callback"] == orjson.loads(body)


# --- a paused broker (a broker of the test's own) -------------------------------------------------------


async def _timed(client: BridgeClient, command: str, key: str) -> tuple[int, dict[str, object], float]:
    query, body = c2c(command, key)
    started = time.monotonic()
    response = await client.post("/callback", params=query, data=body)
    answer = await response.json()
    return response.status, answer, time.monotonic() - started


@pytest.mark.kafka  # starts a broker of its own
async def test_a_paused_broker_makes_a_before_callback_503_in_its_deadline_an_after_callback_waits_longer(
    own_broker: FaultBroker, app_server: AppServer
) -> None:
    """The paused broker costs a chat message at most the before deadline; the after-callback sent at the
    same time waits its delivery timeout. In forward mode as without: the app's answer is not relayed for
    a callback that is not in Kafka."""
    plain = unique_settings(
        own_broker.bootstrap_servers,
        before_callback_timeout=BEFORE_DEADLINE_S,
        delivery_timeout=DELIVERY_TIMEOUT_S,
    )
    forwarding = unique_settings(
        own_broker.bootstrap_servers,
        before_callback_timeout=BEFORE_DEADLINE_S,
        delivery_timeout=DELIVERY_TIMEOUT_S,
        forward_url=app_server.url("allow"),
    )
    async with (
        TestClient(TestServer(create_app(plain))) as bridge,
        TestClient(TestServer(create_app(forwarding))) as forwarder,
    ):
        await wait_until_ready(bridge)
        await wait_until_ready(forwarder)
        assert (await _timed(bridge, BEFORE, "warm"))[0] == 200
        own_broker.pause()
        try:
            answers = await asyncio.gather(
                _timed(bridge, BEFORE, "paused-before"),
                _timed(bridge, AFTER, "paused-after"),
                _timed(forwarder, BEFORE, "forward-before"),
                _timed(forwarder, AFTER, "forward-after"),
            )
        finally:
            own_broker.resume()
        assert (await _timed(bridge, BEFORE, "resumed"))[0] == 200
    (before, after, forward_before, forward_after) = answers
    for status, answer, elapsed in (before, forward_before):
        assert (status, answer["ErrorCode"]) == (503, 50302)
        assert BEFORE_DEADLINE_S - 0.05 <= elapsed < BEFORE_DEADLINE_S + SLACK_S
    for status, answer, elapsed in (after, forward_after):
        assert (status, answer["ErrorCode"]) == (503, 50302)
        assert DELIVERY_TIMEOUT_S - 0.05 <= elapsed < DELIVERY_TIMEOUT_S + SLACK_S
    for _, answer, _ in (forward_before, forward_after):
        assert "the app server answered 200 (not relayed" in str(answer["ErrorInfo"])
    assert len(app_server.received) == 2
    records = await read_records(own_broker.bootstrap_servers, [plain.c2c_topic], expect=2)
    keys = [r.key.rpartition(b":")[2] for r in records if r.key is not None]  # `<command>:<MsgKey>`
    assert keys.count(b"warm") == keys.count(b"resumed") == 1
    # The writes answered 503 may still have landed (ambiguous), each at most once.
    assert keys.count(b"paused-before") <= 1
    assert keys.count(b"paused-after") <= 1
