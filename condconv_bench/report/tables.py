"""Comparison tables as DataFrames: data only, every renderer (terminal, HTML, markdown) reads these.

A *group* is one layer at one device, dtype, mode, thread count, memory format and batch size:
the implementations inside it ran back to back on the same inputs, so ratios between them are
meaningful even on a noisy machine. Ratios are always latency / reference latency (below 1 is
faster than the reference).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from condconv_bench.report import formatting

FLOOR_IMPL = "static"  # the plain conv every strategy is measured against
COMMON_IMPL = "grouped_conv"  # what timm and most open-source ports do
DISPATCH_IMPL = "auto"  # chooses among the strategies, so it is shown beside the fastest, not as one
GROUP_COLUMNS = ["layer", "device", "dtype", "mode", "threads", "memory_format", "batch_size"]


def measured(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with a latency (status ok)."""
    return frame[(frame["status"] == "ok") & frame["latency_median_s"].notna()]


def with_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """`measured(frame)` plus `vs_static` and `vs_grouped_conv`: latency over that impl's, same group."""
    rows = measured(frame).copy()
    for impl, column in ((FLOOR_IMPL, "vs_static"), (COMMON_IMPL, "vs_grouped_conv")):
        reference = rows[rows["impl"] == impl].set_index(GROUP_COLUMNS)["latency_median_s"].rename(column)
        rows = rows.join(reference, on=GROUP_COLUMNS)
        rows[column] = rows["latency_median_s"] / rows[column]
    return rows


HEADLINE_COLUMNS = [*GROUP_COLUMNS, "fastest", "latency_median_s", "vs_static", "vs_grouped_conv", "noisy",
                    "auto_latency_s", "auto_vs_fastest", "auto_picked"]


def headline(frame: pd.DataFrame) -> pd.DataFrame:
    """Per group: the fastest strategy that passed equivalence, its ratios, and what `auto` did there.

    `auto` is left out of the race (it runs one of the strategies); its latency, its ratio to the
    fastest strategy and the strategy it dispatched to are columns of their own.
    """
    rows = with_ratios(frame)
    verified = rows["equivalent"].fillna(False).astype(bool)
    candidates = rows[~rows["impl"].isin([FLOOR_IMPL, DISPATCH_IMPL]) & verified]
    if candidates.empty:
        return pd.DataFrame(columns=HEADLINE_COLUMNS)
    best = candidates.loc[candidates.groupby(GROUP_COLUMNS, sort=False)["latency_median_s"].idxmin()]
    best = best.rename(columns={"impl": "fastest"}).set_index(GROUP_COLUMNS)
    auto = rows[(rows["impl"] == DISPATCH_IMPL) & verified].set_index(GROUP_COLUMNS)
    best["auto_latency_s"] = auto["latency_median_s"].reindex(best.index)
    best["auto_vs_fastest"] = best["auto_latency_s"] / best["latency_median_s"]
    best["auto_picked"] = auto["dispatched"].reindex(best.index)
    return best.reset_index()[HEADLINE_COLUMNS]


def geometric_mean(values: pd.Series) -> float:
    values = values.dropna()
    values = values[values > 0]
    return float(np.exp(np.log(values.astype(float)).mean())) if len(values) else float("nan")


def geomean_by_impl(frame: pd.DataFrame) -> pd.DataFrame:
    """Per implementation: geometric means of its ratios over the groups where it ran, and wins."""
    rows = with_ratios(frame)
    wins = headline(frame)["fastest"].value_counts()
    summary = rows.groupby("impl", sort=False).agg(
        cases=("latency_median_s", "size"),
        geomean_vs_static=("vs_static", geometric_mean),
        geomean_vs_grouped_conv=("vs_grouped_conv", geometric_mean),
    )
    summary["wins"] = wins.reindex(summary.index).fillna(0).astype(int)
    return summary.sort_values("geomean_vs_static").reset_index()


def varying(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    """The columns that take more than one value: the ones a compact table must show."""
    return [c for c in columns if frame[c].nunique(dropna=False) > 1]


CONTEXT_COLUMNS = ["device", "dtype", "mode", "threads", "memory_format"]


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
    """Measurements whose IQR exceeds 10% of the median: compare them with care."""
    rows = measured(frame)
    rows = rows[rows["noisy"].fillna(False).astype(bool)].copy()
    rows["iqr_over_median"] = rows["latency_iqr_s"] / rows["latency_median_s"]
    return rows[["case_id", "latency_median_s", "latency_iqr_s", "iqr_over_median", "n_measurements"]]


def not_measured(frame: pd.DataFrame) -> pd.DataFrame:
    """Skipped and errored cases, grouped by implementation, device and reason, with counts."""
    rows = frame[frame["status"] != "ok"]
    grouped = rows.groupby(["status", "impl", "device", "reason"], dropna=False, sort=False).size()
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
    shown = pd.DataFrame({
        "layer": best["layer"],
        **{column: best[column] for column in context},
        "batch": best["batch_size"],
        "fastest": best["fastest"],
        "latency": best["latency_median_s"].map(formatting.seconds),
        "vs static": best["vs_static"].map(formatting.ratio),
        "vs grouped_conv": best["vs_grouped_conv"].map(formatting.ratio),
    })
    if best["auto_latency_s"].notna().any():
        shown["auto vs fastest"] = best["auto_vs_fastest"].map(formatting.ratio)
        shown["auto picked"] = best["auto_picked"].fillna("-")
    return shown
