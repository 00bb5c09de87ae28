"""The Python consumer library (`EventReader`) reading the topic itself: the same answers as the SQL recipes.

    python -m examples.reader_job --bootstrap-servers localhost:9092 --topic tim.official-account

It reads every partition from the beginning to the end offset it had at start, and counts each record's
callback identity (`Event.identity`, the bridge's own: SdkAppid, command and record key); a message is
counted once, at its first copy, in the hour of its event time (`Event.event_time_ms`: `EventTime`, else
the receive time).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import Any

from bridge.readback.reader import EventReader
from bridge.tencent.envelope import CallbackId
from examples.answers import Answers, hour_of

MESSAGE = "OfficialAccount.CallbackAfterSendMsg"


async def answers(
    bootstrap_servers: str, topic: str, kafka_options: Mapping[str, Any] | None = None
) -> Answers:
    """The answers over every record of `topic`, up to its end offsets when the reader starts."""
    copies: Counter[CallbackId] = Counter()
    messages: Counter[tuple[str, int]] = Counter()
    async with EventReader(
        bootstrap_servers,
        topic,
        start="beginning",
        client_id="examples-reader-job",
        kafka_options=kafka_options,
    ) as reader:
        async for event in reader:
            copies[event.identity] += 1
            if event.command == MESSAGE and copies[event.identity] == 1:
                messages[event.entity, hour_of(event.event_time_ms)] += 1
    duplicated = sum(count for count in copies.values() if count > 1)
    rows = [(account, hour, count) for (account, hour), count in messages.items()]
    return Answers.of(rows, copies.total(), len(copies), duplicated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--bootstrap-servers", default="localhost:9092", help="Kafka brokers (localhost:9092)"
    )
    parser.add_argument(
        "--topic", default="tim.official-account", help="the official-account topic (tim.official-account)"
    )
    arguments = parser.parse_args()
    print(asyncio.run(answers(arguments.bootstrap_servers, arguments.topic)).report())


if __name__ == "__main__":
    main()
