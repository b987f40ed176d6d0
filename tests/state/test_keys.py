"""The key layout: every key a batch writes for one user, in one slot."""
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from streamadapt.state.keys import KeyLayout, registry_base, shard_tags


def test_shard_tags_fall_one_in_each_equal_range_of_the_slots():
    for shards in (1, 3, 16, 100):
        slots = [key_slot(tag.strip("{}").encode()) for tag in shard_tags(shards)]
        assert [slot * shards // REDIS_CLUSTER_HASH_SLOTS for slot in slots] == list(range(shards))


def test_a_users_keys_share_one_slot_and_users_spread_over_the_shards():
    keys = KeyLayout("sa", shards=16)
    for user in (f"user-{i}" for i in range(100)):
        shard = keys.shard_of(user)
        slots = {key_slot(k.encode()) for k in (keys.profile(user), keys.claim(user, "e-1"),
                                                 keys.shard_key(shard, "deadlines:in/0"), keys.shard_key(shard, "windows"),
                                                 keys.shard_key(shard, "window:86400"))}
        assert len(slots) == 1
    assert len({keys.shard_of(f"user-{i}") for i in range(1000)}) == 16
    assert len({key_slot(keys.meta(name).encode()) for name in ("event_time", "event_time_at", "drift", "layout")}) == 1
    assert key_slot(f"{registry_base('sa')}:trainer:lease".encode()) == key_slot(f"{registry_base('sa')}:models:m:champion".encode())


def test_a_single_redis_keeps_one_shard():
    keys = KeyLayout("sa")
    assert {keys.shard_of(f"user-{i}") for i in range(100)} == {0}
