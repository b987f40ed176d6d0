"""StateStore against the real Redis of the dev stack, single and cluster."""
import time
import uuid

import numpy as np
import pytest
import redis

from streamadapt.core.examples import Example
from streamadapt.core.features import CategoryFeatures, FeatureSpec, UserState
from streamadapt.settings import RedisSettings
from streamadapt.state.store import (
    DUE_LIMIT,
    EventClaim,
    LayoutError,
    StateStore,
    StateWrites,
    drop_keys,
)


@pytest.fixture
def store(each_redis):
    settings = each_redis.redis_settings(f"test-state-{uuid.uuid4().hex[:8]}")
    client = each_redis.redis_client()
    yield StateStore(client, settings, features=CategoryFeatures(FeatureSpec(("books",))))
    drop_keys(client, settings.key_prefix)
    client.close()


def pending(user, ts_s):
    return Example(f"e-{user}", ts_s, "v1", np.zeros(3, np.float32), np.array([0.4, 0.6], np.float32))


def test_due_deadlines_stay_until_the_batch_that_settles_them_is_saved(store):
    store.save(StateWrites(pendings={"a": pending("a", 10.0), "b": pending("b", 20.0), "c": pending("c", 90.0)},
                           deadlines={"in/0": {"a": 15.0, "b": 25.0}, "in/1": {"c": 95.0}}))
    assert store.due_deadlines(["in/0", "in/1"], watermark_s=30.0) == {"in/0": ["a", "b"]}
    # A worker that dies before saving its batch settles nothing: the next owner finds the same users due.
    assert store.due_deadlines(["in/0", "in/1"], watermark_s=30.0) == {"in/0": ["a", "b"]}
    # Settled: a became a negative, b bought again and got a new deadline in the same transaction.
    store.save(StateWrites(cleared_pendings={"a": None}, settled_deadlines={"in/0": ["a", "b"]},
                           pendings={"b": pending("b", 28.0)}, deadlines={"in/0": {"b": 33.0}}))
    assert store.due_deadlines(["in/0", "in/1"], watermark_s=30.0) == {}
    assert store.due_deadlines(["in/0", "in/1"], watermark_s=100.0) == {"in/0": ["b"], "in/1": ["c"]}
    assert set(store.load_profiles(["a", "b", "c"])[1]) == {"b", "c"}


def test_a_batch_that_requeues_nothing_still_saves(store):
    store.save(StateWrites(deadlines={"in/0": {"a": 1.0}}))
    store.save(StateWrites(settled_deadlines={"in/0": ["a"]}, deadlines={"in/0": {}}))
    assert store.due_deadlines(["in/0"], watermark_s=5.0) == {}


def test_only_the_partitions_asked_for_are_read(store):
    store.save(StateWrites(deadlines={"in/0": {"a": 1.0}, "in/1": {"b": 1.0}}))
    assert store.due_deadlines(["in/1"], watermark_s=5.0) == {"in/1": ["b"]}


def test_a_profile_holds_state_and_pending_and_a_cleared_pending_keeps_the_state(store):
    state = UserState(purchases=2, last_ts_s=5.0, categories={"books": [1.98, 1.85, 5.0, 2]}, total_count=1.98)
    store.save(StateWrites(states={"a": state}, pendings={"a": pending("a", 5.0)}))
    states, pendings = store.load_profiles(["a"])
    assert states == {"a": state} and pendings["a"].event_id == "e-a"
    store.save(StateWrites(cleared_pendings={"a": state}))
    assert store.load_profiles(["a"]) == ({"a": state}, {})


def test_states_are_kept_from_the_oldest_event_of_the_first_batch_whatever_later_batches_hold(store):
    assert store.load([("a", "e1")], 1_000.5)[3] == 1_000.5
    assert store.load([("b", "e2")], 500.0)[3] == 1_000.5  # a later batch with older events does not move it
    assert store.load([("c", "e3")], 9_000.0)[3] == 1_000.5
    assert store.load([], 7.0)[3] == 7.0  # a batch without valid events reads nothing


def test_a_profile_that_cannot_be_read_counts_as_a_new_user(store):
    client = store._client
    client.set(store.keys.profile("old"), b'[1, 2.0, "toys", {"toys": 1.0}, 0.0, 0.0]\n')  # another version's state
    client.set(store.keys.profile("torn"), b'[1, 2.0, {}, 1.0, 0.0, 0.0]\nnot an example')
    store.save(StateWrites(states={"fine": UserState(purchases=3)}))
    claims, states, pendings, _ = store.load([("old", "e-1"), ("torn", "e-2"), ("fine", "e-3")], 0.0)
    assert states == {"fine": UserState(purchases=3)} and pendings == {} and claims == {}


def test_a_drift_alarm_is_taken_once_and_its_regime_start_is_kept(store):
    assert store.regime_since_ts() is None and not store.take_drift_alarm()
    store.raise_drift_alarm(1_750_000_000.25)
    assert store.take_drift_alarm() and not store.take_drift_alarm()
    assert store.regime_since_ts() == 1_750_000_000.25  # a trainer that takes over later trains on the same regime


def test_drop_keys_takes_a_glob_of_prefixes_and_counts_what_it_dropped(each_redis):
    client = each_redis.redis_client()
    run = uuid.uuid4().hex[:8]
    for prefix in (f"test-drop-{run}-a", f"test-drop-{run}-b", f"test-keep-{run}"):
        pipe = client.pipeline(transaction=False)
        for i in range(1500):  # over one UNLINK's thousand; on a cluster, over every node
            pipe.set(f"{prefix}:k{i}", i)
        pipe.execute()
    try:
        assert drop_keys(client, f"test-drop-{run}-*") == 3000
        assert not list(client.scan_iter(f"test-drop-{run}-*", count=1000))
        assert len(list(client.scan_iter(f"test-keep-{run}:*", count=1000))) == 1500
    finally:
        drop_keys(client, f"test-keep-{run}")
        drop_keys(client, f"test-drop-{run}-*")


def test_the_trainer_reads_the_newest_examples_up_to_a_time_skipping_newer_windows(store):
    day = 86400.0
    labelled = [Example(f"e{k}", k * day / 4, "v1", np.zeros(3, np.float32), np.array([0.4, 0.6], np.float32), 1,
                        k * day / 4 + 1) for k in range(12)]  # three days, four examples a day
    store.save(StateWrites(examples=[(f"user-{k % 5}", example) for k, example in enumerate(labelled)]))
    assert [e.event_id for e in store.recent_examples(5)] == ["e7", "e8", "e9", "e10", "e11"]
    # up to the middle of the second day: the third day's window is not read, the second's newer half is left out
    assert [e.event_id for e in store.recent_examples(3, until_ts_s=1.5 * day)] == ["e4", "e5", "e6"]
    assert [e.event_id for e in store.recent_examples(100, until_ts_s=1.5 * day)] == [f"e{k}" for k in range(7)]
    assert store.recent_examples(100, until_ts_s=-1.0) == []


def test_the_trainer_finds_the_purchases_whose_horizon_is_still_running(store):
    """Watermark 100, horizon 30: purchases after 70 are unsettled. Those repurchased already are in the windows
    (labelled 1); the others wait in their users' profiles, found through the deadline index."""
    day_70 = 70.0
    repurchased = Example("e-r", 80.0, "v1", np.zeros(3, np.float32), np.array([0.4, 0.6], np.float32), 1, 85.0)
    settled = Example("e-s", 60.0, "v1", np.zeros(3, np.float32), np.array([0.4, 0.6], np.float32), 0, 91.0)
    store.save(StateWrites(examples=[("r", repurchased), ("s", settled)],
                           pendings={"a": pending("a", 75.0), "b": pending("b", 95.0), "old": pending("old", 65.0)},
                           deadlines={"in/0": {"a": 105.0, "old": 95.0}, "in/1": {"b": 125.0}},
                           newest_by_partition={"in/0": 101.0, "in/1": 102.0}))
    found = store.unsettled_examples(since_ts_s=day_70, max_examples=100)
    assert [(e.event_id, e.label) for e in found] == [("e-a", -1), ("e-r", 1), ("e-b", -1)]
    assert [e.event_id for e in store.unsettled_examples(since_ts_s=day_70, max_examples=2)] == ["e-r", "e-b"]


def test_a_state_over_the_plug_ins_byte_bound_is_dropped_and_the_user_counts_as_new(store, caplog):
    big = UserState(purchases=2, last_ts_s=5.0, categories={f"c{i}-" + "x" * 1000: [1.0, 1.0, 5.0, 2] for i in range(24)})
    small = UserState(purchases=1, last_ts_s=5.0, categories={"books": [1.0, 1.0, 5.0, 1]})
    store.save(StateWrites(states={"big": big, "small": small}, pendings={"big": pending("big", 5.0)}))
    states, pendings = store.load_profiles(["big", "small"])
    assert states == {"small": small} and set(pendings) == {"big"}  # the pending prediction is kept
    assert any("over the 16384" in r.getMessage() for r in caplog.records)



_ANSWERS = {b"PING": b"+PONG\r\n", b"HELLO": b"-ERR unknown command 'HELLO'\r\n"}  # an old Redis: RESP2


def test_a_batch_transaction_that_times_out_is_not_sent_again_by_the_redis_client():
    """A MULTI/EXEC retried after a timeout may land twice (its RPUSH and INCRBY are not idempotent): the
    client must leave the retry to the serving loop, which builds the batch again from what Redis holds."""
    import re
    import socket
    import threading

    from streamadapt.state.store import connect

    listener = socket.create_server(("127.0.0.1", 0))
    transactions = []

    def serve() -> None:  # answers +OK to every command until a MULTI, then never again
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                while chunk := connection.recv(65536):
                    if b"MULTI" in chunk:
                        transactions.append(chunk)
                        continue
                    commands = re.findall(rb"(?:^|\n)\*\d+\r\n\$\d+\r\n(\w+)", chunk)
                    connection.sendall(b"".join(_ANSWERS.get(c.upper(), b"+OK\r\n") for c in commands))

    threading.Thread(target=serve, daemon=True).start()
    client = connect(RedisSettings(url=f"redis://127.0.0.1:{listener.getsockname()[1]}/0"))
    client.connection_pool.connection_kwargs["socket_timeout"] = 0.3
    store = StateStore(client, RedisSettings(key_prefix="t"), features=CategoryFeatures(FeatureSpec(("a",))))
    example = Example("e1", 1.0, "v1", np.zeros(3, np.float32), np.zeros(2, np.float32), 0, 1.0)
    with pytest.raises(redis.TimeoutError):
        store.save(StateWrites(examples=[("u1", example)]))
    listener.close()
    assert len(transactions) == 1


def test_the_watermark_leaves_out_a_partition_idle_for_longer_than_the_timeout(store):
    store.save(StateWrites(newest_by_partition={"in/0": 1_000.0, "in/1": 9_000.0}))
    assert store.watermark(allowed_lateness_s=0.0, idle_timeout_s=600.0) == 1_000.0  # both just brought events
    store._client.zadd(store.keys.meta("event_time_at"), {"in/0": time.time() - 3600})  # in/0 idle for an hour
    assert store.watermark(allowed_lateness_s=0.0, idle_timeout_s=600.0) == 9_000.0
    assert store.watermark(0.0, 600.0, unsaved={"in/0": 1_500.0}) == 1_500.0  # a batch from it makes it active again


def test_labels_are_known_up_to_where_every_active_partitions_consumer_settled_its_deadlines(store):
    store.save(StateWrites(newest_by_partition={"in/0": 9_000.0, "in/1": 8_000.0},
                           labels_through={"in/0": 8_000.0, "in/1": 7_000.0}))
    assert store.watermark(0.0, 600.0) == 8_000.0
    assert store.labels_watermark(0.0, 600.0) == 7_000.0  # in/1's consumer has settled up to 7,000 only
    store.save(StateWrites(newest_by_partition={"in/1": 9_500.0}, labels_through={"in/1": 9_000.0, "in/0": 100.0}))
    assert store.labels_watermark(0.0, 600.0) == 8_000.0  # labels_through only grows
    assert store.slowest_partition_s(600.0) == 9_000.0
    store._client.zadd(store.keys.meta("event_time_at"), {"in/0": time.time() - 3600})  # in/0 idle: left out
    assert store.labels_watermark(0.0, 600.0) == 9_000.0


def test_a_page_of_due_deadlines_is_not_taken_for_all_of_them(store):
    page = -(-DUE_LIMIT // store.keys.shards)  # due_deadlines reads this many at most from each shard
    assert store.listed_every_due([])
    assert store.listed_every_due(["u"] * (page - 1))
    assert not store.listed_every_due(["u"] * page)


def test_data_written_with_another_shard_count_stops_the_worker_rather_than_lose_every_users_state(each_redis):
    prefix = f"test-layout-{uuid.uuid4().hex[:8]}"
    client = each_redis.redis_client()
    try:
        StateStore(client, each_redis.redis_settings(prefix, cluster_shards=16)).check_layout()
        StateStore(client, each_redis.redis_settings(prefix, cluster_shards=16)).check_layout()  # the same: fine
        other = StateStore(client, each_redis.redis_settings(prefix, cluster_shards=8))
        if each_redis.redis_cluster:
            with pytest.raises(LayoutError, match="written with shards=16, and the settings give shards=8"):
                other.check_layout()
        else:
            other.check_layout()  # a single Redis keeps one shard whatever --redis-cluster-shards says
    finally:
        drop_keys(client, prefix)
        client.close()


def test_a_batch_of_many_users_lands_whole_and_reads_back_on_every_shard(store):
    users = [f"user-{i}" for i in range(200)]
    state = UserState(purchases=1, last_ts_s=5.0)
    claim = EventClaim("in/0/1", "v1", "2026-01-01T00:00:00Z", 1, 0.6, None, None)
    store.save(StateWrites(claims=[(u, f"e-{u}", claim) for u in users], states={u: state for u in users},
                           pendings={u: pending(u, 10.0) for u in users},
                           deadlines={"in/0": {u: 50.0 for u in users}},
                           examples=[(u, pending(u, 5.0).with_label(1, 6.0)) for u in users]))
    claims, states, pendings, _ = store.load([(u, f"e-{u}") for u in users], 0.0)
    assert len(claims) == len(states) == len(pendings) == len(users)
    assert set(store.due_deadlines(["in/0"], watermark_s=60.0)["in/0"]) == set(users)
    assert store.examples_total() == len(users) and sum(store.window_sizes().values()) == len(users)
    assert len(store.recent_examples(1000)) == len(users)
