"""Which strategy survives deployment: tables of the runtime cases beside the eager ones.

A runtime case measures the exported graph of a strategy in ONNX Runtime or OpenVINO, divided
by the static floor exported and run the same way (`condconv_bench.runtimes`). These tables put
the runtimes side by side per context (device, dtype, mode, threads, memory format):

- `matrix`: strategy × runtime, whether the strategy exports with a dynamic batch there and its
  geometric-mean ratio to the floor in that runtime;
- `fastest_deployable`: per layer and batch, the fastest *deployable* strategy of each runtime (its
  graph has a dynamic batch and passed equivalence) beside the fastest eager strategy;
- `by_layer_class`: the same per layer class (pointwise, depthwise, linear, …), as geometric means.
"""

from __future__ import annotations

import re

import pandas as pd

from condconv_bench.core.case import Role
from condconv_bench.report.tables import CONTEXT_COLUMNS, geometric_mean, measured, varying
from condconv_bench.runtimes.catalog import EAGER

EXPORT_LABELS = {"ok": "dynamic batch", "batch_fixed": "batch fixed", "failed": "failed"}
_CONV = re.compile(r"^conv2d (\d+)→(\d+) k(\S+)(?:.* g(\d+))?")
SETTING_COLUMNS = [c for c in CONTEXT_COLUMNS if c != "runtime"]


def layer_class(description: str) -> str:
    """pointwise, depthwise, grouped, conv or linear, from a row's `layer_desc`."""
    if description.startswith("linear"):
        return "linear"
    match = _CONV.match(description)
    if match is None:
        return description.split(" ")[0]
    in_channels, out_channels, kernel, groups = match.groups()
    if groups and int(groups) == int(in_channels) == int(out_channels):
        return f"depthwise k{kernel}"
    if groups:
        return f"grouped k{kernel}"
    return "pointwise" if kernel == "1" else f"conv k{kernel}"


def _export_summary(statuses: pd.Series) -> str:
    """`dynamic batch`, `batch fixed`, `failed`, or the counts where the layers differ."""
    counts = statuses.fillna("not run").value_counts()
    if len(counts) == 1:
        return EXPORT_LABELS.get(counts.index[0], counts.index[0])
    return ", ".join(f"{EXPORT_LABELS.get(status, status)} {n}/{len(statuses)}" for status, n in counts.items())


def settings(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """All rows of a run that has runtime cases, split by the settings that vary (not the runtime), with labels."""
    if not (frame["runtime"] != EAGER).any():
        return []
    shown = varying(frame, SETTING_COLUMNS)
    if not shown:
        return [("", frame)]
    return [(" · ".join(map(str, key)), rows) for key, rows in frame.groupby(shown, sort=False)]


def matrix(frame: pd.DataFrame) -> pd.DataFrame:
    """Strategy × runtime for one context's rows: the export outcome over the layers and batches
    (eager needs none) and the geometric mean of the verified cases' ratios to the floor."""
    rows = frame[frame["role"] != Role.FLOOR]
    verified = measured(rows)
    verified = verified[verified["equivalent"].fillna(False).astype(bool)]
    runtimes = list(dict.fromkeys(rows["runtime"]))
    table = {}
    for impl, impl_rows in rows.groupby("impl", sort=False):
        cells = {}
        for runtime in runtimes:
            in_runtime = impl_rows[impl_rows["runtime"] == runtime]
            if in_runtime.empty:
                cells[runtime] = "-"
                continue
            ratio = geometric_mean(verified[(verified["impl"] == impl) & (verified["runtime"] == runtime)]["vs_floor"])
            export = "eager" if runtime == EAGER else _export_summary(in_runtime["export"])
            cells[runtime] = export + ("" if pd.isna(ratio) else f" · {ratio:.2f}×")
        table[impl] = cells
    return pd.DataFrame.from_dict(table, orient="index", columns=runtimes).rename_axis("strategy").reset_index()


FASTEST_COLUMNS = ["layer", "layer_class", "batch_size", "runtime", "fastest_eager", "eager_vs_floor", "fastest_deployable",
                   "deployable_vs_floor", "deployable_vs_eager"]


def fastest_deployable(frame: pd.DataFrame) -> pd.DataFrame:
    """Per layer, batch and runtime: the fastest verified eager strategy and the fastest verified
    strategy whose graph has a dynamic batch in that runtime, each with its ratio to its own floor,
    and the deployable one's latency over the eager one's (below 1: the runtime is faster)."""
    rows = measured(frame)
    rows = rows[(rows["role"] == Role.STRATEGY) & rows["equivalent"].fillna(False).astype(bool)]
    eager = rows[rows["runtime"] == EAGER]
    deployable = rows[(rows["runtime"] != EAGER) & (rows["export"] == "ok")]
    if eager.empty or deployable.empty:
        return pd.DataFrame(columns=FASTEST_COLUMNS)
    keys = ["layer", "batch_size", *SETTING_COLUMNS]
    best_eager = eager.loc[eager.groupby(keys, sort=False)["latency_median_s"].idxmin()].set_index(keys)
    best = deployable.loc[deployable.groupby([*keys, "runtime"], sort=False)["latency_median_s"].idxmin()]
    records = []
    for _, row in best.iterrows():
        key = tuple(row[k] for k in keys)
        if key not in best_eager.index:
            continue
        reference = best_eager.loc[key]
        records.append({
            "layer": row["layer"], "layer_class": layer_class(row["layer_desc"]), "batch_size": row["batch_size"],
            "runtime": row["runtime"], "fastest_eager": reference["impl"], "eager_vs_floor": reference["vs_floor"],
            "fastest_deployable": row["impl"], "deployable_vs_floor": row["vs_floor"],
            "deployable_vs_eager": row["latency_median_s"] / reference["latency_median_s"],
        })
    return pd.DataFrame(records, columns=FASTEST_COLUMNS)


def by_layer_class(fastest: pd.DataFrame) -> pd.DataFrame:
    """`fastest_deployable` summarised per runtime and layer class: geometric means of the ratios,
    and which strategies were the fastest deployable ones (with how often)."""
    if fastest.empty:
        return pd.DataFrame(columns=["runtime", "layer_class", "cases", "deployable_vs_floor", "deployable_vs_eager", "eager_vs_floor", "strategies"])
    grouped = fastest.groupby(["runtime", "layer_class"], sort=False)
    summary = grouped.agg(cases=("layer", "size"), deployable_vs_floor=("deployable_vs_floor", geometric_mean),
                          deployable_vs_eager=("deployable_vs_eager", geometric_mean), eager_vs_floor=("eager_vs_floor", geometric_mean))
    summary["strategies"] = grouped["fastest_deployable"].agg(
        lambda s: ", ".join(f"{impl} {n}" for impl, n in s.value_counts().items()))
    return summary.reset_index()
