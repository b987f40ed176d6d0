"""The serving loop's pacer: when it reads Redis, and how a wait for the trainer ends."""
import pytest

from streamadapt.core.pacing import TrainerProgress
from streamadapt.metrics import WorkerMetrics
from streamadapt.serving import pacing
from streamadapt.serving.pacing import Pacer

HOUR = 3600.0
DAY = 86400.0


class Redis:
    """What the pacer reads, as the registry and the store give it."""

    def __init__(self, through_s=0.0, running=False, leased=True, examples=0, champion="v0", slowest_s=None):
        self.progress = TrainerProgress(through_s, 2000, running)
        self.leased, self.examples, self.champion, self.slowest_s = leased, examples, champion, slowest_s
        self.reads = 0

    def trainer_state(self):
        self.reads += 1
        return self.progress, self.leased, self.champion

    def examples_and_alarm(self):
        return self.examples, False

    def slowest_partition_s(self, idle_timeout_s):
        return self.slowest_s


@pytest.fixture
def clock(monkeypatch):
    clocks = {"monotonic": 1000.0, "time": 5000 * DAY}
    monkeypatch.setattr(pacing.time, "monotonic", lambda: clocks["monotonic"])
    monkeypatch.setattr(pacing.time, "time", lambda: clocks["time"])

    def advance(seconds):
        clocks["monotonic"] += seconds
        clocks["time"] += seconds

    return advance


def make(redis, **kwargs):
    metrics = WorkerMetrics()
    return Pacer(redis, redis, max_lag_s=HOUR, idle_partition_timeout_s=600.0, first_round_examples=2000,
                 metrics=metrics, **kwargs), metrics


def test_live_partitions_read_nothing(clock):
    redis = Redis(through_s=0.0, running=True)
    pacer, _ = make(redis)
    live = 5000 * DAY - 60
    for second in range(100):
        assert pacer.to_pause({"in/0": live + second, "in/1": live}, "v0") == set()
    assert redis.reads == 0


def test_a_partition_that_ran_ahead_of_a_running_round_waits_for_it_then_for_the_swap(clock):
    redis = Redis(through_s=10 * DAY, running=True, slowest_s=12 * DAY)
    pacer, metrics = make(redis)
    newest = {"in/0": 12 * DAY, "in/1": 12 * DAY}
    assert pacer.to_pause(newest, "v0") == {"in/0", "in/1"}
    assert metrics.registry.get_sample_value("streamadapt_pacing_pauses_total", {"reason": "round"}) == 2
    assert metrics.registry.get_sample_value("streamadapt_paced_partitions") == 2
    clock(0.001)
    assert pacer.to_pause(newest, "v0") == {"in/0", "in/1"}
    assert redis.reads == 1  # read again only every CHECK_EVERY_S
    clock(5.0)
    redis.progress, redis.champion = TrainerProgress(12 * DAY, 6000, False), "v1"  # the round promoted v1
    assert pacer.to_pause(newest, "v0") == {"in/0", "in/1"}
    assert metrics.registry.get_sample_value("streamadapt_pacing_pauses_total", {"reason": "swap"}) == 2
    clock(0.1)
    assert pacer.to_pause(newest, "v1") == set()  # swapped
    assert metrics.registry.get_sample_value("streamadapt_paced_partitions") == 0


def test_a_quiet_partition_behind_the_clock_is_looked_at_once(clock):
    """An input partition with no new events keeps its old newest time: once looked at, it is not read for."""
    redis = Redis(through_s=0.0)
    pacer, _ = make(redis)
    newest = {"in/0": 5000 * DAY - 60, "in/1": 10 * DAY}
    assert pacer.to_pause(newest, "v0") == set()
    assert redis.reads == 1
    for second in range(1, 50):
        clock(1.0)
        assert pacer.to_pause({**newest, "in/0": newest["in/0"] + second}, "v0") == set()
    assert redis.reads == 1


def test_the_starting_trainer_of_role_all_is_waited_for_before_it_holds_the_lease(clock):
    redis = Redis(through_s=10 * DAY, examples=5000, leased=False)
    assert make(redis)[0].to_pause({"in/0": 12 * DAY}, "v0") == set()
    starting, _ = make(redis, trainer_starting_s=120.0)
    assert starting.to_pause({"in/0": 12 * DAY}, "v0") == {"in/0"}
    clock(121.0)
    assert starting.to_pause({"in/0": 12 * DAY}, "v0") == set()


def test_a_round_waited_for_too_long_is_given_up_until_the_trainer_moves(clock, caplog):
    redis = Redis(through_s=10 * DAY, running=True)
    pacer, _ = make(redis)
    assert pacer.to_pause({"in/0": 12 * DAY}, "v0") == {"in/0"}
    clock(pacing.ROUND_WAIT_MAX_S + 1)
    assert pacer.to_pause({"in/0": 12 * DAY}, "v0") == set()
    assert "serving on until the trainer moves" in caplog.text
    clock(1)
    assert pacer.to_pause({"in/0": 13 * DAY}, "v0") == set()  # the trainer is still where it was
    redis.progress = TrainerProgress(13 * DAY - 2 * HOUR, 6000, True)  # it moved on, and runs another round
    clock(1)
    assert pacer.to_pause({"in/0": 13 * DAY + 60}, "v0") == {"in/0"}


def test_a_champion_never_swapped_in_is_waited_for_once(clock, caplog):
    redis = Redis(through_s=12 * DAY, champion="v1")  # the follower refused v1 here, say
    pacer, _ = make(redis)
    assert pacer.to_pause({"in/0": 12 * DAY}, "v0") == {"in/0"}
    clock(pacing.SWAP_WAIT_MAX_S + 1)
    assert pacer.to_pause({"in/0": 12 * DAY}, "v0") == set()
    assert "was not swapped in" in caplog.text
    clock(1)
    assert pacer.to_pause({"in/0": 14 * DAY}, "v0") == set()
