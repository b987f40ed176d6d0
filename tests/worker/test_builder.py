"""The builder processes, for real: a child process that builds batches against Redis, builds a batch on top of
one whose transaction is still landing, swaps weights between batches, hands Redis errors back to the loop,
and is reported when it dies; several of them sharing batches by key. Its reply protocol (`_Builds`) is also
run in-process with a failing save."""
import json
import threading

import numpy as np
import pytest
import redis

from tests.integration.conftest import dumps, event
from worker.batch import BatchBuilder, Built, Resolved
from worker.builder import SPLIT_AFTER_EVENTS, BuilderFailed, BuilderProcess, Builders, _Builds, key_shares
from worker.model import Parameters, ServingModel
from worker.pipeline import InputRecord, builder_of
from worker.settings import load_settings
from worker.state import StateStore


def batch(first_offset: int, bodies: list[bytes]) -> list[InputRecord]:
    return [InputRecord("purchases", 0, first_offset + i, 1_000, b"user", body) for i, body in enumerate(bodies)]


@pytest.fixture
def model(checkpoint) -> ServingModel:
    return ServingModel.from_checkpoint(checkpoint)


def settings_for(stack, names, builders: int = 1, redis_url=None):
    return load_settings({**names.env(stack), "STREAMADAPT_BUILDERS": str(builders),
                          **({"STREAMADAPT_REDIS_URL": redis_url} if redis_url else {})})


def open_builder(stack, names, model, redis_url=None) -> BuilderProcess:
    builder = BuilderProcess(settings_for(stack, names, redis_url=redis_url), model)
    builder.wait_started()
    return builder


def open_builders(stack, names, model, count: int, redis_url=None) -> Builders:
    return Builders(settings_for(stack, names, count, redis_url), model)


def keyed(first_offset: int, users_and_events: list[tuple[str, int]]) -> list[InputRecord]:
    return [InputRecord("purchases", 0, first_offset + i, 1_000, user.encode(), dumps(event(n, user=user)))
            for i, (user, n) in enumerate(users_and_events)]


def test_each_key_has_one_builder_and_keeps_its_order():
    records = [InputRecord("t", 0, i, 0, f"u{i % 7}".encode(), b"{}") for i in range(70)]
    shares = key_shares(records, 3)
    assert sorted(r.offset for share in shares.values() for r in share) == list(range(70))
    for share in shares.values():
        assert [r.offset for r in share] == sorted(r.offset for r in share)
    builder_of = {r.key: index for index, share in shares.items() for r in share}
    assert len(builder_of) == 7 and len(set(builder_of.values())) > 1
    assert key_shares(records, 3) == shares  # the same keys go to the same builders every time
    assert key_shares([InputRecord("t", 0, 0, 0, None, b"{}")], 3) == {0: [InputRecord("t", 0, 0, 0, None, b"{}")]}


def test_the_shares_of_a_batch_join_into_one():
    first = Built([("p", b"a", b"1"), ("p", b"a", b"2"), ("dlq", b"a", b"x")], np.array([5.0, 6.0]), ["invalid_json"],
                  duplicates=1, predicted=2,
                  resolved=Resolved(["v1"], np.array([[0.2, 0.8]], np.float32), [1], [10.0]))
    second = Built([("p", b"b", b"3")], np.array([7.0]), replayed=1, predicted=1,
                   resolved=Resolved(["v2", "v2"], np.array([[0.5, 0.5], [0.9, 0.1]], np.float32), [0, 0], [11.0, 12.0]))
    both = Built.joined([first, second])
    assert [value for _, _, value in both.messages] == [b"1", b"2", b"x", b"3"]
    assert both.input_timestamps_ms.tolist() == [5.0, 6.0, 7.0]
    assert (both.dead_letter_reasons, both.duplicates, both.replayed, both.predicted) == (["invalid_json"], 1, 1, 3)
    assert both.resolved.versions == ["v1", "v2", "v2"] and both.resolved.labels == [1, 0, 0]
    assert both.resolved.probabilities.shape == (3, 2) and both.resolved.resolved_ts_s == [10.0, 11.0, 12.0]
    assert Built.joined([Built([]), Built([])]).resolved is None


def test_builders_share_a_batch_by_key_and_each_user_is_built_in_order(stack, names, model, monkeypatch):
    monkeypatch.setattr("worker.builder.SPLIT_FROM_RECORDS", 5)  # the batches below count as a backlog
    builders = open_builders(stack, names, model, 2)
    try:
        builders.submit(keyed(0, [(f"warm-{i}", 100 + i) for i in range(SPLIT_AFTER_EVENTS)]))
        assert builders.collect().predicted == SPLIT_AFTER_EVENTS and not builders.splitting
        users = [f"u{i}" for i in range(8)]
        assert len(key_shares(keyed(0, [(user, 0) for user in users]), 2)) == 2  # both builders get a share
        builders.submit(keyed(2_000, [(user, i) for i, user in enumerate(users)]))
        assert builders.splitting
        builders.submit(keyed(2_008, [(user, 8 + i) for i, user in enumerate(users)] + [(users[0], 16)]))
        first, second = builders.collect(), builders.collect()
        assert builders.in_flight == 0
        assert (first.predicted, first.labels_resolved) == (8, 0)
        # every user's second event resolves their first; u0's third resolves its second, in the same batch
        assert (second.predicted, second.labels_resolved) == (9, 9)
        client = redis.Redis.from_url(stack.redis_url)
        purchases = {user: json.loads(client.get(f"{names.key_prefix}:profile:{user}").partition(b"\n")[0])[0]
                     for user in users}
        assert purchases == {**{user: 2 for user in users}, "u0": 3}
    finally:
        builders.close()


class FakeProcess:
    """A builder process in-process: builds a share at once; records keyed b"user-..." count as keyed by user."""

    def __init__(self, settings, model, index, log):
        self.index, self.log, self.shares = index, log, []

    @property
    def in_flight(self):
        return len(self.shares)

    def submit(self, records, builders=1):
        self.shares.append(records)
        self.log.append(("submit", self.index, records[0].offset))

    def ready(self):
        return bool(self.shares)

    def collect(self):
        share = self.shares.pop(0)
        self.log.append(("collect", self.index, share[0].offset))
        return Built([("p", r.key, b"{}") for r in share], np.zeros(len(share)), predicted=len(share),
                     keyed_by_user=all(r.key.startswith(b"user-") for r in share))

    def wait_started(self):
        pass

    def close(self, timeout_s=10.0):
        pass


@pytest.fixture
def fake_builders(monkeypatch):
    log = []
    monkeypatch.setattr("worker.builder.BuilderProcess", lambda settings, model, index: FakeProcess(settings, model, index, log))
    monkeypatch.setattr("worker.builder.SPLIT_AFTER_EVENTS", 10)
    monkeypatch.setattr("worker.builder.SPLIT_FROM_RECORDS", 8)
    monkeypatch.setattr("worker.builder.BUILD_ALONE_UP_TO_RECORDS", 3)
    return Builders(load_settings({"STREAMADAPT_BUILDERS": "2"}), None), log


def users_batch(first_offset: int, count: int, key=lambda i: f"user-{i}".encode()) -> list[InputRecord]:
    return [InputRecord("in", 0, first_offset + i, 0, key(i), b"{}") for i in range(count)]


def test_batches_are_split_only_once_enough_events_came_back_keyed_by_user_and_every_earlier_batch_is_back(fake_builders):
    builders, log = fake_builders
    for offset in (0, 100, 200):
        builders.submit(users_batch(offset, 8))
    assert [entry for entry in log if entry[0] == "submit"] == [("submit", 0, 0), ("submit", 0, 100), ("submit", 0, 200)]
    builders.collect()
    builders.collect()  # 16 keyed events back: split from the next hand-over, once batch 200 is back
    builders.submit(users_batch(300, 8))
    assert ("submit", 0, 300) not in log and builders.in_flight == 2  # held: batch 200 was built alone
    builders.collect()  # batch 200 is back: batch 300 is handed over at once, split
    handed_over = [i for i, entry in enumerate(log) if entry[0] == "submit" and entry[2] >= 300]
    assert log.index(("collect", 0, 200)) < min(handed_over)
    assert {log[i][1] for i in handed_over} == {0, 1} and builders.splitting
    assert builders.collect().predicted == 8 and builders.in_flight == 0


def test_a_record_not_keyed_by_its_user_ends_the_splitting_for_good_once_the_split_batches_are_back(fake_builders):
    builders, log = fake_builders
    builders.submit(users_batch(0, 12))
    builders.collect()
    builders.submit(users_batch(100, 8))
    assert builders.splitting
    builders.submit(users_batch(200, 8, key=lambda i: b"other"))  # a producer that keys otherwise
    builders.submit(users_batch(300, 8))
    builders.collect()
    builders.collect()  # batch 200 comes back keyed otherwise: batch 300 (split, out) first, then one builder
    builders.submit(users_batch(400, 8))
    assert not [entry for entry in log if entry[0] == "submit" and entry[2] == 400]
    builders.collect()
    builders.collect()
    assert [entry[1] for entry in log if entry[0] == "submit" and entry[2] == 400] == [0] and not builders.splitting
    builders.submit(users_batch(500, 8))  # well keyed again: still one builder
    builders.collect()
    assert [entry[1] for entry in log if entry[0] == "submit" and entry[2] == 500] == [0]


def test_a_steady_stream_of_small_batches_is_built_by_one_builder_and_a_backlog_is_split_again(fake_builders):
    builders, log = fake_builders
    builders.submit(users_batch(0, 12))
    builders.collect()  # keyed by user from now on
    builders.submit(users_batch(100, 8))
    builders.submit(users_batch(200, 5))  # between the two sizes: as the batch before, split
    builders.submit(users_batch(300, 3))  # small: one builder, once the split ones are back
    assert builders.splitting and not [entry for entry in log if entry[0] == "submit" and entry[2] == 300]
    builders.collect()
    builders.collect()
    assert [entry[1] for entry in log if entry[0] == "submit" and entry[2] == 300] == [0] and not builders.splitting
    builders.submit(users_batch(400, 5))  # between the two sizes: as the batch before, one builder
    builders.submit(users_batch(500, 9))  # a backlog again: split, once batches 300 and 400 are back
    assert [entry[1] for entry in log if entry[0] == "submit" and entry[2] == 400] == [0]
    assert not [entry for entry in log if entry[0] == "submit" and entry[2] == 500]
    for _ in range(3):
        builders.collect()
    assert {entry[1] for entry in log if entry[0] == "submit" and entry[2] >= 500} == {0, 1} and builders.splitting
    assert builders.in_flight == 0


def test_a_redis_error_in_the_builders_comes_back_once_every_share_is_taken_back(stack, names, model):
    builders = open_builders(stack, names, model, 2, redis_url="redis://127.0.0.1:1/0")
    try:
        builders.submit(keyed(0, [(f"u{i}", i) for i in range(8)]))
        with pytest.raises(redis.ConnectionError):
            builders.collect()
        assert builders.in_flight == 0 and all(process.in_flight == 0 for process in builders._processes)
    finally:
        builders.close()


def test_a_batch_is_built_and_saved_in_the_child_and_a_swap_applies_from_the_next_batch(stack, names, model):
    builder = open_builder(stack, names, model)
    try:
        builder.submit(batch(0, [dumps(event(0, user="u1")), b"not json", dumps(event(1, user="u1"))]))
        first = builder.collect()
        assert (first.predicted, first.dead_letter_reasons, first.labels_resolved) == (2, ["invalid_json"], 1)
        assert {json.loads(value)["model_version"] for topic, _, value in first.messages
                if topic == names.predictions_topic} == {model.version}
        assert redis.Redis.from_url(stack.redis_url).exists(f"{names.key_prefix}:profile:u1")

        builder.swap(Parameters([w * 0.5 for w in model._weights]), "v2")
        builder.submit(batch(3, [dumps(event(2, user="u1"))]))
        second = builder.collect()
        assert [json.loads(value)["model_version"] for _, _, value in second.messages] == ["v2"]
        # the label it resolved comes back to be scored, with the version that served it
        assert second.resolved.versions == [model.version] and second.resolved.probabilities.shape == (1, len(model.meta.classes))
    finally:
        builder.close()


def test_a_batch_built_on_top_of_another_reads_what_that_one_writes(stack, names, model):
    builder = open_builder(stack, names, model)
    try:
        builder.submit(batch(0, [dumps(event(0, user="u1"))]))
        builder.submit(batch(1, [dumps(event(1, user="u1")), dumps(event(0, user="u1"))]))  # a duplicate of ev-0
        assert builder.in_flight == 2
        first, second = builder.collect(), builder.collect()
        assert (first.predicted, first.labels_resolved) == (1, 0)
        # whether or not the first transaction had landed when the second batch was read, the second sees
        # u1's pending prediction (its purchase resolves it) and the claim of ev-0
        assert (second.predicted, second.labels_resolved, second.duplicates) == (1, 1, 1)
        profile = redis.Redis.from_url(stack.redis_url).get(f"{names.key_prefix}:profile:u1")
        assert json.loads(profile.partition(b"\n")[0])[0] == 2  # purchases: both events are in the state
    finally:
        builder.close()


@pytest.mark.timeout(120)
def test_batches_larger_than_the_pipe_can_be_handed_over_while_replies_wait(stack, names, model):
    # each way, a batch or its reply outgrows what the pipe holds: handing the third batch over must not wait
    # for the builder to send a reply the loop has not asked for yet
    builder = open_builder(stack, names, model)
    try:
        for first in (0, 1_000, 2_000):
            builder.submit(batch(first, [dumps(event(i, item_id="x" * 200)) for i in range(first, first + 1_000)]))
        assert [builder.collect().predicted for _ in range(3)] == [1_000, 1_000, 1_000]
    finally:
        builder.close()


def test_a_redis_error_in_the_child_comes_back_as_the_same_error(stack, names, model):
    builder = open_builder(stack, names, model, redis_url="redis://127.0.0.1:1/0")
    try:
        builder.submit(batch(0, [dumps(event(0))]))
        with pytest.raises(redis.ConnectionError):
            builder.collect()
        assert not builder.in_flight
    finally:
        builder.close()


def test_a_dead_builder_is_reported_not_waited_for(stack, names, model):
    builder = open_builder(stack, names, model)
    try:
        builder._process.kill()
        builder._process.join()
        with pytest.raises(BuilderFailed, match="died"):
            builder.submit(batch(0, [dumps(event(0))]))
            builder.collect()
    finally:
        builder.close()


def test_a_bug_in_the_child_is_reported_with_the_records_it_was_building(stack, names, model):
    builder = open_builder(stack, names, model)
    try:
        builder.submit([InputRecord("purchases", 2, 40, 1_000, b"user", 12345)])  # a value no client would hand over
        with pytest.raises(BuilderFailed, match=r"(?s)batch of 1 records from purchases/2/40 to purchases/2/40:\n.*TypeError"):
            builder.collect()
    finally:
        builder.close()


class FakePipe:
    def __init__(self):
        self.sent: list[tuple] = []

    def send(self, reply):
        self.sent.append(reply)


class SlowlyFailingSaves:
    """A BatchBuilder whose first transaction fails only once the next batch is being built."""

    def __init__(self):
        self.unsaved_seen, self.saved, self.failed_once = [], [], False
        self.second_built = threading.Event()

    def build(self, records, unsaved=None, builders=1):
        self.unsaved_seen.append(unsaved is not None)
        if len(self.unsaved_seen) == 2:
            self.second_built.set()
        return Built([("out", None, b"{}")], predicted=len(records)), f"writes of {records[0].offset}"

    def save(self, built, writes):
        if not self.saved and not self.failed_once:
            self.failed_once = True
            self.second_built.wait(5)
            raise redis.ConnectionError("Redis went away during EXEC")
        self.saved.append(writes)
        return built


def test_a_batch_built_on_top_of_a_failed_transaction_is_not_saved_and_fails_alike():
    pipe, fake = FakePipe(), SlowlyFailingSaves()
    builds = _Builds(pipe, fake)
    try:
        builds.build(batch(0, [b"{}"]), on_top=False)
        builds.build(batch(1, [b"{}"]), on_top=True)
        assert fake.unsaved_seen == [False, True]  # the second read the first's writes in place of Redis
        assert [kind for kind, _ in pipe.sent] == ["outage", "outage"]  # in order: the failed one first
        assert fake.saved == []
        # the serving loop reads the first batch again, on top of nothing: built and saved as usual
        builds.build(batch(0, [b"{}"]), on_top=False)
        builds.settle()
        assert [kind for kind, _ in pipe.sent] == ["outage", "outage", "built"]
        assert fake.saved == ["writes of 0"] and fake.unsaved_seen[-1] is False
    finally:
        builds.close()


def test_a_repurchase_deadline_is_settled_by_the_builder_of_its_user_and_by_the_only_builder_when_unsplit(
        stack, names, repurchase_checkpoint):
    # u-late buys once; eight days later another user's purchase moves the watermark past u-late's 7-day
    # deadline. Split over two builders, only u-late's own builder settles it (a negative label); built by
    # one builder alone (the input was not keyed by user), that builder settles it, whoever's it is.
    late = next(f"u-late-{i}" for i in range(100) if builder_of(f"u-late-{i}".encode(), 2) == 1)
    settings = settings_for(stack, names, builders=2)
    client = redis.Redis.from_url(stack.redis_url)
    model = ServingModel.from_checkpoint(repurchase_checkpoint)

    def negatives(index: int, builders: int, prefix: str) -> list[int]:
        store = StateStore(client, settings.redis.model_copy(update={"key_prefix": prefix}))
        builder = BatchBuilder(settings, store, model, index)
        first = keyed(0, [(late, 0)])
        second = [InputRecord("purchases", 0, 1, 1_000, b"u-other",
                              dumps(event(1, user="u-other", ts="2025-08-09T02:00:00Z")))]
        for records in (first, second):
            built, writes = builder.build(records, None, builders)
            builder.save(built, writes)
        return built.resolved.labels

    assert negatives(index=1, builders=2, prefix=f"{names.key_prefix}-own") == [0]
    assert negatives(index=0, builders=2, prefix=f"{names.key_prefix}-other") == []
    assert negatives(index=0, builders=1, prefix=f"{names.key_prefix}-alone") == [0]
