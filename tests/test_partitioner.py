"""The partition of an entity is Kafka's Java default partitioner applied to the entity's UTF-8 bytes."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner

from bridge.tencent.partitioner import murmur2, partition_for

# Kafka's own vectors (clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java, testMurmur2).
JAVA_MURMUR2 = {
    "21": -973932308,
    "foobar": -790332482,
    "a-little-bit-long-string": -985981536,
    "a-little-bit-longer-string": -1486304829,
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    "abc": 479470107,
}


@pytest.mark.parametrize(("text", "expected"), JAVA_MURMUR2.items())
def test_murmur2_matches_kafkas_java_implementation(text: str, expected: int) -> None:
    assert murmur2(text.encode()) == expected


@pytest.mark.parametrize(("text", "expected"), JAVA_MURMUR2.items())
def test_partition_is_to_positive_murmur2_modulo_partitions(text: str, expected: int) -> None:
    """A Java consumer computes `Utils.toPositive(Utils.murmur2(bytes)) % partitions`: the same number."""
    for partitions in (1, 3, 12, 100):
        assert partition_for(text, partitions) == (expected & 0x7FFFFFFF) % partitions


@pytest.mark.parametrize(
    "entity",
    ["@TOA#_2J4SZEAEL", "@TGS#2J4SZEAEL", "jared:Jonh", "testuser316", "公众号_新闻", "1400000000", ""],
)
def test_partition_agrees_with_aiokafkas_key_partitioner(entity: str) -> None:
    """Another implementation of the same formula (aiokafka's, used for keys) puts the entity alike."""
    partitions = list(range(12))
    assert partition_for(entity, 12) == DefaultPartitioner()(entity.encode(), partitions, partitions)


def test_the_partition_of_every_entity_is_the_formulas_cached_or_not() -> None:
    """10,000 entities of every shape the bridge sees (accounts, groups, pairs, apps, non-ASCII), each asked
    twice (the second from the cache) for topics of several sizes: always `toPositive(murmur2) % n`, as
    aiokafka's own key partitioner computes it."""
    partitioner = DefaultPartitioner()
    shapes = ("bench_account_{}", "@TOA#_{}", "@TGS#{}", "user{}:peer{}", "14000{}", "公众号_{}", "{}")
    for n in range(10_000):
        entity = shapes[n % len(shapes)].format(n, n)
        for partitions in (1, 3, 12, 100):
            expected = (murmur2(entity.encode("utf-8")) & 0x7FFFFFFF) % partitions
            assert partition_for(entity, partitions) == expected == partition_for(entity, partitions)
        every = list(range(12))
        assert partition_for(entity, 12) == partitioner(entity.encode(), every, every)
