"""Kafka's default partitioner, applied to the owning entity rather than the record key.

`partition_for(entity, n)` is `toPositive(murmur2(utf8(entity))) % n`, the formula of the Java client's
`BuiltInPartitioner.partitionForKey` (and librdkafka's `murmur2_random`), so a Java, Go or librdkafka
consumer can compute an account's partition itself. The record key stays `MsgKey`, for deduplication.
"""

from __future__ import annotations

from functools import lru_cache

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """MurmurHash2 as Kafka's `Utils.murmur2` computes it, as a signed 32-bit integer."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    whole = length - length % 4
    for offset in range(0, whole, 4):
        k = int.from_bytes(data[offset : offset + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length % 4
    if tail == 3:
        h ^= data[whole + 2] << 16
    if tail >= 2:
        h ^= data[whole + 1] << 8
    if tail >= 1:
        h ^= data[whole]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


@lru_cache(maxsize=65536)
def partition_for(entity: str, partitions: int) -> int:
    """The partition of `entity` in a topic of `partitions` partitions."""
    return (murmur2(entity.encode("utf-8")) & 0x7FFFFFFF) % partitions
