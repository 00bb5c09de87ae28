"""`parse_raw_query`, the callback port's split of the raw query string, against `parse_query` of yarl's
decoded pairs (what the port used before): the same `CallbackQuery`, or the same refusal, for any query."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from yarl import URL

from bridge.errors import BridgeError
from bridge.tencent import protocol
from bridge.tencent.protocol import CallbackQuery, parse_query, parse_raw_query

_PIECES = st.sampled_from(
    ["SdkAppid", "CallbackCommand", "1400000000", "C2C.CallbackAfterSendMsg", "Sign", "a" * 64, "=", "&", "+",
     "%20", "%26", "%3D", "%ff", "%zz", "%", "é", "\udcff", "ClientIP", "1.2.3.4", "", " ", "0123", ";"]
)  # fmt: skip


def _answer(parse: Callable[[], CallbackQuery]) -> tuple[str, object]:
    try:
        query = parse()
    except BridgeError as exc:
        return ("refused", (type(exc), exc.status, exc.error_code, exc.info))
    return ("query", (query.sdk_app_id, query.command, list(query.params.items()), query.sign))


def _as_the_port_does(url: URL) -> CallbackQuery:
    parsed = parse_raw_query(url.raw_query_string)
    return parse_query(url.query.items()) if parsed is None else parsed


def _both(raw: str) -> None:
    url = URL.build(path="/callback", query_string=raw, encoded=True)
    before = _answer(lambda: parse_query(url.query.items()))
    protocol._PARSED.clear()
    for _ in range(2):  # parsed, then remembered: the same answer both times
        assert _answer(lambda: _as_the_port_does(url)) == before, raw


@pytest.mark.parametrize(
    "raw",
    [
        "SdkAppid=1400000000&CallbackCommand=C2C.CallbackAfterSendMsg&contenttype=json&ClientIP=1.2.3.4",
        "SdkAppid=1400000000&Sign=" + "a" * 64 + "&RequestTime=1698741698",
        "SdkAppid=1400000000&&CallbackCommand=C2C.CallbackAfterSendMsg&",
        "SdkAppid=1400000000&flag&empty=&a=b=c",
        "SdkAppid=1400000000&name=two+words",
        "SdkAppid=1400000000&SdkAppid=1400000000",
        "SdkAppid=0123",
        "SdkAppid=1400000000&CallbackCommand=not+a+command",
        "CallbackCommand=C2C.CallbackAfterSendMsg",
        "",
        "SdkAppid=1400000000&n%61me=%ff&x=%zz",
        "SdkAppid=1400000000&v=\udcff",
        "SdkAppid=1400000000;CallbackCommand=C2C.CallbackAfterSendMsg",
    ],
)
def test_the_same_answer_as_yarls_pairs(raw: str) -> None:
    _both(raw)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join))
@example("SdkAppid=1400000000&SdkAppid=1400000000")
def test_the_same_answer_for_any_query(raw: str) -> None:
    _both(raw)


def test_a_query_with_a_percent_is_left_to_yarl() -> None:
    assert parse_raw_query("SdkAppid=1400000000&a=%20") is None


def test_remembered_queries_are_bounded() -> None:
    protocol._PARSED.clear()
    for n in range(protocol._PARSED_QUERIES + 5):
        assert parse_raw_query(f"SdkAppid=1400000000&n={n}") is not None
    assert len(protocol._PARSED) <= protocol._PARSED_QUERIES
    first = parse_raw_query("SdkAppid=1400000000&n=x")
    assert parse_raw_query("SdkAppid=1400000000&n=x") is first
