"""DuckDB over `bridge consume` output: messages per official account per hour, and the duplicate rate.

    bridge consume --bootstrap-servers localhost:9092 --from-beginning --output events.jsonl
    python -m examples.duckdb_job events.jsonl

`read_json` reads each line's envelope with `query` and `callback` kept as JSON, and the fields are taken out
of them by path (`->>`), so a field Tencent sends as a number in one callback and as a string in another (as
it does with `EventTime`), or a field absent from most lines, costs nothing. The queries are plain SQL: paste
them into the `duckdb` shell with the file's name in place of `?`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import duckdb

from examples.answers import Answers

EVENTS = """
CREATE OR REPLACE TEMP VIEW events AS
WITH envelopes AS (
    SELECT
        query ->> 'SdkAppid' AS sdk_app_id,
        coalesce(query ->> 'CallbackCommand', callback ->> 'CallbackCommand') AS command,
        callback,
        received_at
    FROM read_json(
        $events_file,
        format = 'newline_delimited',
        columns = {schema: 'VARCHAR', received_at: 'BIGINT', query: 'JSON', callback: 'JSON'}
    )
)
SELECT
    sdk_app_id,
    command,
    callback ->> 'Official_Account' AS official_account,
    -- EventTime is an integer or a decimal string of milliseconds; without a usable one, the receive time.
    coalesce(
        CASE WHEN TRY_CAST(callback ->> 'EventTime' AS BIGINT) >= 0
             THEN TRY_CAST(callback ->> 'EventTime' AS BIGINT) END,
        received_at
    ) AS event_time_ms,
    -- The key of the bridge's callback identity (with SdkAppid and the command).
    CASE
        WHEN command = 'Group.CallbackAfterSendMsg'
            THEN (callback ->> 'GroupId') || ':' || (callback ->> 'MsgSeq')
        WHEN coalesce(callback ->> 'MsgKey', '') <> '' THEN callback ->> 'MsgKey'
        ELSE 'body:' || sha256(CAST(callback AS VARCHAR))
    END AS callback_key
FROM envelopes
"""

MESSAGES_PER_ACCOUNT_PER_HOUR = """
WITH messages AS (  -- each message once, however many copies landed
    SELECT sdk_app_id, callback_key, min(official_account) AS official_account,
           min(event_time_ms) AS event_time_ms
    FROM events
    WHERE command = 'OfficialAccount.CallbackAfterSendMsg'
    GROUP BY sdk_app_id, callback_key
)
SELECT official_account, event_time_ms - event_time_ms % 3600000 AS hour_ms, count(*) AS messages
FROM messages
GROUP BY ALL
ORDER BY ALL
"""

DUPLICATES = """
WITH copies AS (
    SELECT count(*) AS copies FROM events GROUP BY sdk_app_id, command, callback_key
)
SELECT coalesce(sum(copies), 0) AS records,
       count(*) AS callbacks,
       coalesce(sum(copies) FILTER (WHERE copies > 1), 0) AS duplicated_records
FROM copies
"""


def answers(events_file: Path) -> Answers:
    """The answers over one JSON Lines file of envelopes, as `bridge consume` writes it."""
    with duckdb.connect() as connection:
        connection.execute(EVENTS.replace("$events_file", _literal(str(events_file))))
        messages = connection.execute(MESSAGES_PER_ACCOUNT_PER_HOUR).fetchall()
        counts = connection.execute(DUPLICATES).fetchone()
    records, callbacks, duplicated = counts or (0, 0, 0)  # an aggregate without GROUP BY has one row
    return Answers.of(messages, records, callbacks, duplicated)


def _literal(text: str) -> str:
    """A SQL string literal (a view's table function takes no prepared parameter)."""
    return "'" + text.replace("'", "''") + "'"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("events_file", type=Path, help="JSON Lines file written by `bridge consume`")
    print(answers(parser.parse_args().events_file).report())


if __name__ == "__main__":
    main()
