"""Is a latency change real? A factor threshold and a rank test, as asv decides.

A change counts only when the ratio of medians exceeds the threshold *and* a two-sided
Mann–Whitney U test on the raw samples gives p below `alpha` (asv's rule; its default alpha is
0.002). The rank test makes no normality assumption, so heavy tails and outlier blocks do not
fool it, and with tiny sample counts it cannot reach significance at all (3 against 3 samples
give p ≥ 0.1), which is the honest answer: not enough evidence. The threshold guards against
the opposite failure: with hundreds of tight samples a 1% drift is "significant" but not a
regression anyone should be paged for.

Paired samples (two versions timed in the same rounds) get the paired counterpart: the median
of the per-round ratios and a Wilcoxon signed-rank test on their logarithms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import mannwhitneyu, wilcoxon

from condconv_bench.settings import DEFAULT_ALPHA
from condconv_bench.timing.samples import median

Direction = Literal["slower", "faster", "unchanged"]


@dataclass(frozen=True)
class SampleChange:
    """`after` against `before`: ratio of medians and the rank test's two-sided p-value."""

    ratio: float
    p_value: float

    def direction(self, threshold: float, alpha: float = DEFAULT_ALPHA) -> Direction:
        """`slower` when ratio > 1 + threshold and p < alpha; `faster` symmetrically (ratio < 1/(1 + threshold))."""
        if self.p_value < alpha and self.ratio > 1 + threshold:
            return "slower"
        if self.p_value < alpha and self.ratio < 1 / (1 + threshold):
            return "faster"
        return "unchanged"


def compare_samples(before: np.ndarray | list[float], after: np.ndarray | list[float]) -> SampleChange:
    """Ratio of medians (after / before) and the Mann–Whitney U p-value of the two samples."""
    before = np.asarray(before, dtype=float)
    after = np.asarray(after, dtype=float)
    if len(before) == 0 or len(after) == 0:
        raise ValueError("both samples need at least one value")
    ratio = median(after) / median(before)
    if len(before) < 2 or len(after) < 2 or np.ptp(np.concatenate([before, after])) == 0:
        return SampleChange(ratio, 1.0)
    return SampleChange(ratio, float(mannwhitneyu(after, before, alternative="two-sided").pvalue))


def compare_paired(ratios: np.ndarray | list[float]) -> SampleChange:
    """Median of paired ratios (after / before, one per round) and the signed-rank p-value of their logs."""
    ratios = np.asarray(ratios, dtype=float)
    if len(ratios) == 0:
        raise ValueError("need at least one paired ratio")
    logs = np.log(ratios)
    if len(ratios) < 2 or not np.any(logs):
        return SampleChange(median(ratios), 1.0)
    return SampleChange(median(ratios), float(wilcoxon(logs).pvalue))
