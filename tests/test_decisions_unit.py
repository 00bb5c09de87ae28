"""Decision records read back, without a broker: the record `bridge.ingest.forward` writes decodes into a
`DecisionEvent`, a record that only looks like one is refused, and the options that choose what the
readers do with decisions are checked before anything is read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import orjson
import pytest

from bridge.ingest.forward import DECISION_SCHEMA as WRITTEN_SCHEMA
from bridge.ingest.forward import AppAnswer, decision_record
from bridge.readback.consume import _summary
from bridge.readback.decisions import DECISION_SCHEMA, CallbackSeen, decode_decision
from bridge.readback.events import Coordinates, InvalidEnvelope
from bridge.readback.progress import Tally
from bridge.readback.reader import ReaderStats
from bridge.readback.replay import copies_decisions, replay_identity
from bridge.readback.sinks import DeliveryFailed, Failure, TopicSink
from bridge.settings import ReplaySettings, build
from bridge.tencent.callback import parse_callback
from bridge.tencent.partitioner import partition_for
from bridge.tencent.protocol import parse_query
from tests.support.records import StoredRecord
from tests.support.serve import one_line_error, run_bridge
from tests.support.settings import NO_BROKER

COMMAND = "C2C.CallbackBeforeSendMsg"
QUERY = {"SdkAppid": "1400000000", "CallbackCommand": COMMAND, "contenttype": "json"}
BODY = orjson.dumps(
    {
        "CallbackCommand": COMMAND,
        "From_Account": "alice",
        "To_Account": "bob",
        "MsgSeq": 1,
        "MsgRandom": 2,
        "MsgTime": 1_714_521_600,
        "MsgKey": "k-1",
        "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}],
    }
)


def written(answer: bytes, status: int = 200) -> StoredRecord:
    """The decision record forward mode writes for the app's `answer`, as a reader gets it."""
    callback = parse_callback(
        parse_query(QUERY.items()), BODY, received_at_ms=1_764_633_600_101, max_event_age_ms=10**12
    )
    record = decision_record(
        callback,
        callback.record("tim.c2c", "envelope"),
        AppAnswer(status, answer, "application/json"),
        1_764_633_600_123,
    )
    return StoredRecord(record.value, record.key, record.headers, record.timestamp_ms, "tim.c2c", 3, 8)


def test_the_schema_read_is_the_schema_written() -> None:
    assert DECISION_SCHEMA == WRITTEN_SCHEMA


def test_a_decision_record_decodes_with_the_callback_it_decides() -> None:
    """Every field of the value, the identity of its callback, and no entity until its callback is known."""
    decision = decode_decision(written(b'{"ActionStatus":"OK","ErrorInfo":"no","ErrorCode":1}'))
    assert (decision.command, decision.sdk_app_id, decision.family) == (COMMAND, "1400000000", "C2C")
    assert decision.key == f"{COMMAND}:k-1"
    assert decision.identity == f"1400000000\x1f{COMMAND}\x1f{COMMAND}:k-1"
    assert (decision.status, decision.error_code) == (200, 1)
    assert (decision.decided_at_ms, decision.received_at_ms) == (1_764_633_600_123, 1_764_633_600_101)
    # Its owning entity from its own `entity` header; its event time and callback from the callback's, once
    # that is read before it.
    assert (decision.entity, decision.event_time_ms, decision.callback_coordinates) == (
        "alice:bob",
        1_764_633_600_101,
        None,
    )
    assert decision.coordinates == Coordinates("tim.c2c", 3, 8, 1_764_633_600_123)
    assert decision.json_line() == (decision.value + b"\n")
    seen = CallbackSeen("alice:bob", 1_714_521_600_000, Coordinates("tim.c2c", 3, 7, 1), selected=True)
    joined = decision.following(seen)
    assert (joined.entity, joined.event_time_ms, joined.callback_coordinates) == (
        "alice:bob",
        1_714_521_600_000,
        seen.coordinates,
    )


def test_a_decision_of_an_older_bridge_without_an_entity_header_has_no_entity_until_its_callback() -> None:
    record = written(b'{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}')
    record.headers = [(name, value) for name, value in record.headers if name != "entity"]
    assert decode_decision(record).entity is None


def test_an_answer_that_is_not_json_is_its_text_and_has_no_error_code() -> None:
    decision = decode_decision(written(b"upstream down\n", status=503))
    assert (decision.status, decision.answer, decision.error_code) == (503, "upstream down\n", None)


def test_a_decision_whose_answer_holds_a_line_break_prints_on_one_line() -> None:
    """The app's JSON body is kept byte for byte in the value, line breaks included: its line is
    re-serialized, the same JSON."""
    record = written(b'{"ActionStatus":"OK",\n "ErrorCode":0}')
    assert record.value is not None
    assert b"\n" in record.value
    line = decode_decision(record).json_line()
    assert line.count(b"\n") == 1
    assert line.endswith(b"\n")
    assert orjson.loads(line) == orjson.loads(record.value)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda v, h: (b"not json", h), "not UTF-8 JSON"),
        (lambda v, h: (orjson.dumps({**orjson.loads(v), "schema": "other/1"}), h), "not of schema"),
        (lambda v, h: (orjson.dumps({**orjson.loads(v), "extra": 1}), h), "with the fields"),
        (lambda v, h: (orjson.dumps({**orjson.loads(v), "status": "200"}), h), "not an integer"),
        (lambda v, h: (orjson.dumps({**orjson.loads(v), "key": ""}), h), "not a text"),
        (lambda v, h: (v, [(n, b"C2C.Other" if n == "decision-of" else x) for n, x in h]), "decision-of"),
        (lambda v, h: (None, h), "no value"),
    ],
    ids=["not-json", "schema", "extra-field", "status-text", "empty-key", "decision-of", "no-value"],
)
def test_a_record_marked_as_a_decision_that_is_not_one_is_refused_with_the_reason(
    change: Callable[[bytes, list[tuple[str, bytes]]], tuple[bytes | None, list[tuple[str, bytes]]]],
    reason: str,
) -> None:
    record = written(b'{"ErrorCode":0}')
    assert record.value is not None
    record.value, record.headers = change(record.value, list(record.headers))
    with pytest.raises(InvalidEnvelope, match=reason):
        decode_decision(record)


def replay_settings(**changes: object) -> ReplaySettings:
    return ReplaySettings(bootstrap_servers=(NO_BROKER,), **changes)  # type: ignore[arg-type]


def test_replay_copies_decisions_to_a_topic_by_default_and_never_to_a_url() -> None:
    assert copies_decisions(replay_settings(to_topic="copy"))
    assert not copies_decisions(replay_settings(to_file="out.jsonl"))
    assert copies_decisions(replay_settings(to_file="out.jsonl", decisions="include"))
    assert not copies_decisions(replay_settings(to_topic="copy", decisions="skip"))
    assert not copies_decisions(replay_settings(to_url="http://127.0.0.1:9/callback"))


def test_a_checkpoint_names_whether_its_replay_copies_decisions_and_older_ones_stay_valid() -> None:
    """A replay that copies decisions is another replay than one that does not (resuming one with the
    other would leave decisions out or copy them twice); one that does not is named as before."""
    with_decisions = replay_identity(replay_settings(to_topic="copy"))
    without = replay_identity(replay_settings(to_topic="copy", decisions="skip"))
    assert with_decisions == {**without, "decisions": "include"}
    assert "decisions" not in replay_identity(replay_settings(to_file="out.jsonl"))


def test_replay_to_a_url_with_decisions_included_is_a_usage_error_before_connecting() -> None:
    result = run_bridge(
        "replay", "--bootstrap-servers", NO_BROKER, "--to-url", "http://127.0.0.1:9/callback",
        "--decisions", "include",
    )  # fmt: skip
    assert result.returncode == 2
    assert "--to-url never posts a decision record" in one_line_error(result)


def test_the_decisions_options_refuse_a_value_they_do_not_know() -> None:
    with pytest.raises(Exception, match="skip, include, only"):
        build("consume", {"bootstrap_servers": NO_BROKER}, {"BRIDGE_CONSUME_DECISIONS": "all"})
    settings = build("consume", {"bootstrap_servers": NO_BROKER}, {"BRIDGE_CONSUME_DECISIONS": "only"})
    assert settings.decisions == "only"
    assert build("replay", {"bootstrap_servers": NO_BROKER}, {}).decisions == "auto"


def test_consumes_summary_counts_each_kind_and_keeps_todays_line_by_default() -> None:
    stats = ReaderStats(events=5, filtered_out=2, bad=0, decisions=3)
    assert _summary("skip", 5, Counter(), stats, 0) == (
        "5 events written, 2 filtered out, 0 bad records, 3 app decisions passed over"
    )
    kinds = Counter({"callback": 5, "decision": 3})
    assert _summary("include", 8, kinds, stats, 0) == (
        "8 events written (5 callbacks, 3 app decisions), 2 filtered out, 0 bad records"
    )
    assert _summary("only", 3, kinds, stats, 5) == (
        "3 app decisions written, 2 filtered out, 0 bad records, 5 callbacks passed over"
    )


def test_replays_summary_names_the_decisions_copied_and_passed_over_only_when_there_are_some() -> None:
    assert "decision" not in Tally(copied=4).summary(1.0)
    assert Tally(copied=4, decisions=1).summary(1.0).startswith("copied 4 (1 app decision),")
    assert ", app decisions passed over 2 in" in Tally(copied=4, decisions_passed_over=2).summary(1.0)


class SourcePartitions:
    """A producer class for `TopicSink` that never connects: the source topic has `count` partitions."""

    count = 12

    def __init__(self, **_arguments: object) -> None:
        pass

    async def partitions_for(self, _topic: str) -> set[int]:
        return set(range(self.count))


@pytest.mark.parametrize("source_partitions", [3, 12])
async def test_a_copied_decision_goes_to_its_entitys_partition_or_an_older_one_to_where_it_was(
    source_partitions: int,
) -> None:
    """Into a destination of 3 partitions: a decision with its `entity` header to that entity's; one of an
    older bridge, without it and read without its callback, to the partition it was read from when the
    source has as many, else set aside (its callback's partition there is not known)."""
    settings = build(
        "replay", {"bootstrap_servers": NO_BROKER, "topic": "tim.c2c", "to_topic": "tim.copy"}, {}
    )
    SourcePartitions.count = source_partitions
    sink = TopicSink(settings, "tim.copy", producer_class=SourcePartitions)
    sink._partitions = 3
    record = written(b'{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}')
    decision = decode_decision(record)
    assert decision.entity is not None
    assert await sink._decision_partition(decision) == partition_for(decision.entity, 3)

    record.headers = [(name, value) for name, value in record.headers if name != "entity"]
    record.partition = 2
    older = decode_decision(record)
    if source_partitions == 3:
        assert await sink._decision_partition(older) == 2
    else:
        with pytest.raises(DeliveryFailed, match="read without its callback") as refused:
            await sink._decision_partition(older)
        assert refused.value.failure is Failure.RECORD
