"""ClickHouse (embedded, through chDB) over `bridge consume` output: the same answers as the DuckDB recipe.

    bridge consume --bootstrap-servers localhost:9092 --from-beginning --output events.jsonl
    python -m examples.chdb_job events.jsonl

The columns are the generated ClickHouse column extraction of the topic (`bridge.schema.clickhouse`, what
`bridge schema --format clickhouse --topic tim.official-account` puts in the materialized view of a Kafka
engine table: one `JSONExtract*` expression per typed column over the envelope held as one string), run
here as it is over the JSON Lines file read with `file('events.jsonl', 'JSONAsString')`, whose one column is
`json`. The aggregates are plain SQL over those columns (`SdkAppid`, `CallbackCommand`, `key`,
`event_time`, `Official_Account`, `callback`): the same queries run on the MergeTree table the view fills,
where `record_key` (Kafka's `_key`) is the key of every record.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import chdb

from bridge.schema.clickhouse import extraction_query, literal
from bridge.schema.model import select
from examples.answers import Answers

TOPIC = "tim.official-account"
"""The topic whose extraction is run: the official-account family's (as the default layout names it)."""

EVENTS = """
events AS (
    SELECT *,
        -- The key of the bridge's callback identity (with SdkAppid and the command): the generated `key`
        -- column (the record key by the command's key rule), else, where the bridge hashes the body, the
        -- body as it was received (copies of one callback carry the same bytes).
        ifNull(key, concat('body:', hex(SHA256(callback)))) AS callback_key
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


def extraction(events_file: Path) -> str:
    """The generated column extraction of the topic, over the JSON Lines file."""
    source = f"file({literal(str(events_file.resolve()))}, 'JSONAsString')"
    return extraction_query(select(topic=TOPIC), source)


def answers(events_file: Path) -> Answers:
    """The answers over one JSON Lines file of envelopes, as `bridge consume` writes it."""
    events = EVENTS.replace("{extraction}", extraction(events_file))
    connection = chdb.connect(":memory:")  # type: ignore[no-untyped-call]  # chdb's connect() has no hints
    try:
        cursor = connection.cursor()
        cursor.execute(MESSAGES_PER_ACCOUNT_PER_HOUR.replace("{events}", events))
        messages = cursor.fetchall()
        cursor.execute(DUPLICATES.replace("{events}", events))
        counts = cursor.fetchone()
    finally:
        connection.close()
    records, callbacks, duplicated = counts or (0, 0, 0)  # an aggregate without GROUP BY has one row
    return Answers.of(messages, records, callbacks, duplicated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("events_file", type=Path, help="JSON Lines file written by `bridge consume`")
    print(answers(parser.parse_args().events_file).report())


if __name__ == "__main__":
    main()
