import math

import numpy as np
import pytest

from worker.promotion import decide, prior_probabilities

PRIOR = {"log_loss": 2.0}


@pytest.mark.parametrize("candidate, champion, margin, promote", [
    (0.90, 1.00, 0.01, True),
    (0.995, 1.00, 0.01, False),   # better, but not by the margin
    (1.10, 1.00, 0.01, False),
    (0.50, 0.50, 0.0, False),     # a tie never promotes
    (math.nan, 1.00, 0.01, False),
    (math.inf, 1.00, 0.01, False),
    (0.80, math.nan, 0.01, True),
])
def test_gate_against_the_champion(candidate, champion, margin, promote):
    decision = decide({"log_loss": candidate}, {"log_loss": champion}, PRIOR, margin)
    assert decision.promote is promote and decision.reason


def test_a_candidate_no_better_than_the_label_prior_is_rejected_even_against_a_bad_champion():
    decision = decide({"log_loss": 1.99}, {"log_loss": 3.5}, {"log_loss": 2.0}, 0.01)
    assert not decision.promote and "label prior" in decision.reason


def test_missing_score_never_promotes():
    assert not decide({}, {"log_loss": 1.0}, PRIOR, 0.01).promote


def test_prior_probabilities_are_smoothed_class_frequencies():
    p = prior_probabilities(np.array([0, 0, 2]), n_classes=3, n_rows=2)
    np.testing.assert_allclose(p, [[0.5, 1 / 6, 1 / 3]] * 2)
