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
    assert decide(score(champion), score(model.get_weights()), prior, 0.01).promote  # the gate is not merely closed
    assert not decide(score(candidate), score(champion), prior, 0.01).promote
