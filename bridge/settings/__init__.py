"""All settings, each with a flag and an environment variable of the same name, built once at start.

`OPTIONS` is the single table the command line, `--help`, the environment and the README's configuration
table are made from: `--delivery-timeout` is `BRIDGE_DELIVERY_TIMEOUT` is `Settings.delivery_timeout`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.secret import HIDDEN, Secret
from bridge.settings import values
from bridge.tencent.commands import TopicGroup

ENV_PREFIX = "BRIDGE_"
COMPRESSION_TYPES = ("none", "gzip", "lz4", "zstd", "snappy")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "text")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class SettingsError(ValueError):
    """A setting has a value the bridge cannot use; the message says which and how to fix it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    bootstrap_servers: tuple[str, ...] = ()
    host: str = "0.0.0.0"  # noqa: S104 - a webhook receiver listens on every interface by default
    port: int = 8080
    path: str = "/callback"
    topic: str = "tim.official-account"
    c2c_topic: str = "tim.c2c"
    group_topic: str = "tim.group"
    user_topic: str = "tim.user"
    app_topic: str = "tim.app"
    unknown_topic: str = "tim.unknown"
    create_topics: bool = False
    partitions: int = 12
    replication_factor: int | None = None
    min_insync_replicas: int | None = None
    retention_hours: int = 14 * 24
    delivery_timeout: float = 5.0
    max_in_flight: int = 512
    dedup_window: float = 300.0
    dedup_max_keys: int = 100_000
    dedup_max_bytes: int = 32 << 20
    shutdown_delay: float = 0.0
    shutdown_timeout: float = 10.0
    max_body_bytes: int = 1024 * 1024
    body_timeout: float = 5.0
    max_pending_bodies: int = 256
    # security: who may post (issues 4 and 12)
    callback_token: tuple[Secret, ...] = ()
    """Bare `Secret`s sign for any app; a `CallbackToken` with an `sdk_app_id` for that app only."""
    callback_token_file: tuple[Secret, ...] = ()
    """The tokens read from `--callback-token-file`, one a line."""
    allow_unsigned: bool = False
    max_clock_skew: float = 60.0
    sdk_app_id: tuple[str, ...] = ()
    # what a connection may send and how long it may take (aiohttp's request handler)
    max_url_bytes: int = 4096
    max_header_bytes: int = 8190
    max_headers: int = 100
    idle_timeout: float = 75.0
    max_connections: int = 1024
    # the connection to Kafka
    security_protocol: str = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    sasl_password_file: Secret | None = None
    """The password read from `--sasl-password-file`."""
    compression: str = "none"
    linger_ms: int = 0
    idempotence: bool = False
    client_id: str = "tencent-chat-kafka-bridge"
    log_level: str = "info"
    log_format: str = "auto"
    # `bridge consume` and `bridge replay`
    from_beginning: bool = False
    since: int | None = None
    until: int | None = None
    command: tuple[str, ...] = ()
    account: str | None = None
    lateness: float = 3600.0
    follow: bool = False
    max: int | None = None
    group: str | None = None
    output: str = "-"
    from_offset: int | None = None
    to_offset: int | None = None
    to_topic: str | None = None
    to_file: str | None = None
    to_url: str | None = None
    concurrency: int = 8
    retries: int = 5
    rate: float | None = None
    checkpoint: str | None = None
    skipped: str = "replay-skipped.jsonl"
    dedup: bool = False
    # `bridge bench`
    url: str | None = None
    connections: int = 64
    duration: float = 5.0
    warmup: float = 1.0
    rounds: int = 2
    accounts: int = 50
    baseline: bool = False
    floor: bool = False
    format: str = "text"

    def topic_for(self, group: TopicGroup) -> str:
        return {
            TopicGroup.OFFICIAL_ACCOUNT: self.topic,
            TopicGroup.C2C: self.c2c_topic,
            TopicGroup.GROUP: self.group_topic,
            TopicGroup.USER: self.user_topic,
            TopicGroup.APP: self.app_topic,
            TopicGroup.UNKNOWN: self.unknown_topic,
        }[group]

    @property
    def callback_tokens(self) -> tuple[Secret, ...]:
        """Every token a callback may be signed with, from the flags, the environment and the file."""
        return self.callback_token + self.callback_token_file

    @property
    def max_event_age_ms(self) -> int:
        """An `EventTime` older than this (half the retention) does not become the record's timestamp: every
        callback answered 200 then stays at least half the retention, however old its event."""
        return self.retention_hours * 3_600_000 // 2

    @property
    def topics(self) -> tuple[str, ...]:
        """Every topic the bridge writes to, each once, in a stable order."""
        return tuple(dict.fromkeys(self.topic_for(group) for group in TopicGroup))


# --- value parsers: each turns a flag's or variable's text into a value, or raises ValueError ---------------


@dataclass(frozen=True, slots=True)
class Option:
    field: str
    help: str
    parse: Callable[[str], Any]
    metavar: str | None = None
    commands: frozenset[str] = frozenset({"serve", "dev", "topics"})
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
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()

    @property
    def is_switch(self) -> bool:
        """An on/off option: `--name` / `--no-name` on the command line, true/false in the environment."""
        return self.parse is values.boolean


SERVE_ONLY = frozenset({"serve"})
# `topics` is `bridge topics ensure`: it needs the brokers, the topic names and what a topic should look
# like, not the HTTP or producer settings.
TOPICS = frozenset({"topics"})
SERVING = frozenset({"serve", "dev"})
CONSUME = frozenset({"consume"})
REPLAY = frozenset({"replay"})
READERS = CONSUME | REPLAY
# Every command that talks to a real cluster; `dev`'s embedded broker is plain and local.
KAFKA_CLIENTS = SERVE_ONLY | TOPICS | READERS
BENCH = frozenset({"bench"})
_TOPIC_HELP = "Topic for {what} callbacks."
_INSTANT = "ISO 8601 (UTC unless an offset is given) or epoch ms"
READER_OPTIONS: tuple[Option, ...] = (
    Option(
        "from_beginning",
        "Read from the beginning of the topic; without it (or --since, or a group's commits), only new "
        "events.",
        values.boolean,
        commands=CONSUME,
    ),
    Option(
        "since",
        f"Only events at or after this event time, {_INSTANT}.",
        values.instant,
        "TIME",
        READERS,
        "(none)",
    ),
    Option(
        "until", f"Only events before this event time, {_INSTANT}.", values.instant, "TIME", READERS, "(none)"
    ),
    Option(
        "command",
        "Only these commands or command families, comma-separated "
        "(OfficialAccount.CallbackAfterSendMsg,C2C).",
        values.names,
        "NAME[,...]",
        READERS,
    ),
    Option(
        "account",
        "Only this owning entity (official account, conversation, group...); reads only its partition.",
        values.text,
        "ENTITY",
        READERS,
        "(none)",
    ),
    Option(
        "lateness",
        "Seconds of event time a callback may land after later ones: the --since lookup by time starts "
        "this much earlier (a partition is always read to its end offset, whatever the event times).",
        values.lateness,
        "SECONDS",
        READERS,
    ),
    Option("follow", "Keep reading new events until Ctrl-C.", values.boolean, commands=CONSUME),
    Option("max", "Stop after this many events.", values.int_between(1, 2**62), "N", CONSUME, "(no limit)"),
    Option(
        "group",
        "Consumer group: start from its committed offsets and commit the events written out.",
        values.text,
        "GROUP",
        CONSUME,
        "(none)",
    ),
    Option("output", "File to write JSON Lines to; - is standard output.", values.text, "FILE", CONSUME),
    Option(
        "from_offset",
        "Start every partition read at this offset.",
        values.int_between(0, 2**62),
        "OFFSET",
        REPLAY,
        "(none)",
    ),
    Option(
        "to_offset",
        "Stop every partition before this offset.",
        values.int_between(0, 2**62),
        "OFFSET",
        REPLAY,
        "(none)",
    ),
    Option(
        "to_topic",
        "Copy to this topic (same cluster), with key, timestamp, headers and the partition rule kept.",
        values.topic,
        "NAME",
        REPLAY,
        "(none)",
    ),
    Option("to_file", "Copy to this JSON Lines file, appending.", values.text, "FILE", REPLAY, "(none)"),
    Option(
        "to_url",
        "Re-post each callback body to this URL with its stored query (without Sign: run the receiver "
        "without a token).",
        values.url,
        "URL",
        REPLAY,
        "(none)",
    ),
    Option("concurrency", "Deliveries in flight at once.", values.int_between(1, 1000), "N", REPLAY),
    Option(
        "retries",
        "Retries of a delivery that failed for a passing reason.",
        values.int_between(0, 100),
        "N",
        REPLAY,
    ),
    Option(
        "rate",
        "replay: most records copied per second. bench: callbacks sent per second, an open loop at a "
        "constant arrival rate (without it, a closed loop).",
        values.rate,
        "PER_SECOND",
        REPLAY | BENCH,
        "(no limit)",
    ),
    Option(
        "checkpoint",
        "File recording progress per partition; a replay run again with it continues where it stopped.",
        values.text,
        "FILE",
        REPLAY,
        "(none)",
    ),
    Option(
        "skipped",
        "File the records the destination refuses for good (HTTP 400, 413, 422, a record too large) are "
        "appended to, as JSON Lines envelopes, to be re-sent once fixed.",
        values.text,
        "FILE",
        REPLAY,
    ),
    Option(
        "dedup",
        "Drop records of a callback already copied in this run (same SdkAppid, command and key).",
        values.boolean,
        commands=REPLAY,
    ),
)
BENCH_OPTIONS: tuple[Option, ...] = (
    Option(
        "url",
        "Callback URL of a running bridge to measure; without it the bench starts one (and a broker).",
        values.url,
        "URL",
        BENCH,
        "(start one)",
    ),
    Option(
        "connections",
        "Keep-alive connections: all busy in the closed loop, at most this many in the open loop.",
        values.int_between(1, 10_000),
        "N",
        BENCH,
    ),
    Option(
        "duration",
        "Seconds each measured round lasts.",
        values.number(0, 3600, zero=False, what="a number of seconds above 0 and at most 3600"),
        "SECONDS",
        BENCH,
    ),
    Option(
        "warmup",
        "Seconds of unmeasured load before each round.",
        values.seconds_or_zero,
        "SECONDS",
        BENCH,
    ),
    Option(
        "rounds",
        "Measured rounds per server, alternating between them.",
        values.int_between(1, 100),
        "N",
        BENCH,
    ),
    Option(
        "accounts",
        "Distinct owning accounts (official accounts, senders, groups) in the callbacks.",
        values.int_between(1, 10_000_000),
        "N",
        BENCH,
    ),
    Option(
        "baseline",
        "Also measure a bare aiohttp server parsing the same requests without Kafka, and give the ratio.",
        values.boolean,
        commands=BENCH,
    ),
    Option(
        "floor",
        "Also measure the baseline plus one write per callback through the bridge's publisher and nothing "
        "else: the least any bridge on aiokafka can cost.",
        values.boolean,
        commands=BENCH,
    ),
    Option("format", "Report format: text or json.", values.one_of(("text", "json")), "FORMAT", BENCH),
)
OPTIONS: tuple[Option, ...] = (
    Option(
        "bootstrap_servers",
        "Kafka brokers to connect to (required; bench: instead of an embedded broker).",
        values.servers,
        "HOST:PORT[,...]",
        SERVE_ONLY | READERS | TOPICS | BENCH,
    ),
    Option("host", "Address to listen on.", values.text, "ADDRESS", SERVING),
    Option(
        "port", "TCP port to listen on (0 picks a free port).", values.int_between(0, 65535), "PORT", SERVING
    ),
    Option("path", "URL path Tencent posts callbacks to.", values.path, "PATH", SERVING),
    Option(
        "topic",
        _TOPIC_HELP.format(what="official-account (OfficialAccount.*)")
        + " consume and replay read this topic.",
        values.topic,
        "NAME",
        SERVING | READERS | TOPICS,
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
    Option(
        "create_topics",
        "Create missing topics at start; without it a missing topic keeps the bridge not ready.",
        values.boolean,
        commands=SERVING,
    ),
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
    Option(
        "delivery_timeout",
        "Longest wait, in seconds, for the broker to confirm a write before answering 503.",
        values.seconds,
        "SECONDS",
        SERVING,
    ),
    Option(
        "max_in_flight",
        "Callbacks waiting for the broker at once; more get 503 at once, so memory stays bounded.",
        values.int_between(1, 100_000),
        "N",
        SERVING,
    ),
    Option(
        "dedup_window",
        "Seconds a confirmed callback is remembered, so a copy is answered 200 without a second write "
        "(0 turns it off).",
        values.seconds_or_zero,
        "SECONDS",
        SERVING,
    ),
    Option(
        "dedup_max_keys",
        "Most confirmed callbacks remembered for the dedup window.",
        values.int_between(0, 10_000_000),
        "N",
        SERVING,
    ),
    Option(
        "dedup_max_bytes",
        "Most memory the dedup window may take, in bytes, whatever the keys (each key counts its size "
        "plus 150 bytes); the oldest keys go first.",
        values.int_between(0, 1 << 40),
        "BYTES",
        SERVING,
    ),
    Option(
        "shutdown_delay",
        "Seconds to keep serving after SIGTERM while /readyz says 503, so a load balancer can notice.",
        values.seconds_or_zero,
        "SECONDS",
        SERVING,
    ),
    Option(
        "shutdown_timeout",
        "Longest time, in seconds, to flush and close the producer on shutdown.",
        values.seconds,
        "SECONDS",
        SERVING,
    ),
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
        SERVING,
    ),
    Option(
        "max_pending_bodies",
        "Callbacks whose body is still arriving at once (a body sent with the headers takes none); more "
        "get 503 at once.",
        values.int_between(1, 100_000),
        "N",
        SERVING,
    ),
    Option(
        "callback_token",
        "Tencent webhook authentication token: a callback is accepted only when signed with one of "
        "these. APPID=TOKEN signs for that SDKAppID only, a bare TOKEN for any app. Repeat the flag, or "
        "separate with commas, to accept the old and the new token in a rotation.",
        values.tokens,
        "[APPID=]TOKEN",
        SERVING,
        "(none)",
        repeatable=True,
        hidden=True,
    ),
    Option(
        "callback_token_file",
        "File holding more tokens, one a line, each TOKEN or APPID=TOKEN (a container secret).",
        values.token_file,
        "FILE",
        SERVING,
        "(none)",
    ),
    Option(
        "allow_unsigned",
        "Accept callbacks without a signature when no token is set; without a token and without this, "
        "serve refuses to start.",
        values.boolean,
        commands=SERVING,
    ),
    Option(
        "max_clock_skew",
        "Most seconds a signed callback's RequestTime may be from the bridge's clock, either way.",
        values.seconds,
        "SECONDS",
        SERVING,
    ),
    Option(
        "sdk_app_id",
        "Accept callbacks of these SDKAppIDs only; others get 403. Repeatable, or comma-separated.",
        values.sdk_app_ids,
        "ID[,...]",
        SERVING,
        "(any)",
        repeatable=True,
    ),
    Option(
        "max_url_bytes",
        "Longest request line (method, path and query); longer gets 400 and the connection is closed.",
        values.int_between(256, 1 << 20),
        "BYTES",
        SERVING,
    ),
    Option(
        "max_header_bytes",
        "Longest header line; longer gets 400 and the connection is closed.",
        values.int_between(256, 1 << 20),
        "BYTES",
        SERVING,
    ),
    Option(
        "max_headers",
        "Most header lines in a request; more get 400 and the connection is closed.",
        values.int_between(8, 10_000),
        "N",
        SERVING,
    ),
    Option(
        "idle_timeout",
        "Seconds a connection may stay idle between requests, or take to send a request's headers, "
        "before the bridge closes it.",
        values.seconds,
        "SECONDS",
        SERVING,
    ),
    Option(
        "max_connections",
        "Most client connections open at once; one more is answered 503 and closed (keep it below the "
        "file descriptor limit).",
        values.int_between(1, 1_000_000),
        "N",
        SERVING,
    ),
    Option(
        "compression",
        "Producer compression: " + ", ".join(COMPRESSION_TYPES) + ".",
        values.one_of(COMPRESSION_TYPES),
        "CODEC",
        SERVING,
    ),
    Option(
        "linger_ms",
        "Milliseconds the producer waits to fill a batch.",
        values.int_between(0, 1000),
        "MS",
        SERVING,
    ),
    Option(
        "idempotence",
        "aiokafka's idempotent producer: a retried write lands once, and a record answered 503 is retried "
        "until it lands, holding its in-flight slot while the brokers refuse it.",
        values.boolean,
        commands=SERVING,
    ),
    Option("client_id", "Kafka client id.", values.text, "ID"),
    Option(
        "security_protocol",
        "How to connect to Kafka: " + ", ".join(SECURITY_PROTOCOLS) + ".",
        values.upper_one_of(SECURITY_PROTOCOLS),
        "PROTOCOL",
        KAFKA_CLIENTS,
    ),
    Option(
        "ssl_cafile",
        "PEM file of the CAs that sign the brokers' certificates (SSL, SASL_SSL); default: the system's.",
        values.existing_file,
        "FILE",
        KAFKA_CLIENTS,
        "(none)",
    ),
    Option(
        "ssl_certfile",
        "PEM client certificate, for brokers that require one (mutual TLS).",
        values.existing_file,
        "FILE",
        KAFKA_CLIENTS,
        "(none)",
    ),
    Option(
        "ssl_keyfile",
        "PEM private key of the client certificate, if not in the certificate file.",
        values.existing_file,
        "FILE",
        KAFKA_CLIENTS,
        "(none)",
    ),
    Option(
        "sasl_mechanism",
        "SASL mechanism (SASL_PLAINTEXT, SASL_SSL): " + ", ".join(SASL_MECHANISMS) + ".",
        values.upper_one_of(SASL_MECHANISMS),
        "MECHANISM",
        KAFKA_CLIENTS,
        "(none)",
    ),
    Option("sasl_username", "SASL user name.", values.text, "USER", KAFKA_CLIENTS, "(none)"),
    Option(
        "sasl_password", "SASL password.", values.password, "PASSWORD", KAFKA_CLIENTS, "(none)", hidden=True
    ),
    Option(
        "sasl_password_file",
        "File holding the SASL password (a container secret); one final line break is ignored.",
        values.password_file,
        "FILE",
        KAFKA_CLIENTS,
        "(none)",
    ),
    Option("log_level", "Log level: " + ", ".join(LOG_LEVELS) + ".", values.one_of(LOG_LEVELS), "LEVEL"),
    Option(
        "log_format",
        "Log format: json, text, or auto (JSON unless stderr is a terminal).",
        values.one_of(LOG_FORMATS),
        "FORMAT",
    ),
    *READER_OPTIONS,
    *BENCH_OPTIONS,
)

# Defaults that differ for `bridge dev`: loopback only, topics created on a single in-memory broker, and
# unsigned callbacks accepted, so the quick start's curl works as it is.
DEV_DEFAULTS: Mapping[str, Any] = {
    "host": "127.0.0.1",
    "create_topics": True,
    "replication_factor": 1,
    "allow_unsigned": True,
}


def default(option: Option, command: str) -> Any:
    if command == "dev" and option.field in DEV_DEFAULTS:
        return DEV_DEFAULTS[option.field]
    return next(f.default for f in dataclasses.fields(Settings) if f.name == option.field)


def describe_default(value: Any, unset: str = "auto") -> str:
    match value:
        case None:
            return unset
        case bool():
            return "true" if value else "false"
        case tuple():
            return ",".join(value) or "(none)"
    return str(value)


def parse_value(option: Option, text: str, source: str) -> Any:
    try:
        return option.parse(text)
    except ValueError as exc:
        shown = HIDDEN if option.hidden else repr(text)
        raise SettingsError(f"{source}={shown}: {exc}") from None


def require_authentication(command: str, settings: Settings) -> None:
    """`serve` does not start open to anyone by accident: a token, or `--allow-unsigned` said out loud."""
    if command == "serve" and not settings.callback_tokens and not settings.allow_unsigned:
        raise SettingsError(
            "no callback token: set --callback-token (BRIDGE_CALLBACK_TOKEN) or --callback-token-file to "
            "the webhook authentication token of the Tencent Cloud Chat console, or pass --allow-unsigned "
            "(BRIDGE_ALLOW_UNSIGNED=true) to accept callbacks anyone can forge"
        )


def build(command: str, flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Settings for `command`: each from its flag (None where not given), else its variable, else default."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if command not in option.commands:
            continue
        if flags.get(option.field) is not None:
            values[option.field] = flags[option.field]
        elif environ.get(option.env, "").strip():  # an empty variable counts as unset, as in compose files
            values[option.field] = parse_value(option, environ[option.env], option.env)
        else:
            values[option.field] = default(option, command)
    return Settings(**values)
