"""Which partitions a stream that is catching up pauses, and why (streamadapt.core.pacing), as a table."""
import pytest

from streamadapt.core.pacing import TrainerProgress, TrainerView, partitions_to_pause

HOUR = 3600.0
DAY = 86400.0
NOW = 1000 * DAY  # the clock; a replayed log is years behind it


def trainer(through_s=None, next_round=2000, running=False, alive=True, examples=0, alarm=False, champion="v2"):
    progress = None if through_s is None else TrainerProgress(through_s, next_round, running)
    return TrainerView(progress, alive, examples, alarm, champion)


@pytest.mark.parametrize("case, newest, slowest, view, expected", [
    # live: a partition within the lag of the clock is never paused, whatever the trainer and the others do
    ("live", {"a": NOW - 60}, NOW - 2 * DAY, trainer(through_s=NOW - 3 * DAY, examples=5000), {}),
    # catching up: a partition more than the lag ahead of the fleet's slowest waits for it
    ("aligned", {"a": 10 * DAY + HOUR, "b": 10 * DAY}, 10 * DAY, None, {}),
    ("ahead of the slowest", {"a": 10 * DAY + HOUR + 1, "b": 10 * DAY}, 10 * DAY, None, {"a": "align"}),
    ("slowest not known", {"a": 12 * DAY}, None, None, {}),
    # a due round: partitions more than the lag past the trainer's look wait for it
    ("nothing due", {"a": 12 * DAY}, 12 * DAY, trainer(through_s=10 * DAY, examples=1999), {}),
    ("due by examples", {"a": 12 * DAY}, 12 * DAY, trainer(through_s=10 * DAY, examples=2000), {"a": "round"}),
    ("a round running", {"a": 12 * DAY}, 12 * DAY, trainer(through_s=10 * DAY, running=True), {"a": "round"}),
    ("a drift alarm waiting", {"a": 12 * DAY}, 12 * DAY, trainer(through_s=10 * DAY, alarm=True), {"a": "round"}),
    ("running, within the lag", {"a": 10 * DAY + HOUR}, 10 * DAY, trainer(through_s=10 * DAY, running=True), {}),
    ("never published: the first round's examples", {"a": 12 * DAY}, 12 * DAY, trainer(examples=2000), {"a": "round"}),
    ("never published, fewer", {"a": 12 * DAY}, 12 * DAY, trainer(examples=1999), {}),
    ("no trainer", {"a": 12 * DAY}, 12 * DAY, trainer(through_s=10 * DAY, running=True, alive=False), {}),
    # after the round: partitions wait for this worker to serve the champion it chose
    ("champion not served here", {"a": 12 * DAY}, 12 * DAY, trainer(through_s=12 * DAY, champion="v3"), {"a": "swap"}),
    ("no champion", {"a": 12 * DAY}, 12 * DAY, trainer(through_s=12 * DAY, champion=None), {}),
    # each partition for its own reason
    ("mixed", {"a": 10 * DAY, "b": 10 * DAY + 2 * HOUR, "c": 10 * DAY + 30 * 60}, 10 * DAY,
     trainer(through_s=10 * DAY - HOUR, running=True), {"b": "align", "c": "round"}),
])
def test_a_partition_waits_only_while_catching_up_and_ahead(case, newest, slowest, view, expected):
    assert partitions_to_pause(newest, slowest, view, NOW, max_lag_s=HOUR, serving_version="v2",
                               first_round_examples=2000) == expected, case


def test_a_lag_of_zero_never_pauses():
    assert partitions_to_pause({"a": 12 * DAY}, 0.0, trainer(through_s=0.0, running=True), NOW, max_lag_s=0.0,
                               serving_version="v2", first_round_examples=2000) == {}
