"""Comparison tables as DataFrames: data only, every renderer (terminal, HTML, markdown) reads these.

A *group* is one layer at one device, dtype, mode, thread count, memory format and batch size:
the implementations inside it ran back to back on the same inputs, so ratios between them are
meaningful even on a noisy machine. Ratios are always latency / reference latency (below 1 is
faster than the reference).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FLOOR_IMPL = "static"  # the plain conv every strategy is measured against
COMMON_IMPL = "grouped_conv"  # what timm and most open-source ports do
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


def headline(frame: pd.DataFrame) -> pd.DataFrame:
    """Per group: the fastest CondConv implementation that passed equivalence, and its ratios."""
    rows = with_ratios(frame)
    candidates = rows[(rows["impl"] != FLOOR_IMPL) & (rows["equivalent"].fillna(False).astype(bool))]
    if candidates.empty:
        return pd.DataFrame(columns=[*GROUP_COLUMNS, "fastest", "latency_median_s", "vs_static", "vs_grouped_conv"])
    best = candidates.loc[candidates.groupby(GROUP_COLUMNS, sort=False)["latency_median_s"].idxmin()]
    best = best.rename(columns={"impl": "fastest"})
    return best[[*GROUP_COLUMNS, "fastest", "latency_median_s", "vs_static", "vs_grouped_conv", "noisy"]].reset_index(drop=True)


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
