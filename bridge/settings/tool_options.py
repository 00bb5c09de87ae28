"""The options of the tools: what `consume` and `replay` read, each one's own, and `bench`'s, each table one
group of `--help`."""

from __future__ import annotations

from bridge.settings import values
from bridge.settings.option import COMPRESSION_TYPES, Option

_INSTANT = "ISO 8601 (UTC unless an offset is given) or epoch ms"
CONSUME_DECISIONS = ("skip", "include", "only")
REPLAY_DECISIONS = ("auto", "include", "skip")

READING: tuple[Option, ...] = (
    Option(
        "topic",
        "Topic to read (default: the official-account topic serve writes to).",
        values.topic,
        "NAME",
    ),
    Option(
        "since",
        f"Only events at or after this event time, {_INSTANT}.",
        values.instant,
        "TIME",
        unset="(none)",
    ),
    Option(
        "until", f"Only events before this event time, {_INSTANT}.", values.instant, "TIME", unset="(none)"
    ),
    Option(
        "command",
        "Only these commands or command families, comma-separated "
        "(OfficialAccount.CallbackAfterSendMsg,C2C).",
        values.names,
        "NAME[,...]",
    ),
    Option(
        "account",
        "Only this owning entity (official account, conversation, group...); reads only its partition.",
        values.text,
        "ENTITY",
        unset="(none)",
    ),
    Option(
        "lateness",
        "Seconds of event time a callback may land after later ones: the --since lookup by time starts "
        "this much earlier (a partition is always read to its end offset, whatever the event times).",
        values.lateness,
        "SECONDS",
    ),
)
CONSUME: tuple[Option, ...] = (
    Option(
        "from_beginning",
        "Read from the beginning of the topic; without it (or --since, or a group's commits), only new "
        "events.",
        values.boolean,
    ),
    Option("follow", "Keep reading new events until Ctrl-C.", values.boolean),
    Option("max", "Stop after this many events.", values.int_between(1, 2**62), "N", unset="(no limit)"),
    Option(
        "group",
        "Consumer group: start from its committed offsets and commit the events written out.",
        values.text,
        "GROUP",
        unset="(none)",
    ),
    Option("output", "File to write JSON Lines to; - is standard output.", values.text, "FILE"),
    Option(
        "decisions",
        "Forward mode's records of the app server's decisions on before-callbacks: skip (passed over and "
        "counted), include (each printed after its callback, its value as written, of schema "
        "tencent-chat-kafka-bridge/app-decision/1) or only (the decisions alone). --command, --account "
        "and the window select a decision with its callback.",
        values.one_of(CONSUME_DECISIONS),
        "WHICH",
    ),
)
REPLAY: tuple[Option, ...] = (
    Option(
        "from_offset",
        "Start every partition read at this offset.",
        values.int_between(0, 2**62),
        "OFFSET",
        unset="(none)",
    ),
    Option(
        "to_offset",
        "Stop every partition before this offset.",
        values.int_between(0, 2**62),
        "OFFSET",
        unset="(none)",
    ),
    Option(
        "to_topic",
        "Copy to this topic (same cluster), with key, timestamp, headers and the partition rule kept.",
        values.topic,
        "NAME",
        unset="(none)",
    ),
    Option("to_file", "Copy to this JSON Lines file, appending.", values.text, "FILE", unset="(none)"),
    Option(
        "to_url",
        "Re-post each callback body to this URL with its stored query (without Sign: run the receiver "
        "without a token).",
        values.url,
        "URL",
        unset="(none)",
    ),
    Option("concurrency", "Deliveries in flight at once.", values.int_between(1, 1000), "N"),
    Option(
        "retries", "Retries of a delivery that failed for a passing reason.", values.int_between(0, 100), "N"
    ),
    Option(
        "rate",
        "Most records copied per second.",
        values.rate,
        "PER_SECOND",
        unset="(no limit)",
    ),
    Option(
        "checkpoint",
        "File recording progress per partition; a replay run again with it continues where it stopped.",
        values.text,
        "FILE",
        unset="(none)",
    ),
    Option(
        "skipped",
        "File the records the destination refuses for good (HTTP 400, 413, 422, a record too large) are "
        "appended to, as JSON Lines envelopes, to be re-sent once fixed.",
        values.text,
        "FILE",
    ),
    Option(
        "dedup",
        "Drop records of a callback already copied in this run (same SdkAppid, command and key).",
        values.boolean,
    ),
    Option(
        "decisions",
        "Forward mode's records of the app server's decisions on before-callbacks: include (copied, each "
        "after its callback: --to-topic on its partition, value and headers byte for byte; --to-file as "
        "consume --decisions include prints them), skip (passed over and counted), or auto: include for "
        "--to-topic, skip for --to-file and --to-url. --to-url never posts a decision.",
        values.one_of(REPLAY_DECISIONS),
        "WHICH",
    ),
)
BENCH: tuple[Option, ...] = (
    Option(
        "url",
        "Callback URL of a running bridge to measure; without it the bench starts one (and a broker).",
        values.url,
        "URL",
        unset="(start one)",
    ),
    Option(
        "connections",
        "Keep-alive connections: all busy in the closed loop, at most this many in the open loop.",
        values.int_between(1, 10000),
        "N",
    ),
    Option(
        "rate",
        "Callbacks sent per second, an open loop at a constant arrival rate (without it, a closed loop). "
        "The Python generator only: wrk has no constant arrival rate.",
        values.rate,
        "PER_SECOND",
        unset="(no limit)",
    ),
    Option(
        "duration",
        "Seconds each measured round lasts.",
        values.number(0, 3600, zero=False, what="a number of seconds above 0 and at most 3600"),
        "SECONDS",
    ),
    Option("warmup", "Seconds of unmeasured load before each round.", values.seconds_or_zero, "SECONDS"),
    Option(
        "rounds", "Measured rounds per server, alternating between them.", values.int_between(1, 100), "N"
    ),
    Option(
        "accounts",
        "Distinct owning accounts (official accounts, senders, groups) in the callbacks.",
        values.int_between(1, 10000000),
        "N",
    ),
    Option(
        "baseline",
        "Also measure a bare aiohttp server parsing the same requests without Kafka, and give the ratio.",
        values.boolean,
    ),
    Option(
        "floor",
        "Also measure the baseline's handler plus one plain aiokafka send_and_wait per callback (acks=all, "
        "linger 0) and nothing else, writing to a topic of its own: the bridge minus it is the bridge's own "
        "cost.",
        values.boolean,
    ),
    Option(
        "driver",
        "What posts the callbacks: python (the bench's own generator; closed or open loop), wrk (wrk -t1 "
        "-c<connections>, closed loop only, whole seconds; it takes less CPU from the server measured) or "
        "both, each round by each.",
        values.one_of(("python", "wrk", "both")),
        "DRIVER",
    ),
    Option("format", "Report format: text or json.", values.one_of(("text", "json")), "FORMAT"),
)


BENCH_BOOTSTRAP = Option(
    "bootstrap_servers",
    "Kafka brokers for the bridge the bench starts, instead of an embedded broker.",
    values.servers,
    "HOST:PORT[,...]",
)
REPLAY_TOPIC_SINK: tuple[Option, ...] = (
    Option(
        "compression",
        "Compression of the records copied to --to-topic: " + ", ".join(COMPRESSION_TYPES) + ".",
        values.one_of(COMPRESSION_TYPES),
        "CODEC",
    ),
    Option(
        "max_record_bytes",
        "Largest record copied to --to-topic; a larger one is set aside in --skipped. The default is the "
        "max.message.bytes the bridge gives the topics it creates, with the default body limit.",
        values.int_between(1024, 64 << 20),
        "BYTES",
    ),
)
SCHEMA_FORMATS = ("json-schema", "clickhouse", "clickhouse-query", "flink", "spark")
SCHEMA: tuple[Option, ...] = (
    Option(
        "format",
        "What to print: json-schema (the record value: envelope and typed callback), clickhouse (a Kafka "
        "engine table, a MergeTree target and the materialized view between them), clickhouse-query (the "
        "column extraction alone, over bridge consume's JSON Lines, for clickhouse local or chDB), flink "
        "(a Flink SQL kafka table), spark (the value's StructType, as JSON).",
        values.one_of(SCHEMA_FORMATS),
        "FORMAT",
    ),
    Option(
        "command",
        "One command (OfficialAccount.CallbackAfterSendMsg).",
        values.text,
        "NAME",
        unset="(none)",
    ),
    Option(
        "family",
        "Every known command of a family (OfficialAccount, C2C, Group...), fields merged.",
        values.text,
        "NAME",
        unset="(none)",
    ),
    Option(
        "topic",
        "Every known command written to a topic (tim.official-account), fields merged; topic names as "
        "serve's topic settings give them (BRIDGE_TOPIC, BRIDGE_C2C_TOPIC... when set).",
        values.topic,
        "NAME",
        unset="(none)",
    ),
    Option(
        "bootstrap_servers",
        "Kafka brokers written into the clickhouse and flink DDL.",
        values.servers,
        "HOST:PORT[,...]",
    ),
    Option(
        "source",
        "What the clickhouse-query format reads: a table, or a table function of a String column `json`.",
        values.text,
        "TABLE",
    ),
)
