"""Kafka's default partitioner, applied to the owning entity rather than the record key.

`partition_for(entity, n)` is `toPositive(murmur2(utf8(entity))) % n`, the formula of the Java client's
`BuiltInPartitioner.partitionForKey` (and librdkafka's `murmur2_random`), so a Java, Go or librdkafka
consumer can compute an account's partition itself. The record key stays `MsgKey`, for deduplication.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

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


class PartitionCache:
    """The partitions of recently seen entities, bounded by entries and by bytes.

    murmur2 runs in pure Python on the event loop (about 3 us for a 20-byte account), so the partition of
    an entity seen before is looked up. The bytes of an entry are its entity string's size plus
    `ENTRY_OVERHEAD` (the key tuple, the ordered dict's node and its share of the hash table: 120 to 171
    bytes measured with tracemalloc, depending on how full the table is), so entities
    long or many cannot grow the cache past `max_bytes`. The oldest entry goes first, so a hit costs one
    look-up and nothing else.
    """

    ENTRY_OVERHEAD = 180

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._partitions: OrderedDict[tuple[str, int], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._partitions)

    def partition_for(self, entity: str, partitions: int) -> int:
        """The partition of `entity` in a topic of `partitions` partitions."""
        key = (entity, partitions)
        partition = self._partitions.get(key)
        if partition is None:
            partition = (murmur2(entity.encode("utf-8")) & 0x7FFFFFFF) % partitions
            self._partitions[key] = partition
            self.bytes += sys.getsizeof(entity) + self.ENTRY_OVERHEAD
            while self._partitions and (
                len(self._partitions) > self.max_entries or self.bytes > self.max_bytes
            ):
                (oldest, _), _ = self._partitions.popitem(last=False)
                self.bytes -= sys.getsizeof(oldest) + self.ENTRY_OVERHEAD
        return partition


# One per process, like the lru_cache it replaces: at most 65,536 entities and 16 MiB (65,536 accounts of
# 20 bytes count 16 MB).
_CACHE = PartitionCache(max_entries=65_536, max_bytes=16 << 20)


partition_for = _CACHE.partition_for
"""`partition_for(entity, partitions)`: the partition of `entity` in a topic of `partitions` partitions (the
cache's method itself: one call fewer per callback than a function calling it)."""
