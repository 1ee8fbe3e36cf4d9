"""Paired ratios with confidence intervals that count the process as a level of variance.

A ratio sample is one implementation's per-call time over a reference's (the floor, or the
fastest strategy) in the same round of the same process. The estimate is the median of all
samples. Its 95% interval comes from a two-level bootstrap, as Kalibera & Jones recommend for
benchmarks with several levels of repetition: resample the processes, then the rounds inside
each chosen process. When processes disagree (one got huge pages, another did not), the interval
widens to cover them; a one-level bootstrap over the pooled rounds would instead report the
mixture as a precise value, which a second invocation would not reproduce.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from condconv_bench.timing.rounds import Round
from condconv_bench.timing.samples import median

CONFIDENCE = 0.95
RESAMPLES = 2000
BOOTSTRAP_SEED = 20191  # the bootstrap is seeded: the same samples always give the same verdict


@dataclass(frozen=True)
class Interval:
    """A ratio's median and its confidence interval."""

    estimate: float
    low: float
    high: float

    @property
    def relative_half_width(self) -> float:
        """How far the interval reaches from the estimate, as a fraction of it (the larger side)."""
        return max(self.high / self.estimate - 1, 1 - self.low / self.estimate)


def paired_ratios(rounds: Iterable[Round], key: str, reference: str) -> list[float]:
    """`key`'s per-call time over `reference`'s in each round that timed both: the paired samples."""
    return [r.per_call_s[key] / r.per_call_s[reference] for r in rounds if key in r.per_call_s and reference in r.per_call_s]


def process_medians(values: np.ndarray, processes: np.ndarray) -> np.ndarray:
    """The median ratio of each process, in process order."""
    return np.array([median(values[processes == p]) for p in np.unique(processes)])


def hierarchical_interval(values: np.ndarray, processes: np.ndarray, rng: np.random.Generator,
                          confidence: float = CONFIDENCE, resamples: int = RESAMPLES) -> Interval:
    """Median of `values` with a bootstrap interval resampling processes, then rounds within them."""
    values = np.asarray(values, dtype=float)
    processes = np.asarray(processes)
    estimate = median(values)
    groups = [values[processes == p] for p in np.unique(processes)]
    width = max(len(g) for g in groups)
    # One row per process, padded with NaN; each resample draws processes, then rounds inside each.
    padded = np.full((len(groups), width), np.nan)
    for row, group in enumerate(groups):
        padded[row, : len(group)] = group
    sizes = np.array([len(g) for g in groups])
    chosen = rng.integers(0, len(groups), size=(resamples, len(groups)))
    positions = (rng.random((resamples, len(groups), width)) * sizes[chosen][:, :, None]).astype(int)
    drawn = padded[chosen[:, :, None], positions]
    drawn[np.arange(width)[None, None, :] >= sizes[chosen][:, :, None]] = np.nan
    medians = np.nanmedian(drawn.reshape(resamples, -1), axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return Interval(estimate, float(min(low, estimate)), float(max(high, estimate)))


def is_tied(ratio_to_best: Interval, margin: float) -> bool:
    """Tied with the fastest unless surely slower than it by more than `margin`.

    "Surely" is the interval's lower end above `1 + margin`: a gap the interval cannot exclude,
    or one smaller than the margin, is not a verdict a second run would reproduce.
    """
    return ratio_to_best.low <= 1 + margin
