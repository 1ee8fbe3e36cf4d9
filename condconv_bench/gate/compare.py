"""Baseline vs current, case by case: what changed, by how much, and whether it is a regression.

Latency is compared only between runs of the same machine (`environment.machine_differences`:
CPU, caches, instruction sets, kernel, software and measured matmul peak). Across machines it is
refused with the reason: measured here, a planted 1.5× slowdown passed such a gate because the
other machine was 30% faster overall, and dividing by the `static` floor did not rescue it,
since CPUs of one label also differ in which strategies they favour. The A/B gate
(`condconv_bench.gate.ab`) is what judges latency on any runner.

On one machine, timing verdicts follow `statistics` (threshold and rank test), in one of two modes:

- `absolute` (what `auto` picks): raw latencies. Dividing by the floor of a small layer adds
  that measurement's own noise to every case (seen here: a 10 µs floor moving 25% between
  processes made whole layers look 1.7× slower), so the floor's overall drift is reported instead;
- `floor`: each latency divided by the `static` floor's median from its own run, for a machine
  whose speed drifted between baseline and check.

The floor is the reference, not code under test, so `static` cases get verdicts but never fail a gate. Deterministic figures are compared exactly: any FLOP increase, any equivalence
failure, any case that newly errors, is skipped or disappears. Peak memory fails beyond its own
threshold (and a small absolute margin, so a few hundred bytes on a tiny layer do not count).

A dispatcher's FLOPs and peak memory are those of the strategy it chose (`probed_dispatch`).
`autotune` chooses by measuring: in two runs of mobile's autotune cases on one machine it chose
differently in 12 of 42, and their peak memory moved by more than 10% in 11 of those (up to 9×),
while the 30 cases that chose the same had identical FLOPs and peak memory. Where the choice
differs, the change is a note naming both choices, not a regression; where it is the same, the
figures are compared exactly, as for any strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from condconv_bench.gate.snapshot import CaseFigures, Snapshot
from condconv_bench.machine.environment import machine_differences
from condconv_bench.errors import ResultsError
from condconv_bench.formatting import count, size
from condconv_bench.timing.rank_tests import compare_samples
from condconv_bench.settings import GateSettings

# Environment keys a comparison's header reports when they differ.
REPORTED_KEYS = ("hostname", "cpu_model", "cpu_count", "gpus", "torch", "cuda", "cudnn")


@dataclass(frozen=True)
class CaseComparison:
    """One case before and after; `problems` fail a gate, `improvements` ask for a new baseline."""

    case_id: str
    impl: str
    verdict: str  # slower | faster | unchanged | new | missing | errors | skipped | fixed | not measured
    before_s: float | None = None
    after_s: float | None = None
    ratio: float | None = None  # in the comparison's mode
    p_value: float | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    memory_before: int | None = None
    memory_after: int | None = None
    equivalent: bool | None = None
    problems: tuple[str, ...] = ()
    improvements: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # neither fail nor ask for a new baseline


@dataclass(frozen=True)
class Comparison:
    mode: Literal["absolute", "floor"] | None  # None: latency not compared (`mode_reason` says why)
    mode_reason: str
    environment_notes: tuple[str, ...]
    thresholds: GateSettings
    cases: tuple[CaseComparison, ...]
    baseline: str
    current: str

    @property
    def regressions(self) -> list[CaseComparison]:
        return [c for c in self.cases if c.problems]

    @property
    def improvements(self) -> list[CaseComparison]:
        return [c for c in self.cases if c.improvements]


def environment_notes(base: Snapshot, current: Snapshot) -> list[str]:
    """Differences that make latencies incomparable in absolute terms, said up front."""
    notes = []
    for key in REPORTED_KEYS:
        before, after = base.environment.get(key), current.environment.get(key)
        if before != after:
            notes.append(f"{key} differs: baseline {before!r}, current {after!r}")
    if base.suite_sha256 != current.suite_sha256:
        notes.append("the suite file changed since the baseline (cases may be new or missing)")
    threads_before = {figures.threads for figures in base.cases.values()}
    threads_after = {figures.threads for figures in current.cases.values()}
    if threads_before != threads_after:
        notes.append(f"thread counts differ: baseline {sorted(threads_before)}, current {sorted(threads_after)}")
    return notes


def floor_drift(base: Snapshot, current: Snapshot) -> float | None:
    """Geometric mean of current/baseline latency of the static floor over the common cases."""
    ratios = [
        current.cases[cid].latency_median_s / figures.latency_median_s
        for cid, figures in base.cases.items()
        if figures.floor_case == cid and figures.latency_median_s and cid in current.cases
        and current.cases[cid].latency_median_s
    ]
    return float(np.exp(np.mean(np.log(ratios)))) if ratios else None


def _choose_mode(base: Snapshot, current: Snapshot, thresholds: GateSettings, latency: bool) -> tuple[str | None, str]:
    if not latency:
        return None, "latency not compared (asked for: FLOPs, equivalence, errors and memory only)"
    differences = machine_differences(base.environment, current.environment)
    if differences:
        return None, (f"latency not compared: the baseline comes from another machine, or this one in another state ({differences[0]}); "
                      "judge latency with an A/B gate on one machine: condconv-bench gate ab REF")
    drift = floor_drift(base, current)
    moved = "" if drift is None else f"; the static floor moved by {drift - 1:+.0%} overall"
    if thresholds.comparison != "auto":
        return thresholds.comparison, "same machine, requested" + moved
    return "absolute", "same machine" + moved


def _samples(snapshot: Snapshot, figures: CaseFigures, mode: str) -> np.ndarray | None:
    samples = np.asarray(figures.samples_s, dtype=float)
    if mode == "absolute":
        return samples
    floor = snapshot.cases.get(figures.floor_case) if figures.floor_case else None
    return samples / floor.latency_median_s if floor is not None and floor.latency_median_s else None


def _deterministic(before: CaseFigures, after: CaseFigures, t: GateSettings) -> tuple[list[str], list[str], list[str]]:
    problems: list[str] = []
    improvements: list[str] = []
    if after.equivalent is False:
        problems.append(f"equivalence failed (relative error {after.max_rel_error:.2e})")
    if before.probed_dispatch and after.probed_dispatch and before.probed_dispatch != after.probed_dispatch:
        return problems, improvements, [f"chose {after.probed_dispatch} (was {before.probed_dispatch}): FLOPs and peak memory are the choice's"]
    for name, unit in (("macs_fvcore", "MAC (fvcore)"), ("flops_torch", "FLOP (FlopCounterMode)"), ("macs_analytic", "MAC (analytic)")):
        old, new = getattr(before, name), getattr(after, name)
        if old is not None and new is not None and new != old:
            text = f"{count(old)} → {count(new)} {unit}"
            (problems if new > old else improvements).append(("FLOPs increased: " if new > old else "FLOPs decreased: ") + text)
    old, new = before.peak_memory_bytes, after.peak_memory_bytes
    if old is not None and new is not None and abs(new - old) > t.memory_min_bytes:
        if new > old * (1 + t.memory_threshold):
            problems.append(f"peak memory grew {new / old - 1:+.0%}: {size(old)} → {size(new)}")
        elif new < old / (1 + t.memory_threshold):
            improvements.append(f"peak memory shrank {new / old - 1:+.0%}: {size(old)} → {size(new)}")
    return problems, improvements, []


def _compare_case(case_id: str, base: Snapshot, current: Snapshot, mode: str | None, t: GateSettings) -> CaseComparison:
    before, after = base.cases.get(case_id), current.cases.get(case_id)
    impl = (after or before).impl  # type: ignore[union-attr]
    if before is None:
        return CaseComparison(case_id, impl, "new", after_s=after.latency_median_s if after else None)
    if after is None:
        return CaseComparison(case_id, impl, "missing", before_s=before.latency_median_s,
                              problems=("missing: the case is no longer in the run",) if before.status == "ok" else ())
    common = dict(
        before_s=before.latency_median_s, after_s=after.latency_median_s, flops_before=before.flops_torch,
        flops_after=after.flops_torch, memory_before=before.peak_memory_bytes, memory_after=after.peak_memory_bytes,
        equivalent=after.equivalent,
    )
    if after.status != "ok":
        if before.status == "ok":
            verdict = "errors" if after.status == "error" else "skipped"
            return CaseComparison(case_id, impl, verdict, problems=(f"now {after.status}: {after.reason}",), **common)
        return CaseComparison(case_id, impl, "not measured", **common)
    if before.status != "ok":
        return CaseComparison(case_id, impl, "fixed", improvements=(f"was {before.status}, now measured",), **common)
    problems, improvements, notes = _deterministic(before, after, t)
    if mode is None:
        return CaseComparison(case_id, impl, "latency not compared", problems=tuple(problems), improvements=tuple(improvements),
                              notes=tuple(notes), **common)
    before_samples, after_samples = _samples(base, before, mode), _samples(current, after, mode)
    if before_samples is None or after_samples is None or not len(before_samples) or not len(after_samples):
        return CaseComparison(case_id, impl, "not measured", problems=tuple(problems), improvements=tuple(improvements),
                              notes=tuple(notes), **common)
    change = compare_samples(before_samples, after_samples)
    verdict = change.direction(t.time_threshold, t.alpha)
    if abs(after.latency_median_s - before.latency_median_s) <= t.time_min_delta_s:
        verdict = "unchanged"  # below the absolute margin: tiny, Python-bound cases move this much by themselves
    if before.floor_case != case_id:
        if verdict == "slower":
            problems.append(f"slower: {change.ratio:.2f}× ({mode}, p={change.p_value:.1e})")
        elif verdict == "faster":
            improvements.append(f"faster: {change.ratio:.2f}× ({mode}, p={change.p_value:.1e})")
    return CaseComparison(case_id, impl, verdict, ratio=change.ratio, p_value=change.p_value,
                          problems=tuple(problems), improvements=tuple(improvements), notes=tuple(notes), **common)


def compare_snapshots(base: Snapshot, current: Snapshot, thresholds: GateSettings = GateSettings(), latency: bool = True) -> Comparison:
    """Compare every case of either snapshot (latency only with `latency` and on one machine);
    refuses snapshots of different suites."""
    if base.suite_name != current.suite_name:
        raise ResultsError(
            f"{current.source}: suite {current.suite_name!r} cannot be compared with baseline {base.source} "
            f"of suite {base.suite_name!r}"
        )
    notes = environment_notes(base, current)
    mode, reason = _choose_mode(base, current, thresholds, latency)
    case_ids = list(dict.fromkeys([*base.cases, *current.cases]))
    cases = tuple(_compare_case(case_id, base, current, mode, thresholds) for case_id in case_ids)
    return Comparison(mode, reason, tuple(notes), thresholds, cases, base.source, current.source)  # type: ignore[arg-type]
