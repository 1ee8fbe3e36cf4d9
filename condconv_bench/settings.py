"""The settings of each layer that takes any — the instrument, the baseline gate, the A/B gate — once.

Each is a frozen dataclass, and its fields are the one declaration of each setting: name,
default, and (in the field's metadata) the bounds a value must keep and any other name a suite
may use for it. A suite's `timing:` and `gate:` sections are derived from these fields
(`suite.schema`), so a setting added here can be set from a suite at once, and the command line
shows the same names and values. This module sits below everything that reads it (it imports
nothing of the package), so a suite can name the gate's defaults without importing the gate.

The two gates keep different time thresholds on purpose: a baseline gate compares two runs made
apart in time, whose drift between runs counts against the threshold; the A/B gate's paired
ratios come from the same rounds of the same worker processes and carry none of that drift, so a
lower threshold is still safe there (`gate.ab.verdict` gives the measurements).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


DEFAULT_ALLOCATOR = "fixed"  # the worker processes' allocator policy (`machine.allocators` names them all)
DEFAULT_ALPHA = 0.002  # significance level of both gates' rank tests

Comparison = Literal["auto", "absolute", "floor"]


def setting(default: Any, *, aliases: tuple[str, ...] = (), **bounds: float) -> Any:
    """A field with its bounds (`gt`, `ge`, `lt`, `le`) and the other names a suite may give it.

    Upper bounds keep a typo from asking for days of measurement.
    """
    return field(default=default, metadata={"bounds": bounds, "aliases": aliases})


@dataclass(frozen=True)
class MeasureSettings:
    """How a group is measured (`condconv_bench.measure`); a suite's `timing:` section."""

    processes: int = setting(3, ge=1, le=64)  # fresh worker processes; each measures every group
    rounds: int = setting(10, ge=1, le=10_000)  # interleaved rounds per worker visit
    block_s: float = setting(0.005, aliases=("block_time",), gt=0, le=10)  # seconds one timed block lasts
    warmup: int = setting(2, ge=0, le=1000)  # untimed calls after the first, per worker
    precision: float = setting(0.02, gt=0, lt=1)  # stop once every ratio's 95% interval is within ±this
    budget_s: float = setting(10.0, aliases=("budget",), gt=0, le=86_400)  # seconds of timing per group before stopping anyway
    tie_margin: float = setting(0.02, ge=0, lt=1)  # gaps to the fastest below this are ties
    max_passes: int = setting(8, ge=1, le=1000)  # visits of every worker process per group before stopping anyway
    sweep_groups: int = setting(64, ge=1, le=10_000)  # groups whose first visits interleave (see measure.group)
    allocator: str = DEFAULT_ALLOCATOR  # of the worker processes (see machine.allocators, which names the choices)


@dataclass(frozen=True)
class GateSettings:
    """What the baseline gate and `compare` count as a change (`condconv_bench.gate.compare`); a suite's `gate:` section."""

    time_threshold: float = setting(0.10, gt=0)  # relative slowdown that counts
    time_min_delta_s: float = setting(0.0, ge=0)  # and the absolute change must exceed this
    memory_threshold: float = setting(0.10, gt=0)  # relative peak-memory growth that counts
    memory_min_bytes: int = setting(16 * 1024, ge=0, le=2**62)  # and the growth must exceed this
    alpha: float = setting(DEFAULT_ALPHA, gt=0, lt=1)  # significance level of the Mann-Whitney U test
    comparison: Comparison = "auto"  # raw latencies, or latencies over the floor of their own run


@dataclass(frozen=True)
class ABSettings:
    """What the A/B gate counts as a regression (`condconv_bench.gate.ab.verdict` says why these values)."""

    time_threshold: float = 0.05  # relative slowdown of the paired ratio head / base
    instruction_threshold: float = 0.02  # relative growth of instructions per step
    instruction_min_delta: int = 5000  # and the growth must exceed this many instructions per step
    alpha: float = DEFAULT_ALPHA  # significance level of the Wilcoxon signed-rank test
