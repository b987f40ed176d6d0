import numpy as np
import pytest

from streamadapt.core.promotion import (
    Ranking,
    decide,
    example_losses,
    paired_gain,
    prior_probabilities,
)

RNG = np.random.default_rng(0)
BASE = RNG.exponential(1.0, 2000)  # per-example losses of a champion on a holdout
PRIOR = BASE + 1.0


def unit_noise(n: int, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, 1.0, n)
    return (noise - noise.mean()) / noise.std(ddof=1)  # exactly unit spread: a gain's SE is 1 / sqrt(n)


@pytest.mark.parametrize("candidate, promote", [
    (BASE - 0.2, True),                                   # clearly and consistently better
    (BASE - 0.005, True),                                 # a small gain, but the same on every example: real
    (BASE + 0.1, False),                                  # worse
    (BASE.copy(), False),                                 # a tie never promotes
    (BASE - 0.03 + RNG.normal(0, 3.0, 2000), False),      # better on average, but within the holdout's noise
])
def test_gate_against_the_champion(candidate, promote):
    decision = decide(candidate, BASE, PRIOR, 3.0)
    assert decision.promote is promote and decision.reason


def test_the_gain_needs_z_standard_errors_however_small_or_large():
    for gain_in_se in (4.0, 50.0):  # 4: the larger of the two standard errors is at most ~1.5 x the per-example one
        candidate = BASE - gain_in_se / np.sqrt(2000) - unit_noise(2000, 1)
        assert decide(candidate, BASE, PRIOR, 2.0).promote
    candidate = BASE - 2.5 / np.sqrt(2000) - unit_noise(2000, 1)
    refused = decide(candidate, BASE, PRIOR, 3.0)
    assert not refused.promote and "gain over the champion +0.0559 (SE 0.0236) needs > 3 x SE" in refused.reason


def test_a_minimum_gain_can_be_asked_on_top():
    candidate = BASE - 0.005
    assert decide(candidate, BASE, PRIOR, 3.0).promote
    refused = decide(candidate, BASE, PRIOR, 3.0, min_gain=0.01)
    assert not refused.promote and "and > 0.01" in refused.reason


def test_a_candidate_no_better_than_the_label_prior_is_rejected_even_against_a_bad_champion():
    decision = decide(PRIOR - 0.001 - unit_noise(2000, 2) * 0.5, PRIOR + 2.0, PRIOR, 3.0)
    assert not decision.promote and "gain over the label prior" in decision.reason
    assert "beats the champion" in decision.reason  # the figures it did pass are reported too


@pytest.mark.parametrize("candidate", [np.array([]), np.array([0.1, np.nan]), np.array([np.inf, 0.2])])
def test_missing_or_non_finite_scores_never_promote(candidate):
    assert not decide(candidate, np.ones(len(candidate)), np.ones(len(candidate)), 3.0).promote


def test_example_losses_prior_and_paired_gain():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])
    np.testing.assert_allclose(example_losses(probabilities, np.array([0, 1])), -np.log([0.9, 0.8]))
    np.testing.assert_allclose(prior_probabilities(np.array([0, 0, 2]), 3, 2), [[0.5, 1 / 6, 1 / 3]] * 2)
    gain, standard_error = paired_gain(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 5.0]))
    assert gain == pytest.approx(1.0) and standard_error == pytest.approx(np.std([1, 0, 2], ddof=1) / np.sqrt(3))


def ranking(shift: float, n: int = 4000, seed: int = 3) -> Ranking:
    """Holdout scores of a champion with a true AUC near 0.75, and of a candidate whose scores are the champion's
    plus `shift` times independent noise: the larger the shift, the worse it ranks."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    champion = labels * 1.0 + rng.normal(0, 1.4, n)
    return Ranking(champion + shift * rng.normal(0, 1.0, n), champion, labels)


def test_a_binary_candidate_is_refused_only_when_it_ranks_worse_beyond_the_noise():
    better_log_loss = BASE - 0.2
    tiny = decide(better_log_loss, BASE, PRIOR, 3.0, ranking=ranking(0.05))  # an AUC a hair lower
    assert tiny.promote and "ranks no worse: AUC difference -0.00" in tiny.reason
    refused = decide(better_log_loss, BASE, PRIOR, 3.0, ranking=ranking(3.0))  # far noisier scores
    assert not refused.promote and "ranks worse than the champion beyond the noise" in refused.reason
    assert "more than 2 x SE below" in refused.reason
    assert not decide(BASE + 0.1, BASE, PRIOR, 3.0, ranking=ranking(-0.5)).promote  # ranking alone never promotes


def test_a_gain_that_comes_in_stretches_of_the_holdout_needs_more_than_its_per_example_error():
    # 2,000 holdout examples in event-time order, ten days of 200. The candidate gains 0.01 nats on average,
    # but by the day: +0.11 on half the days, -0.09 on the other half (it learnt the last days' class rates).
    rng = np.random.default_rng(0)
    champion = np.full(2000, 2.0)
    by_day = np.repeat(np.where(np.arange(10) % 2 == 0, 0.11, -0.09), 200)
    noise = rng.normal(0.0, 0.05, 2000)
    gain, standard_error = paired_gain(champion - by_day - noise, champion)
    per_example = np.std(by_day + noise, ddof=1) / np.sqrt(2000)
    assert gain == pytest.approx(0.01, abs=0.005)
    assert gain > 2 * per_example  # the per-example error alone would promote it
    assert standard_error > 5 * per_example and gain < 2 * standard_error
    assert not decide(champion - by_day - noise, champion, None, z=2.0).promote
    # the same mean gain spread evenly over the days is promoted
    even = champion - 0.01 - noise
    assert decide(even, champion, None, z=2.0).promote
