"""Settings for a bridge under test: topics of its own on the broker, or no broker at all; and settings of
the readers of its topics."""

from __future__ import annotations

import uuid
from dataclasses import fields, replace
from typing import Any, TypeVar

from bridge.settings import KafkaConnection, ReaderSettings, ServeSettings, TopicsSettings

Reader = TypeVar("Reader", bound=ReaderSettings)

NO_BROKER = "127.0.0.1:9"
"""A bootstrap address for unit tests, which never connect: the discard port, where no broker listens."""


def unique_settings(bootstrap_servers: str, **overrides: Any) -> ServeSettings:
    """Settings whose topics (the six and the dead-letter one) are new to the broker, so each test reads only
    its own records."""
    run = uuid.uuid4().hex[:10]
    base = ServeSettings(
        bootstrap_servers=tuple(bootstrap_servers.split(",")),
        host="127.0.0.1",
        port=0,
        topic=f"t{run}.official-account",
        c2c_topic=f"t{run}.c2c",
        group_topic=f"t{run}.group",
        user_topic=f"t{run}.user",
        app_topic=f"t{run}.app",
        unknown_topic=f"t{run}.unknown",
        rejected_topic=f"t{run}.rejected",
        create_topics=True,
        partitions=12,
    )
    return replace(base, **overrides)


def reading(kind: type[Reader], bridge: TopicsSettings, **changes: Any) -> Reader:
    """Settings of `kind` (consume's or replay's) that read the official-account topic of `bridge` over its
    Kafka connection (brokers, TLS, SASL; not its client id), with `changes`."""
    connection = {part.name: getattr(bridge, part.name) for part in fields(KafkaConnection)}
    del connection["client_id"]
    return kind(**{**connection, "topic": bridge.topic, **changes})
