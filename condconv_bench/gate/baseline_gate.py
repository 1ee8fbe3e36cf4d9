"""The baseline gate: a comparison with a committed baseline turned into pass or fail and an exit code.

It judges what does not depend on the machine anywhere, and latency only on the baseline's own
machine (`compare`); the A/B gate (`condconv_bench.gate.ab`) judges latency on any runner.

Fails (exit 1) on any regression the comparison found; with `fail_on_improvement`, also on
improvements beyond the thresholds, as PyTorch's CI does, so that a faster path forces the
baseline to be updated instead of silently widening the margin for the next regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from condconv_bench.gate.snapshot import load_snapshot
from condconv_bench.gate.compare import CaseComparison, Comparison, compare_snapshots
from condconv_bench.gate.verdict import GateVerdict
from condconv_bench.settings import GateSettings


@dataclass(frozen=True)
class GateResult(GateVerdict):
    comparison: Comparison
    failures: tuple[CaseComparison, ...]
    fail_on_improvement: bool


def run_gate(run_dirs: list[Path], baseline: Path, thresholds: GateSettings, fail_on_improvement: bool = False,
             latency: bool = True) -> GateResult:
    """Compare the runs (each case from its fastest run) with `baseline` (a baseline file or a run
    directory) and decide; latency only with `latency` and when both come from this machine."""
    comparison = compare_snapshots(load_snapshot(baseline), load_snapshot(list(run_dirs)), thresholds, latency)
    failures = [c for c in comparison.cases if c.problems or (fail_on_improvement and c.improvements)]
    return GateResult(comparison, tuple(failures), fail_on_improvement)
