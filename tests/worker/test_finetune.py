"""Fine-tuning contract: the source is untouched, inputs are not mutated, a seed repeats, the strategies
differ as documented, and a candidate trained on shuffled labels does not pass the gate."""
import numpy as np
import pytest

from worker.finetune import FineTuneConfig, FineTuneError, _validation_split, fine_tune
from worker.model import load_checkpoint
from worker.pretrain import build_examples, read_events
from worker.promotion import decide, example_losses, prior_probabilities


@pytest.fixture(scope="module")
def setup(checkpoint, source_events, tmp_path_factory):
    from worker.generate import write_events

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


def test_head_strategy_moves_only_the_head(setup):
    model, _, examples = setup
    tuned = run(model, examples.features[:1500], examples.labels[:1500], strategy="head")
    head = {id(w) for w in model.get_layer("head").weights}
    for variable, source, new in zip(model.weights, model.get_weights(), tuned):
        assert np.array_equal(source, new) != (id(variable) in head), variable.path


def test_l2sp_stays_closer_to_the_source_than_full(setup):
    model, _, examples = setup
    x, y = examples.features[:2000], examples.labels[:2000]
    source = model.get_weights()

    def distance(weights):
        return sum(float(np.sum((a - b) ** 2)) for a, b in zip(weights[:-2], source[:-2]))

    free = run(model, x, y, strategy="l2sp", l2sp_weight=0.0, learning_rate=1e-3)
    pulled = run(model, x, y, strategy="l2sp", l2sp_weight=1.0, learning_rate=1e-3)
    assert distance(pulled) < distance(free)


def test_early_stopping_keeps_a_run_on_noise_from_fitting_it(setup):
    """Labels that are noise: training on and on memorises them; early stopping stops near the start and
    keeps the best epoch, so on fresh examples its loss is lower."""
    model, _, examples = setup
    rng = np.random.default_rng(1)
    x = examples.features[:600]
    y = rng.integers(0, 21, 600)
    fresh_x, fresh_y = examples.features[600:1600], rng.integers(0, 21, 1000)
    stopped = run(model, x, y, strategy="full", learning_rate=1e-2, epochs=60, patience=2)
    memorised = run(model, x, y, strategy="full", learning_rate=1e-2, epochs=60, validation_share=0.0)
    scratch = __import__("tensorflow").keras.models.clone_model(model)

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
    candidate = run(model, examples.features[:split], shuffled, strategy="full", learning_rate=1e-2)
    held_x, held_y = examples.features[split:], examples.labels[split:]
    scratch = __import__("tensorflow").keras.models.clone_model(model)

    def score(weights):
        scratch.set_weights(weights)
        return example_losses(scratch.predict(held_x, verbose=0), held_y)

    prior = example_losses(prior_probabilities(shuffled, len(meta.classes), len(held_y)), held_y)
    champion = run(model, examples.features[:split], examples.labels[:split])  # an adapted model serving now
    assert decide(score(champion), score(model.get_weights()), prior, 0.01, 3.0).promote  # the gate is not merely closed
    assert not decide(score(candidate), score(champion), prior, 0.01, 3.0).promote


def test_calibrate_moves_only_the_output_and_refits_its_scale_and_class_rates(setup):
    """`calibrate` keeps the source's logits up to one scale and per-class offsets: fitted to labels drawn from
    the source's own probabilities it stays the source; fitted to labels drawn from sharper, shifted
    probabilities it finds them again."""
    model, meta, examples = setup
    x = examples.features[:5000]
    rng = np.random.default_rng(0)
    source_p = model.predict(x, verbose=0, batch_size=4096).astype(np.float64)
    source_logits = np.log(source_p)

    def draw(logits):
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return np.array([rng.choice(p.shape[1], p=row) for row in p]), p

    def served(weights):
        return predictions(model, weights, x)

    own_labels, _ = draw(source_logits)
    kept = run(model, x, own_labels, strategy="calibrate")
    assert all(np.array_equal(a, b) for a, b in zip(kept[:-2], model.get_weights()[:-2]))  # the base is the source's
    assert np.mean(np.abs(served(kept) - source_p)) < 0.01

    offsets = rng.normal(0.0, 0.7, source_p.shape[1])
    shifted_labels, shifted_p = draw(1.6 * source_logits + offsets)
    refit = served(run(model, x, shifted_labels, strategy="calibrate"))
    assert np.mean(np.abs(refit - shifted_p)) < 0.25 * np.mean(np.abs(source_p - shifted_p))
    # the ranking within each class is the source's: log-odds against class 0 are affine in the source's
    for k in range(1, source_p.shape[1]):
        a, b = np.polyfit(source_logits[:, k] - source_logits[:, 0], np.log(refit[:, k] / refit[:, 0]), 1)
        np.testing.assert_allclose(np.log(refit[:, k] / refit[:, 0]), a * (source_logits[:, k] - source_logits[:, 0]) + b,
                                   atol=1e-3)


def test_calibrate_on_a_binary_head_refits_its_rate_and_keeps_the_order(repurchase_checkpoint, source_events):
    model, meta = load_checkpoint(repurchase_checkpoint)
    events, _ = read_events(source_events)
    x = build_examples(events, meta.feature_spec, "repurchase", 7.0).features[:4000]
    source_p = model.predict(x, verbose=0, batch_size=4096)[:, 0].astype(np.float64)
    logit = np.log(source_p / (1 - source_p))
    wanted = 1 / (1 + np.exp(-(0.7 * logit - 0.8)))  # flatter and rarer than the source says
    labels = (np.random.default_rng(1).random(len(x)) < wanted).astype(np.int64)
    weights = fine_tune(model, x, labels, np.ones(len(x), np.float32), "repurchase", FineTuneConfig(strategy="calibrate"))
    refit = predictions(model, weights, x)[:, 0]
    assert np.mean(np.abs(refit - wanted)) < 0.25 * np.mean(np.abs(source_p - wanted))
    order = np.argsort(source_p, kind="stable")
    assert np.all(np.diff(refit[order]) >= -1e-6)  # the source's ranking, so its AUC, is kept


def test_a_round_sends_the_fleet_back_to_the_source_when_the_source_beats_the_champion(setup):
    """A champion gone bad (its output scrambled) and a candidate taught nonsense (every training label the
    same class): the source checkpoint beats both on the holdout, so the round returns to it; with the
    source as champion there is nothing to go back to."""
    from worker.candidate import Scorer, fine_tune_round
    from worker.examples import Example
    from worker.settings import TrainingSettings

    model, meta, examples = setup
    n = 3000
    window = [Example(f"e{i}", float(examples.ts_s[i]), "v1", examples.features[i], np.zeros(len(meta.classes)),
                      0 if i < int(n * 0.8) else int(examples.labels[i]), float(examples.ts_s[i]))
              for i in range(n)]  # one class to train on, the true labels held out
    bad = model.get_weights()
    bad[-2] = np.random.default_rng(1).normal(0.0, 1.0, bad[-2].shape).astype(np.float32)
    training = TrainingSettings(epochs=2)
    scorer = Scorer(model, meta)
    gone_bad = fine_tune_round(model, bad, window, "next_category", len(meta.classes), training, scorer)
    assert gone_bad.back_to_source and not gone_bad.decision.promote
    assert gone_bad.decision.reason.startswith("back to the source checkpoint")
    assert gone_bad.scores["source"]["log_loss"] < gone_bad.scores["champion"]["log_loss"]
    source_champion = fine_tune_round(model, None, window, "next_category", len(meta.classes), training, scorer)
    assert not source_champion.back_to_source and "source" not in source_champion.scores
