"""The statistics against their definitions, computed the slow way."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rpo_diffusers.stats import (
    average_ranks,
    bootstrap_ci,
    cohen_kappa,
    grouped_auc,
    paired_comparison,
    roc_auc,
    spearman,
)


def _pairwise_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_is_the_probability_a_positive_outscores_a_negative_with_ties_halved():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    labels = rng.random(40) < 0.4
    assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)
    assert roc_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert roc_auc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert math.isnan(roc_auc([1, 2], [True, True]))


def test_grouped_auc_ignores_what_separates_groups():
    # within each prompt the score is useless (constant), but prompts with more positives score higher:
    # pooled AUC is high, within-prompt AUC is one half
    scores = [0.9] * 4 + [0.1] * 4
    labels = [True, True, True, False, True, False, False, False]
    groups = ["a"] * 4 + ["b"] * 4
    assert roc_auc(scores, labels) == 0.75
    auc, counted = grouped_auc(scores, labels, groups)
    assert auc == 0.5 and counted == 2
    assert grouped_auc([1, 2], [True, True], ["a", "a"])[1] == 0


def test_spearman_matches_pearson_on_ranks_and_handles_ties():
    a, b = [1, 2, 2, 3, 5], [10, 30, 20, 40, 50]
    ra, rb = average_ranks(a), average_ranks(b)
    assert list(ra) == [1, 2.5, 2.5, 4, 5]
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="one length"):
        spearman([1, 2], [1])


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_subjects():
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.5, 0.1, 5), rng.normal(0.5, 0.1, 200)
    m1, lo1, hi1 = bootstrap_ci(few)
    m2, lo2, hi2 = bootstrap_ci(many)
    assert lo1 < m1 < hi1 and lo2 < m2 < hi2
    assert hi2 - lo2 < (hi1 - lo1) / 2
    assert bootstrap_ci([0.3, 0.3, 0.3]) == (pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3))


def test_paired_comparison_counts_wins_and_says_whether_zero_is_excluded():
    base = [0.2, 0.4, 0.1, 0.5, 0.3, 0.2]
    better = [b + 0.1 for b in base]
    mixed = [0.3, 0.3, 0.2, 0.4, 0.3, 0.1]
    clear = paired_comparison(better, base)
    assert (clear["wins"], clear["losses"], clear["excludes_zero"]) == (6, 0, True)
    assert clear["mean_diff"] == pytest.approx(0.1)
    unclear = paired_comparison(mixed, base)
    assert (unclear["wins"], unclear["ties"], unclear["losses"]) == (2, 1, 3) and not unclear["excludes_zero"]


def test_cohen_kappa_discounts_the_agreement_that_the_rates_alone_give():
    a = [True] * 10 + [False] * 90
    assert cohen_kappa(a, a) == 1.0
    # a rater that always says no agrees 90% of the time with a, and no better than chance
    assert cohen_kappa(a, [False] * 100) == 0.0
    # independent raters with a's rate: agreement 0.82 by chance alone, kappa about 0
    b = [True] * 1 + [False] * 9 + [True] * 9 + [False] * 81
    assert sum(x == y for x, y in zip(a, b)) / 100 == pytest.approx(0.82)
    assert cohen_kappa(a, b) == pytest.approx(0.0)
    # by hand: 19 of 20 agree; rates 0.5 and 0.45 give chance 0.5 * 0.45 + 0.5 * 0.55 = 0.5; (0.95 - 0.5) / 0.5
    c, d = [True, True, False, False] * 5, [True, True, False, False] * 4 + [True, False, False, False]
    assert cohen_kappa(c, d) == pytest.approx(0.9)
    assert math.isnan(cohen_kappa([True] * 4, [True] * 4))
    with pytest.raises(ValueError, match="one length"):
        cohen_kappa([True], [True, False])
