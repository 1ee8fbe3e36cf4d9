"""Raw latency samples of one case, and the sample statistics every timed comparison reads.

One sample is one timed block: `number` back-to-back calls, timed together, divided by `number`.
Each sample remembers the worker process and the round it came from, because the process is a
level of variance of its own (allocator state, page placement, kernel paths): statistics that
ignore it overstate how sure a measurement is.

The statistics (`percentiles`, `median`, `spread`) are plain Python over a sorted list: autotune
reads them between its rounds, in the user's process, on a handful of values, where numpy's
per-call overhead (about 25 µs for a median of 20 values, 1 µs here) would eat into its budget.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property


def percentiles(values: Iterable[float], points: Sequence[float]) -> list[float]:
    """The `points` (0–100) percentiles, interpolated linearly between order statistics (numpy's
    default and `statistics.quantiles(method="inclusive")`); the 50th is exactly the median."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentiles of no values")
    found = []
    for point in points:
        position = (len(ordered) - 1) * point / 100
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        fraction = position - low
        found.append(float(ordered[low] * (1 - fraction) + ordered[high] * fraction))
    return found


def median(values: Iterable[float]) -> float:
    (middle,) = percentiles(values, (50,))
    return middle


def spread(values: Iterable[float]) -> float:
    """Interquartile range / median: how much the samples disagree, relative to their size."""
    low, middle, high = percentiles(values, (25, 50, 75))
    return (high - low) / middle


_REPORTED = (10, 25, 50, 75, 90)


@dataclass(frozen=True)
class Timing:
    """Per-call times (seconds), one per timed block, with the process and round of each."""

    times_s: tuple[float, ...]
    number_per_run: int  # calls per block (the median over processes; each sizes its own blocks)
    process: tuple[int, ...] = ()
    round: tuple[int, ...] = ()

    @cached_property
    def _percentiles(self) -> dict[int, float]:
        return dict(zip(_REPORTED, percentiles(self.times_s, _REPORTED)))

    @property
    def median_s(self) -> float:
        return self._percentiles[50]

    @property
    def iqr_s(self) -> float:
        return self._percentiles[75] - self._percentiles[25]

    @property
    def p10_s(self) -> float:
        return self._percentiles[10]

    @property
    def p90_s(self) -> float:
        return self._percentiles[90]

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.times_s)

    @property
    def processes(self) -> int:
        return len(set(self.process)) or 1
