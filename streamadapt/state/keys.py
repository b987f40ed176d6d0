"""The Redis key layout: which keys share a hash tag, so that every transaction and script touches one slot.

Redis Cluster runs a transaction or a script only when all its keys hash to one slot, and the hash of a key
whose name holds `{...}` is that of the text between the braces (its hash tag). So the keys are grouped:

  {p}:{<shard>}:...   a user's keys: their profile, the claims of their events, the deadlines of their pending
                      predictions and the examples their labels made. A batch writes one atomic script per
                      shard it touches, so all it changes for one user lands together or not at all.
  {p}:{meta}:...      the fleet's event-time clock, the drift alarm and the layout itself
  {p}:{registry}:...  model versions, their artifacts, the champion and the trainer lease (the promote
                      script reads the lease and writes the champion)

A single Redis keeps one shard, so that a batch is one MULTI/EXEC, as cheap as it gets. A cluster keeps
`--redis-cluster-shards` of them; the shard tags are picked so that their slots spread evenly over the
16384, and so over the masters of any even split of the slots. The shard count is part of the data: the
worker records it in Redis and refuses to start with another.
"""
from __future__ import annotations

from functools import cache
from zlib import crc32

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

META_TAG = "{meta}"
REGISTRY_TAG = "{registry}"


@cache
def shard_tags(shards: int) -> tuple[str, ...]:
    """`shards` hash tags whose slots fall one in each of `shards` equal ranges of the slot space."""
    tags = []
    for shard in range(shards):
        low, high = shard * REDIS_CLUSTER_HASH_SLOTS // shards, (shard + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
        attempt = 0
        while not low <= key_slot(f"{shard}-{attempt}".encode()) < high:
            attempt += 1
        tags.append(f"{{{shard}-{attempt}}}")
    return tuple(tags)


class KeyLayout:
    def __init__(self, prefix: str, shards: int = 1):
        self.prefix = prefix
        self.shards = shards
        self._bases = [f"{prefix}:{tag}" for tag in shard_tags(shards)]
        self._meta = f"{prefix}:{META_TAG}"

    def shard_of(self, user_id: str) -> int:
        return 0 if self.shards == 1 else crc32(user_id.encode()) % self.shards

    def shard_key(self, shard: int, name: str) -> str:
        """A key of one shard: deadlines:{topic}/{partition}, window:{start}, windows, examples_total."""
        return f"{self._bases[shard]}:{name}"

    def claim(self, user_id: str, event_id: str) -> str:
        """A claim lives with its event's user, so that it lands in the same script as their profile."""
        return f"{self._bases[self.shard_of(user_id)]}:event:{event_id}"

    def profile(self, user_id: str) -> str:
        return f"{self._bases[self.shard_of(user_id)]}:profile:{user_id}"

    def meta(self, name: str) -> str:
        """event_time, event_time_at, observed_since, drift, regime_since_ts, layout."""
        return f"{self._meta}:{name}"

    def describe(self) -> str:
        """What the layout check stores, and compares at every start."""
        return f"shards={self.shards}"


def registry_base(prefix: str) -> str:
    return f"{prefix}:{REGISTRY_TAG}"
