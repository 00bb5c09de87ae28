"""Metadata of the bridge's own topics, asked for by name without letting a broker create them.

A Metadata request naming a topic lets a broker with `auto.create.topics.enable=true` create it: a topic an
operator deleted would silently come back. aiokafka names topics with creation allowed, so the bridge asked
for every topic on the cluster instead, each second: on a cluster shared with other teams' thousands of
topics, half a second of the event loop each time. From Metadata v4 a request can name topics and forbid
their creation (`allow_auto_topic_creation=false`); `metadata_request` does so wherever the broker speaks
v4, and asks for every topic, as before, where it does not.

`read_metadata` is one such read into a new `ClusterMetadata` (the probe's, the start-up wait's);
`refresh_by_name` makes an aiokafka client's own refreshes (its periodic one, those it forces after an
error, `force_metadata_update`) read only the given topics the same way.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Mapping
from typing import Any

from aiokafka.client import ConnectionGroup
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest

log = logging.getLogger("bridge.publisher")  # see `bridge.logs.LOGGERS`

NAMED_WITHOUT_CREATION_FROM = 4
"""The first Metadata version whose request says whether the broker may create the topics it names."""
_BOOTSTRAP = ("bootstrap", ConnectionGroup.DEFAULT)
"""aiokafka's key for the bootstrap connection it keeps while the cluster lists no broker."""


def metadata_request(versions: Mapping[int, tuple[int, int]], topics: Collection[str]) -> Any:
    """The Metadata request for `topics` on a connection that negotiated `versions` (API key to its lowest
    and highest version): by name with creation forbidden where the broker speaks v4 or later; else for
    every topic, since naming one could create it. No topics: every topic."""
    span = versions.get(MetadataRequest.API_KEY)
    if topics and span is not None and span[1] >= NAMED_WITHOUT_CREATION_FROM:
        # aiokafka sends the highest version both sides speak: v4 or later here, which carries the flag.
        return MetadataRequest(sorted(topics), allow_auto_topic_creation=False)
    return MetadataRequest(None)


async def update_metadata(client: Any, cluster: ClusterMetadata, topics: Collection[str]) -> bool:
    """Read `topics`' metadata (`metadata_request`) from one of `client`'s brokers into `cluster`; whether it
    was read.

    As aiokafka's `AIOKafkaClient._metadata_update` does, with the bridge's request: the brokers in random
    order, the first answer with brokers taken, the bootstrap connection closed once the cluster lists one.
    """
    node_ids: list[Any] = [broker.nodeId for broker in client.cluster.brokers()]
    if _BOOTSTRAP in client._conns:
        node_ids.append("bootstrap")
    random.shuffle(node_ids)
    for node_id in node_ids:
        conn = await client._get_conn(node_id)
        if conn is None:
            continue
        request = metadata_request(getattr(conn, "_versions", {}), topics)
        try:
            response = await conn.send(request)
        except (TimeoutError, KafkaError) as exc:
            log.debug("cannot read metadata from node %s: %r", node_id, exc)
            continue
        if not response.brokers:
            # Answered without brokers: a cluster still forming. Not an update, as in aiokafka.
            return False
        cluster.update_metadata(response)
        if _BOOTSTRAP in client._conns and client.cluster.brokers():
            client._conns.pop(_BOOTSTRAP).close()
        return True
    cluster.failed_update(None)
    return False


async def read_metadata(client: Any, topics: Collection[str]) -> ClusterMetadata:
    """`topics`' metadata, read from one of `client`'s brokers into a new `ClusterMetadata`; a topic that
    does not exist is absent from it. Raises `KafkaError` when no broker answered."""
    cluster = ClusterMetadata(metadata_max_age_ms=client._metadata_max_age_ms)
    # A missing topic is the bridge's to report (`readiness`), not for aiokafka to log at each read.
    cluster.need_all_topic_metadata = True
    if not await update_metadata(client, cluster, topics):
        raise KafkaError("Unable to get cluster metadata over all known brokers")
    return cluster


def refresh_by_name(client: Any, topics: Collection[str]) -> None:
    """Make `client`'s own metadata refreshes read `topics` only, by name with creation forbidden
    (`metadata_request`), and topics it was told of since (aiokafka's `add_topic`) the same way.

    aiokafka refreshes its cluster metadata every `metadata_max_age_ms`, after a connection is lost, after a
    NOT_LEADER answer, and when asked (`force_metadata_update`); each reads every topic while the client
    tracks none, and names its topics with creation allowed once it tracks some. This replaces the one
    method every such refresh goes through (`_metadata_update`, called by its synchronizer task), on this
    client only; its `fetch_all_metadata` then reads `topics` too.
    """
    bridge_topics = frozenset(topics)

    async def refresh(cluster: ClusterMetadata, tracked: Collection[str] | None) -> bool:
        return await update_metadata(client, cluster, set(tracked or ()) | bridge_topics)

    client._metadata_update = refresh
