"""Raw latency samples of one case and the statistics derived from them, computed on demand.

One sample is one timed block: `number` back-to-back calls, timed together, divided by `number`.
Each sample remembers the worker process and the round it came from, because the process is a
level of variance of its own (allocator state, page placement, kernel paths): statistics that
ignore it overstate how sure a measurement is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Per-call times (seconds), one per timed block, with the process and round of each."""

    times_s: tuple[float, ...]
    number_per_run: int  # calls per block (the median over processes; each sizes its own blocks)
    process: tuple[int, ...] = ()
    round: tuple[int, ...] = ()

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
    def processes(self) -> int:
        return len(set(self.process)) or 1
