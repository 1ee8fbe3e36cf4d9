"""Run directories loaded for reporting, each labelled by the hardware it ran on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from condconv_bench.machine.environment import hardware_label
from condconv_bench.report.tables import geometric_mean
from condconv_bench.run.directory import RunDirectory


@dataclass(frozen=True)
class LoadedRun:
    """One run directory's results, metadata and profiles, with a label unique among the runs shown."""

    path: Path
    label: str
    metadata: dict[str, Any]
    results: pd.DataFrame
    profiles: tuple[dict[str, Any], ...]

    @property
    def suite_name(self) -> str:
        return str(self.metadata["suite"]["name"])

    @property
    def environment(self) -> dict[str, Any]:
        return self.metadata.get("environment", {})

    def matmul_peak(self, device: str, dtype: str, threads: int) -> float | None:
        for peak in self.metadata.get("matmul_peaks", []):
            if (peak["device"], peak["dtype"], peak["threads"]) == (device, dtype, threads):
                return float(peak["flops_per_s"])
        return None


def load_runs(paths: list[Path]) -> list[LoadedRun]:
    """Open each run directory; labels name the directory and its hardware."""
    runs = []
    for path in paths:
        run = RunDirectory.open(path)
        metadata, results = run.metadata(), run.results()
        devices = {str(device).split(":")[0] for device in results.loc[results["status"] == "ok", "device"]}
        label = f"{Path(path).resolve().name} ({hardware_label(metadata.get('environment', {}), devices or None)})"
        runs.append(LoadedRun(Path(path), label, metadata, results, tuple(run.profiles())))
    return runs


# A case's identity across runs: threads and device are left out on purpose, so a 1-thread run
# compares with a 2-thread run and a CPU run with a GPU run.
COMPARISON_KEY = ["layer", "impl", "batch_size", "dtype", "mode", "memory_format"]


def variants(runs: list[LoadedRun]) -> pd.DataFrame:
    """All measured rows of all runs, with `variant`: the run label plus device and threads when they vary."""
    frames = []
    for run in runs:
        frame = run.results[run.results["status"] == "ok"].copy()
        frame["run"] = run.label
        frames.append(frame)
    if not frames:
        return pd.DataFrame()
    rows = pd.concat(frames, ignore_index=True)
    several_devices = rows.groupby("run")["device"].nunique().max() > 1
    several_threads = rows.groupby("run")["threads"].nunique().max() > 1
    rows["variant"] = rows["run"]
    if several_devices or len(runs) == 1:
        rows["variant"] = rows["variant"] + " · " + rows["device"]
    if several_threads or len(runs) == 1:
        rows["variant"] = rows["variant"] + " · " + rows["threads"].astype(str) + " thr"
    return rows


def cross_run(runs: list[LoadedRun]) -> tuple[pd.DataFrame, list[str]]:
    """Latency of each case in every variant side by side, with ratios to the first variant.

    Returns the table (one row per case key, `latency:<variant>` and `ratio:<variant>` columns)
    and the variants in order; empty when there is only one variant.
    """
    rows = variants(runs)
    if rows.empty:
        return pd.DataFrame(), []
    order = list(dict.fromkeys(rows["variant"]))
    if len(order) < 2:
        return pd.DataFrame(), order
    wide = rows.pivot_table(index=COMPARISON_KEY, columns="variant", values="latency_median_s", aggfunc="first")
    wide = wide[[v for v in order if v in wide.columns]].dropna()
    table = pd.DataFrame(index=wide.index)
    for variant in order:
        table[f"latency:{variant}"] = wide[variant]
    for variant in order[1:]:
        table[f"ratio:{variant}"] = wide[variant] / wide[order[0]]
    return table.reset_index(), order


def comparison_summary(comparison: pd.DataFrame, variants: list[str]) -> pd.DataFrame:
    """Per implementation: geometric mean of each variant's latency ratio to the first variant."""
    if comparison.empty:
        return pd.DataFrame()
    summary = comparison.groupby("impl", sort=False).agg(
        cases=("layer", "size"),
        **{variant: (f"ratio:{variant}", geometric_mean) for variant in variants[1:]},
    )
    return summary.reset_index()
