"""Latency of one callable, measured by `torch.utils.benchmark` with the raw samples kept.

`torch.utils.benchmark.Timer` handles warm-up-free block sizing and CUDA synchronisation; its
`num_threads` defaults to 1, so the thread count is always passed explicitly and recorded.
`Timing` keeps what was measured (per-call times of each block) apart from the statistics derived
from it, which are computed on demand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from torch.utils import benchmark

NOISY_IQR_RATIO = 0.10  # IQR/median above this marks a measurement too noisy to trust (FIELD_NOTES §5)


@dataclass(frozen=True)
class Timing:
    """Per-call times (seconds), one per measured block of `number_per_run` calls."""

    times_s: tuple[float, ...]
    number_per_run: int

    @cached_property
    def _percentiles(self) -> dict[int, float]:
        values = np.percentile(np.asarray(self.times_s), [10, 25, 50, 75, 90])
        return dict(zip((10, 25, 50, 75, 90), map(float, values)))

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
        return float(np.mean(self.times_s))

    @property
    def total_timed_s(self) -> float:
        """Time spent inside measured blocks, for the runner's overhead accounting."""
        return float(np.sum(self.times_s)) * self.number_per_run

    @property
    def noisy(self) -> bool:
        return self.iqr_s > NOISY_IQR_RATIO * self.median_s


def measure(
    fn: Callable[[], object],
    *,
    threads: int,
    min_run_time: float,
    warmup: int = 2,
    timer: Callable[[], float] | None = None,
) -> Timing:
    """Time `fn` with blocked autorange after `warmup` untimed calls.

    `timer` replaces the clock (tests inject a fake one for exact expectations); by default
    torch's timer, which synchronises CUDA before reading the clock.
    """
    for _ in range(warmup):
        fn()
    options = {} if timer is None else {"timer": timer}
    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, **options).blocked_autorange(
        min_run_time=min_run_time
    )
    return Timing(tuple(float(t) for t in measurement.times), int(measurement.number_per_run))
