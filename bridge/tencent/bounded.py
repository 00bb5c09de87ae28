"""The one rule of the small caches on the request path: bounded, emptied rather than grown.

Their keys come from callers (any dotted name is a command, any number an app id, every query string is new),
so a cache that only grew would be a client's way to exhaust memory; one that evicted in order would cost
the hit path a bookkeeping step. Emptied once full, each is refilled by the next few callbacks.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def keep(cache: dict[K, V], key: K, value: V, limit: int) -> V:
    """`value` kept in `cache` under `key`, the cache emptied first when it holds `limit` entries; returns
    `value`, for `cache.get(key) or keep(cache, key, made, limit)`."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value
