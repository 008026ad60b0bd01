"""The statistics the benchmark and the toy world's fidelity report rest on, as pure numpy functions.

ROC-AUC says how well a score separates images a judge calls positive from the rest (0.5: not at all),
pooled or within groups (one prompt), since a score can rank prompts instead of images. Spearman's ρ says
whether validation rewards order training steps the way the ground truth does. Cohen's κ says how far two
judges' yes/no verdicts agree beyond chance. Bootstrap intervals over
subjects and paired differences against a baseline say whether a gap between methods is more than the
spread of subjects.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(score of a positive > score of a negative), ties counting one half; NaN without both classes."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def grouped_auc(scores: Sequence[float], labels: Sequence[bool], groups: Sequence[Hashable]) -> tuple[float, int]:
    """Mean AUC within groups that hold both classes, weighted by their positive x negative pairs, and how
    many groups counted: the separation that remains when the score cannot lean on which prompt it sees."""
    by_group: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    total, weight, counted = 0.0, 0, 0
    for idx in by_group.values():
        yy = y[idx]
        pairs = int(yy.sum()) * int((~yy).sum())
        if pairs:
            total += roc_auc(s[idx], yy) * pairs
            weight += pairs
            counted += 1
    return (total / weight if weight else float("nan")), counted


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); NaN when either side is constant."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs two sequences of one length, got {len(a)} and {len(b)}.")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Agreement of two raters' yes/no verdicts beyond what their rates alone give (1: always agree, 0: chance);
    NaN when chance agreement is already certain (both raters always say the same one thing)."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"cohen_kappa needs two non-empty sequences of one length, got {len(a)} and {len(b)}.")
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    observed = float((x == y).mean())
    chance = float(x.mean() * y.mean() + (1 - x.mean()) * (1 - y.mean()))
    return (observed - chance) / (1 - chance) if chance < 1 else float("nan")


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean over the given units (subjects)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(low), float(high)


def paired_comparison(
    method: Sequence[float], baseline: Sequence[float], level: float = 0.95, seed: int = 0
) -> dict[str, float | int | bool]:
    """A method against a baseline on the same subjects: mean difference with its bootstrap interval, the
    subjects it wins, ties and loses, and whether the interval excludes 0."""
    a, b = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_comparison needs one value per subject on both sides, got {a.shape} and {b.shape}.")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    mean, low, high = bootstrap_ci(diff, level=level, seed=seed)
    return {
        "mean_diff": mean,
        "ci_low": low,
        "ci_high": high,
        "wins": int((diff > 0).sum()),
        "ties": int((diff == 0).sum()),
        "losses": int((diff < 0).sum()),
        "subjects": int(keep.sum()),
        "excludes_zero": bool(low > 0 or high < 0),
    }
