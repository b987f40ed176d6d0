"""The adaptation benchmark replays a small drifting stream end to end (offline; no speed or quality goal
is asserted here beyond what must hold by construction)."""
import json

import numpy as np
import pytest

from benchmarks.adaptation import (
    build_stream,
    goals,
    river_contenders,
    run_adaptation_bench,
    run_frequency_baselines,
    run_river,
)
from benchmarks.results import finite_or_null
from streamadapt.model.checkpoint import load_checkpoint
from streamadapt.ops.generate import generate_events
from streamadapt.schemas import PurchaseEvent
from streamadapt.settings import TrainingSettings


@pytest.fixture(scope="module")
def drifting_events():
    return [PurchaseEvent.model_validate(e) for e in generate_events(events=3000, market="target", drift_at=1500, seed=3)]


def test_stream_labels_are_the_next_purchase_of_the_same_user(drifting_events, checkpoint):
    _, meta = load_checkpoint(checkpoint)
    stream = build_stream(drifting_events, meta, split_at=1500)
    for i, j in enumerate(stream.revealed_at.tolist()):
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
                                  plot_path=tmp_path / "a.png", strategies=("l2sp",), oracle_goal=True,
                                  river="none", curve_sizes=(250,), curve_seeds=(0,), echo=lines.append)
    names = [row["name"] for row in result["contenders"]]
    assert names[:5] == ["static", "adapted-l2sp", "scratch", "per-user-frequency", "global-frequency"]
    assert names[-1] == "oracle" and not any(name.startswith("river-") for name in names)
    by_name = {row["name"]: row for row in result["contenders"]}
    for row in result["contenders"]:
        assert 0.0 <= row["before"] <= 1.0 and 0.0 <= row["after_first_5k"] <= 1.0
    # The oracle learned the regime after the drift (on other events of it): it must beat the unchanged
    # source model there.
    assert by_name["oracle"]["after"] > by_name["static"]["after"]
    assert by_name["adapted-l2sp"]["before"] == by_name["static"]["before"] or by_name["adapted-l2sp"]["promotions"]
    assert [(row["span"], row["examples"]) for row in result["transfer_curve"]] == [("before", 250), ("after", 250)]
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "a.json").read_text()) == finite_or_null(result)  # spans it cannot score are null
    assert any(line.startswith("prequential accuracy") for line in lines)
    static_row = next(line for line in lines if line.startswith("static "))
    assert static_row.split()[4] == "–"  # this stream has no labels "later after" the drift: a dash, not nan
    assert [goal["goal"].split(" after")[0] for goal in result["goals"]][:2] == [
        "adapted-l2sp is at least static serving", "adapted-l2sp beats the naive frequency baselines"]


@pytest.mark.parametrize("task", ["next_category", "repurchase"])
def test_river_learners_serve_a_distribution_for_every_event_and_learn_from_revealed_labels(
        drifting_events, checkpoint, repurchase_checkpoint, task):
    # River's trees are slow on this many features: a short stretch of the stream is enough to check them.
    _, meta = load_checkpoint(checkpoint if task == "next_category" else repurchase_checkpoint)
    stream = build_stream(drifting_events[:600], meta, split_at=300)
    names = [name for name, _ in river_contenders(task)]
    assert names == ["river-adaptive-random-forest", "river-hoeffding-adaptive-tree",
                     "river-softmax-regression" if task == "next_category" else "river-logistic-regression"]
    uniform = np.full(len(meta.classes), 1.0 / len(meta.classes))
    for name, model in river_contenders(task):
        served = run_river(name, model, stream, len(meta.classes), meta.feature_spec.feature_names()).probabilities
        assert served.shape == (600, len(meta.classes))
        np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-4)
        assert np.allclose(served[0], uniform)  # nothing revealed yet
        assert not np.allclose(served[-1], uniform)  # labels were learnt


def test_the_frequency_baselines_are_each_users_own_history_and_everybodys(checkpoint):
    _, meta = load_checkpoint(checkpoint)
    known = meta.feature_spec.categories[:2]
    events = [PurchaseEvent.model_validate({"event_id": f"e{n}", "user_id": user, "item_id": "i", "category": category,
                                            "price": 3.0, "quantity": 1, "ts": f"2025-06-01T{n:02d}:00:00+00:00"})
              for n, (user, category) in enumerate([("a", known[0]), ("a", known[0]), ("b", known[1]), ("a", known[1])])]
    stream = build_stream(events, meta, split_at=2)
    per_user, everybody = run_frequency_baselines(stream, len(meta.classes), 3600.0)
    n_classes, first, second = len(meta.classes), meta.feature_spec.index_of(known[0]), meta.feature_spec.index_of(known[1])
    counts = np.ones(n_classes)  # add-one: no class is impossible
    counts[first] += 2
    counts[second] += 2
    np.testing.assert_allclose(everybody.probabilities[3], counts / counts.sum(), rtol=1e-6)  # all four purchases
    own = np.zeros(n_classes)
    own[first], own[second] = 2, 1
    expected = (own + 5.0 * counts / counts.sum()) / (3 + 5.0)
    np.testing.assert_allclose(per_user.probabilities[3], expected, rtol=1e-6)  # a's three, smoothed toward everybody's


def purchase(n, user, day):
    return PurchaseEvent.model_validate({"event_id": f"e{n}", "user_id": user, "item_id": "i", "price": 3.0,
                                         "quantity": 1, "ts": f"2025-06-{1 + day:02d}T12:00:00+00:00"})


def test_repurchase_labels_are_revealed_when_the_worker_would_know_them(repurchase_checkpoint):
    _, meta = load_checkpoint(repurchase_checkpoint)  # a 7-day horizon
    events = [purchase(0, "a", 0), purchase(1, "b", 0), purchase(2, "a", 2), purchase(3, "c", 4),
              purchase(4, "c", 8), purchase(5, "b", 9), purchase(6, "d", 20), purchase(7, "d", 21)]
    stream = build_stream(events, meta, split_at=None, allowed_lateness_s=3600.0)
    # a's purchase on day 0 is repurchased on day 2 (event 2); b's on day 0 is not within 7 days, and the
    # watermark passes its deadline (day 7, plus an hour) at c's purchase on day 8 (event 4), before b comes
    # back on day 9; c's on day 4 is repurchased on day 8; the deadlines of a's on day 2, c's on day 8 and
    # b's on day 9 have passed by d's purchase on day 20; d's on day 20 is repurchased on day 21, and the
    # one on day 21 is still open when the stream ends
    assert stream.labels.tolist() == [1, 0, 0, 1, 0, 0, 1, -1]
    assert stream.revealed_at.tolist() == [2, 4, 6, 4, 6, 6, 7, -1]
    # d's positive on day 20 is known, but a negative there would not be by the end: it is not scored
    assert stream.scored.tolist() == [True] * 6 + [False, False]


def test_a_repurchase_checkpoint_is_judged_on_auc_and_log_loss(drifting_events, repurchase_checkpoint, tmp_path):
    training = TrainingSettings(every_examples=800, min_examples=300, epochs=2)
    lines = []
    result = run_adaptation_bench(drifting_events, repurchase_checkpoint, 1500, training, strategies=("l2sp",),
                                  river="none", with_oracle=False, curve_sizes=(250,), curve_seeds=(0,),
                                  echo=lines.append)
    for row in result["contenders"]:
        assert 0.0 <= row["before"] <= 1.0 and 0.0 < row["before_log_loss"] < 10.0
    assert result["transfer_curve"][0].keys() >= {"transfer_auc", "scratch_auc"}
    static_goal = result["goals"][0]
    assert static_goal["goal"].startswith("adapted-l2sp is at least static") and "log-loss" in static_goal["figures"]
    assert any(line.startswith("prequential AUC") for line in lines)
    assert any(line.startswith("prequential log-loss") for line in lines)


def row(name, after, log_loss, later=float("nan")):
    return {"name": name, "after": after, "after_log_loss": log_loss, "after_later": later,
            "after_later_log_loss": float("nan")}


def test_goals_are_judged_from_the_figures():
    curve = [{"span": "before", "examples": 500, "transfer_minus_scratch": 0.08},
             {"span": "before", "examples": 2000, "transfer_minus_scratch": 0.031},
             {"span": "after", "examples": 500, "transfer_minus_scratch": 0.01}]
    table = [row("static", 0.30, 2.0), row("adapted-l2sp", 0.297, 1.9, later=0.35),
             row("per-user-frequency", 0.29, 2.1), row("global-frequency", 0.2, 2.3),
             row("river-softmax-regression", 0.31, 1.95), row("oracle", 0.36, 1.8, later=0.365)]
    static_goal, baselines, river, oracle, before, after = goals(table, curve, "l2sp", "next_category", True)
    assert static_goal["met"] and "(static)" in static_goal["figures"]  # 0.3 points lower is within the tie
    assert baselines["met"] and "(per-user-frequency)" in baselines["figures"]
    assert not river["met"] and "river-softmax-regression" in river["figures"]  # a higher accuracy than adapted
    assert oracle["met"] and "-1.5 points" in oracle["figures"]
    assert before["met"] and not after["met"] and "+1.0 at 500" in after["figures"]
    table[1] = row("adapted-l2sp", 0.30, 2.01, later=0.30)
    static_goal, _, _, oracle = goals(table, [], "l2sp", "next_category", True)
    assert not static_goal["met"] and not oracle["met"]  # a worse log-loss than static is not "at least static"
    assert len(goals(table, [], "l2sp", "next_category", False)) == 3  # the oracle goal is the generated stream's


def test_a_figure_that_is_undefined_leaves_its_goal_unjudged():
    nan = float("nan")
    table = [row("static", nan, 0.50), row("adapted-l2sp", nan, 0.40), row("river-logistic-regression", 0.7, 0.45),
             row("oracle", 0.8, 0.3)]
    static_goal, river_goal, oracle_goal = goals(table, [], "l2sp", "repurchase", True)
    assert static_goal["met"] is None and river_goal["met"] is None
    assert oracle_goal["met"] is None and oracle_goal["figures"].startswith("the stream has no more than")


def test_a_stream_the_bench_cannot_judge_is_refused_before_any_replay(drifting_events, checkpoint):
    training = TrainingSettings()
    with pytest.raises(ValueError, match="the split at event 5,000 is outside the stream's 3,000 events"):
        run_adaptation_bench(drifting_events, checkpoint, 5000, training, echo=lambda line: None)
    with pytest.raises(ValueError, match=r"only \d+ events from the split at event 30 on get a next_category label"):
        run_adaptation_bench(drifting_events[:60], checkpoint, 30, training, echo=lambda line: None)


def test_the_through_worker_printout_says_when_the_adapted_worker_never_left_the_source():
    from benchmarks.adaptation_e2e import print_through_worker

    def result(adapted_versions):
        row = {"after": 0.75, "after_log_loss": 0.56}
        return {"through_worker": [{**row, "name": "worker-static", "model_versions": ["src-a"]},
                                   {**row, "name": "worker-adapted", "model_versions": adapted_versions}],
                "static_agreement": {"agree": True, "compared": 10, "missing": 0, "largest_score_difference": 0.0,
                                     "predicted_class_differs_share": 0.0}}

    lines = []
    print_through_worker(result(["src-a"]), "auc", lines.append)
    assert lines[-1].startswith("note: the adapted worker served the source model alone")
    lines = []
    print_through_worker(result(["src-a", "v1"]), "auc", lines.append)
    assert lines[-1].startswith("static through the worker and in the replay agree: 10 predictions compared")


def test_the_through_worker_run_reads_its_trainers_decisions_from_the_worker_log(tmp_path):
    from benchmarks.adaptation_e2e import _trainer_decisions

    log = tmp_path / "worker-adapted.log"
    log.write_text(
        "2026-12-08 03:41:09,261 INFO streamadapt.training.trainer: fine-tune (4525 new examples): l2sp on 7816 settled\n"
        "2026-12-08 03:41:11,249 INFO streamadapt.training.trainer: v1 rejected: fine-tuned: log-loss 0.5299\n"
        "2026-12-08 03:41:12,000 INFO streamadapt.serving.hotswap: now serving model v1 (promoted elsewhere)\n"
        "2026-12-08 03:41:13,000 INFO streamadapt.training.trainer: fine-tune skipped (2000 new examples): 0 examples\n"
        "2026-12-08 03:41:14,000 INFO streamadapt.training.trainer: v2 promoted: recalibrated: log-loss 0.4662\n"
        "2026-12-08 03:41:15,000 WARNING streamadapt.training.trainer: src-1 is champion again instead of v2: back\n")
    assert _trainer_decisions(log) == [
        "v1 rejected: fine-tuned: log-loss 0.5299",
        "fine-tune skipped (2000 new examples): 0 examples",
        "v2 promoted: recalibrated: log-loss 0.4662",
        "src-1 is champion again instead of v2: back",
    ]
