"""The one declarative source of the settings: every option of every command, its flag, its environment
variable, its help and its group in `--help`. The command line, `--help`, the environment and the README's
configuration tables (checked by tests/test_docs.py) are all made from `COMMANDS`.

`--delivery-timeout` is `BRIDGE_DELIVERY_TIMEOUT` is `ServeSettings.delivery_timeout`. The service's
settings (serve, dev, topics ensure) and the Kafka connection and logging options every command takes are
`BRIDGE_<NAME>`; a tool's own options are scoped by command (`--group` of consume is
`BRIDGE_CONSUME_GROUP`), and their old unscoped names are still read, with a warning, for one release.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.settings import values
from bridge.settings.parts import (
    BenchSettings,
    ConsumeSettings,
    ReplaySettings,
    ServeSettings,
    TopicsSettings,
)

ENV_PREFIX = "BRIDGE_"
COMPRESSION_TYPES = ("none", "gzip", "lz4", "zstd", "snappy")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "text")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True, slots=True)
class Option:
    field: str
    help: str
    parse: Callable[[str], Any]
    metavar: str | None = None
    unset: str = "auto"
    """What a default of None means, in `--help` and the README."""
    repeatable: bool = False
    """A flag that may be given several times, each adding to the list (the variable is comma-separated)."""
    hidden: bool = False
    """A secret: a message about a bad value names the variable, never repeats the value."""

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def is_switch(self) -> bool:
        """An on/off option: `--name` / `--no-name` on the command line, true/false in the environment."""
        return self.parse is values.boolean


_TOPIC_HELP = "Topic for {what} callbacks."
_INSTANT = "ISO 8601 (UTC unless an offset is given) or epoch ms"

KAFKA_CONNECTION: tuple[Option, ...] = (
    Option("client_id", "Kafka client id.", values.text, "ID"),
    Option(
        "security_protocol",
        "How to connect to Kafka: " + ", ".join(SECURITY_PROTOCOLS) + ".",
        values.upper_one_of(SECURITY_PROTOCOLS),
        "PROTOCOL",
    ),
    Option(
        "ssl_cafile",
        "PEM file of the CAs that sign the brokers' certificates (SSL, SASL_SSL); default: the system's.",
        values.existing_file,
        "FILE",
        unset="(none)",
    ),
    Option(
        "ssl_certfile",
        "PEM client certificate, for brokers that require one (mutual TLS).",
        values.existing_file,
        "FILE",
        unset="(none)",
    ),
    Option(
        "ssl_keyfile",
        "PEM private key of the client certificate, if not in the certificate file.",
        values.existing_file,
        "FILE",
        unset="(none)",
    ),
    Option(
        "sasl_mechanism",
        "SASL mechanism (SASL_PLAINTEXT, SASL_SSL): " + ", ".join(SASL_MECHANISMS) + ".",
        values.upper_one_of(SASL_MECHANISMS),
        "MECHANISM",
        unset="(none)",
    ),
    Option("sasl_username", "SASL user name.", values.text, "USER", unset="(none)"),
    Option("sasl_password", "SASL password.", values.password, "PASSWORD", unset="(none)", hidden=True),
    Option(
        "sasl_password_file",
        "File holding the SASL password (a container secret); one final line break is ignored.",
        values.password_file,
        "FILE",
        unset="(none)",
    ),
)
TOPIC_NAMES: tuple[Option, ...] = (
    Option(
        "topic",
        _TOPIC_HELP.format(what="official-account (OfficialAccount.*)"),
        values.topic,
        "NAME",
    ),
    Option("c2c_topic", _TOPIC_HELP.format(what="one-to-one message (C2C.*)"), values.topic, "NAME"),
    Option("group_topic", _TOPIC_HELP.format(what="group (Group.*)"), values.topic, "NAME"),
    Option(
        "user_topic",
        _TOPIC_HELP.format(what="user (State.*, Profile.*, Sns.*, Follow.*)"),
        values.topic,
        "NAME",
    ),
    Option(
        "app_topic",
        _TOPIC_HELP.format(what="app-level (Alert.*, Push.*, ContentCallback.*, Bot.*)"),
        values.topic,
        "NAME",
    ),
    Option(
        "unknown_topic",
        "Topic for callbacks of command families the bridge does not know.",
        values.topic,
        "NAME",
    ),
)
TOPIC_SHAPE: tuple[Option, ...] = (
    Option("partitions", "Partitions of topics the bridge creates.", values.int_between(1, 10000), "N"),
    Option(
        "replication_factor",
        "Replication factor of topics the bridge creates; auto is min(3, brokers in the cluster).",
        values.auto_or(values.int_between(1, 32)),
        "N|auto",
    ),
    Option(
        "min_insync_replicas",
        "min.insync.replicas of topics the bridge creates; auto is 2 with 3 or more replicas, else 1.",
        values.auto_or(values.int_between(1, 32)),
        "N|auto",
    ),
    Option(
        "retention_hours",
        "retention.ms of topics the bridge creates, in hours: how far back a replay or backfill can go.",
        values.int_between(1, 24 * 3650),
        "HOURS",
    ),
)
HTTP: tuple[Option, ...] = (
    Option("host", "Address to listen on.", values.text, "ADDRESS"),
    Option("port", "TCP port to listen on (0 picks a free port).", values.int_between(0, 65535), "PORT"),
    Option("path", "URL path Tencent posts callbacks to.", values.path, "PATH"),
    Option(
        "max_body_bytes",
        "Largest callback body accepted; larger gets 413.",
        values.int_between(1, 64 << 20),
        "BYTES",
    ),
    Option(
        "body_timeout",
        "Seconds a client has to send the whole body; a slower one gets 408 and frees its slot.",
        values.seconds,
        "SECONDS",
    ),
    Option(
        "max_pending_bodies",
        "Callbacks whose body is still arriving at once (a body sent with the headers takes none); more "
        "get 503 at once.",
        values.int_between(1, 100000),
        "N",
    ),
    Option(
        "max_url_bytes",
        "Longest request line (method, path and query); longer gets 400 and the connection is closed.",
        values.int_between(256, 1 << 20),
        "BYTES",
    ),
    Option(
        "max_header_bytes",
        "Longest header line; longer gets 400 and the connection is closed.",
        values.int_between(256, 1 << 20),
        "BYTES",
    ),
    Option(
        "max_headers",
        "Most header lines in a request; more get 400 and the connection is closed.",
        values.int_between(8, 10000),
        "N",
    ),
    Option(
        "idle_timeout",
        "Seconds a connection may stay idle between requests, or take to send a request's headers, before "
        "the bridge closes it.",
        values.seconds,
        "SECONDS",
    ),
    Option(
        "max_connections",
        "Most client connections open at once; one more is answered 503 and closed (keep it below the "
        "file descriptor limit).",
        values.int_between(1, 1000000),
        "N",
    ),
)
AUTHENTICATION: tuple[Option, ...] = (
    Option(
        "callback_token",
        "Tencent webhook authentication token: a callback is accepted only when signed with one of these. "
        "APPID=TOKEN signs for that SDKAppID only, a bare TOKEN for any app. Repeat the flag, or separate "
        "with commas, to accept the old and the new token in a rotation.",
        values.tokens,
        "[APPID=]TOKEN",
        unset="(none)",
        repeatable=True,
        hidden=True,
    ),
    Option(
        "callback_token_file",
        "File holding more tokens, one a line, each TOKEN or APPID=TOKEN (a container secret).",
        values.token_file,
        "FILE",
        unset="(none)",
    ),
    Option(
        "allow_unsigned",
        "Accept callbacks without a signature when no token is set; without a token and without this, "
        "serve refuses to start.",
        values.boolean,
    ),
    Option(
        "max_clock_skew",
        "Most seconds a signed callback's RequestTime may be from the bridge's clock, either way.",
        values.seconds,
        "SECONDS",
    ),
    Option(
        "sdk_app_id",
        "Accept callbacks of these SDKAppIDs only; others get 403. Repeatable, or comma-separated.",
        values.sdk_app_ids,
        "ID[,...]",
        unset="(any)",
        repeatable=True,
    ),
)
DELIVERY: tuple[Option, ...] = (
    Option(
        "delivery_timeout",
        "Longest wait, in seconds, for the broker to confirm a write before answering 503.",
        values.seconds,
        "SECONDS",
    ),
    Option(
        "max_in_flight",
        "Callbacks waiting for the broker at once; more get 503 at once, so memory stays bounded.",
        values.int_between(1, 100000),
        "N",
    ),
    Option(
        "dedup_window",
        "Seconds a confirmed callback is remembered, so a copy is answered 200 without a second write (0 "
        "turns it off).",
        values.seconds_or_zero,
        "SECONDS",
    ),
    Option(
        "dedup_max_keys",
        "Most confirmed callbacks remembered for the dedup window.",
        values.int_between(0, 10000000),
        "N",
    ),
    Option(
        "dedup_max_bytes",
        "Most memory the dedup window may take, in bytes, whatever the keys (each key counts its size "
        "plus 150 bytes); the oldest keys go first.",
        values.int_between(0, 1 << 40),
        "BYTES",
    ),
    Option(
        "compression",
        "Producer compression: " + ", ".join(COMPRESSION_TYPES) + ".",
        values.one_of(COMPRESSION_TYPES),
        "CODEC",
    ),
    Option(
        "linger_ms", "Milliseconds the producer waits to fill a batch.", values.int_between(0, 1000), "MS"
    ),
    Option(
        "idempotence",
        "aiokafka's idempotent producer: a retried write lands once, and a record answered 503 is retried "
        "until it lands, holding its in-flight slot while the brokers refuse it.",
        values.boolean,
    ),
)
SHUTDOWN: tuple[Option, ...] = (
    Option(
        "shutdown_delay",
        "Seconds to keep serving after SIGTERM while /readyz says 503, so a load balancer can notice.",
        values.seconds_or_zero,
        "SECONDS",
    ),
    Option(
        "shutdown_timeout",
        "Longest time, in seconds, to flush and close the producer on shutdown.",
        values.seconds,
        "SECONDS",
    ),
)
LOGGING: tuple[Option, ...] = (
    Option("log_level", "Log level: " + ", ".join(LOG_LEVELS) + ".", values.one_of(LOG_LEVELS), "LEVEL"),
    Option(
        "log_format",
        "Log format: json, text, or auto (JSON unless stderr is a terminal).",
        values.one_of(LOG_FORMATS),
        "FORMAT",
    ),
)
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
        "Callbacks sent per second, an open loop at a constant arrival rate (without it, a closed loop).",
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
        "Also measure the baseline plus one write per callback through the bridge's publisher and nothing "
        "else: the least any bridge on aiokafka can cost.",
        values.boolean,
    ),
    Option("format", "Report format: text or json.", values.one_of(("text", "json")), "FORMAT"),
)

# Options with the same field but another meaning, or another help, in some commands.
SERVE_BOOTSTRAP = Option(
    "bootstrap_servers", "Kafka brokers to connect to (required).", values.servers, "HOST:PORT[,...]"
)
BENCH_BOOTSTRAP = Option(
    "bootstrap_servers",
    "Kafka brokers for the bridge the bench starts, instead of an embedded broker.",
    values.servers,
    "HOST:PORT[,...]",
)
CREATE_TOPICS = Option(
    "create_topics",
    "Create missing topics at start; without it a missing topic keeps the bridge not ready.",
    values.boolean,
)
TOPICS_MAX_BODY_BYTES = Option(
    "max_body_bytes",
    "Largest callback body the bridge accepts: the topics' max.message.bytes is this plus 64 KiB.",
    values.int_between(1, 64 << 20),
    "BYTES",
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


def _only(options: tuple[Option, ...], *fields: str) -> tuple[Option, ...]:
    return tuple(option for option in options if option.field in fields)


def _but(options: tuple[Option, ...], *fields: str) -> tuple[Option, ...]:
    return tuple(option for option in options if option.field not in fields)


# Settings every command reads under their service names, whatever the command: which cluster, how to
# connect to it, how to log.
SHARED_FIELDS = frozenset(
    {option.field for option in (SERVE_BOOTSTRAP, *KAFKA_CONNECTION, *LOGGING)} - {"client_id"}
)
# A tool's options that had no variable before they were scoped: nothing to stay compatible with.
_NEW_IN_TOOLS = frozenset({"client_id", "compression", "max_record_bytes"})
Group = tuple[str, tuple[Option, ...]]


@dataclass(frozen=True)
class Command:
    """A command's settings class, its options in their `--help` groups, and its defaults where they are not
    the class's."""

    name: str
    title: str
    """How the command is named to the user: `topics ensure`."""
    settings: type[Any]
    groups: tuple[Group, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    scoped: bool = False
    """A tool: its own options are `BRIDGE_<COMMAND>_<NAME>`, not `BRIDGE_<NAME>`."""

    @property
    def options(self) -> tuple[Option, ...]:
        return tuple(option for _, options in self.groups for option in options)

    def env(self, option: Option) -> str:
        if self.scoped and option.field not in SHARED_FIELDS:
            return f"{ENV_PREFIX}{self.name.upper()}_{option.field.upper()}"
        return ENV_PREFIX + option.field.upper()

    def old_env(self, option: Option) -> str | None:
        """The variable this option had before it was scoped, still read for one release, with a warning."""
        if self.scoped and option.field not in SHARED_FIELDS | _NEW_IN_TOOLS:
            return ENV_PREFIX + option.field.upper()
        return None

    def default(self, option: Option) -> Any:
        if option.field in self.defaults:
            return self.defaults[option.field]
        return next(f.default for f in dataclasses.fields(self.settings) if f.name == option.field)


_SERVE_GROUPS: tuple[Group, ...] = (
    ("Kafka connection", (SERVE_BOOTSTRAP, *KAFKA_CONNECTION)),
    ("topics", (*TOPIC_NAMES, CREATE_TOPICS, *TOPIC_SHAPE)),
    ("HTTP", HTTP),
    ("authentication", AUTHENTICATION),
    ("delivery", DELIVERY),
    ("shutdown", SHUTDOWN),
    ("logging", LOGGING),
)
_READER_CONNECTION = ("Kafka connection", (SERVE_BOOTSTRAP, *KAFKA_CONNECTION))
COMMANDS: Mapping[str, Command] = {
    command.name: command
    for command in (
        Command("serve", "serve", ServeSettings, _SERVE_GROUPS),
        Command(
            "dev",
            "dev",
            ServeSettings,
            # dev's embedded broker is plain and local: of the Kafka connection, only the client id.
            (("Kafka connection", _only(KAFKA_CONNECTION, "client_id")), *_SERVE_GROUPS[1:]),
            # Loopback only, topics created on a single in-memory broker, and unsigned callbacks accepted,
            # so the quick start's curl works as it is.
            {"host": "127.0.0.1", "create_topics": True, "replication_factor": 1, "allow_unsigned": True},
        ),
        Command(
            "topics",
            "topics ensure",
            TopicsSettings,
            (
                ("Kafka connection", (SERVE_BOOTSTRAP, *KAFKA_CONNECTION)),
                ("topics", (*TOPIC_NAMES, *TOPIC_SHAPE, TOPICS_MAX_BODY_BYTES)),
                ("logging", LOGGING),
            ),
        ),
        Command(
            "consume",
            "consume",
            ConsumeSettings,
            (_READER_CONNECTION, ("events read", READING), ("consume", CONSUME), ("logging", LOGGING)),
            scoped=True,
        ),
        Command(
            "replay",
            "replay",
            ReplaySettings,
            (
                _READER_CONNECTION,
                ("events read", READING),
                ("replay", REPLAY),
                ("the --to-topic destination", REPLAY_TOPIC_SINK),
                ("logging", LOGGING),
            ),
            scoped=True,
        ),
        Command(
            "bench",
            "bench",
            BenchSettings,
            (("bench", BENCH), ("Kafka connection", (BENCH_BOOTSTRAP,)), ("logging", LOGGING)),
            scoped=True,
        ),
    )
}
