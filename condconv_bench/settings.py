"""The settings of each layer that takes any — the instrument, the baseline gate, the A/B gate — once.

Each is a frozen dataclass whose field defaults are *the* defaults: a suite's `timing:` and
`gate:` sections (`suite`) validate YAML into them and take their defaults from here, and the
command line's help shows the same values (`show_default`). This module sits below everything
that reads it (it imports nothing of the package), so a suite can name the gate's defaults
without importing the gate.

The two gates keep different time thresholds on purpose: a baseline gate compares two runs made
apart in time, whose drift between runs counts against the threshold; the A/B gate's paired
ratios come from the same rounds of the same worker processes and carry none of that drift, so a
lower threshold is still safe there (`gate.ab.verdict` gives the measurements).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


DEFAULT_ALLOCATOR = "fixed"  # the worker processes' allocator policy (`machine.allocators` names them all)
DEFAULT_ALPHA = 0.002  # significance level of both gates' rank tests

Comparison = Literal["auto", "absolute", "floor"]


@dataclass(frozen=True)
class MeasureSettings:
    """How a group is measured (`condconv_bench.measure`); a suite's `timing:` section."""

    processes: int = 3  # fresh worker processes; each measures every group
    rounds: int = 10  # interleaved rounds per worker visit
    block_s: float = 0.005  # seconds one timed block lasts
    warmup: int = 2  # untimed calls after the first, per worker
    precision: float = 0.02  # stop once every ratio's 95% interval is within ±this
    budget_s: float = 10.0  # seconds of timing per group before stopping anyway
    tie_margin: float = 0.02  # gaps to the fastest below this are ties
    max_passes: int = 8
    sweep_groups: int = 64  # groups whose first visits interleave (see measure.group)
    allocator: str = DEFAULT_ALLOCATOR  # of the worker processes (see machine.allocators)


@dataclass(frozen=True)
class GateSettings:
    """What the baseline gate and `compare` count as a change (`condconv_bench.gate.compare`); a suite's `gate:` section."""

    time_threshold: float = 0.10  # relative slowdown that counts
    time_min_delta_s: float = 0.0  # and the absolute change must exceed this
    memory_threshold: float = 0.10  # relative peak-memory growth that counts
    memory_min_bytes: int = 16 * 1024  # and the growth must exceed this
    alpha: float = DEFAULT_ALPHA  # significance level of the Mann-Whitney U test
    comparison: Comparison = "auto"  # raw latencies, or latencies over the floor of their own run


@dataclass(frozen=True)
class ABSettings:
    """What the A/B gate counts as a regression (`condconv_bench.gate.ab.verdict` says why these values)."""

    time_threshold: float = 0.05  # relative slowdown of the paired ratio head / base
    instruction_threshold: float = 0.02  # relative growth of instructions per step
    instruction_min_delta: int = 5000  # and the growth must exceed this many instructions per step
    alpha: float = DEFAULT_ALPHA  # significance level of the Wilcoxon signed-rank test
