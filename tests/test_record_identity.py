"""A callback's record is byte for byte what the construction before the cached headers gave: the value, the
key, the timestamp and every header, of every fixture, in both formats, with queries that need encoding,
at receive times across days; and the caches that made it cheaper stay bounded."""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlencode

import orjson
import pytest

from bridge.errors import CommandMismatch, InvalidQuery
from bridge.kafka.sizes import record_bytes
from bridge.tencent import cloudevents, envelope, protocol
from bridge.tencent.callback import checked_query, parse_callback
from bridge.tencent.envelope import SCHEMA, Record
from tests.support.requests import load_fixtures

# --- the construction of the previous release, kept here as the reference ---------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def reference_envelope(raw_body: bytes, query: dict[str, str], received_at_ms: int) -> bytes:
    return orjson.dumps(
        {
            "schema": SCHEMA,
            "received_at": received_at_ms,
            "query": query,
            "callback": orjson.Fragment(raw_body),
        }
    )


def reference_envelope_headers(
    command: str, sdk_app_id: str, entity: str, received_at_ms: int
) -> tuple[tuple[str, bytes], ...]:
    return (
        ("CallbackCommand", command.encode("utf-8")),
        ("SdkAppid", sdk_app_id.encode("ascii")),
        ("content-type", b"application/json"),
        ("entity", entity.encode("utf-8")),
        ("received_at", str(received_at_ms).encode("ascii")),
        ("schema", b"tencent-chat-callback/1"),
    )


def reference_rfc3339(epoch_ms: int) -> str:
    instant = _EPOCH + timedelta(milliseconds=epoch_ms)
    return instant.strftime("%Y-%m-%dT%H:%M:%S") + f".{epoch_ms % 1000:03d}Z"


def reference_cloudevents_headers(
    command: str,
    sdk_app_id: str,
    entity: str,
    key: str,
    query: dict[str, str],
    received_at_ms: int,
    time_ms: int,
) -> tuple[tuple[str, bytes], ...]:
    return (
        ("ce_specversion", b"1.0"),
        ("ce_id", f"{sdk_app_id}/{command}/{key}".encode()),
        ("ce_source", f"/tencent-cloud-chat/{sdk_app_id}".encode("ascii")),
        ("ce_type", f"com.tencentcloud.chat.{command}".encode()),
        ("ce_time", reference_rfc3339(time_ms).encode("ascii")),
        ("content-type", b"application/json"),
        ("ce_partitionkey", entity.encode("utf-8")),
        ("ce_receivedat", reference_rfc3339(received_at_ms).encode("ascii")),
        ("ce_query", urlencode(query, quote_via=quote, safe="").encode("ascii")),
    )


# --- the comparison ----------------------------------------------------------------------------------------

EXTRA_QUERIES: tuple[dict[str, str], ...] = (
    {},
    {"RequestTime": "1764143520", "Sign": "ab" * 32},  # Sign is in neither format
    {
        "note": "a b/c&d=e?f#g",
        "empty": "",
        "tilde~dot.dash-under_": "~._-",
        "ünï": "公众号 新闻",
        "%": "100%",
    },
)
RECEIVED_AT = (1_764_143_520_123, 1_670_574_414_999, 86_399_999, 86_400_000, 0, 253_402_300_799_999)


@pytest.mark.parametrize("received_at_ms", RECEIVED_AT)
def test_every_fixtures_record_is_byte_identical_to_the_reference_construction_in_both_formats(
    received_at_ms: int,
) -> None:
    """Each fixture, with each query, parsed and made a record twice (the second from the caches): the value,
    key, entity, timestamp and headers are those the reference builds from the same facts."""
    for fixture in load_fixtures():
        for extra in EXTRA_QUERIES:
            pairs = [*fixture.query.items(), *extra.items()]
            raw_body = fixture.raw_body
            for _ in range(2):
                query = checked_query(pairs, None, ())
                callback = parse_callback(
                    query, raw_body, received_at_ms=received_at_ms, max_event_age_ms=10**13
                )
                routed, params = callback.routed, {k: v for k, v in pairs if k != "Sign"}
                sdk_app_id = params["SdkAppid"]
                as_envelope = callback.record("tim.t")
                assert as_envelope.value == reference_envelope(raw_body, params, received_at_ms)
                assert as_envelope.headers == reference_envelope_headers(
                    routed.command, sdk_app_id, routed.entity, received_at_ms
                )
                as_event = callback.record("tim.t", "cloudevents")
                assert as_event.value == raw_body
                assert as_event.headers == reference_cloudevents_headers(
                    routed.command,
                    sdk_app_id,
                    routed.entity,
                    routed.key,
                    params,
                    received_at_ms,
                    callback.timestamp_ms,
                )
                for record in (as_envelope, as_event):
                    assert (record.topic, record.key, record.entity, record.timestamp_ms) == (
                        "tim.t",
                        routed.key.encode("utf-8"),
                        routed.entity,
                        callback.timestamp_ms,
                    ), fixture.name


@pytest.mark.parametrize(
    "epoch_ms",
    [
        -86_400_001,
        -1,
        0,
        999,
        1_000,
        59_999,
        86_399_999,
        951_782_400_000,
        1_764_143_520_123,
        253_402_300_799_999,
    ],
)
def test_rfc3339_is_the_datetime_construction_for_any_millisecond(epoch_ms: int) -> None:
    """Leap days, day and second boundaries and times before the epoch alike, the cached text or not."""
    cloudevents._SECONDS.clear()
    assert cloudevents.rfc3339(epoch_ms) == reference_rfc3339(epoch_ms)
    assert cloudevents.rfc3339(epoch_ms) == reference_rfc3339(epoch_ms)  # from the cache


def test_rfc3339_beyond_datetimes_years_raises_as_before() -> None:
    for epoch_ms in (253_402_300_800_000, -62_135_596_800_001):
        with pytest.raises(OverflowError):
            reference_rfc3339(epoch_ms)
        with pytest.raises(OverflowError):
            cloudevents.rfc3339(epoch_ms)


def test_the_form_encoded_query_is_urlencodes_for_every_kind_of_character() -> None:
    texts = [
        "",
        "a",
        "AZaz09",
        "_.-~",
        " ",
        "+",
        "/",
        "%20",
        "a=b&c",
        "é",
        "公众号",
        "\U0001f600",
        "\x00\x7f",
    ]
    texts += ["*", "'", "(", ")", "!", ",", ";", ":", "@", "$", "*'()!"]
    query = {f"{name}{n}": value for n, (name, value) in enumerate(zip(texts, reversed(texts), strict=True))}
    for _ in range(2):
        assert cloudevents.form_urlencoded(query) == urlencode(query, quote_via=quote, safe="")
    assert cloudevents.form_urlencoded({}) == ""


def test_the_header_and_check_caches_stay_bounded_under_ever_new_commands_and_apps() -> None:
    """Any dotted name is a command and, with no `--sdk-app-id`, any number an app: 5,000 of each leave at
    most the caches' bounds behind, and the headers stay right while the caches empty."""
    for n in range(5_000):
        command, app = f"Unknown.Command{n}", str(1_400_000_000 + n)
        assert envelope.record_headers(command, app, "e", n) == reference_envelope_headers(
            command, app, "e", n
        )
        headers = cloudevents.headers(
            command=command,
            sdk_app_id=app,
            entity="e",
            key="k",
            query={"v": str(n)},
            received_at_ms=n * 1000,
            timestamp_ms=n,
        )
        assert headers == reference_cloudevents_headers(command, app, "e", "k", {"v": str(n)}, n * 1000, n)
        protocol.parse_query([("SdkAppid", app), ("CallbackCommand", command)])
    bounded: dict[str, tuple[Sized, int]] = {
        "envelope commands": (envelope._COMMAND_PAIRS, envelope._CACHED_PAIRS),
        "envelope apps": (envelope._APP_PAIRS, envelope._CACHED_PAIRS),
        "ce_source": (cloudevents._SOURCE_PAIRS, cloudevents._CACHED),
        "ce_type": (cloudevents._TYPE_PAIRS, cloudevents._CACHED),
        "query texts": (cloudevents._QUOTED, cloudevents._CACHED),
        "seconds": (cloudevents._SECONDS, cloudevents._CACHED_SECONDS),
        "checked apps": (protocol._CHECKED_APPS, protocol._CHECKED),
        "checked commands": (protocol._CHECKED_COMMANDS, protocol._CHECKED),
    }
    for what, (cache, bound) in bounded.items():
        assert len(cache) <= bound, what


def test_a_command_or_app_checked_once_is_still_refused_when_it_is_bad() -> None:
    """The sets of checked names hold only names that passed: a bad one is refused every time."""
    for _ in range(2):
        with pytest.raises(InvalidQuery):
            protocol.parse_query([("SdkAppid", "0123")])
        with pytest.raises(CommandMismatch):
            protocol.parse_query([("SdkAppid", "1400000000"), ("CallbackCommand", "not a command")])


def test_a_records_size_is_computed_once_and_never_copied_to_another_record() -> None:
    headers = (("a", b"1"), ("bb", b"22"))
    record = Record("t", "e", b"key", b"v" * 100, 1, headers)
    expected = 61 + 35 + 3 + 100 + sum(10 + 4 * len(name) + len(value) for name, value in headers)
    assert record.size == -1
    assert record_bytes(record) == expected == record.size
    larger = replace(record, value=b"v" * 1000)
    assert larger.size == -1
    assert record_bytes(larger) == expected + 900
    assert record == Record("t", "e", b"key", b"v" * 100, 1, headers)  # the size is no part of equality
