"""The settings of each command, composed from shared parts, built once at start and passed down.

A part is a frozen dataclass of the settings one area needs: the Kafka connection, the topic layout, the
HTTP limits, authentication, delivery, logging. A command's settings class inherits the parts it uses, so
`settings.bootstrap_servers` and `settings.topic_for(...)` read the same whichever command built them.
Which flag and variable sets each field is declared once, in `bridge.settings.options`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from bridge.secret import Secret, TokenFile, UrlFile
from bridge.tencent.commands import TopicGroup


class SettingsError(ValueError):
    """A setting has a value the bridge cannot use; the message says which and how to fix it."""


_TLS = frozenset({"SSL", "SASL_SSL"})
_SASL = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})
CLIENT_ID = "tencent-chat-kafka-bridge"
# Room for the envelope's query and fields, and the record's headers.
ENVELOPE_HEADROOM_BYTES = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class KafkaConnection:
    """Where the Kafka cluster is and how to connect to it: brokers, client id, TLS and SASL."""

    bootstrap_servers: tuple[str, ...] = ()
    client_id: str = CLIENT_ID
    security_protocol: str = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    sasl_password_file: Secret | None = None
    """The password read from `--sasl-password-file` (a `SecretFile`: with its path, read again on SIGHUP)."""

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient: the security
        protocol, an SSL context, the SASL credentials.

        Raises `SettingsError` for settings that do not fit together or files that cannot be loaded.
        """
        protocol = self.security_protocol
        options: dict[str, Any] = {"security_protocol": protocol}
        tls_files = {
            "--ssl-cafile": self.ssl_cafile,
            "--ssl-certfile": self.ssl_certfile,
            "--ssl-keyfile": self.ssl_keyfile,
        }
        if protocol in _TLS:
            options["ssl_context"] = self._ssl_context()
        elif given := [flag for flag, value in tls_files.items() if value is not None]:
            raise SettingsError(
                f"{', '.join(given)} given, but --security-protocol is {protocol}: use SSL or SASL_SSL"
            )
        password = self._password()
        sasl = {
            "--sasl-mechanism": self.sasl_mechanism,
            "--sasl-username": self.sasl_username,
            "--sasl-password": password,
        }
        if protocol in _SASL:
            missing = [flag for flag, value in sasl.items() if value is None]
            if missing or password is None:
                raise SettingsError(f"--security-protocol {protocol} needs {', '.join(missing)}")
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=password.reveal(),
            )
        elif given := [flag for flag, value in sasl.items() if value is not None]:
            raise SettingsError(
                f"{', '.join(given)} given, but --security-protocol is {protocol}: use SASL_PLAINTEXT or "
                "SASL_SSL"
            )
        return options

    def _password(self) -> Secret | None:
        if self.sasl_password is not None and self.sasl_password_file is not None:
            raise SettingsError("give --sasl-password or --sasl-password-file, not both")
        return self.sasl_password or self.sasl_password_file

    def _ssl_context(self) -> ssl.SSLContext:
        # aiokafka is imported here, not at the top: `bridge --help` and the settings stay fast to load.
        from aiokafka.helpers import create_ssl_context  # noqa: PLC0415

        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise SettingsError("--ssl-keyfile needs --ssl-certfile, the certificate it belongs to")
        try:
            context: ssl.SSLContext = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        except FileNotFoundError as exc:
            raise SettingsError(f"cannot load TLS files: {exc.filename or 'a file'} does not exist") from None
        except (OSError, ssl.SSLError) as exc:
            files = ", ".join(f for f in (self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile) if f)
            raise SettingsError(f"cannot load TLS files ({files}): {exc}") from None
        return context


@dataclass(frozen=True, kw_only=True)
class Logging:
    log_level: str = "info"
    log_format: str = "auto"


@dataclass(frozen=True, kw_only=True)
class TopicLayout:
    """The bridge's topics: their names, one per family of commands, and how the bridge creates them."""

    topic: str = "tim.official-account"
    c2c_topic: str = "tim.c2c"
    group_topic: str = "tim.group"
    user_topic: str = "tim.user"
    app_topic: str = "tim.app"
    unknown_topic: str = "tim.unknown"
    rejected_topic: str = "tim.rejected"
    """The dead-letter topic: authentic callbacks that failed validation, kept raw (`tencent.rejected`)."""
    dead_letter: bool = True
    """Keep those callbacks in `rejected_topic`; off, they are answered 4xx and kept nowhere."""
    partitions: int = 12
    replication_factor: int | None = None
    min_insync_replicas: int | None = None
    retention_hours: int = 14 * 24
    max_body_bytes: int = 1024 * 1024
    """The largest callback body accepted; the topics' `max.message.bytes` is made from it."""

    def topic_for(self, group: TopicGroup) -> str:
        return {
            TopicGroup.OFFICIAL_ACCOUNT: self.topic,
            TopicGroup.C2C: self.c2c_topic,
            TopicGroup.GROUP: self.group_topic,
            TopicGroup.USER: self.user_topic,
            TopicGroup.APP: self.app_topic,
            TopicGroup.UNKNOWN: self.unknown_topic,
        }[group]

    def __post_init__(self) -> None:
        if self.dead_letter and self.rejected_topic in self.callback_topics:
            raise SettingsError(
                f"--rejected-topic {self.rejected_topic} is also a callback topic: the dead-letter topic "
                "must be a topic of its own (or turn it off with --no-dead-letter)"
            )

    @property
    def callback_topics(self) -> tuple[str, ...]:
        """The topics of the callbacks the bridge accepts, each once, in a stable order."""
        return tuple(dict.fromkeys(self.topic_for(group) for group in TopicGroup))

    @property
    def dead_letter_topic(self) -> str | None:
        """Where authentic callbacks that failed validation are kept; None when `--no-dead-letter`."""
        return self.rejected_topic if self.dead_letter else None

    @property
    def topics(self) -> tuple[str, ...]:
        """Every topic the bridge writes to, each once, in a stable order: the callback topics, then the
        dead-letter topic when it is on. Each is created, checked and watched alike."""
        dead_letter = () if self.dead_letter_topic is None else (self.dead_letter_topic,)
        return self.callback_topics + dead_letter

    @property
    def max_record_bytes(self) -> int:
        """The largest record the bridge writes, and so the `max.message.bytes` its topics get: the body,
        which the value embeds byte for byte, and `ENVELOPE_HEADROOM_BYTES` (64 KiB) for the rest.

        The rest is small and bounded: the key is built from fields of at most `MAX_ID_BYTES` (256) and a
        command of at most 128 characters; the envelope's query is at most twice `--max-url-bytes` once
        escaped (4096 by default); the headers and the batch's framing take a few hundred bytes more.
        (Before key fields were bounded a key could be as long as the body, which the limit once paid for
        twice.) A record over the limit anyway, with a `--max-url-bytes` above 31 KiB say, is refused before
        it is sent (see `KafkaPublisher`).
        """
        return self.max_body_bytes + ENVELOPE_HEADROOM_BYTES

    @property
    def max_event_age_ms(self) -> int:
        """An `EventTime` older than this (half the retention) does not become the record's timestamp: every
        callback answered 200 then stays at least half the retention, however old its event."""
        return self.retention_hours * 3_600_000 // 2


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """Where the bridge listens, and what a connection may send and how long it may take."""

    host: str = "0.0.0.0"  # noqa: S104 - a webhook receiver listens on every interface by default
    port: int = 8080
    path: str = "/callback"
    body_timeout: float = 5.0
    max_pending_bodies: int = 256
    max_url_bytes: int = 4096
    max_header_bytes: int = 8190
    max_headers: int = 100
    idle_timeout: float = 75.0
    max_connections: int = 1024
    admin_port: int | None = None
    """With a port, `/readyz`, `/metrics` and `/stats` move to a listener of their own, which has `/healthz`
    too (`bridge.ingest.admin`)."""
    admin_host: str | None = None
    """The admin listener's address; None is `host`'s."""


@dataclass(frozen=True, kw_only=True)
class Authentication:
    """Who may post (issues 4 and 12)."""

    callback_token: tuple[Secret, ...] = ()
    """Bare `Secret`s sign for any app; a `CallbackToken` with an `sdk_app_id` for that app only."""
    callback_token_file: TokenFile | None = None
    """The tokens read from `--callback-token-file`, one a line, and its path (read again on SIGHUP)."""
    allow_unsigned: bool = False
    max_clock_skew: float = 60.0
    sdk_app_id: tuple[str, ...] = ()
    reload_interval: float = 0.0
    """Seconds between looks at the secret files (`bridge.ingest.reload`); 0: they are read on SIGHUP only."""

    @property
    def callback_tokens(self) -> tuple[Secret, ...]:
        """Every token a callback may be signed with, from the flags, the environment and the file."""
        from_file = () if self.callback_token_file is None else self.callback_token_file.tokens
        return self.callback_token + from_file


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """How a callback becomes a record: the producer, the in-flight bound, the dedup window, shutdown."""

    delivery_timeout: float = 5.0
    before_callback_timeout: float = 0.5
    """The deadline of a before-callback (`commands.runs_before`) instead of `delivery_timeout`: Tencent
    holds the user's action until it is answered, 2 s at most."""
    max_in_flight: int = 512
    dedup_window: float = 300.0
    dedup_max_keys: int = 100_000
    dedup_max_bytes: int = 32 << 20
    shutdown_delay: float = 0.0
    shutdown_timeout: float = 10.0
    compression: str = "none"
    linger_ms: int = 0
    idempotence: bool = False
    record_format: str = "envelope"
    """`envelope` or `cloudevents`: what `ParsedCallback.record` writes."""


@dataclass(frozen=True, kw_only=True)
class Forwarding:
    """Forward mode (`bridge.ingest.forward`): each accepted callback also goes to the app's own server."""

    forward_url: str | None = None
    forward_url_file: UrlFile | None = None
    """The forward URL read from `--forward-url-file`, and its path (read again on SIGHUP)."""
    forward_timeout: float = 1.5
    forward_max_connections: int = 100

    @property
    def forward_target(self) -> str | None:
        """The app server's URL, from `--forward-url` or `--forward-url-file`; None: no forward mode."""
        return self.forward_url_file.url if self.forward_url_file is not None else self.forward_url


@dataclass(frozen=True, kw_only=True)
class TopicsSettings(KafkaConnection, TopicLayout, Logging):
    """`bridge topics ensure`: the brokers, the topic names and what a topic should look like."""


@dataclass(frozen=True, kw_only=True)
class ServeSettings(TopicsSettings, HttpLimits, Authentication, Delivery, Forwarding):
    """`bridge serve`, and `bridge dev` with other defaults: all `topics ensure` needs, since serve can
    create the topics too, and the HTTP side."""

    create_topics: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.forward_url is not None and self.forward_url_file is not None:
            raise SettingsError("give --forward-url or --forward-url-file, not both")


@dataclass(frozen=True, kw_only=True)
class ReaderSettings(KafkaConnection, Logging):
    """What `consume` and `replay` share: the topic read and the window of events."""

    topic: str = "tim.official-account"
    since: int | None = None
    until: int | None = None
    command: tuple[str, ...] = ()
    account: str | None = None
    lateness: float = 3600.0


@dataclass(frozen=True, kw_only=True)
class ConsumeSettings(ReaderSettings):
    client_id: str = f"{CLIENT_ID}-consume"
    from_beginning: bool = False
    follow: bool = False
    max: int | None = None
    group: str | None = None
    output: str = "-"
    decisions: str = "skip"
    """Forward mode's decision records: skip (passed over, counted), include (printed too) or only."""


# The `max.message.bytes` of topics `bridge topics ensure` creates with its defaults.
DEFAULT_MAX_RECORD_BYTES = TopicLayout().max_record_bytes


@dataclass(frozen=True, kw_only=True)
class ReplaySettings(ReaderSettings):
    client_id: str = f"{CLIENT_ID}-replay"
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
    compression: str = "none"
    """The compression of the records written to `--to-topic`."""
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    """The largest record written to `--to-topic`; a larger one is refused and set aside."""
    decisions: str = "auto"
    """Forward mode's decision records: auto (copied to --to-topic, not to --to-file), include, skip."""


@dataclass(frozen=True, kw_only=True)
class BenchSettings(Logging):
    bootstrap_servers: tuple[str, ...] = ()
    url: str | None = None
    connections: int = 64
    rate: float | None = None
    duration: float = 5.0
    warmup: float = 1.0
    rounds: int = 2
    accounts: int = 50
    baseline: bool = False
    floor: bool = False
    driver: str = "python"
    format: str = "text"


@dataclass(frozen=True, kw_only=True)
class SchemaSettings(Logging):
    """`bridge schema`: which schema to print, of one command, a family or a topic."""

    format: str = "json-schema"
    command: str | None = None
    family: str | None = None
    topic: str | None = None
    bootstrap_servers: tuple[str, ...] = ("localhost:9092",)
    source: str = "file('events.jsonl', 'JSONAsString')"
