"""ClickHouse (embedded, through chDB) over `bridge consume` output: the same answers as the DuckDB recipe.

    bridge consume --bootstrap-servers localhost:9092 --from-beginning --output events.jsonl
    python -m examples.chdb_job events.jsonl

The columns come from the ClickHouse column extraction of the topic (`EXTRACTION`, one `JSONExtract*`
expression per column over the envelope held as one string, as `bridge schema --format clickhouse` gives it
to the materialized view of a Kafka engine table), run here over the JSON Lines file read with
`file('events.jsonl', 'JSONAsString')`, whose one column is `json`. The aggregates are then plain SQL over
those columns: the same queries run on the MergeTree table the materialized view fills.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import chdb

from examples.answers import Answers

EXTRACTION = """
SELECT
    JSONExtractString(`json`, 'query', 'SdkAppid') AS `SdkAppid`,
    coalesce(nullIf(JSONExtractString(`json`, 'query', 'CallbackCommand'), ''),
             JSONExtractString(`json`, 'callback', 'CallbackCommand')) AS `CallbackCommand`,
    fromUnixTimestamp64Milli(ifNull(
        multiIf(JSONType(`json`, 'callback', 'EventTime') IN ('Int64', 'UInt64')
                    AND JSONExtract(`json`, 'callback', 'EventTime', 'Int64') >= 0,
                JSONExtract(`json`, 'callback', 'EventTime', 'Nullable(Int64)'),
                JSONType(`json`, 'callback', 'EventTime') = 'String'
                    AND match(JSONExtractString(`json`, 'callback', 'EventTime'), '^[0-9]{1,19}$'),
                toInt64OrNull(JSONExtractString(`json`, 'callback', 'EventTime')),
                NULL),
        JSONExtract(`json`, 'received_at', 'Int64')), 'UTC') AS `event_time`,
    JSONExtractString(`json`, 'callback', 'Official_Account') AS `Official_Account`,
    JSONExtract(`json`, 'callback', 'MsgKey', 'Nullable(String)') AS `MsgKey`,
    JSONExtractRaw(`json`, 'callback') AS `callback`
FROM {source}
"""
"""The extraction of the columns the recipe reads, in the generator's shape (see the module docstring)."""

EVENTS = """
events AS (
    SELECT *,
        -- The key of the bridge's callback identity (with SdkAppid and the command): MsgKey, else the body.
        if(ifNull(MsgKey, '') != '', MsgKey, concat('body:', hex(SHA256(callback)))) AS callback_key
    FROM ({extraction})
)
"""

MESSAGES_PER_ACCOUNT_PER_HOUR = """
WITH {events},
messages AS (  -- each message once, however many copies landed
    SELECT SdkAppid, callback_key, min(Official_Account) AS official_account,
           min(toUnixTimestamp64Milli(event_time)) AS event_time_ms
    FROM events
    WHERE CallbackCommand = 'OfficialAccount.CallbackAfterSendMsg'
    GROUP BY SdkAppid, callback_key
)
SELECT official_account, event_time_ms - event_time_ms % 3600000 AS hour_ms, count() AS messages
FROM messages
GROUP BY official_account, hour_ms
ORDER BY official_account, hour_ms
"""

DUPLICATES = """
WITH {events},
copies AS (
    SELECT count() AS copies FROM events GROUP BY SdkAppid, CallbackCommand, callback_key
)
SELECT sum(copies) AS records, count() AS callbacks, sumIf(copies, copies > 1) AS duplicated_records
FROM copies
"""


def answers(events_file: Path) -> Answers:
    """The answers over one JSON Lines file of envelopes, as `bridge consume` writes it."""
    source = f"file({_literal(str(events_file.resolve()))}, 'JSONAsString')"
    events = EVENTS.replace("{extraction}", EXTRACTION.replace("{source}", source))
    connection = chdb.connect(":memory:")
    try:
        cursor = connection.cursor()
        cursor.execute(MESSAGES_PER_ACCOUNT_PER_HOUR.replace("{events}", events))
        messages = cursor.fetchall()
        cursor.execute(DUPLICATES.replace("{events}", events))
        counts = cursor.fetchone()
    finally:
        connection.close()
    assert counts is not None  # an aggregate without GROUP BY always has its one row
    return Answers.of(messages, *counts)


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("events_file", type=Path, help="JSON Lines file written by `bridge consume`")
    print(answers(parser.parse_args().events_file).report())


if __name__ == "__main__":
    main()
