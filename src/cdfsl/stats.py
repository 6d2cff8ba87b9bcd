"""Episode statistics as the field reports them: mean accuracy and the 95% interval half-width, in percent.

Also paired comparisons of two methods on the episodes both ran (differences in percentage points). The two
intervals follow two rules on purpose: a run's mean uses the field's `1.96 · std / sqrt(n)` (ddof = 0), so reported
accuracies are comparable with the papers' over 400 or 800 episodes; a paired difference, often taken over a few
episodes of an ablation, uses Student's t interval `t_{0.975, n−1} · s / sqrt(n)` (s with ddof = 1), right at small
n and equal to the normal one in the limit. `cdfsl report --paired` and `cdfsl compare` both read `paired_difference`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t
from scipy.stats import wilcoxon

Z95 = 1.96
_TIE_DECIMALS = 10


def mean_ci95(accuracies: Sequence[float]) -> tuple[float, float]:
    """Mean and `1.96 · std / sqrt(n)` (numpy's default std, ddof=0) of accuracies in [0, 1], both in percent.

    An empty sequence gives (nan, nan); a single episode gives a half-width of 0.
    """
    values = np.asarray(accuracies, dtype=np.float64) * 100.0
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(Z95 * values.std() / np.sqrt(values.size))


@dataclass(frozen=True)
class PairedStats:
    """A method against a baseline on the episodes both ran, in percentage points.

    `mean_diff` and `ci95` are the mean of the per-episode differences `a − b` and the half-width of their 95%
    Student's t interval (`t_ci95`; NaN for a single episode, where it is undefined). `p_value` is the two-sided
    Wilcoxon signed-rank test of the differences (scipy's default `zero_method="wilcox"`: zero differences are
    dropped); it is NaN when fewer than two episodes are shared or every difference is zero, where the test is
    undefined. `shared`
    counts the matched episodes; `only_a` and `only_b` count the episodes only one side has, which the
    statistics leave out.
    """

    mean_diff: float
    ci95: float
    p_value: float
    shared: int
    only_a: int
    only_b: int

    @property
    def unequal(self) -> bool:
        """True when the two episode sets differ, so only the shared episodes were compared."""
        return self.only_a > 0 or self.only_b > 0


def episode_differences(a: Mapping[int, float], b: Mapping[int, float]) -> dict[int, float]:
    """Episode index → `a[i] − b[i]` in percentage points, for every episode both have, in episode order.

    Accuracies are fractions in [0, 1]. Differences are rounded to 1e-10 points, so equal differences that
    float arithmetic would make differ in the last bits count as ties in the signed-rank test.
    """
    shared = sorted(set(a) & set(b))
    return {i: round((a[i] - b[i]) * 100.0, _TIE_DECIMALS) for i in shared}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> PairedStats:
    """Compare per-episode accuracies `a` (a method) with `b` (its baseline) on their shared episodes.

    See `PairedStats` for the definitions. No shared episodes gives NaN statistics and `shared == 0`.
    """
    diffs = np.fromiter(episode_differences(a, b).values(), dtype=np.float64)
    n = int(diffs.size)
    only_a, only_b = len(set(a) - set(b)), len(set(b) - set(a))
    if n == 0:
        return PairedStats(float("nan"), float("nan"), float("nan"), 0, only_a, only_b)
    return PairedStats(float(diffs.mean()), t_ci95(diffs), _wilcoxon_p(diffs), n, only_a, only_b)


def t_ci95(values: Sequence[float] | np.ndarray) -> float:
    """Half-width of the 95% Student's t interval of the mean of `values`: `t_{0.975, n−1} · s / sqrt(n)`, `s` the
    sample standard deviation (ddof = 1). NaN below two values."""
    array = np.asarray(values, dtype=np.float64)
    n = int(array.size)
    if n < 2:
        return float("nan")
    return float(student_t.ppf(0.975, n - 1) * array.std(ddof=1) / np.sqrt(n))


def _wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; NaN where the test is undefined."""
    if diffs.size < 2 or not np.any(diffs != 0.0):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-sample notes of older scipy versions
        try:
            return float(wilcoxon(diffs, alternative="two-sided").pvalue)
        except ValueError:
            return float("nan")
