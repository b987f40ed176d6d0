"""The serving loop with fake clients and a fake builder: the commit order of the window in flight, outages,
exactly-once transactions, rebalances and a clean stop."""
import logging
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import redis

from streamadapt.kafka.protocol import (
    InputRecord,
    KafkaUnavailable,
    NotAcknowledged,
    ProducerFenced,
    TopicPartition,
    TransactionAborted,
)
from streamadapt.metrics import WorkerMetrics
from streamadapt.serving import loop as loop_module
from streamadapt.serving.batch import Built, Resolved
from streamadapt.serving.loop import ServingLoop
from streamadapt.settings import load_settings

P0, P1 = TopicPartition("in", 0), TopicPartition("in", 1)


def records(partition: int, *offsets: int) -> list[InputRecord]:
    return [InputRecord("in", partition, offset, 0, b"k", b"{}") for offset in offsets]


class Log(list):
    """What happened, in order, across the fakes."""


class FakeBuilder:
    """Builds a prediction per record; `failures` are raised by the next builds, one each."""

    def __init__(self, log: Log, failures: list[Exception] | None = None):
        self.log, self.failures = log, list(failures or [])

    def build(self, batch):
        self.log.append(("build", batch[0].offset))
        if self.failures and (failure := self.failures.pop(0)) is not None:
            raise failure
        return Built([("out", b"k", b"{}")] * len(batch), list(batch), np.zeros(len(batch)), predicted=len(batch)), None

    def save(self, built, writes):
        return built

    def newest_event_times(self):
        return {"in/0": 1.0, "in/1": 1.0} if self.log else {}


class FakeConsumer:
    def __init__(self, log: Log, polls: list, owned=(P0, P1), stop: threading.Event | None = None):
        """`polls`: what each poll returns; a callable is called inside that poll (a scripted event) and
        returns the records. Once they run out, the poll sets `stop`."""
        self.log, self.polls, self.owned, self.stop = log, list(polls), set(owned), stop
        self.before_revoke = lambda: None
        self.on_assigned = lambda assigned: {}
        self.seeks: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.paused = False
        self.paused_partitions: set[TopicPartition] = set()
        self.while_paused: list = []  # called one per poll while paused (scripted events of an outage)

    def rebalance(self, owned) -> None:
        """An eager rebalance, as both clients run it: everything revoked, then `owned` assigned, and
        started where `on_assigned` asks. A new assignment is not paused."""
        self.before_revoke()
        self.owned, self.paused = set(owned), False
        for tp, offset in self.on_assigned(set(owned)).items():
            self.seek(tp, offset)

    def poll(self, timeout_ms, max_records=None):
        if self.paused_partitions >= self.owned:
            self.log.append(("poll paused", timeout_ms))
            return []
        if self.paused:  # what a paused consumer reads comes after it resumes
            if self.while_paused:
                self.while_paused.pop(0)()
            return []
        if not self.polls:
            if self.stop is not None:
                self.stop.set()
            return []
        polled = self.polls.pop(0)
        return polled() if callable(polled) else polled

    def assignment(self):
        return self.owned

    def pause_all(self):
        self.paused = True

    def resume_all(self):
        self.paused = False
        self.log.append(("resume",))

    def pause(self, partitions):
        self.paused_partitions |= partitions

    def resume(self, partitions):
        if partitions:
            self.paused_partitions -= partitions
            self.log.append(("resume", sorted(tp.partition for tp in partitions)))

    def seek(self, tp, offset):
        self.seeks[tp] = offset
        self.log.append(("seek", tp.partition, offset))

    def commit(self, offsets):
        self.committed.update(offsets)
        self.log.append(("commit", dict(offsets)))
        return True

    def commit_async(self, offsets, done):
        self.committed.update(offsets)
        self.log.append(("commit_async", dict(offsets)))
        done()

    def lag(self):
        return {}

    def fetching(self):
        return True

    def group_metadata(self):
        return "generation-7"


class FakeAcks:
    def __init__(self, first_offset: int, acknowledged: bool):
        self.first_offset, self.acknowledged, self.error, self.waits = first_offset, acknowledged, None, 0
        self.refused = {}

    def done(self):
        return self.acknowledged

    def wait(self, timeout_s):
        self.waits += 1

    def check(self):
        if self.error is not None:
            raise self.error
        return self.refused


class FakeProducer:
    """Records are acknowledged at once, unless `hold`: then when the test says (`acknowledge`)."""

    def __init__(self, log: Log, failures: list[Exception] | None = None, hold: bool = False):
        self.log, self.failures, self.hold = log, list(failures or []), hold
        self.transactions: list[tuple] = []
        self.sent: list[FakeAcks] = []

    def send(self, messages):
        self.log.append(("send", len(messages)))
        if self.failures:
            raise self.failures.pop(0)
        acks = FakeAcks(len(self.sent), not self.hold)
        self.sent.append(acks)
        return acks

    def acknowledge(self, index: int, error: Exception | None = None, refused: dict[int, str] | None = None):
        self.sent[index].acknowledged, self.sent[index].error = True, error
        self.sent[index].refused = refused or {}

    def flush(self, timeout_s=None):
        self.log.append(("flush",))
        for acks in self.sent:
            acks.acknowledged = True

    def send_in_transaction(self, messages, next_offsets, group_metadata):
        self.transactions.append((len(messages), dict(next_offsets), group_metadata))
        self.sent_messages = messages
        self.log.append(("transaction", len(messages)))
        if self.failures:
            raise self.failures.pop(0)


def make_loop(consumer, producer, builder, exactly_once=False, metrics=None, raise_drift_alarm=None,
              window=8000, pacer=None) -> ServingLoop:
    settings = load_settings({"STREAMADAPT_KAFKA_EXACTLY_ONCE": str(exactly_once).lower(),
                              "STREAMADAPT_KAFKA_MAX_IN_FLIGHT_RECORDS": str(window)})
    model = SimpleNamespace(version="v1", meta=SimpleNamespace(task="next_category"))
    return ServingLoop(settings, consumer, producer, builder, model, metrics or WorkerMetrics(),
                       raise_drift_alarm=raise_drift_alarm, pacer=pacer)


@pytest.fixture(autouse=True)
def quick_outage_retries(monkeypatch):
    monkeypatch.setattr("streamadapt.serving.outage.FIRST_RETRY_S", 0.01)


def test_a_batch_is_sent_without_waiting_and_committed_only_with_every_batch_before_it_acknowledged():
    log, stop = Log(), threading.Event()
    producer = FakeProducer(log, hold=True)

    def second_acknowledged_first():
        producer.acknowledge(1)
        return []

    def then_the_first():
        assert "commit_async" not in [entry[0] for entry in log]  # the second waits for the first
        producer.acknowledge(0)
        return []

    consumer = FakeConsumer(log, [records(0, 10, 11), records(1, 4), second_acknowledged_first, then_the_first, []],
                            stop=stop)
    make_loop(consumer, producer, FakeBuilder(log)).run(stop)
    assert log[:4] == [("build", 10), ("send", 2), ("build", 4), ("send", 1)]  # no wait between them
    assert ("commit_async", {P0: 12, P1: 5}) in log  # both at once, once the first is acknowledged
    assert log[-1] == ("commit", {P0: 12, P1: 5})  # a clean stop confirms the last offsets synchronously


def test_a_full_window_waits_for_acknowledgements_and_then_polls_only_for_the_room_left(monkeypatch):
    log, stop = Log(), threading.Event()
    producer = FakeProducer(log, hold=True)
    polled = []

    class Counting(FakeConsumer):
        def poll(self, timeout_ms, max_records=None):
            polled.append(max_records)
            return super().poll(timeout_ms, max_records)

    def wait(acks, timeout_s):  # meanwhile, the client acknowledges the oldest batch
        log.append(("wait",))
        producer.acknowledge(next(i for i, sent in enumerate(producer.sent) if not sent.acknowledged))

    monkeypatch.setattr(FakeAcks, "wait", wait)
    consumer = Counting(log, [records(0, 10, 11), records(0, 12), records(0, 13, 14)], stop=stop)
    make_loop(consumer, producer, FakeBuilder(log), window=3).run(stop)
    assert polled[:2] == [3, 1]  # 3 records of room, then 1 once the first batch (2 records) is in flight
    assert log[:5] == [("build", 10), ("send", 2), ("build", 12), ("send", 1), ("wait",)]  # full: no poll
    assert consumer.committed[P0] == 15


def test_a_window_full_of_unanswered_commits_polls_for_the_answers_and_reads_again_what_it_returns():
    log, stop = Log(), threading.Event()
    answers = []

    class SlowCoordinator(FakeConsumer):
        def commit_async(self, offsets, done):
            self.committed.update(offsets)
            self.log.append(("commit_async", dict(offsets)))
            answers.append(done)  # answered at the next poll

        def poll(self, timeout_ms, max_records=None):
            while answers:
                answers.pop(0)()
            return super().poll(timeout_ms, max_records)

    consumer = SlowCoordinator(log, [records(0, 10, 11), records(0, 12, 13), records(0, 14)], stop=stop)
    loop = make_loop(consumer, FakeProducer(log), FakeBuilder(log), window=2)
    loop.run(stop)
    assert ("seek", 0, 12) in log  # polled with a full window for the answer: its record is read again
    assert consumer.committed[P0] == 15


def test_a_refused_output_rewinds_to_its_batch_drops_the_window_and_reads_both_again_after_the_backoff():
    log, stop, metrics = Log(), threading.Event(), WorkerMetrics()
    producer = FakeProducer(log, hold=True)

    def first_refused():
        producer.acknowledge(0, NotAcknowledged("NotLeaderForPartitionError"))
        return []

    def read_again():
        assert consumer.seeks == {P0: 10, P1: 4} and loop.paused
        producer.hold = False
        return records(0, 10, 11) + records(1, 4)

    consumer = FakeConsumer(log, [records(0, 10, 11), records(1, 4), first_refused, read_again], stop=stop)
    loop = make_loop(consumer, producer, FakeBuilder(log), metrics=metrics)
    loop.run(stop)
    assert consumer.committed == {P0: 12, P1: 5}
    assert not loop.paused and not consumer.paused
    assert metrics.total("streamadapt_dependency_errors_total") == 1
    assert metrics.total("streamadapt_predictions_total") == 3  # the dropped batches count once, when committed


def test_an_output_refused_for_what_it_is_is_counted_and_skipped_and_its_batch_committed(caplog):
    log, stop, metrics = Log(), threading.Event(), WorkerMetrics()
    producer = FakeProducer(log, hold=True)

    def second_record_refused():
        producer.acknowledge(0, refused={1: "MSG_SIZE_TOO_LARGE: larger than the topic accepts"})
        return []

    consumer = FakeConsumer(log, [records(0, 10, 11, 12), second_record_refused], stop=stop)
    loop = make_loop(consumer, producer, FakeBuilder(log), metrics=metrics)
    with caplog.at_level(logging.ERROR):
        loop.run(stop)
    assert consumer.committed == {P0: 13} and consumer.seeks == {} and not loop.paused
    assert metrics.total("streamadapt_outputs_refused_total") == 1
    assert "in/0/11" in caplog.text and "MSG_SIZE_TOO_LARGE" in caplog.text


def test_a_send_that_times_out_is_an_outage_and_its_batch_is_read_again():
    log, stop = Log(), threading.Event()
    producer = FakeProducer(log, [KafkaUnavailable("no metadata for topic predictions after 60 s")])
    consumer = FakeConsumer(log, [records(0, 10, 11), lambda: records(0, 10, 11)], stop=stop)
    loop = make_loop(consumer, producer, FakeBuilder(log))
    loop.run(stop)
    assert consumer.seeks == {P0: 10} and consumer.committed == {P0: 12} and not loop.paused


def test_a_batch_unacknowledged_for_too_long_is_an_outage(monkeypatch):
    monkeypatch.setattr("streamadapt.serving.loop.ACK_TIMEOUT_S", 0.0)
    log, stop = Log(), threading.Event()
    producer = FakeProducer(log, hold=True)
    consumer = FakeConsumer(log, [records(0, 10), []], stop=stop)
    make_loop(consumer, producer, FakeBuilder(log)).run(stop)
    assert consumer.seeks == {P0: 10} and consumer.committed == {}


def test_a_redis_outage_builds_the_batch_again_once_redis_answers_and_then_sends_it():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11), []], stop=stop)
    loop = make_loop(consumer, FakeProducer(log), FakeBuilder(log, [redis.ConnectionError("Redis is away")]))
    loop.run(stop)
    assert log[:4] == [("build", 10), ("build", 10), ("send", 2), ("resume",)]
    assert consumer.committed[P0] == 12
    assert not loop.paused


def test_batches_saved_before_a_redis_outage_are_committed_during_it_and_the_outage_lasts():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11), records(0, 12), []], stop=stop)
    producer = FakeProducer(log, hold=True)  # the first batch is acknowledged only once the outage waits for it
    flush = producer.flush

    def flush_then_acknowledge_at_once(timeout_s=None):
        flush(timeout_s)
        producer.hold = False

    producer.flush = flush_then_acknowledge_at_once
    loop = make_loop(consumer, producer, FakeBuilder(log, [None, redis.ConnectionError("Redis is away")]))
    loop.run(stop)
    # the first batch is committed while Redis is away; consumption resumes only once the batch Redis refused
    # is saved, sent and committed
    assert log[:9] == [("build", 10), ("send", 2), ("build", 12), ("flush",), ("commit_async", {P0: 12}),
                       ("build", 12), ("send", 1), ("resume",), ("commit_async", {P0: 13})]


def test_a_redis_outage_at_stop_leaves_the_batch_to_be_read_again():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11)], stop=stop)

    class AwayForGood(FakeBuilder):
        def build(self, batch):
            stop.set()
            raise redis.ConnectionError("Redis is away")

    make_loop(consumer, FakeProducer(log), AwayForGood(log)).run(stop)
    assert consumer.seeks == {P0: 10} and consumer.committed == {}


def test_a_batch_is_one_transaction_with_the_offsets_after_it_and_the_group_metadata():
    log, stop = Log(), threading.Event()
    producer = FakeProducer(log)
    consumer = FakeConsumer(log, [records(0, 10, 11) + records(1, 4)], stop=stop)
    make_loop(consumer, producer, FakeBuilder(log), exactly_once=True).run(stop)
    assert producer.transactions == [(3, {P0: 12, P1: 5}, "generation-7")]


def test_an_aborted_transaction_rewinds_its_batch_on_the_partitions_still_owned():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11) + records(1, 4) + records(2, 7)], owned=(P0, P1), stop=stop)
    producer = FakeProducer(log, [TransactionAborted("CommitFailedError: generation is stale")])
    make_loop(consumer, producer, FakeBuilder(log), exactly_once=True).run(stop)
    # partition 2 went to another worker: not ours to rewind
    assert consumer.seeks == {P0: 10, P1: 4}


def test_exactly_once_leaves_out_an_output_refused_for_what_it_is_when_the_aborted_batch_is_read_again():
    log, stop, metrics = Log(), threading.Event(), WorkerMetrics()
    consumer = FakeConsumer(log, [records(0, 10, 11, 12), lambda: records(0, 10, 11, 12)], stop=stop)
    producer = FakeProducer(log, [TransactionAborted("1 records refused", {1: "MSG_SIZE_TOO_LARGE: too large"})])
    make_loop(consumer, producer, FakeBuilder(log), exactly_once=True, metrics=metrics).run(stop)
    assert consumer.seeks == {P0: 10}
    assert [(n, offsets) for n, offsets, _ in producer.transactions] == [(3, {P0: 13}), (2, {P0: 13})]
    assert metrics.total("streamadapt_outputs_refused_total") == 1


def test_a_kafka_outage_in_exactly_once_mode_sends_the_same_built_batch_again():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11), []], stop=stop)
    producer = FakeProducer(log, [NotAcknowledged("leader not available")])
    make_loop(consumer, producer, FakeBuilder(log), exactly_once=True).run(stop)
    assert [entry for entry in log if entry[0] in ("build", "transaction")] == [("build", 10), ("transaction", 2),
                                                                               ("transaction", 2)]


def test_a_fenced_producer_ends_the_loop_with_a_reason():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10)], stop=stop)
    producer = FakeProducer(log, [ProducerFenced()])
    with pytest.raises(ProducerFenced, match="own --kafka-transactional-id"):
        make_loop(consumer, producer, FakeBuilder(log), exactly_once=True).run(stop)


def test_a_rebalance_commits_the_batches_in_flight_before_their_partitions_go():
    log, stop = Log(), threading.Event()
    producer = FakeProducer(log, hold=True)

    def rebalance():
        consumer.before_revoke()
        assert consumer.committed == {P0: 13}  # before the partitions go
        consumer.owned = {P1}
        return records(1, 4)

    consumer = FakeConsumer(log, [records(0, 10, 11), records(0, 12), rebalance], stop=stop)
    make_loop(consumer, producer, FakeBuilder(log)).run(stop)
    assert log.index(("flush",)) < log.index(("commit_async", {P0: 13}))


def test_a_rebalance_during_an_outage_leaves_the_batches_in_flight_to_the_next_owner():
    log, stop = Log(), threading.Event()
    producer = FakeProducer(log, hold=True)
    consumer = FakeConsumer(log, [records(0, 10)], stop=stop)
    loop = make_loop(consumer, producer, FakeBuilder(log))
    loop._serve(records(0, 10), stop)
    loop._outage.since = 0.0
    consumer.rebalance({P0})
    assert loop.in_flight == 0 and consumer.committed == {}
    assert consumer.seeks == {P0: 10}  # kept: read again from the first record left, wherever the client was


def test_a_rebalance_restarts_a_kept_partition_at_a_batch_in_flight_that_was_refused():
    log, stop = Log(), threading.Event()
    producer = FakeProducer(log, hold=True)

    def rebalance():
        producer.acknowledge(0, error=NotAcknowledged("leader not available"))
        producer.flush = lambda timeout_s=None: None  # the refusal stands
        consumer.rebalance({P0})  # kept: kafka-python would go on past offset 11
        return []

    consumer = FakeConsumer(log, [records(0, 10, 11), rebalance], stop=stop)
    make_loop(consumer, producer, FakeBuilder(log)).run(stop)
    assert consumer.seeks == {P0: 10} and consumer.committed == {}


def test_a_rebalance_during_a_redis_outage_takes_the_batch_in_hand_and_restarts_the_kept_partitions_at_it():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11) + records(1, 4), []], stop=stop)
    consumer.while_paused.append(lambda: consumer.rebalance({P1}))  # P0 goes to a member that joined
    make_loop(consumer, FakeProducer(log), FakeBuilder(log, [redis.ConnectionError("Redis is away")])).run(stop)
    # built once, refused; after the rebalance neither saved nor sent: P1 is read again from offset 4
    assert [entry for entry in log if entry[0] in ("build", "send", "seek")] == [("build", 10), ("seek", 1, 4)]
    assert consumer.committed == {}


def test_a_rebalance_during_a_kafka_outage_in_exactly_once_mode_takes_the_batch_in_hand():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 10, 11) + records(1, 4), []], stop=stop)
    consumer.while_paused.append(lambda: consumer.rebalance({P0, P1}))  # a member joined and left again
    producer = FakeProducer(log, [NotAcknowledged("coordinator not available")])
    make_loop(consumer, producer, FakeBuilder(log), exactly_once=True).run(stop)
    assert len(producer.transactions) == 1  # the refused one; the batch is not sent again after the rebalance
    assert consumer.seeks == {P0: 10, P1: 4}


class ResolvingBuilder(FakeBuilder):
    """Each batch comes back with the labels it resolved."""

    def __init__(self, log: Log, resolved: list[Resolved]):
        super().__init__(log)
        self.resolved = list(resolved)

    def save(self, built, writes) -> Built:
        built = super().save(built, writes)
        built.resolved = self.resolved.pop(0)
        return built


def served(first_ts_s: int, count: int, label: int) -> Resolved:
    """`count` labels of predictions that gave class 0 a probability of 0.9, each known a second after the last."""
    return Resolved(["v1"] * count, np.tile(np.array([[0.9, 0.1]], np.float32), (count, 1)), [label] * count,
                    [float(first_ts_s + i) for i in range(count)])


def test_committed_labels_are_scored_and_a_shift_in_their_loss_raises_one_drift_alarm_dated_at_the_change():
    # 1,500 labels the model got right, then 1,500 it got wrong from event time 1,500 s on, across six
    # batches: the detector alarms once and dates the change there
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
    caplog.set_level(logging.INFO, logger="streamadapt.serving.observer")
    consumer = FakeConsumer(Log(), [])
    consumer.fetching = lambda: fetching
    loop = make_loop(consumer, FakeProducer(Log()), FakeBuilder(Log()))
    fetching = False
    for now in (100.0, 130.0, 159.0):  # not fetching, but not yet for STALLED_AFTER_S
        loop.observer.check_fetching(now, False)
        assert not loop.stalled
    loop.observer.check_fetching(160.0, False)
    assert loop.stalled
    assert "has fetched nothing for over a minute" in caplog.text
    fetching = True
    loop.observer.check_fetching(165.0, False)
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
    paused = why == "consumption paused by an outage"
    for now in (0.0, 60.0, 600.0):
        loop.observer.check_fetching(now, paused)
        assert not loop.stalled


class CoordinatorLoading(FakeConsumer):
    """A group coordinator that refuses `refusals` synchronous commits (a broker restarting)."""

    def __init__(self, *args, refusals: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.refusals = refusals

    def commit(self, offsets):
        if self.refusals:
            self.refusals -= 1
            raise KafkaUnavailable("COORDINATOR_LOAD_IN_PROGRESS: Commit failed: Broker: Coordinator load in progress")
        return super().commit(offsets)


def test_a_stop_waits_for_a_loading_coordinator_to_take_the_final_commit(monkeypatch):
    monkeypatch.setattr(loop_module, "FINAL_COMMIT_RETRY_S", 0.0)
    log, stop = Log(), threading.Event()
    consumer = CoordinatorLoading(log, [records(0, 10, 11), []], stop=stop, refusals=2)
    make_loop(consumer, FakeProducer(log), FakeBuilder(log)).run(stop)
    assert [entry for entry in log if entry[0] == "commit"] == [("commit", {P0: 12})]  # the third try


def test_a_stop_leaves_the_last_records_to_be_read_again_when_the_coordinator_never_answers(monkeypatch, caplog):
    monkeypatch.setattr(loop_module, "FINAL_COMMIT_RETRY_S", 0.0)
    monkeypatch.setattr(loop_module, "FINAL_COMMIT_WAIT_S", 0.0)
    log, stop = Log(), threading.Event()
    consumer = CoordinatorLoading(log, [records(0, 10, 11), []], stop=stop, refusals=10**6)
    make_loop(consumer, FakeProducer(log), FakeBuilder(log)).run(stop)  # returns: the process ends cleanly
    assert not [entry for entry in log if entry[0] == "commit"]
    assert any("will be read again by their partitions' next owner" in r.getMessage() for r in caplog.records)


class HoldingPacer:
    """Pauses every partition for `checks` of its checks once a batch has been served, as the pacer does while a
    due round runs."""

    poll_records = None

    def __init__(self, checks: int):
        self.left = checks
        self.seen: list[dict] = []

    def to_pause(self, newest_s, serving_version):
        self.seen.append(dict(newest_s))
        if not newest_s or self.left == 0:
            return set()
        self.left -= 1
        return set(newest_s)


def test_while_the_pacer_holds_every_partition_the_loop_polls_briefly_and_serves_nothing_then_resumes():
    log, stop = Log(), threading.Event()
    consumer = FakeConsumer(log, [records(0, 0, 1), records(0, 2, 3)], stop=stop)
    pacer = HoldingPacer(checks=3)
    loop = make_loop(consumer, FakeProducer(log), FakeBuilder(log), pacer=pacer)
    loop.run(stop)
    assert log[:2] == [("build", 0), ("send", 2)]
    assert log[2][0] == "commit_async"
    paced_poll = ("poll paused", loop_module.PACED_POLL_MS)
    assert log[3:7] == [paced_poll, paced_poll, paced_poll, ("resume", [0, 1])]
    assert log[7:9] == [("build", 2), ("send", 2)]
    assert consumer.committed[P0] == 4
    assert pacer.seen[-1] == {"in/0": 1.0, "in/1": 1.0}  # the owned partitions' newest event times
