"""`--path` as written in the Tencent console's URL: percent-escapes and non-ASCII characters work, and the
callback port's direct dispatch (`bridge serve`: `BridgeRunner`, `callback_first`) and the application's
router (the test client's `TestServer(create_app())`) match the same requests: the same decoded path, `%2F`
and `%25` kept escaped (aiohttp's `path_safe`). A near miss gets the bridge's 404 JSON body from both.
What cannot work (a space, a `%` that starts no escape, a dot segment, ...) is a usage error at start."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from bridge.ingest.runner import request_handler_options
from bridge.ingest.server import create_app, matched_path
from bridge.settings import ServeSettings, values
from tests.conftest import BridgeClient
from tests.support.fakes import FakePublisher
from tests.support.requests import fixture
from tests.support.serve import BridgeTestServer, run_bridge, serve_listening
from tests.support.settings import NO_BROKER

SEED = fixture("oa-after-send-text")

# (--path as given, the path a request asks for, whether it is the callback path)
CASES = [
    ("/callback", "/callback", True),
    ("/callback", "/call%62ack", True),  # an escape of an unreserved character is that character
    ("/callback", "/callback/", False),
    ("/callback", "/Callback", False),
    ("/tencent%2Fim", "/tencent%2Fim", True),
    ("/tencent%2Fim", "/tencent%2fim", True),
    ("/tencent%2Fim", "/tencent/im", False),
    ("/tencent%2Fim", "/tencent%252Fim", False),
    ("/tencent/im", "/tencent/im", True),
    ("/tencent/im", "/tencent%2Fim", False),
    ("/a%20b", "/a%20b", True),
    ("/a%20b", "/a%2520b", False),
    ("/a%20b", "/a+b", False),
    ("/a%25b", "/a%25b", True),
    ("/a%25b", "/a%2525b", False),
    ("/回调", "/%E5%9B%9E%E8%B0%83", True),
    ("/回调", "/%e5%9b%9e%e8%b0%83", True),
    ("/%E5%9B%9E%E8%B0%83", "/%E5%9B%9E%E8%B0%83", True),
    ("/回调", "/%E5%9B%9E", False),
    ("/cb{name}", "/cb%7Bname%7D", True),  # a character, not a route variable
    ("/cb{name}", "/cbanything", False),
]
IDS = [f"{given} {asked}" for given, asked, _ in CASES]


async def answer(client: BridgeClient, asked: str) -> tuple[int, int]:
    """The status and ErrorCode of the seed callback posted to the raw path `asked`."""
    url = URL(str(client.make_url("")).rstrip("/") + asked, encoded=True).with_query(SEED.query)
    async with client.session.post(url, data=orjson.dumps(SEED.body)) as response:
        body = orjson.loads(await response.read())
        return response.status, body["ErrorCode"]


@pytest.mark.parametrize(("given", "asked", "matches"), CASES, ids=IDS)
async def test_the_direct_dispatch_and_the_router_match_the_same_requests(
    given: str, asked: str, matches: bool
) -> None:
    settings = ServeSettings(path=values.path(given))
    answers = []
    for direct in (True, False):
        publisher = FakePublisher()
        publisher.confirm.set()
        app = create_app(settings, publisher=publisher)
        server = BridgeTestServer(app) if direct else TestServer(app)
        await server.start_server(**request_handler_options(settings))
        async with TestClient(server) as client:
            answers.append((await answer(client, asked), len(publisher.records)))
    expected = ((200, 0), 1) if matches else ((404, 40400), 0)
    assert answers == [expected, expected]


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("/callback", "/callback"),
        ("/tencent%2Fim", "/tencent%2Fim"),
        ("/a%20b", "/a%20b"),
        ("/回调", "/%E5%9B%9E%E8%B0%83"),
        ("/cb{name}", "/cb%7Bname%7D"),
        ("/a\\b", "/a%5Cb"),
    ],
)
def test_a_path_is_kept_as_a_url_writes_it(given: str, stored: str) -> None:
    """What `bridge dev` prints in the callback URL, and what a request's path is compared with."""
    assert values.path(given) == stored
    assert matched_path(stored) == URL.build(path=stored, encoded=True).path_safe


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("callback", ""),
        ("//callback", ""),
        ("/a b", "no space"),
        ("/a?b", "no space, '?'"),
        ("/a#b", "'#'"),
        ("/a\tb", "control character"),
        ("/a%zz", "every '%' starts an escape"),
        ("/a%2", "every '%' starts an escape"),
        ("/a%", "every '%' starts an escape"),
        ("/a%FF", "not UTF-8"),
        ("/a%0Ab", "decodes to a control character"),
        ("/a/../b", "no '.' or '..' segment"),
        ("/a/./b", "no '.' or '..' segment"),
        ("/a/%2E%2E/b", "no '.' or '..' segment"),
        ("/healthz", ""),
        ("/heal%74hz", ""),
    ],
)
def test_a_path_that_cannot_work_is_refused_saying_why(given: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"must be a URL path such as /callback.*{re.escape(why)}"):
        values.path(given)


def test_serve_refuses_a_path_that_cannot_work_in_one_line_with_status_2() -> None:
    result = run_bridge("serve", "--bootstrap-servers", NO_BROKER, "--allow-unsigned", "--path", "/a%zz")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "argument --path: must be a URL path" in result.stderr
    assert "every '%' starts an escape" in result.stderr


def test_serve_help_shows_the_percent_escapes_of_path() -> None:
    result = run_bridge("serve", "--help")
    assert result.returncode == 0, result.stderr
    assert "/tencent%2Fim" in result.stdout


NEAR_MISSES = {
    "/tencent%2Fim/%E5%9B%9E%E8%B0%83": (503, 50301),
    "/tencent%2fim/%e5%9b%9e%e8%b0%83": (503, 50301),
    "/tencent/im/%E5%9B%9E%E8%B0%83": (404, 40400),
    "/tencent%2Fim/%E5%9B%9E": (404, 40400),
}


async def post_each(base: str, paths: list[str]) -> dict[str, tuple[int, int]]:
    """The status and ErrorCode of the seed callback posted to each raw path at `base`."""
    answers = {}
    async with ClientSession() as session:
        for asked in paths:
            url = URL(base + asked, encoded=True).with_query(SEED.query)
            async with session.post(url, data=orjson.dumps(SEED.body)) as response:
                answers[asked] = (response.status, orjson.loads(await response.read())["ErrorCode"])
    return answers


def test_bridge_serve_answers_an_encoded_path_and_404s_its_near_misses(tmp_path: Path) -> None:
    """The real `bridge serve`, no broker: the callback path answers 503 (Kafka not ready), so it was
    matched; a near miss is the bridge's 404 with its JSON body."""
    arguments = ["--bootstrap-servers", NO_BROKER, "--allow-unsigned", "--path", "/tencent%2Fim/回调"]
    with serve_listening(arguments, tmp_path / "stderr") as port:
        answers = asyncio.run(post_each(f"http://127.0.0.1:{port}", list(NEAR_MISSES)))
    assert answers == NEAR_MISSES
