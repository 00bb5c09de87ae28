"""The bridge's topics on the cluster: which exist, and creating the missing ones when asked to."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from bridge.settings import Settings

log = logging.getLogger(__name__)

# Room for the envelope's query and fields, and the record's headers.
ENVELOPE_HEADROOM_BYTES = 64 * 1024


def max_record_bytes(settings: Settings) -> int:
    """The largest record the bridge can write: the body, a key taken from the body, and the rest."""
    return 2 * settings.max_body_bytes + ENVELOPE_HEADROOM_BYTES


def how_to_create(settings: Settings, topics: Iterable[str]) -> str:
    """A hint a user can act on when topics are missing."""
    names = " ".join(topics)
    return (
        f"create them (kafka-topics.sh --create --topic NAME --partitions {settings.partitions} ...) for: "
        f"{names}; or restart the bridge with --create-topics (BRIDGE_CREATE_TOPICS=true)"
    )


async def create_topics(settings: Settings, topics: list[str], broker_count: int) -> None:
    """Create `topics` with the configured partitions and replication factor; existing ones are left alone."""
    replication = settings.replication_factor or min(3, max(broker_count, 1))
    admin = AIOKafkaAdminClient(
        bootstrap_servers=list(settings.bootstrap_servers),
        client_id=settings.client_id,
    )
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(
                    name,
                    settings.partitions,
                    replication,
                    topic_configs={"max.message.bytes": str(max_record_bytes(settings))},
                )
                for name in topics
            ]
        )
    finally:
        await admin.close()
    for name, code, message in (error[:3] for error in response.topic_errors):
        if code == 0:
            log.info(
                "created topic %s with %d partitions, replication factor %d",
                name,
                settings.partitions,
                replication,
            )
        elif code != TopicAlreadyExistsError.errno:
            raise for_code(code)(f"cannot create topic {name}: {message}")
