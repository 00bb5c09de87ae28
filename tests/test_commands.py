"""Each command family's owning entity, record key and event time, as the README documents them."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.errors import InvalidField
from bridge.settings import ServeSettings
from bridge.tencent.commands import COMMANDS, TopicGroup, route
from bridge.tencent.envelope import record_timestamp
from tests.support.requests import load_fixtures

APP = "1400000000"


def routed(command: str, **body: Any) -> Any:
    return route(command, APP, {"CallbackCommand": command, **body})


def test_every_fixture_is_a_known_command() -> None:
    assert all(f.body["CallbackCommand"] in COMMANDS for f in load_fixtures())


def test_a_new_official_account_message_is_keyed_by_its_msg_key() -> None:
    result = routed("OfficialAccount.CallbackAfterSendMsg", Official_Account="@TOA#_a", MsgKey="1_2_3")
    assert (result.topic_group, result.entity, result.key) == (
        TopicGroup.OFFICIAL_ACCOUNT,
        "@TOA#_a",
        "1_2_3",
    )


def test_a_c2c_conversation_is_the_sorted_pair_whichever_side_sends() -> None:
    one = routed("C2C.CallbackAfterSendMsg", From_Account="zoe", To_Account="adam", MsgKey="k1")
    other = routed("C2C.CallbackAfterSendMsg", From_Account="adam", To_Account="zoe", MsgKey="k2")
    assert one.entity == other.entity == "adam:zoe"
    assert one.key == "k1"


def test_a_report_belongs_to_the_reporter_and_peer_pair() -> None:
    assert routed("C2C.CallbackAfterMsgReport", Report_Account="b", Peer_Account="a").entity == "a:b"


def test_a_withdrawal_keeps_its_msg_key_but_never_collides_with_the_message_it_withdraws() -> None:
    withdrawal = routed("C2C.CallbackAfterMsgWithDraw", From_Account="a", To_Account="b", MsgKey="1_2_3")
    assert withdrawal.key == "C2C.CallbackAfterMsgWithDraw:1_2_3"


def test_a_group_message_is_keyed_by_group_id_and_msg_seq() -> None:
    result = routed("Group.CallbackAfterSendMsg", GroupId="@TGS#x", MsgSeq=42)
    assert (result.topic_group, result.entity, result.key) == (TopicGroup.GROUP, "@TGS#x", "@TGS#x:42")


def test_events_without_an_id_are_keyed_by_a_digest_that_ignores_key_order_but_not_content() -> None:
    one = route("State.StateChange", APP, {"Info": {"To_Account": "u", "Action": "Login"}, "EventTime": 1})
    same = route("State.StateChange", APP, {"EventTime": 1, "Info": {"Action": "Login", "To_Account": "u"}})
    other = route("State.StateChange", APP, {"Info": {"To_Account": "u", "Action": "Logout"}, "EventTime": 1})
    assert one.key == same.key
    assert one.key != other.key
    assert one.key.startswith("State.StateChange:sha256:")
    assert (one.topic_group, one.entity) == (TopicGroup.USER, "u")


def test_relationship_changes_belong_to_the_first_pairs_from_account() -> None:
    result = routed(
        "Sns.CallbackFriendAdd", PairList=[{"From_Account": "a", "To_Account": "b"}, {"From_Account": "c"}]
    )
    assert (result.topic_group, result.entity) == (TopicGroup.USER, "a")


@pytest.mark.parametrize(
    ("command", "topic_group"),
    [
        ("Alert.RequestOverLimit", TopicGroup.APP),
        ("Push.CallbackAfterPushed", TopicGroup.APP),
        ("Group.CallbackOnDailyGroupQuotaAlarm", TopicGroup.GROUP),
        ("Galaxy.CallbackNew", TopicGroup.UNKNOWN),
    ],
)
def test_app_level_and_unknown_family_events_belong_to_the_app(command: str, topic_group: TopicGroup) -> None:
    result = routed(command, From_Account="someone")
    assert (result.topic_group, result.entity) == (topic_group, APP)


def test_an_unknown_command_of_a_known_family_uses_the_familys_entity_when_present() -> None:
    assert routed("Group.CallbackAfterSomethingNew", GroupId="@TGS#g").entity == "@TGS#g"
    assert routed("Group.CallbackAfterSomethingNew").entity == APP
    assert not routed("Group.CallbackAfterSomethingNew").known


def test_unknown_commands_are_not_type_checked() -> None:
    result = routed("OfficialAccount.CallbackFromTheFuture", Official_Account=5, MsgKey=[], EventTime="soon")
    assert (result.entity, result.event_time_ms) == (APP, None)


@pytest.mark.parametrize(
    ("event_time", "expected"),
    [(1670574414123, 1670574414123), ("1670574414123", 1670574414123), (0, 0), (-5, None), (2**63, None)],
)
def test_event_time_becomes_the_record_timestamp_when_usable(event_time: Any, expected: int | None) -> None:
    result = routed(
        "OfficialAccount.CallbackAfterSendMsg", Official_Account="a", MsgKey="k", EventTime=event_time
    )
    assert result.event_time_ms == expected


def test_the_first_bad_field_is_named_with_its_command() -> None:
    with pytest.raises(
        InvalidField, match=r"OfficialAccount.CallbackAfterSendMsg: field 'MsgTime' must be an integer"
    ):
        routed("OfficialAccount.CallbackAfterSendMsg", Official_Account="a", MsgKey="k", MsgTime="now")


RECEIVED = 1_796_000_000_000
DAY = 86_400_000


@pytest.mark.parametrize(
    ("event_time", "expected"),
    [
        (RECEIVED - 3 * DAY, RECEIVED - 3 * DAY),  # a backfill within half the retention keeps its time
        (RECEIVED - 7 * DAY, RECEIVED - 7 * DAY),
        (RECEIVED - 7 * DAY - 1, RECEIVED),  # older: Kafka's retention would delete it minutes after its 200
        (RECEIVED + 60_000, RECEIVED + 60_000),
        (RECEIVED + 11 * 60_000, RECEIVED),  # a broken clock far ahead
        (None, RECEIVED),
    ],
)
def test_the_record_timestamp_is_the_event_time_unless_absent_far_ahead_or_older_than_half_the_retention(
    event_time: int | None, expected: int
) -> None:
    half_of_14_days = ServeSettings(retention_hours=14 * 24).max_event_age_ms
    assert record_timestamp(event_time, RECEIVED, half_of_14_days) == expected
