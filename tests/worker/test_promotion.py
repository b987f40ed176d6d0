import numpy as np
import pytest

from worker.promotion import decide, example_losses, prior_probabilities

RNG = np.random.default_rng(0)
BASE = RNG.exponential(1.0, 2000)  # per-example losses of a champion on a holdout
PRIOR = BASE + 1.0


@pytest.mark.parametrize("candidate, margin, promote", [
    (BASE - 0.2, 0.01, True),                             # clearly and consistently better
    (BASE - 0.005, 0.01, False),                          # better, but less than the margin
    (BASE + 0.1, 0.01, False),                            # worse
    (BASE.copy(), 0.0, False),                            # a tie never promotes
    (BASE - 0.03 + RNG.normal(0, 3.0, 2000), 0.01, False),  # better on average, but within the holdout's noise
])
def test_gate_against_the_champion(candidate, margin, promote):
    decision = decide(candidate, BASE, PRIOR, margin, 3.0)
    assert decision.promote is promote and decision.reason


def test_the_gain_needs_z_standard_errors():
    noise = RNG.normal(0.0, 1.0, 2000)
    noise = (noise - noise.mean()) / noise.std(ddof=1)  # exactly unit spread: the gain's SE is 1 / sqrt(2000)
    candidate = BASE - 2.5 / np.sqrt(2000) - noise  # a mean gain of 2.5 SE over the champion
    assert decide(candidate, BASE, PRIOR, 0.0, 2.0).promote
    refused = decide(candidate, BASE, PRIOR, 0.0, 3.0)
    assert not refused.promote and "> 3 x SE 0.0224" in refused.reason


def test_a_candidate_no_better_than_the_label_prior_is_rejected_even_against_a_bad_champion():
    decision = decide(PRIOR - 0.001, PRIOR + 2.0, PRIOR, 0.01, 3.0)
    assert not decision.promote and "label prior" in decision.reason


@pytest.mark.parametrize("candidate", [np.array([]), np.array([0.1, np.nan]), np.array([np.inf, 0.2])])
def test_missing_or_non_finite_scores_never_promote(candidate):
    assert not decide(candidate, np.ones(len(candidate)), np.ones(len(candidate)), 0.01, 3.0).promote


def test_example_losses_and_prior():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])
    np.testing.assert_allclose(example_losses(probabilities, np.array([0, 1])), -np.log([0.9, 0.8]))
    np.testing.assert_allclose(prior_probabilities(np.array([0, 0, 2]), 3, 2), [[0.5, 1 / 6, 1 / 3]] * 2)


def test_a_binary_candidate_that_ranks_worse_than_the_champion_is_not_promoted_for_its_log_loss():
    better_log_loss = BASE - 0.2
    assert decide(better_log_loss, BASE, PRIOR, 0.01, 3.0, ranking=(0.78, 0.77)).promote
    assert decide(better_log_loss, BASE, PRIOR, 0.01, 3.0, ranking=(0.77, 0.77)).promote  # ranking as well is enough
    refused = decide(better_log_loss, BASE, PRIOR, 0.01, 3.0, ranking=(0.7785, 0.7792))
    assert not refused.promote and "ranks worse than the champion: AUC 0.7785 against 0.7792" in refused.reason
    assert not decide(BASE + 0.1, BASE, PRIOR, 0.01, 3.0, ranking=(0.9, 0.7)).promote  # ranking alone never promotes
