"""Dispatch entries from a run's result rows: what `condconv-bench tune` learns from a measured suite.

The table's format and lookup live in `condconv_bench.dispatch.table`, which the drop-in layers
read; building entries from measurements needs the run's DataFrame, so it lives here, above the
instrument, where pandas stays out of every model that uses a layer.
"""

from __future__ import annotations

import pandas as pd

from condconv_bench.core.case import GROUP_KEYS
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.dispatch.table import RIVALS, Entry, Query
from condconv_bench.runtimes.catalog import EAGER


def entries_from_results(frame: pd.DataFrame, workloads: dict[str, tuple[LayerSpec, Pair]], eligible: set[str],
                         allocator: str, vector_isa: str) -> list[Entry]:
    """One entry per measured group of a run (whose workers ran under `allocator`, on a CPU with
    `vector_isa`, empty where the run did not record it): the fastest
    eligible strategy that passed equivalence. Only eager rows: the table serves the eager layers,
    and a runtime's speeds are the runtime's."""
    rows = frame[(frame["status"] == "ok") & frame["impl"].isin(eligible) & frame["equivalent"].fillna(False).astype(bool)
                 & (frame["runtime"] == EAGER)]
    rows = rows[rows["layer"].isin(workloads)]
    entries = []
    for key, group in rows.groupby(list(GROUP_KEYS), sort=False):
        layer, device, dtype, mode, threads, memory_format, batch_size, _ = key
        spec, input_size = workloads[layer]
        ranked = group.sort_values("latency_median_s")
        best = ranked.iloc[0]
        margin = float(ranked.iloc[1]["latency_median_s"] / best["latency_median_s"]) if len(ranked) > 1 else 1.0
        raced = ranked.iloc[:1 + RIVALS]
        query = Query(spec=spec, input_size=input_size, device=str(device).split(":")[0], dtype=str(dtype), mode=str(mode),
                      threads=int(threads), memory_format=str(memory_format), allocator=allocator, batch_size=int(batch_size))
        entries.append(query.entry(
            str(best["impl"]), margin, str(layer), rivals=tuple(str(i) for i in raced["impl"].iloc[1:]),
            medians_s={str(r["impl"]): float(r["latency_median_s"]) for _, r in raced.iterrows()},
            spread=float(best["latency_iqr_s"] / best["latency_median_s"]),  # the run's rows keep no per-round ratios
            vector_isa=vector_isa,
        ))
    return entries
