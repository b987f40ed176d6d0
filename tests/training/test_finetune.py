"""Fine-tuning contract: the source is untouched, inputs are not mutated, a seed repeats, the strategies
differ as documented, and a candidate trained on shuffled labels does not pass the gate."""
import numpy as np
import pytest

from streamadapt.core.promotion import decide, example_losses, prior_probabilities
from streamadapt.model.checkpoint import Parameters, load_checkpoint
from streamadapt.training.finetune import (
    FineTuneConfig,
    FineTuneError,
    _validation_split,
    fine_tune,
    head_layers,
)
from streamadapt.training.pretrain import build_examples, read_events


@pytest.fixture(scope="module")
def setup(checkpoint, source_events, tmp_path_factory):
    from streamadapt.ops.generate import write_events

    model, meta = load_checkpoint(checkpoint)
    target = tmp_path_factory.mktemp("target") / "target.jsonl"
    write_events(target, events=5000, market="target", drift_at=0, seed=8)
    events, _ = read_events(target)
    examples = build_examples(events, meta.feature_spec, "next_category", 7.0)
    return model, meta, examples


def predictions(model, weights, x):
    import tensorflow as tf

    copy = tf.keras.models.clone_model(model)
    copy.set_weights(weights)
    return copy.predict(x, verbose=0, batch_size=4096).astype(np.float64)


def run(model, x, y, **changes):
    return fine_tune(model, x, y, np.ones(len(y), np.float32), "next_category", FineTuneConfig(**{"epochs": 2, **changes}))


def test_source_model_and_inputs_are_not_changed_and_seed_repeats(setup):
    model, _, examples = setup
    x, y = examples.features[:2000], examples.labels[:2000]
    x_before, y_before, source_before = x.copy(), y.copy(), model.get_weights()
    first = run(model, x, y, seed=3)
    second = run(model, x, y, seed=3)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), source_before))
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(first, second))


def test_the_head_is_the_layers_with_weights_nearest_the_output(checkpoint, repurchase_checkpoint):
    assert sorted(head_layers(load_checkpoint(checkpoint)[0])) == ["class_score", "context_logits"]  # added logits
    assert head_layers(load_checkpoint(repurchase_checkpoint)[0]) == ["head"]


def head_weight_ids(model) -> set[int]:
    return {id(w) for name in head_layers(model) for w in model.get_layer(name).weights}


def test_head_strategy_moves_only_the_head(setup):
    model, _, examples = setup
    tuned = run(model, examples.features[:1500], examples.labels[:1500], strategy="head")
    head = head_weight_ids(model)
    for variable, source, new in zip(model.weights, model.get_weights(), tuned):
        assert np.array_equal(source, new) != (id(variable) in head), variable.path


def test_l2sp_stays_closer_to_the_source_than_full(setup):
    model, _, examples = setup
    x, y = examples.features[:2000], examples.labels[:2000]
    source = model.get_weights()
    base = [id(variable) not in head_weight_ids(model) for variable in model.weights]

    def distance(weights):
        return sum(float(np.sum((a - b) ** 2)) for a, b, pulled in zip(weights, source, base) if pulled)

    free = run(model, x, y, strategy="l2sp", l2sp_weight=0.0, learning_rate=1e-3)
    pulled = run(model, x, y, strategy="l2sp", l2sp_weight=1.0, learning_rate=1e-3)
    assert distance(pulled) < distance(free)


def test_early_stopping_keeps_a_run_on_noise_from_fitting_it(setup):
    """Labels that are noise, and a network wide enough to memorise them: training on and on memorises them;
    early stopping stops near the start and keeps the best epoch, so on fresh examples its loss is lower."""
    import tensorflow as tf

    _, _, examples = setup
    inputs = tf.keras.Input(shape=(examples.features.shape[1],))
    wide = tf.keras.Model(inputs, tf.keras.layers.Dense(21, activation="softmax")(
        tf.keras.layers.Dense(512, activation="relu")(inputs)))
    rng = np.random.default_rng(1)
    standardised = (examples.features - examples.features.mean(axis=0)) / (examples.features.std(axis=0) + 1e-6)
    x = standardised[:600]  # as a real model's normalisation layer would see them
    y = rng.integers(0, 21, 600)
    fresh_x, fresh_y = standardised[600:1600], rng.integers(0, 21, 1000)
    stopped = run(wide, x, y, strategy="full", learning_rate=1e-2, epochs=60, patience=2)
    memorised = run(wide, x, y, strategy="full", learning_rate=1e-2, epochs=60, validation_share=0.0)
    scratch = tf.keras.models.clone_model(wide)

    def fresh_loss(weights):
        scratch.set_weights(weights)
        return float(np.mean(example_losses(scratch.predict(fresh_x, verbose=0), fresh_y)))

    assert fresh_loss(stopped) < fresh_loss(memorised) - 0.1


def test_the_validation_split_is_disjoint_and_none_when_too_small():
    train, held = _validation_split(1000, 0.15, seed=0)
    assert len(held) == 150 and not set(train) & set(held) and set(train) | set(held) == set(range(1000))
    train, held = _validation_split(100, 0.15, seed=0)  # 15 rows would judge epochs by noise
    assert len(held) == 0 and list(train) == list(range(100))


def test_non_finite_training_data_fails_the_run(setup):
    model, _, examples = setup
    x = examples.features[:500].copy()
    x[0, 0] = np.nan
    with pytest.raises(FineTuneError):
        run(model, x, examples.labels[:500])


def test_a_candidate_trained_on_shuffled_labels_is_rejected_by_the_gate(setup):
    model, meta, examples = setup
    split = int(len(examples.labels) * 0.8)
    shuffled = np.random.default_rng(0).permutation(examples.labels[:split])
    # from random weights: started from the source, two epochs of noise leave its knowledge of users standing
    candidate = run(model, examples.features[:split], shuffled, strategy="full", learning_rate=1e-2, from_scratch=True)
    held_x, held_y = examples.features[split:], examples.labels[split:]
    scratch = __import__("tensorflow").keras.models.clone_model(model)

    def score(weights):
        scratch.set_weights(weights)
        return example_losses(scratch.predict(held_x, verbose=0), held_y)

    prior = example_losses(prior_probabilities(shuffled, len(meta.classes), len(held_y)), held_y)
    champion = run(model, examples.features[:split], examples.labels[:split])  # an adapted model serving now
    assert decide(score(champion), score(model.get_weights()), None, 3.0).promote  # the gate is not merely closed
    refused = decide(score(candidate), score(champion), prior, 3.0)
    assert not refused.promote and "gain over the label prior" in refused.reason


def test_calibrate_keeps_the_source_weights_and_has_no_scratch_form(setup):
    model, _, examples = setup
    kept = run(model, examples.features[:500], examples.labels[:500], strategy="calibrate")
    assert all(np.array_equal(a, b) for a, b in zip(kept, model.get_weights()))
    with pytest.raises(ValueError, match="no from-scratch form"):
        run(model, examples.features[:500], examples.labels[:500], strategy="calibrate", from_scratch=True)


def test_a_round_sends_the_fleet_back_to_the_source_when_the_source_beats_the_champion(setup):
    """A champion gone bad (its output scrambled) and a candidate taught nonsense (every training label the
    same class): the source checkpoint beats both on the holdout, so the round returns to it; with the
    source as champion there is nothing to go back to."""
    from streamadapt.core.examples import Example
    from streamadapt.settings import TrainingSettings
    from streamadapt.training.candidate import Scorer, fine_tune_round

    model, meta, examples = setup
    n = 3000
    window = [Example(f"e{i}", float(examples.ts_s[i]), "v1", examples.features[i], np.zeros(len(meta.classes)),
                      0 if i < int(n * 0.8) else int(examples.labels[i]), float(examples.ts_s[i]))
              for i in range(n)]  # one class to train on, the true labels held out
    head = head_weight_ids(model)
    bad = Parameters([np.random.default_rng(1).normal(0.0, 1.0, w.shape).astype(np.float32) if id(v) in head else w
                      for v, w in zip(model.weights, model.get_weights())])
    training = TrainingSettings(epochs=2)
    scorer = Scorer(model, meta)
    gone_bad = fine_tune_round(model, bad, window, "next_category", len(meta.classes), training, scorer)
    assert gone_bad.back_to_source and not gone_bad.decision.promote
    assert gone_bad.decision.reason.startswith("back to the source checkpoint")
    assert gone_bad.scores["source"]["log_loss"] < gone_bad.scores["champion"]["log_loss"]
    source_champion = fine_tune_round(model, None, window, "next_category", len(meta.classes), training, scorer)
    assert not source_champion.back_to_source and "source" not in source_champion.scores


def test_a_base_rate_that_moved_within_the_last_horizon_is_followed_from_its_unsettled_labels(repurchase_checkpoint,
                                                                                               source_events):
    """Settled labels drawn from the source's own probabilities: nothing to gain there. The purchases of the last
    horizon come back far more often, which only their unsettled labels show (repurchases seen so far): a round
    given them promotes the champion recalibrated to the new rate; a round without them keeps the champion."""
    from streamadapt.core.examples import Example
    from streamadapt.settings import TrainingSettings
    from streamadapt.training.candidate import Scorer, fine_tune_round

    model, meta = load_checkpoint(repurchase_checkpoint)
    events, _ = read_events(source_events)
    examples = build_examples(events, meta.feature_spec, "repurchase", 7.0)
    rng = np.random.default_rng(5)
    x = examples.features[:6000]
    p = model.predict(x, verbose=0, batch_size=4096)[:, 0].astype(np.float64)
    day, horizon = 86400.0, 7.0
    n_settled = 4000
    watermark = n_settled * 0.01 * day + horizon * day  # settled purchases 0.01 day apart, then a horizon of others
    settled = []
    for i in range(n_settled):
        positive = rng.random() < p[i]
        delay = rng.uniform(0.0, horizon) * day
        ts = i * 0.01 * day
        settled.append(Example(f"s{i}", ts, "v1", x[i], np.zeros(2, np.float32), int(positive), ts + (delay if positive else horizon * day)))
    shifted = 1.0 / (1.0 + np.exp(-(np.log(p / (1 - p)) + 1.5)))  # the new, higher rate
    recent = []
    for k, i in enumerate(range(n_settled, 6000)):
        ts = watermark - horizon * day + (k + 0.5) * (horizon * day / 2000)
        delay = rng.uniform(0.0, horizon) * day
        seen = rng.random() < shifted[i] and ts + delay <= watermark
        recent.append(Example(f"r{i}", ts, "v1", x[i], np.zeros(2, np.float32), 1 if seen else -1,
                              ts + delay if seen else None))
    training = TrainingSettings(epochs=2)
    scorer = Scorer(model, meta)
    informed = fine_tune_round(model, None, settled, "repurchase", 2, training, scorer, recent=recent,
                               watermark_s=watermark, horizon_days=horizon)
    assert informed.decision.promote and informed.contender == "recalibrated", informed.decision.reason
    assert informed.parameters.calibration[2] > 0.1  # a higher bias: more come back
    # the weights learn from the settled ones only; the holdout is the newest purchases, all still unsettled here
    assert informed.unsettled_examples == 2000 and informed.trained_examples == n_settled
    blind = fine_tune_round(model, None, settled, "repurchase", 2, training, scorer)
    assert not blind.decision.promote, blind.decision.reason
