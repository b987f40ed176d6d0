"""The serving loop with fake clients and a fake builder: the pipeline's order, outages, exactly-once aborts,
rebalances and a clean stop."""
import logging
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import redis
from kafka import TopicPartition

from worker import kafka_io
from worker.batch import Built, Resolved
from worker.builder import BuilderFailed
from worker.metrics import WorkerMetrics
from worker.pipeline import InputRecord
from worker.serving import ServingLoop
from worker.settings import load_settings

P0, P1 = TopicPartition("in", 0), TopicPartition("in", 1)


def records(partition: int, *offsets: int) -> list[InputRecord]:
    return [InputRecord("in", partition, offset, 0, b"k", b"{}") for offset in offsets]


class Log(list):
    """What happened, in order, across the fakes."""


class FakeBuilder:
    """Batches come back in order; like the real builder, a batch built on top of one that failed fails too."""

    def __init__(self, log: Log, failures: list[Exception] | None = None):
        self.log, self.failures = log, list(failures or [])
        self.queue: list[tuple[list[InputRecord], bool]] = []  # (batch, built on top of the one before)
        self._failed: Exception | None = None

    @property
    def in_flight(self) -> int:
        return len(self.queue)

    def submit(self, batch):
        assert len(self.queue) <= 2  # one in the loop's hands, one saved, one built
        self.queue.append((batch, bool(self.queue)))
        self.log.append(("submit", batch[0].offset))

    def collect(self) -> Built:
        batch, on_top = self.queue.pop(0)
        self.log.append(("collect", batch[0].offset))
        failed, self._failed = self._failed, None
        if on_top and failed is not None:
            self._failed = failed
            raise failed
        if self.failures:
            self._failed = self.failures.pop(0)
            raise self._failed
        return Built([("out", b"k", b"{}")] * len(batch), np.zeros(len(batch)), predicted=len(batch))

    def ready(self):
        return False  # taken back only when the pipeline is full or the stream is quiet

    def check_alive(self):
        pass

    def swap(self, weights, version):
        self.log.append(("swap", version))


class FakeConsumer:
    def __init__(self, log: Log, polls: list[list[InputRecord]], owned=(P0, P1), stop: threading.Event | None = None):
        self.log, self.polls, self.owned, self.stop = log, list(polls), set(owned), stop
        self.before_revoke = lambda: None
        self.seeks: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.paused = False

    def poll(self, timeout_ms):
        if not self.polls:
            if self.stop is not None:
                self.stop.set()
            return []
        polled = self.polls.pop(0)
        if callable(polled):  # a scripted event inside poll, e.g. a rebalance
            return polled()
        return [] if self.paused else polled

    def assignment(self):
        return self.owned

    def pause_all(self):
        self.paused = True

    def resume_all(self):
        self.paused = False
        self.log.append(("resume",))

    def seek(self, tp, offset):
        self.seeks[tp] = offset
        self.log.append(("seek", tp.partition, offset))

    def commit(self, offsets):
        self.committed.update(offsets)
        self.log.append(("commit", dict(offsets)))
        return True

    def commit_async(self, offsets):
        self.committed.update(offsets)

    def lag(self):
        return {}

    def fetching(self):
        return True

    def group_metadata(self):
        return "generation-7"


class FakeProducer:
    def __init__(self, log: Log, failures: list[Exception] | None = None):
        self.log, self.failures = log, list(failures or [])
        self.transactions: list[tuple] = []

    def send_all(self, messages):
        self.log.append(("send", len(messages)))
        if self.failures:
            raise self.failures.pop(0)

    def send_in_transaction(self, messages, next_offsets, group_metadata):
        self.transactions.append((len(messages), dict(next_offsets), group_metadata))
        self.log.append(("transaction", len(messages)))
        if self.failures:
            raise self.failures.pop(0)


def make_loop(consumer, producer, builder, exactly_once=False, metrics=None, raise_drift_alarm=None) -> ServingLoop:
    settings = load_settings({"STREAMADAPT_KAFKA_EXACTLY_ONCE": str(exactly_once).lower()})
    model = SimpleNamespace(version="v1", meta=SimpleNamespace(task="next_category"))
    return ServingLoop(settings, consumer, producer, builder, model, metrics or WorkerMetrics(),
                       raise_drift_alarm=raise_drift_alarm)


@pytest.fixture(autouse=True)
def quick_outage_retries(monkeypatch):
    monkeypatch.setattr("worker.serving.OUTAGE_FIRST_RETRY_S", 0.01)


def test_batches_are_handed_to_the_builder_before_the_ones_before_them_are_taken_back():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11), records(0, 12), records(1, 4), records(1, 5)], stop=stop)
    make_loop(consumer, FakeProducer(log), FakeBuilder(log)).run(stop)
    # three in the builder, then the oldest is produced; on a quiet stream, all are
    assert log[:11] == [("submit", 10), ("submit", 12), ("submit", 4), ("collect", 10), ("send", 2),
                        ("submit", 5), ("collect", 12), ("send", 1), ("collect", 4), ("send", 1), ("collect", 5)]
    assert consumer.committed == {P0: 13, P1: 6}
    assert log[-1] == ("commit", {P0: 13, P1: 6})  # a clean stop confirms the last offsets synchronously


class ReadyBuilder(FakeBuilder):
    """Builds the batches behind the oldest while the loop waits for it: they are ready once it is back."""

    def ready(self):
        return bool(self.queue) and self.log[-1][0] == "collect"


def test_batches_built_while_the_loop_waited_for_the_oldest_are_produced_and_committed_with_it():
    log, stop, metrics = Log(), threading.Event(), WorkerMetrics()
    consumer = FakeConsumer(log, [records(0, 10, 11), records(0, 12), records(1, 4)], stop=stop)
    make_loop(consumer, FakeProducer(log), ReadyBuilder(log), metrics=metrics).run(stop)
    assert log[:7] == [("submit", 10), ("submit", 12), ("submit", 4), ("collect", 10), ("collect", 12), ("collect", 4),
                       ("send", 4)]  # one flush for the three
    assert consumer.committed == {P0: 13, P1: 5}
    assert metrics.total("streamadapt_batch_records_count") == 3 and metrics.total("streamadapt_predictions_total") == 4


def test_batches_produced_together_are_one_transaction_and_rewound_together_when_it_aborts():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11), records(0, 12), records(1, 4)], stop=stop)
    producer = FakeProducer(log, [kafka_io.TransactionAborted("CommitFailedError: generation is stale")])
    make_loop(consumer, producer, ReadyBuilder(log), exactly_once=True).run(stop)
    assert producer.transactions[0] == (4, {P0: 13, P1: 5}, "generation-7")
    assert consumer.seeks == {P0: 10, P1: 4}


def test_a_redis_outage_behind_the_oldest_batch_builds_that_batch_again_and_produces_both_together():
    log, stop = Log(), threading.Event()

    class FailsOnce(ReadyBuilder):
        def collect(self):
            if self.queue[0][0][0].offset == 12 and ("collect", 12) not in log:
                self.queue.pop(0)
                log.append(("collect", 12))
                raise redis.ConnectionError("Redis is away")
            return super().collect()

    consumer = FakeConsumer(log, [records(0, 10, 11), records(0, 12), records(1, 4)], stop=stop)
    loop = make_loop(consumer, FakeProducer(log), FailsOnce(log))
    loop.run(stop)
    # 4, built on the failed 12, is dropped and read again; 12 is built again and goes out with 10
    assert log[:8] == [("submit", 10), ("submit", 12), ("submit", 4), ("collect", 10), ("collect", 12),
                       ("collect", 4), ("seek", 1, 4), ("submit", 12)]
    assert log[8:10] == [("collect", 12), ("send", 3)]
    assert consumer.committed[P0] == 13 and P1 not in consumer.committed
    assert not loop.paused


def test_a_redis_outage_rewinds_the_batch_built_on_top_and_builds_the_batch_again():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11), records(0, 12, 13), []], stop=stop)
    builder = FakeBuilder(log, [redis.ConnectionError("Redis is away")])
    loop = make_loop(consumer, FakeProducer(log), builder)
    loop.run(stop)
    assert log[:9] == [("submit", 10), ("submit", 12), ("collect", 10), ("collect", 12), ("seek", 0, 12),
                       ("submit", 10), ("collect", 10), ("send", 2), ("resume",)]
    assert consumer.committed[P0] == 12  # 12 and 13 are read again, after the outage
    assert not loop.paused


def test_a_kafka_outage_produces_the_same_built_batch_again_without_building_it_again():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11), []], stop=stop)  # stops during the wait, not before
    producer = FakeProducer(log, [kafka_io.NotAcknowledged("leader not available")])
    make_loop(consumer, producer, FakeBuilder(log)).run(stop)
    assert [entry for entry in log if entry[0] in ("submit", "send")] == [("submit", 10), ("send", 2), ("send", 2)]
    assert consumer.committed[P0] == 12


def test_a_batch_is_one_transaction_with_the_offsets_after_it_and_the_group_metadata():
    log, stop = Log(), threading.Event()
    producer = FakeProducer(log)
    consumer = FakeConsumer(log, [records(0, 10, 11) + records(1, 4)], stop=stop)
    make_loop(consumer, producer, FakeBuilder(log), exactly_once=True).run(stop)
    assert producer.transactions == [(3, {P0: 12, P1: 5}, "generation-7")]


def test_an_aborted_transaction_rewinds_it_and_the_batch_built_on_it_on_the_partitions_still_owned():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11) + records(1, 4), records(0, 12) + records(2, 7)],
                            owned=(P0, P1), stop=stop)
    producer = FakeProducer(log, [kafka_io.TransactionAborted("CommitFailedError: generation is stale")])
    make_loop(consumer, producer, FakeBuilder(log), exactly_once=True).run(stop)
    # partition 2 went to another worker: not ours to rewind; 0 goes back to the aborted batch's start
    assert consumer.seeks == {P0: 10, P1: 4}
    assert [entry[0] for entry in log[:5]] == ["submit", "submit", "collect", "transaction", "collect"]


def test_a_fenced_producer_ends_the_loop_with_a_reason():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10)], stop=stop)
    producer = FakeProducer(log, [kafka_io.ProducerFenced()])
    with pytest.raises(kafka_io.ProducerFenced, match="own --kafka-transactional-id"):
        make_loop(consumer, producer, FakeBuilder(log), exactly_once=True).run(stop)


def test_a_rebalance_commits_the_batches_in_flight_before_their_partitions_go():
    log, stop = Log(), threading.Event()

    def rebalance():
        consumer.before_revoke()
        consumer.owned = {P1}
        return records(1, 4)

    consumer = FakeConsumer(log, [records(0, 10, 11), records(0, 12), rebalance], stop=stop)
    make_loop(consumer, FakeProducer(log), FakeBuilder(log)).run(stop)
    assert log[:8] == [("submit", 10), ("submit", 12), ("collect", 10), ("send", 2), ("collect", 12), ("send", 1),
                       ("submit", 4), ("collect", 4)]
    assert consumer.committed[P0] == 13


def test_a_dead_builder_ends_the_loop_and_leaves_nothing_in_flight_for_the_revoke_at_close():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10), records(0, 11), records(0, 12)], stop=stop)
    loop = make_loop(consumer, FakeProducer(log), FakeBuilder(log, [BuilderFailed("the batch builder process died")]))
    with pytest.raises(BuilderFailed):
        loop.run(stop)
    consumer.before_revoke()  # closing the consumer revokes its partitions: nothing is asked of the dead builder
    assert [entry for entry in log if entry[0] == "collect"] == [("collect", 10)]
    assert consumer.committed == {}


def test_a_builder_found_dead_when_a_batch_is_handed_over_leaves_nothing_in_flight_either():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10), records(0, 11), records(0, 12)], stop=stop)
    builder = FakeBuilder(log)
    submit = builder.submit

    def submit_until_dead(batch):
        if batch[0].offset == 12:  # the pipe to the builder is broken by now
            raise BuilderFailed("the batch builder process died (exit code -9)")
        submit(batch)

    builder.submit = submit_until_dead
    loop = make_loop(consumer, FakeProducer(log), builder)
    with pytest.raises(BuilderFailed, match="exit code -9"):
        loop.run(stop)
    consumer.before_revoke()
    assert [entry for entry in log if entry[0] == "collect"] == []


class ResolvingBuilder(FakeBuilder):
    """Each batch comes back with the labels it resolved."""

    def __init__(self, log: Log, resolved: list[Resolved]):
        super().__init__(log)
        self.resolved = list(resolved)

    def collect(self) -> Built:
        built = super().collect()
        built.resolved = self.resolved.pop(0)
        return built


def served(first_ts_s: int, count: int, label: int) -> Resolved:
    """`count` labels of predictions that gave class 0 a probability of 0.9, each known a second after the last."""
    return Resolved(["v1"] * count, np.tile(np.array([[0.9, 0.1]], np.float32), (count, 1)), [label] * count,
                    [float(first_ts_s + i) for i in range(count)])


def test_committed_labels_are_scored_and_a_shift_in_their_loss_raises_one_drift_alarm_dated_at_the_change():
    # 1,500 labels the model got right, then 1,500 it got wrong from event time 1,500 s on, across six
    # batches: the detector (whichever builder joined the labels) alarms once and dates the change there
    log, stop, metrics, alarms = Log(), threading.Event(), WorkerMetrics(), []
    consumer = FakeConsumer(log, [records(0, offset) for offset in range(6)], stop=stop)
    builder = ResolvingBuilder(log, [served(ts_s, 500, 0) for ts_s in (0, 500, 1_000)]
                               + [served(ts_s, 500, 1) for ts_s in (1_500, 2_000, 2_500)])
    make_loop(consumer, FakeProducer(log), builder, metrics=metrics, raise_drift_alarm=alarms.append).run(stop)
    assert alarms == [1_500.0]
    assert metrics.total("streamadapt_drift_alarms_total") == 1
    assert metrics.total("streamadapt_labels_resolved_total") == 3_000
    # live quality over the rolling window of the last 2,000 labels: 500 right, then 1,500 wrong
    assert metrics.registry.get_sample_value("streamadapt_live_quality", {"model_version": "v1", "measure": "accuracy"}) == 0.25


def test_a_drift_alarm_that_cannot_reach_redis_is_logged_and_serving_goes_on(caplog):
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, offset) for offset in range(4)], stop=stop)
    builder = ResolvingBuilder(log, [served(0, 1_000, 0), served(1_000, 500, 1), served(1_500, 500, 1), served(2_000, 1, 1)])

    def unreachable(regime_since_ts):
        raise redis.ConnectionError("Redis is away")

    make_loop(consumer, FakeProducer(log), builder, raise_drift_alarm=unreachable).run(stop)
    assert consumer.committed == {P0: 4}
    assert "could not pass the drift alarm to the trainer" in caplog.text


def test_a_consumer_that_owns_partitions_and_stops_fetching_makes_the_loop_stalled_until_it_fetches_again(caplog):
    caplog.set_level(logging.INFO, logger="worker.serving")
    consumer = FakeConsumer(Log(), [])
    consumer.fetching = lambda: fetching
    loop = make_loop(consumer, FakeProducer(Log()), FakeBuilder(Log()))
    fetching = False
    for now in (100.0, 130.0, 159.0):  # not fetching, but not yet for STALLED_AFTER_S
        loop._check_fetching(now)
        assert not loop.stalled
    loop._check_fetching(160.0)
    assert loop.stalled
    assert "has fetched nothing for over a minute" in caplog.text
    fetching = True
    loop._check_fetching(165.0)
    assert not loop.stalled and "fetches again" in caplog.text


@pytest.mark.parametrize("why", ["no partitions owned", "consumption paused by an outage", "client does not say",
                                 "the look-up fails"])
def test_a_consumer_that_does_not_fetch_for_a_reason_or_cannot_say_is_not_stalled(why):
    consumer = FakeConsumer(Log(), [], owned=() if why == "no partitions owned" else (P0, P1))

    def fetching():
        if why == "the look-up fails":
            raise RuntimeError("metrics changed under us")
        return None if why == "client does not say" else False

    consumer.fetching = fetching
    loop = make_loop(consumer, FakeProducer(Log()), FakeBuilder(Log()))
    if why == "consumption paused by an outage":
        loop._outage_since = 0.0
    for now in (0.0, 60.0, 600.0):
        loop._check_fetching(now)
        assert not loop.stalled
