"""What the metadata says of readiness: every topic as at start, and enough replicas in sync.

The publisher is ready only while each of its topics is present with the partition count it had when the
bridge first became ready (`partition_for` maps entities with that count), and while every partition has at
least its topic's `min.insync.replicas` in sync (fewer, and its leader refuses acks=all writes). Both are
judged from the metadata of the bridge's topics (asked for by name, their creation forbidden:
`bridge.kafka.metadata`), read by the producer's probe each second and whenever the producer's own metadata
changes; what changed is logged once, not at every read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

from aiokafka.cluster import ClusterMetadata

from bridge.kafka.batching import Partition
from bridge.settings import ServeSettings

log = logging.getLogger("bridge.publisher")  # see `bridge.logs.LOGGERS`

# Partitions named in `/readyz` when too few replicas are in sync; the rest are counted.
_NAMED_PARTITIONS = 3


class TopicsAtStart:
    """The topics gone or changed since start, and what is wrong with each: their callbacks get 503."""

    def __init__(self, settings: ServeSettings) -> None:
        self._settings = settings
        self.problems: dict[str, str] = {}

    def check(self, cluster: ClusterMetadata, at_start: Mapping[str, int]) -> None:
        """Compare the topics in `cluster`, metadata of the bridge's topics (a deleted one absent), with
        `at_start` (each one's partition count when the bridge first became ready); log what changed."""
        problems = {}
        for topic in self._settings.topics:
            partitions = cluster.partitions_for_topic(topic)
            count = at_start.get(topic)
            if not partitions:
                problems[topic] = f"topic {topic} is missing"
            elif count is not None and len(partitions) != count:
                problems[topic] = (
                    f"topic {topic} has {len(partitions)} partitions, not the {count} it had at start"
                )
        if problems == self.problems:
            return
        for topic, problem in problems.items():
            if self.problems.get(topic) == problem:
                continue
            if topic not in cluster.topics():
                hint = (
                    "its callbacks get 503 until it is back. The bridge does not re-create a topic while it "
                    "runs, and the broker must not either (auto.create.topics.enable=false): create it again "
                    f"with {at_start.get(topic, self._settings.partitions)} partitions, e.g. "
                    "with `bridge topics ensure`"
                )
            else:
                hint = (
                    "a changed count maps accounts to other partitions, so its callbacks get 503 until the "
                    "bridge is restarted to take the new count"
                )
            log.error("not ready: %s; %s", problem, hint)
        for topic in self.problems.keys() - problems.keys():
            log.info("topic %s is back as at start, with %d partitions", topic, at_start[topic])
        self.problems = problems


class InSyncReplicas:
    """The partitions whose in-sync replicas, in the last metadata read, are fewer than their topic's
    minimum."""

    def __init__(self, topics: Collection[str], on_counts: Callable[[Mapping[str, int]], None]) -> None:
        """`on_counts` is told, at each check, each topic's count of partitions below its minimum."""
        self._topics = topics
        self._on_counts = on_counts
        self.below: dict[Partition, str] = {}
        """Partitions with fewer replicas in sync than their topic's minimum, and what is wrong, in words."""
        self._unreadable = False
        """Whether aiokafka's metadata was found without the partitions' in-sync replicas (said once)."""

    def check(self, cluster: ClusterMetadata, minimums: Mapping[str, int]) -> None:
        """Find the partitions whose in-sync replicas in `cluster` are fewer than their topic's minimum
        (`minimums`, each topic's `min.insync.replicas` where the broker told it)."""
        # aiokafka keeps each partition's ISR from the metadata only in this private map.
        partitions_of = getattr(cluster, "_partitions", None)
        if partitions_of is None:
            if not self._unreadable:
                self._unreadable = True
                log.warning(
                    "cannot read the partitions' in-sync replicas from aiokafka's metadata (its internals "
                    "changed): readiness does not know of partitions with too few replicas in sync"
                )
            return
        below: dict[Partition, str] = {}
        for topic in self._topics:
            minimum = minimums.get(topic)
            if minimum is None:
                continue
            for number, metadata in sorted(partitions_of.get(topic, {}).items()):
                in_sync = sorted(getattr(metadata, "isr", ()) or ())
                if len(in_sync) < minimum:
                    below[topic, number] = (
                        f"topic {topic} partition {number} has {len(in_sync)} in-sync replicas "
                        f"({', '.join(map(str, in_sync)) or 'none'}), fewer than its min.insync.replicas "
                        f"{minimum}: its leader refuses acks=all writes (NOT_ENOUGH_REPLICAS)"
                    )
        if below.keys() != self.below.keys():
            if below:
                log.warning(
                    "not ready: %d partitions have too few replicas in sync; %s",
                    len(below),
                    next(iter(below.values())),
                )
            else:
                log.info("every partition has enough replicas in sync again")
        self.below = below
        if minimums:
            counts = dict.fromkeys(minimums, 0)
            for topic, _ in below:
                counts[topic] += 1
            self._on_counts(counts)


def isr_problems(below: Mapping[Partition, str], refusals: Mapping[Partition, str]) -> list[str]:
    """The partitions with too few replicas in sync: the first few named, those the broker refused a
    write of first, with its refusal."""
    named = sorted(below.items(), key=lambda item: (item[0] not in refusals, item[0]))
    problems = []
    for partition, problem in named[:_NAMED_PARTITIONS]:
        refusal = refusals.get(partition)
        refused = "" if refusal is None else f"; the broker refused its last write: {refusal}"
        problems.append(problem + refused)
    if len(below) > _NAMED_PARTITIONS:
        problems.append(f"and {len(below) - _NAMED_PARTITIONS} more partitions so")
    return problems
