"""Which shard holds a subscription: a stable hash of its name, the same in every replica
and every version, so that a replica holding shard n holds the same subscriptions as the
one before it."""

from __future__ import annotations

import zlib


def shard_of(name: str, count: int) -> int:
    """The shard (0 to `count` - 1) of the subscription `name`."""
    return zlib.crc32(name.encode()) % count
