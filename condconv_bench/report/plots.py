"""seaborn figures of one context's measured rows (see `tables.contexts`), rendered to PNG bytes.

Every figure uses one colour per implementation across the whole report, log scales where
latencies and sizes span decades, and one facet per layer, so a reader can look across layers
without re-learning the legend.
"""

from __future__ import annotations

import io

import matplotlib
import matplotlib.patches
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from condconv_bench.core.limits import Ceilings
from condconv_bench.profiling.phases import PHASES
from condconv_bench.report import tables

matplotlib.use("Agg")  # reports are files; never open a window

FACETS_PER_ROW = 5
DPI = 110


def palette(impls: list[str]) -> dict[str, tuple[float, float, float]]:
    # tab10 repeats its colours past ten (a suite of twelve implementations drew auto like static); tab20 does not
    colours = sns.color_palette("tab10" if len(impls) <= 10 else "tab20", n_colors=max(10, len(impls)))
    return {impl: colours[i] for i, impl in enumerate(impls)}


def to_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _wrap(rows: pd.DataFrame) -> int:
    return min(FACETS_PER_ROW, max(1, rows["layer"].nunique()))


def latency_vs_batch(rows: pd.DataFrame, colours: dict[str, tuple]) -> Figure:
    """Median latency against batch size, one line per implementation, one facet per layer."""
    grid = sns.relplot(
        data=rows, x="batch_size", y="latency_median_s", hue="impl", col="layer", col_wrap=_wrap(rows),
        kind="line", marker="o", palette=colours, height=2.4, aspect=1.25, facet_kws={"sharey": False},
    )
    batch_sizes = sorted(rows["batch_size"].unique())
    grid.set(xscale="log", yscale="log", xticks=batch_sizes, xticklabels=[str(b) for b in batch_sizes])
    for axis in grid.axes.flat:
        axis.xaxis.set_minor_locator(NullLocator())
    grid.set_axis_labels("batch size", "latency (s)")
    grid.set_titles("{col_name}", size=8)
    grid.figure.suptitle("Latency vs batch size (median; log scales)", y=1.02)
    return grid.figure


def speed_vs_floor(rows: pd.DataFrame) -> Figure:
    """Heatmap per layer: latency / static latency, implementation × batch size; green is cheap."""
    ratios = tables.with_ratios(rows)
    layers = list(dict.fromkeys(ratios["layer"]))
    columns = _wrap(ratios)
    grid_rows = int(np.ceil(len(layers) / columns))
    figure, axes = plt.subplots(grid_rows, columns, figsize=(3.0 * columns, 2.3 * grid_rows), squeeze=False)
    log_ratios = np.log2(ratios["vs_floor"].dropna().astype(float))
    bound = max(1.0, float(log_ratios.abs().max())) if len(log_ratios) else 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
    for axis, layer in zip(axes.flat, layers):
        table = ratios[ratios["layer"] == layer].pivot_table(index="impl", columns="batch_size", values="vs_floor", sort=False)
        values = table.astype(float)
        labels = values.map(lambda v: "" if np.isnan(v) else (f"{v:.2g}" if v < 10 else f"{v:.0f}"))
        sns.heatmap(
            np.log2(values), ax=axis, cmap="RdYlGn_r", norm=norm, cbar=False,
            annot=labels, fmt="", annot_kws={"size": 7},
        )
        axis.set_title(layer, fontsize=8)
        axis.set_xlabel("batch size", fontsize=7)
        axis.set_ylabel("")
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(layers):]:
        axis.set_visible(False)
    figure.suptitle("Latency relative to the static floor (×; below 1 is faster than a plain conv)")
    figure.tight_layout()
    return figure


def peak_memory(rows: pd.DataFrame, colours: dict[str, tuple]) -> Figure:
    """Peak bytes allocated during one step, per implementation and batch size, one facet per layer."""
    data = rows[rows["peak_memory_bytes"].notna()].assign(peak_mib=lambda f: f["peak_memory_bytes"].astype(float) / 2**20)
    grid = sns.catplot(
        data=data, x="batch_size", y="peak_mib", hue="impl", col="layer", col_wrap=_wrap(data), kind="bar",
        palette=colours, height=2.4, aspect=1.25, sharey=False,
    )
    grid.set(yscale="log")
    grid.set_axis_labels("batch size", "peak memory (MiB)")
    grid.set_titles("{col_name}", size=8)
    grid.figure.suptitle("Peak memory allocated per step (log scale)", y=1.02)
    return grid.figure


def achieved_gflops(rows: pd.DataFrame, colours: dict[str, tuple], peak_flops: float | None) -> Figure:
    """Achieved GFLOP/s per implementation (every layer and batch size), beside the matmul peak."""
    data = tables.achieved_flops(rows)
    figure, axis = plt.subplots(figsize=(9, 3.8))
    sns.stripplot(data=data, x="impl", y="achieved_gflops", hue="impl", palette=colours, ax=axis, size=4, jitter=0.25, legend=False)
    axis.set_yscale("log")
    axis.set_xlabel("")
    axis.set_ylabel("achieved GFLOP/s (analytic FLOPs / latency)")
    if peak_flops:
        axis.axhline(peak_flops / 1e9, color="black", linestyle="--", linewidth=1)
        axis.annotate(f"measured matmul peak {peak_flops / 1e9:.3g} GFLOP/s", (0.01, peak_flops / 1e9),
                      xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(0, 4), fontsize=8)
    axis.set_title("How far each strategy is from the hardware's dense-matmul rate")
    axis.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    return figure


def roofline(rows: pd.DataFrame, colours: dict[str, tuple], ceilings: Ceilings) -> Figure:
    """Achieved GFLOP/s against arithmetic intensity (FLOP per modelled byte), one marker per case
    coloured by implementation, under the machine's roofs: the dense and depthwise compute peaks,
    and the LLC and DRAM bandwidth slopes."""
    data = rows[rows["arithmetic_intensity"].notna() & rows["achieved_gflop_per_s"].notna()]
    figure, axis = plt.subplots(figsize=(9, 4.8))
    sns.scatterplot(data=data, x="arithmetic_intensity", y="achieved_gflop_per_s", hue="impl", palette=colours,
                    style="layer" if data["layer"].nunique() <= 12 else None, ax=axis, s=28, alpha=0.85)
    intensities = np.logspace(np.log10(max(1e-3, data["arithmetic_intensity"].min() / 3)),
                              np.log10(data["arithmetic_intensity"].max() * 3), 200)
    dense, depthwise = ceilings.dense_flops_per_s / 1e9, ceilings.depthwise_flops_per_s / 1e9
    for bandwidth, label, style in ((ceilings.llc_bytes_per_s, "LLC", "-"), (ceilings.dram_bytes_per_s, "DRAM", "--")):
        axis.plot(intensities, np.minimum(dense, intensities * bandwidth / 1e9), color="black", linestyle=style, linewidth=1,
                  label=f"{label} {bandwidth / 1e9:.3g} GB/s, dense peak {dense:.3g} GFLOP/s")
    axis.axhline(depthwise, color="grey", linestyle=":", linewidth=1, label=f"depthwise-conv peak {depthwise:.3g} GFLOP/s")
    axis.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP per modelled byte)",
             ylabel="achieved GFLOP/s (analytic FLOPs / latency)")
    axis.set_title("Roofline: each case against the machine's ceilings (forward pass)")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return figure


PHASE_COLOURS = dict(zip(PHASES, sns.color_palette("tab10", n_colors=10)))


def phase_bars(shares: pd.DataFrame) -> Figure:
    """Per profiled case, a bar of its step split into phases (share of the step), one facet per layer."""
    layers = list(dict.fromkeys(shares["layer"]))
    columns = min(3, len(layers))
    grid_rows = int(np.ceil(len(layers) / columns))
    bars_per_layer = max(shares.groupby("layer")["case_id"].nunique())
    figure, axes = plt.subplots(grid_rows, columns, figsize=(4.4 * columns, 0.9 + 0.22 * bars_per_layer * grid_rows + 0.6 * grid_rows),
                                squeeze=False)
    present = [phase for phase in PHASES if phase in set(shares["phase"])]
    for axis, layer in zip(axes.flat, layers):
        table = shares[shares["layer"] == layer].assign(case=lambda f: f["impl"] + " b" + f["batch_size"].astype(str))
        wide = table.pivot_table(index="case", columns="phase", values="share", aggfunc="sum", sort=False).reindex(columns=present).fillna(0)
        left = np.zeros(len(wide))
        for phase in present:
            axis.barh(wide.index, wide[phase], left=left, color=PHASE_COLOURS[phase], label=phase, height=0.8)
            left += wide[phase].to_numpy()
        axis.invert_yaxis()
        axis.set_xlim(0, 1)
        axis.set_title(layer, fontsize=8)
        axis.tick_params(labelsize=7)
        axis.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    for axis in list(axes.flat)[len(layers):]:
        axis.set_visible(False)
    handles = [matplotlib.patches.Patch(color=PHASE_COLOURS[phase], label=phase) for phase in present]
    figure.legend(handles=handles, loc="upper center", ncol=min(len(present), 6), fontsize=8, bbox_to_anchor=(0.5, 1.0))
    figure.suptitle("Where each step goes (share of the profiled step)", y=1.04)
    figure.tight_layout()
    return figure
