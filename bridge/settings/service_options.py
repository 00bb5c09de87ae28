"""The options of the service: `serve`, `dev` and `topics ensure`, and the Kafka connection and logging
options every command takes, each table one group of `--help`."""

from __future__ import annotations

from bridge.settings import values
from bridge.settings.option import (
    COMPRESSION_TYPES,
    LOG_FORMATS,
    LOG_LEVELS,
    RECORD_FORMATS,
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
    Option,
)

_TOPIC_HELP = "Topic for {what} callbacks."


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
        "File holding the SASL password (a container secret); one final line break is ignored; serve "
        "reads it again on SIGHUP.",
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
    Option(
        "rejected_topic",
        "Dead-letter topic: authentic callbacks that fail validation (not JSON, a field of the wrong type "
        "or missing, a command mismatch) are kept there raw, keyed by SdkAppid, before their 400.",
        values.topic,
        "NAME",
    ),
    Option(
        "dead_letter",
        "Keep callbacks that fail validation in --rejected-topic; --no-dead-letter answers them 400 and "
        "keeps nothing (and the topic is neither needed nor created).",
        values.boolean,
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
    Option(
        "path",
        "URL path Tencent posts callbacks to, as in the console's URL: percent-escapes (/tencent%2Fim, "
        "/a%20b) and non-ASCII allowed; %2F is not /. No space, ?, #, control character or . or .. "
        "segment.",
        values.path,
        "PATH",
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
ADMIN: tuple[Option, ...] = (
    Option(
        "admin_port",
        "TCP port of a second listener for /healthz, /readyz, /metrics and /stats (0 picks a free port); "
        "the callback port then serves only the callback path and /healthz. Unset: all on --port.",
        values.int_between(0, 65535),
        "PORT",
        unset="(none)",
    ),
    Option(
        "admin_host",
        "Address the admin listener binds to; unset, the same as --host (never wider than the callbacks').",
        values.text,
        "ADDRESS",
        unset="as --host",
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
        "File holding more tokens, one a line, each TOKEN or APPID=TOKEN (a container secret); serve "
        "reads it again on SIGHUP.",
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
    Option(
        "reload_interval",
        "Seconds between looks at the files of secrets (callback tokens, forward URL, SASL password): one "
        "whose content changed is read again, as on SIGHUP. 0: on SIGHUP only (Kubernetes sends none, and "
        "swaps a mounted secret's files: 30 there).",
        values.seconds_or_zero,
        "SECONDS",
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
        "before_callback_timeout",
        "Deadline, in seconds, of a before-callback (*.CallbackBefore*, Sns.CallbackPrev*), instead of "
        "--delivery-timeout: Tencent holds the user's action until it is answered (2 s at most), and lets "
        "it proceed on the 503 answered past this deadline.",
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
    Option(
        "record_format",
        "How a callback is written: envelope (a JSON envelope around the body) or cloudevents (the "
        "CloudEvents Kafka binding, binary mode: the body byte for byte as the value, the metadata in ce_* "
        "headers). Same key, partition and timestamp either way; consume and replay read both.",
        values.one_of(RECORD_FORMATS),
        "FORMAT",
    ),
)
FORWARD: tuple[Option, ...] = (
    Option(
        "forward_url",
        "Forward mode: POST each accepted callback, its query (Sign included) and body byte for byte, to "
        "this URL of the app's own callback server too; a before-callback is answered with that server's "
        "answer once the Kafka write is confirmed.",
        values.forward_url,
        "URL",
        unset="(none)",
    ),
    Option(
        "forward_url_file",
        "File holding the forward URL on one line, for a URL with credentials (a container secret); serve "
        "reads it again on SIGHUP. Instead of --forward-url.",
        values.forward_url_file,
        "FILE",
        unset="(none)",
    ),
    Option(
        "forward_timeout",
        "Longest wait, in seconds, for the app server's answer (within the callback's own deadline).",
        values.seconds,
        "SECONDS",
    ),
    Option(
        "forward_max_connections",
        "Connections to the app server, and forwards under way, at most; a forward past it fails at once.",
        values.int_between(1, 100000),
        "N",
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

# Options with the same field but another meaning, or another help, in some commands.
SERVE_BOOTSTRAP = Option(
    "bootstrap_servers", "Kafka brokers to connect to (required).", values.servers, "HOST:PORT[,...]"
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
