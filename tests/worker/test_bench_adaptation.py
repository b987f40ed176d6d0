"""The adaptation benchmark replays a small drifting stream end to end (offline; no speed or quality goal
is asserted here beyond what must hold by construction)."""
import json

import pytest

from schemas import PurchaseEvent
from worker.bench_adaptation import build_stream, run_adaptation_bench
from worker.generate import generate_events
from worker.model import load_checkpoint
from worker.settings import TrainingSettings


@pytest.fixture(scope="module")
def drifting_events():
    return [PurchaseEvent.model_validate(e) for e in generate_events(events=3000, market="target", drift_at=1500, seed=3)]


def test_stream_labels_are_the_next_purchase_of_the_same_user(drifting_events, checkpoint):
    _, meta = load_checkpoint(checkpoint)
    stream = build_stream(drifting_events, meta.feature_spec, drift_at=1500)
    for i, j in enumerate(stream.revealed_by.tolist()):
        if j >= 0:
            assert j > i and stream.events[j].user_id == stream.events[i].user_id
            assert stream.labels[i] == meta.feature_spec.index_of(stream.events[j].category)
            between = [e.user_id for e in stream.events[i + 1:j]]
            assert stream.events[i].user_id not in between  # it is the *next* purchase
        else:
            assert stream.labels[i] == -1


def test_every_contender_is_scored_and_the_oracle_beats_static_after_the_drift(drifting_events, checkpoint, tmp_path):
    training = TrainingSettings(every_examples=800, min_examples=300, epochs=2)
    lines = []
    result = run_adaptation_bench(drifting_events, checkpoint, 1500, training, out=tmp_path / "a.json",
                                  plot_path=tmp_path / "a.png", strategies=("l2sp",), curve_sizes=(250,), curve_seeds=(0,),
                                  echo=lines.append)
    names = [row["name"] for row in result["contenders"]]
    assert names[:3] == ["static", "adapted-l2sp", "scratch"] and names[-1] == "oracle"
    assert {"river-adaptive-random-forest", "river-hoeffding-adaptive-tree", "river-softmax-regression"} <= set(names)
    by_name = {row["name"]: row for row in result["contenders"]}
    for row in result["contenders"]:
        assert 0.0 <= row["before_drift"] <= 1.0 and 0.0 <= row["first_5k_after_drift"] <= 1.0
    # The oracle was trained on the answers after the drift: it must beat the unchanged source model there.
    assert by_name["oracle"]["first_5k_after_drift"] > by_name["static"]["first_5k_after_drift"]
    assert by_name["adapted-l2sp"]["before_drift"] == by_name["static"]["before_drift"] or by_name["adapted-l2sp"]["promotions"]
    assert result["transfer_curve"][0]["examples"] == 250
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads(json.dumps(result))
    assert any(line.startswith("prequential accuracy") for line in lines)
