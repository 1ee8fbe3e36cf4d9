"""A case's result row: the cells of its identity, of each probe's typed result and, once the
workers measured it, of its timing verdict, named by the columns `run.columns` defines.

The modules that compute the values (the float64 oracle, the FLOP counters, the limits, the
timing verdicts) know nothing of rows; what each value is called in a row is decided here.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from condconv_bench.core.case import Case
from condconv_bench.core.equivalence import EquivalenceReport
from condconv_bench.core.flops import FlopCounts
from condconv_bench.core.limits import CaseLimits
from condconv_bench.measure.group import CaseTiming, GroupTiming
from condconv_bench.runtimes.export import Export
from condconv_bench.timing.ratios import Interval
from condconv_bench.timing.samples import Timing


def identity_columns(case: Case) -> dict[str, Any]:
    return {
        "case_id": case.id,
        "impl": case.impl,
        "layer": case.layer,
        "layer_desc": case.workload.describe(),
        "kind": case.workload.kind,
        "input_size": "x".join(map(str, case.workload.input_shape(1)[2:])),
        "routing_given": case.workload.routing_given,
        "batch_size": case.batch_size,
        "device": case.device,
        "dtype": case.dtype,
        "mode": case.mode,
        "threads": case.threads,
        "memory_format": case.memory_format,
        "runtime": case.runtime,
    }


def export_columns(export: Export) -> dict[str, Any]:
    return {"export": export.status, "export_reason": export.reason, "export_ops": export.operators, "export_s": export.seconds}


def equivalence_columns(report: EquivalenceReport) -> dict[str, Any]:
    columns: dict[str, Any] = {"max_rel_error": report.max_rel_error, "max_abs_error": report.max_abs_error,
                               "worst_tensor": report.worst, "tolerance": report.tolerance, "equivalent": report.passed}
    if report.checked_against is not None:  # an ok row's reason says which check ran
        columns["reason"] = f"equivalence checked against {report.checked_against}"
    return columns


def flop_columns(counts: FlopCounts) -> dict[str, Any]:
    return {
        "macs_fvcore": counts.macs_fvcore, "flops_torch": counts.flops_torch, "macs_analytic": counts.analytic.total,
        "macs_analytic_routing": counts.analytic.routing, "macs_analytic_mixing": counts.analytic.mixing,
        "macs_analytic_conv": counts.analytic.conv, "flops_agree": counts.agree, "flops_problems": counts.problems,
        "fvcore_uncounted_ops": counts.fvcore_uncounted_ops,
    }


def limit_columns(limits: CaseLimits) -> dict[str, Any]:
    """The limit cells known before timing; `_distance_columns` adds the latency's distance to them."""
    work = limits.work
    return {
        "macs_compulsory": work.compulsory.macs.total, "bytes_compulsory": work.compulsory.traffic.moved,
        "bytes_modelled": work.own.traffic.moved, "limit_s": limits.compulsory.seconds, "limit_own_s": limits.own.seconds,
        "limit_bound": limits.compulsory.bound, "limit_memory": limits.compulsory.memory_level,
        "arithmetic_intensity": limits.arithmetic_intensity,
    }


def _distance_columns(row: dict[str, Any]) -> dict[str, float]:
    """Given a row's latency and limits: latency over each limit, and the achieved FLOP and byte rates."""
    latency = row.get("latency_median_s")
    if not latency or not row.get("limit_s"):
        return {}
    return {
        "vs_limit": latency / row["limit_s"], "vs_limit_own": latency / row["limit_own_s"],
        "achieved_gflop_per_s": 2 * row["macs_analytic"] / latency / 1e9,
        "achieved_gb_per_s": row["bytes_modelled"] / latency / 1e9,
    }


def _interval_columns(prefix: str, interval: Interval | None) -> dict[str, float | None]:
    if interval is None:
        return {}
    return {prefix: interval.estimate, f"{prefix}_ci_low": interval.low, f"{prefix}_ci_high": interval.high}


def _timing_columns(verdict: CaseTiming, batch_size: int) -> dict[str, Any]:
    timing = verdict.timing
    return {
        "latency_median_s": timing.median_s, "latency_iqr_s": timing.iqr_s, "latency_p10_s": timing.p10_s,
        "latency_p90_s": timing.p90_s, "latency_mean_s": timing.mean_s, "n_measurements": len(timing.times_s),
        "number_per_run": timing.number_per_run, "processes": timing.processes, "noisy": verdict.unstable,
        "process_spread": verdict.process_spread, "throughput_per_s": batch_size / timing.median_s,
        "timed_s": float(sum(timing.times_s)) * timing.number_per_run, "tied_fastest": verdict.tied_fastest,
        **_interval_columns("vs_floor", verdict.vs_floor), **_interval_columns("vs_best", verdict.vs_best),
        **({"vs_sentinel": verdict.vs_sentinel} if verdict.vs_sentinel is not None else {}),
    }


def record_timing(measured: GroupTiming, rows: dict[str, dict[str, Any]]) -> dict[str, Timing]:
    """Add each timed case's verdict (or its failure) to its row; returns the raw samples."""
    timed = [case_id for case_id, row in rows.items() if row["status"] == "ok"]
    share = measured.elapsed_s / len(timed)
    for case_id in timed:
        row = rows[case_id]
        row["wall_s"] += share
        if case_id in measured.cases:
            row.update(_timing_columns(measured.cases[case_id], row["batch_size"]), stopped_because=measured.stopped_because)
            if measured.sentinel_median_s is not None:
                row["sentinel_median_s"] = measured.sentinel_median_s
            row.update(_distance_columns(row))
            if case_id in measured.dispatched:
                row["dispatched"] = dispatch_summary(measured.dispatched[case_id])
        else:
            row.update(status="error", reason=measured.errors[case_id])
    return {case_id: verdict.timing for case_id, verdict in measured.cases.items()}


def dispatch_summary(builds: Counter[str]) -> str:
    """What a dispatcher ran in the timed workers: `pixel_major_matmul` when every build agreed,
    else each choice with its share of the builds, most frequent first (`a 5/7; b 2/7`)."""
    if len(builds) == 1:
        return next(iter(builds))
    total = sum(builds.values())
    return "; ".join(f"{choice} {count}/{total}" for choice, count in sorted(builds.items(), key=lambda item: (-item[1], item[0])))
