"""Hostile input cannot make the bridge spend unbounded time or memory on one field.

Entity and key fields have a length limit (a 400 over it, nothing written), and the two caches that keep
strings from callbacks, the partition cache and the edge dedup window, are bounded by bytes as well as by
entries, however long or many the strings.
"""

from __future__ import annotations

import io
import tracemalloc
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.errors import InvalidField
from bridge.ingest.dedup import EdgeDedup
from bridge.ingest.server import DEDUP, create_app
from bridge.settings import ServeSettings
from bridge.tencent.commands import MAX_ID_BYTES, route
from bridge.tencent.partitioner import PartitionCache, murmur2
from tests.support.fakes import FakePublisher
from tests.support.requests import fixture

APP = "1400000000"
SEED = fixture("oa-after-send-text")
OVER = "x" * (MAX_ID_BYTES + 1)
# 256 bytes in UTF-8 but 86 characters: the limit counts bytes, as Tencent's do.
AT_LIMIT_WIDE = "号" * (MAX_ID_BYTES // 3) + "a"
OVER_WIDE = "号" * (MAX_ID_BYTES // 3 + 1)
MEGABYTE = "x" * 1_000_000  # with the rest of the body, within the 1 MiB body limit


def routed(command: str, **body: Any) -> Any:
    return route(command, APP, {"CallbackCommand": command, **body})


# (command, the body with a placeholder V for the long value, the field the answer names)
FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("OfficialAccount.CallbackAfterSendMsg", {"Official_Account": "V", "MsgKey": "k"}, "Official_Account"),
    ("OfficialAccount.CallbackAfterSendMsg", {"Official_Account": "a", "MsgKey": "V"}, "MsgKey"),
    ("OfficialAccount.CallbackBeforeCreateOfficialAccount", {"Owner_Account": "V"}, "Owner_Account"),
    ("C2C.CallbackAfterSendMsg", {"From_Account": "V", "To_Account": "b"}, "From_Account"),
    ("C2C.CallbackAfterSendMsg", {"From_Account": "a", "To_Account": "V"}, "To_Account"),
    ("C2C.CallbackAfterSendMsg", {"From_Account": "a", "To_Account": "b", "MsgKey": "V"}, "MsgKey"),
    ("C2C.CallbackAfterMsgReport", {"Report_Account": "V", "Peer_Account": "b"}, "Report_Account"),
    ("Group.CallbackAfterSendMsg", {"GroupId": "V", "MsgSeq": 1}, "GroupId"),
    ("Group.CallbackAfterNewMemberJoin", {"GroupId": "V"}, "GroupId"),
    ("State.StateChange", {"Info": {"To_Account": "V"}}, "Info.To_Account"),
    ("Sns.CallbackFriendAdd", {"PairList": [{"From_Account": "V"}]}, "PairList[0].From_Account"),
    ("Profile.CallbackPortraitSet", {"From_Account": "V"}, "From_Account"),
    # Commands the bridge does not know use their family's entity and any MsgKey alike.
    ("OfficialAccount.CallbackFromTheFuture", {"Official_Account": "V"}, "Official_Account"),
    ("Galaxy.CallbackNew", {"MsgKey": "V"}, "MsgKey"),
]


def with_value(body: dict[str, Any], value: str) -> dict[str, Any]:
    filled: dict[str, Any] = orjson.loads(orjson.dumps(body).replace(b'"V"', orjson.dumps(value)))
    return filled


@pytest.mark.parametrize(("command", "body", "field"), FIELDS, ids=[f"{c}:{f}" for c, _, f in FIELDS])
@pytest.mark.parametrize("value", [OVER, OVER_WIDE, MEGABYTE], ids=["257 bytes", "258 wide bytes", "1 MB"])
def test_an_entity_or_key_field_over_the_limit_is_refused_naming_the_field_and_the_limit(
    command: str, body: dict[str, Any], field: str, value: str
) -> None:
    with pytest.raises(InvalidField) as refused:
        routed(command, **with_value(body, value))
    assert refused.value.info == (
        f"{command}: field '{field}' is longer than {MAX_ID_BYTES} bytes, the limit of the fields that "
        "name the owning entity or key a record"
    )


@pytest.mark.parametrize(("command", "body", "field"), FIELDS, ids=[f"{c}:{f}" for c, _, f in FIELDS])
@pytest.mark.parametrize("value", ["x" * MAX_ID_BYTES, AT_LIMIT_WIDE], ids=["256 bytes", "256 wide bytes"])
def test_an_entity_or_key_field_at_the_limit_is_accepted(
    command: str, body: dict[str, Any], field: str, value: str
) -> None:
    assert len(value.encode()) == MAX_ID_BYTES
    result = routed(command, **with_value(body, value))
    assert value in (result.entity + result.key)


async def test_a_callback_with_a_megabyte_account_gets_400_naming_the_field_and_is_only_dead_lettered(
    publisher: FakePublisher,
) -> None:
    async with TestClient(TestServer(create_app(ServeSettings(), publisher=publisher))) as client:
        for field in ("Official_Account", "MsgKey"):
            body = io.BytesIO(orjson.dumps({**SEED.body, field: MEGABYTE}))
            response = await client.post("/callback", params=SEED.query, data=body)
            assert response.status == 400
            answer = await response.json()
            assert answer["ErrorCode"] == 40003
            assert f"field '{field}' is longer than 256 bytes" in answer["ErrorInfo"]
        assert client.app[DEDUP].remembered == 0
    # Nothing reaches a callback topic; each, authentic, is kept raw in the dead-letter topic (issue 16).
    assert [record.topic for record in publisher.records] == [ServeSettings().rejected_topic] * 2


def window_memory(dedup: EdgeDedup, ids: list[str]) -> int:
    """What remembering `ids` adds to the process, strings included (the bridge builds one per callback)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for callback_id in ids:
            dedup.remember(callback_id[:-1] + callback_id[-1])  # a new string, as a callback brings
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_the_dedup_window_never_grows_past_its_byte_bound_whatever_the_keys() -> None:
    bound = 1 << 20
    dedup = EdgeDedup(300.0, max_keys=100_000, max_bytes=bound)
    huge = [f"{APP}\x1fGalaxy.X\x1f{n}:" + "k" * 100_000 for n in range(100)]  # 10 MB of keys
    assert window_memory(dedup, huge) <= bound
    assert dedup.remembered_bytes <= bound
    assert 0 < dedup.remembered < 100


# Just after the hash table grew, when each entry's share of it is largest.
FULLEST = [1_000, 21_847, 87_382]


@pytest.mark.parametrize("count", FULLEST)
def test_the_dedup_windows_byte_count_is_not_below_what_it_holds(count: int) -> None:
    """The count (the string's size plus 150 bytes a key) is what the bound trusts: never an underestimate."""
    dedup = EdgeDedup(300.0, max_keys=1_000_000, max_bytes=1 << 40)
    ids = [f"{APP}\x1fOfficialAccount.CallbackAfterSendMsg\x1f71_1_{n}" for n in range(count)]
    assert window_memory(dedup, ids) <= dedup.remembered_bytes


@pytest.mark.parametrize("count", FULLEST)
def test_the_partition_caches_byte_count_is_not_below_what_it_holds(
    count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    cheap_hash(monkeypatch)
    cache = PartitionCache(max_entries=1_000_000, max_bytes=1 << 40)
    entities = [f"@TOA#_{n:010d}" for n in range(count)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for entity in entities:
            cache.partition_for(entity[:-1] + entity[-1], 12)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= cache.bytes


async def test_many_callbacks_with_the_longest_keys_keep_the_window_within_its_byte_bound(
    publisher: FakePublisher,
) -> None:
    settings = replace(ServeSettings(), dedup_max_bytes=64 << 10)
    async with TestClient(TestServer(create_app(settings, publisher=publisher))) as client:
        for n in range(300):
            key = f"{n}-".ljust(MAX_ID_BYTES, "k")
            body = orjson.dumps({**SEED.body, "MsgKey": key})
            assert (await client.post("/callback", params=SEED.query, data=body)).status == 200
        dedup = client.app[DEDUP]
        assert dedup.remembered_bytes <= 64 << 10
        assert dedup.remembered < 300  # the oldest went to keep within the bound
    assert len(publisher.records) == 300


def cheap_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """murmur2 in pure Python allocates an integer per step, which tracemalloc makes slow; what the cache
    holds does not depend on the hash."""
    monkeypatch.setattr("bridge.tencent.partitioner.murmur2", len)


def test_the_partition_cache_never_grows_past_its_byte_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    cheap_hash(monkeypatch)
    cache = PartitionCache(max_entries=65_536, max_bytes=64 << 10)
    entities = [f"{n}-".ljust(MAX_ID_BYTES, "e") for n in range(5_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for entity in entities:
            cache.partition_for(entity[:-1] + entity[-1], 12)  # a new string each time, as a callback brings
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= cache.bytes <= 64 << 10
    assert 0 < len(cache) < 5_000


def test_the_partition_cache_gives_the_partition_the_formula_gives_after_evictions() -> None:
    cache = PartitionCache(max_entries=50, max_bytes=1 << 30)
    entities = [f"@TOA#_{n}" for n in range(200)] * 2
    assert [cache.partition_for(e, 12) for e in entities] == [
        (murmur2(e.encode()) & 0x7FFFFFFF) % 12 for e in entities
    ]


def test_the_partition_cache_is_bounded_by_entries_too() -> None:
    cache = PartitionCache(max_entries=100, max_bytes=1 << 30)
    for n in range(1_000):
        cache.partition_for(f"@TOA#_{n}", 12)
    assert len(cache) == 100
