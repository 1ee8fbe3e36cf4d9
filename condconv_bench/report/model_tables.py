"""Per model: what each way of running it costs over its floor, per batch size (data only).

A model group (`kind: model`) times the model as its library ships it, converted with each
strategy, `auto` and `autotune`, and the floor (the network without CondConv) in the same
interleaved rounds. Its table has one row per batch size: every case's paired ratio to the floor
(`X / floor`, with its 95% interval), and `as shipped / autotune`, how much faster the converted
model is than the library's own (a ratio of the two paired medians; above 1× autotune is faster).
Where a batch size's cases were checked against the as-shipped model in their own dtype (the
float64 one did not fit in memory), its `notes` say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from condconv_bench.cases.models import AS_SHIPPED
from condconv_bench.core.case import Role
from condconv_bench.report.tables import CONTEXT_COLUMNS, measured

TUNED = "autotune"


@dataclass(frozen=True)
class ModelTable:
    model: str  # the name of the first suite entry that runs the model
    description: str  # the model, its input size and its floor
    context: str  # device · dtype · mode · threads · memory format
    columns: list[str]  # the ratio columns, in order
    rows: pd.DataFrame  # batch_size, floor_latency_s, then per column: value, `<column> low`, `<column> high`
    tuning_s: pd.Series  # autotune's first call per batch size (its tuning cost), when it ran
    notes: tuple[str, ...] = ()  # per batch size, how its cases were checked where not against the float64 oracle


def _label(impl: str) -> str:
    return "as shipped" if impl == AS_SHIPPED else impl


def model_tables(frame: pd.DataFrame) -> list[ModelTable]:
    """One table per model and context (device, dtype, mode, threads, memory format) that was measured."""
    rows = measured(frame)
    rows = rows[rows["kind"] == "model"]
    tables = []
    # Suite entries of one model (e.g. its batch-32 or training entry) share a description: one table.
    for key, group in rows.groupby(["layer_desc", *CONTEXT_COLUMNS], sort=False):
        description, *context = key
        layer = str(group["layer"].iloc[0])
        floor = next(iter(group.loc[group["role"] == Role.FLOOR, "impl"]), None)
        impls = [AS_SHIPPED] if AS_SHIPPED in set(group["impl"]) else []
        impls += [i for i in dict.fromkeys(group["impl"]) if i not in (AS_SHIPPED, floor)]
        columns = [f"{_label(impl)} / floor" for impl in impls]
        table = pd.DataFrame({"batch_size": sorted(group["batch_size"].unique())}).set_index("batch_size")
        by_impl = {impl: g.set_index("batch_size") for impl, g in group.groupby("impl")}  # one entry per batch size
        if floor is not None:
            table["floor_latency_s"] = by_impl[floor]["latency_median_s"]
        for impl, column in zip(impls, columns):
            cases = by_impl[impl]
            table[column], table[f"{column} low"], table[f"{column} high"] = (
                cases["vs_floor"], cases["vs_floor_ci_low"], cases["vs_floor_ci_high"])
        if AS_SHIPPED in by_impl and TUNED in by_impl:
            column = "as shipped / autotune"
            table[column] = by_impl[AS_SHIPPED]["latency_median_s"] / by_impl[TUNED]["latency_median_s"]
            if floor is not None:
                table[column] = by_impl[AS_SHIPPED]["vs_floor"] / by_impl[TUNED]["vs_floor"]
            columns.append(column)
        tuning = by_impl[TUNED]["first_call_s"] if TUNED in by_impl else pd.Series(dtype=float)
        checked = group[group["reason"].fillna("").str.startswith("equivalence checked against")]
        notes = tuple(f"batch {batch}: {reason}" for (batch, reason), _ in checked.groupby(["batch_size", "reason"]))
        label = " · ".join(f"{v} threads" if c == "threads" else str(v) for c, v in zip(CONTEXT_COLUMNS, context))
        tables.append(ModelTable(layer, str(description), label, columns, table.reset_index(), tuning, notes))
    first = {description: index for index, description in reversed(list(enumerate(t.description for t in tables)))}
    return sorted(tables, key=lambda t: first[t.description])
