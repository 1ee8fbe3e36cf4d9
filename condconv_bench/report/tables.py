"""Comparison tables as DataFrames: data only, every renderer (terminal, HTML, markdown) reads these.

A *group* (`condconv_bench.core.case`) is one layer at one device, dtype, mode, thread count, memory
format and batch size: its implementations were timed in the same interleaved rounds on the same
inputs. Ratios are latency / reference latency (below 1 is faster than the reference); the ratio
to the floor is the paired one the instrument measured (median of per-round ratios, with its 95%
interval), the ratio to `grouped_conv` a ratio of medians.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from condconv_bench.core.case import GROUP_KEYS, Role
from condconv_bench import formatting
from condconv_bench.profiling.phases import phases_of

COMMON_IMPL = "grouped_conv"  # what timm and most open-source ports do
GROUP_COLUMNS = list(GROUP_KEYS)
TIE = " ≈ "


def measured(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with a latency (status ok)."""
    return frame[(frame["status"] == "ok") & frame["latency_median_s"].notna()]


def with_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """`measured(frame)`, the floor's own `vs_floor` set to 1, and `vs_grouped_conv`."""
    rows = measured(frame).copy()
    rows["vs_floor"] = rows["vs_floor"].where(rows["role"] != Role.FLOOR, 1.0)
    reference = rows[rows["impl"] == COMMON_IMPL].set_index(GROUP_COLUMNS)["latency_median_s"].rename("vs_grouped_conv")
    rows = rows.join(reference, on=GROUP_COLUMNS)
    rows["vs_grouped_conv"] = rows["latency_median_s"] / rows["vs_grouped_conv"]
    return rows


HEADLINE_COLUMNS = [*GROUP_COLUMNS, "fastest", "fastest_set", "latency_median_s", "vs_floor", "vs_floor_ci_low",
                    "vs_floor_ci_high", "vs_limit", "limit_memory", "vs_grouped_conv", "noisy", "auto_latency_s", "auto_vs_fastest",
                    "auto_vs_fastest_ci_high", "auto_tied", "auto_picked"]


def headline(frame: pd.DataFrame) -> pd.DataFrame:
    """Per group: the fastest verified strategy, the set tied with it, its ratios, and what `auto` did.

    `vs_limit` is the fastest strategy's latency over the case's compulsory limit (`limits`), with
    the memory level that limit assumes. `fastest_set` lists every strategy that cannot be told
    apart from the fastest (`tied_fastest`:
    its paired ratio to the fastest is not surely above 1 + the suite's tie margin), fastest first,
    joined by ` ≈ `. `noisy` marks a group where any of them is not reproducible. The dispatcher
    (`auto`) is not in the race: it runs one of the strategies, so its paired ratio to the fastest,
    whether it is tied with it, and what it dispatched to are columns of their own.
    """
    rows = with_ratios(frame)
    verified = rows["equivalent"].fillna(False).astype(bool)
    candidates = rows[(rows["role"] == Role.STRATEGY) & verified]
    if candidates.empty:
        return pd.DataFrame(columns=HEADLINE_COLUMNS)
    best = candidates.loc[candidates.groupby(GROUP_COLUMNS, sort=False)["vs_best"].idxmin()]
    best = best.rename(columns={"impl": "fastest"}).set_index(GROUP_COLUMNS)
    tied = candidates[candidates["tied_fastest"].fillna(False).astype(bool)].sort_values("vs_best")
    best["fastest_set"] = tied.groupby(GROUP_COLUMNS, sort=False)["impl"].agg(TIE.join).reindex(best.index)
    best["noisy"] = tied.groupby(GROUP_COLUMNS, sort=False)["noisy"].any().reindex(best.index)
    dispatchers = rows[(rows["role"] == Role.DISPATCHER) & verified]
    # One dispatcher fills these columns (`auto` where the suite runs it); every dispatcher's
    # distance to the fastest is in `geomean_by_impl` (within_5pct, geomean_vs_fastest).
    shown = "auto" if (dispatchers["impl"] == "auto").any() else dispatchers["impl"].min()
    auto = dispatchers[dispatchers["impl"] == shown].set_index(GROUP_COLUMNS)
    best["auto_latency_s"] = auto["latency_median_s"].reindex(best.index)
    best["auto_vs_fastest"] = auto["vs_best"].reindex(best.index)
    best["auto_vs_fastest_ci_high"] = auto["vs_best_ci_high"].reindex(best.index)
    best["auto_tied"] = auto["tied_fastest"].reindex(best.index)
    best["auto_picked"] = auto["dispatched"].reindex(best.index)
    return best.reset_index()[HEADLINE_COLUMNS]


def headline_absent(frame: pd.DataFrame) -> str:
    """Why `headline` has no row: nothing verified, or no strategy in the race (a run of
    `--impl static --impl autotune`), where the dispatchers' ratios to the floor are still measured."""
    verified = frame[frame["equivalent"].fillna(False).astype(bool) & (frame["status"] == "ok")]
    dispatchers = sorted(verified.loc[verified["role"] == Role.DISPATCHER, "impl"].unique())
    if dispatchers and not (frame["role"] == Role.STRATEGY).any():
        return (f"No strategy ran beside the floor and {', '.join(dispatchers)}, so none is ranked; "
                "each case's ratio to the floor is the vs_floor column of results.csv.")
    return "No implementation produced a verified latency."


def geometric_mean(values: pd.Series) -> float:
    values = values.dropna()
    values = values[values > 0]
    return float(np.exp(np.log(values.astype(float)).mean())) if len(values) else float("nan")


NEAR_FASTEST = 1.05


def geomean_by_impl(frame: pd.DataFrame) -> pd.DataFrame:
    """Per implementation: geometric means of its ratios over the groups where it ran (to the floor,
    to grouped_conv, to the fastest, to the compulsory limit and to its own limit), wins, and in
    how many groups it came within 5% of the fastest strategy (the measure a dispatcher answers to)."""
    rows = with_ratios(frame)
    wins = headline(frame)["fastest"].value_counts()
    rows["near_fastest"] = rows["vs_best"] <= NEAR_FASTEST
    summary = rows.groupby("impl", sort=False).agg(
        cases=("latency_median_s", "size"),
        geomean_vs_floor=("vs_floor", geometric_mean),
        geomean_vs_grouped_conv=("vs_grouped_conv", geometric_mean),
        geomean_vs_fastest=("vs_best", geometric_mean),
        geomean_vs_limit=("vs_limit", geometric_mean),
        geomean_vs_limit_own=("vs_limit_own", geometric_mean),
        within_5pct=("near_fastest", "sum"),
    )
    summary["wins"] = wins.reindex(summary.index).fillna(0).astype(int)
    return summary.sort_values("geomean_vs_floor").reset_index()


def varying(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    """The columns that take more than one value: the ones a compact table must show."""
    return [c for c in columns if frame[c].nunique(dropna=False) > 1]


CONTEXT_COLUMNS = ["device", "dtype", "mode", "threads", "memory_format", "runtime"]


def contexts(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Measured rows split by the context columns that vary (device, dtype, …), with labels."""
    rows = measured(frame)
    if rows.empty:
        return []
    shown = varying(rows, CONTEXT_COLUMNS)
    if not shown:
        return [("", rows)]
    labelled = []
    for key, group in rows.groupby(shown, sort=False):
        label = " · ".join(f"{v} threads" if c == "threads" else str(v) for c, v in zip(shown, key))
        labelled.append((label, group))
    return labelled


def macs_per_example(frame: pd.DataFrame) -> pd.DataFrame:
    """Analytic MACs per example (millions), layer × implementation: the cost models side by side."""
    rows = frame[frame["macs_analytic"].notna()].copy()
    rows["mmac_per_example"] = rows["macs_analytic"] / rows["batch_size"] / 1e6
    return rows.pivot_table(index="layer", columns="impl", values="mmac_per_example", aggfunc="first", sort=False)


def flops_disagreements(frame: pd.DataFrame) -> pd.DataFrame:
    """Cases where fvcore, FlopCounterMode and the analytic count do not agree, with the reason."""
    rows = frame[frame["flops_agree"].fillna(True).astype(bool).eq(False)]
    return rows[["case_id", "macs_fvcore", "flops_torch", "macs_analytic", "flops_problems"]]


def equivalence_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per implementation: cases checked, passed, and the worst errors against the float64 oracle."""
    rows = frame[frame["equivalent"].notna()]
    if rows.empty:
        return pd.DataFrame(columns=["impl", "checked", "passed", "worst_rel_error", "worst_abs_error", "worst_case"])
    worst = rows.loc[rows.groupby("impl", sort=False)["max_rel_error"].idxmax()].set_index("impl")
    summary = rows.groupby("impl", sort=False).agg(
        checked=("equivalent", "size"), passed=("equivalent", "sum"), worst_abs_error=("max_abs_error", "max")
    )
    summary["worst_rel_error"] = worst["max_rel_error"]
    summary["worst_case"] = worst["case_id"] + " (" + worst["worst_tensor"].fillna("") + ")"
    summary["tolerance"] = worst["tolerance"]
    return summary.reset_index()[["impl", "checked", "passed", "worst_rel_error", "tolerance", "worst_abs_error", "worst_case"]]


def equivalence_failures(frame: pd.DataFrame) -> pd.DataFrame:
    rows = frame[frame["equivalent"].fillna(True).astype(bool).eq(False)]
    return rows[["case_id", "max_rel_error", "tolerance", "worst_tensor", "max_abs_error"]]


def noisy_cases(frame: pd.DataFrame) -> pd.DataFrame:
    """Cases whose ratio a second invocation would likely not confirm: the interval of the paired
    ratio to the floor reaches more than ±5% from it, or the worker processes disagree by more than 10%."""
    rows = measured(frame)
    rows = rows[rows["noisy"].fillna(False).astype(bool)]
    return rows[["case_id", "latency_median_s", "vs_floor", "vs_floor_ci_low", "vs_floor_ci_high", "process_spread",
                 "processes", "n_measurements"]]


def not_measured(frame: pd.DataFrame) -> pd.DataFrame:
    """Skipped and errored cases, grouped by implementation, device, runtime and reason, with counts."""
    rows = frame[frame["status"] != "ok"]
    grouped = rows.groupby(["status", "impl", "device", "runtime", "reason"], dropna=False, sort=False).size()
    return grouped.rename("cases").reset_index()


def compile_times(frame: pd.DataFrame) -> pd.DataFrame:
    """Cold first calls that compiled graphs: compile time per layer and batch size."""
    rows = measured(frame)
    rows = rows[rows["compiled_graphs"].fillna(0) > 0]
    return rows[["impl", "layer", "batch_size", "dtype", "mode", "first_call_s", "compiled_graphs", "latency_median_s"]]


def achieved_flops(frame: pd.DataFrame) -> pd.DataFrame:
    """Inference rows with `achieved_gflops`: analytic FLOPs (2 × MAC) over the median latency.

    FLOPs are counted for the forward pass only, so a training step's rate would be meaningless.
    """
    rows = measured(frame)
    rows = rows[(rows["mode"] == "inference") & rows["macs_analytic"].notna()].copy()
    rows["achieved_gflops"] = 2 * rows["macs_analytic"].astype(float) / rows["latency_median_s"] / 1e9
    return rows


def headline_display(frame: pd.DataFrame) -> pd.DataFrame:
    """`headline` as formatted text columns for terminals and markdown; context columns only if they vary."""
    best = headline(frame)
    context = varying(best, CONTEXT_COLUMNS) if not best.empty else []
    fastest = best["fastest_set"].fillna(best["fastest"]) + np.where(best["noisy"].fillna(False).astype(bool), " (unstable)", "")
    shown = pd.DataFrame({
        "layer": best["layer"],
        **{column: best[column] for column in context},
        "batch": best["batch_size"],
        "fastest": fastest,
        "latency": best["latency_median_s"].map(formatting.seconds),
        "vs floor [95% CI]": [formatting.interval(*values) for values in best[["vs_floor", "vs_floor_ci_low", "vs_floor_ci_high"]].itertuples(index=False)],
        **({"vs limit": [f"{formatting.ratio(ratio)} ({level})" if not formatting.missing(ratio) else "-"
                         for ratio, level in best[["vs_limit", "limit_memory"]].itertuples(index=False)]}
           if best["vs_limit"].notna().any() else {}),
        "vs grouped_conv": best["vs_grouped_conv"].map(formatting.ratio),
    })
    if best["auto_latency_s"].notna().any():
        shown["auto vs fastest"] = [
            "-" if formatting.missing(ratio) else f"{formatting.ratio(ratio)}{' (tied)' if formatting.flag(tied) else ''}"
            for ratio, tied in best[["auto_vs_fastest", "auto_tied"]].itertuples(index=False)
        ]
        shown["auto picked"] = best["auto_picked"].fillna("-")
    return shown


def phase_shares(frame: pd.DataFrame, profiles: tuple[dict, ...] | list[dict]) -> pd.DataFrame:
    """Per profiled case: each phase's microseconds per step and share of the step, joined with the
    case's identity; profile records without (valid) phases are left out."""
    records = []
    for record in profiles:
        phases = phases_of(record)
        step = record.get("step_us")
        if phases is None or not isinstance(step, (int, float)) or step <= 0:
            continue
        records += [{"case_id": record.get("case_id"), "phase": phase, "us_per_step": us, "share": us / step}
                    for phase, us in phases.items()]
    if not records:
        return pd.DataFrame(columns=["case_id", "phase", "us_per_step", "share", *GROUP_COLUMNS, "impl"])
    identity = frame.set_index("case_id")[[*GROUP_COLUMNS, "impl"]]
    return pd.DataFrame(records).join(identity, on="case_id", how="inner")
