"""A run's result rows → dispatch entries: what `condconv-bench tune` keeps from a measured suite."""

from __future__ import annotations

import pandas as pd

from condconv_bench import LayerSpec
from condconv_bench.dispatch.table import RIVALS, signature
from condconv_bench.tune.measured_entries import entries_from_results

SPEC = LayerSpec("conv2d", 8, 16, 4, kernel_size=3, padding=1)
GROUP = dict(layer="c", device="cpu:0", dtype="float32", mode="inference", threads=2, memory_format="contiguous", batch_size=8,
             runtime="eager")


def row(impl: str, median_s: float, status: str = "ok", equivalent: bool | None = True, **changes) -> dict[str, object]:
    return {**GROUP, "impl": impl, "status": status, "equivalent": equivalent, "latency_median_s": median_s,
            "latency_iqr_s": median_s / 10, **changes}


def entries(rows: list[dict[str, object]], eligible=("a", "b", "c", "d", "fast_but_wrong")):
    return entries_from_results(pd.DataFrame(rows), {"c": (SPEC, (6, 6))}, set(eligible), "system", "AVX2")


def test_the_fastest_verified_eligible_strategy_wins_with_its_rivals_and_margin() -> None:
    (entry,) = entries([
        row("c", 3e-3), row("a", 2e-3), row("b", 1e-3), row("d", 4e-3),
        row("fast_but_wrong", 1e-4, equivalent=False), row("unknown", 1e-5, equivalent=None),
        row("a", 1e-6, runtime="onnxruntime"),  # a runtime's speed is no entry for the eager layers
        row("failed", 1e-6, status="error"), row("floor", 1e-7),
    ], eligible=("a", "b", "c", "d", "fast_but_wrong", "unknown", "failed"))
    assert entry.strategy == "b"
    assert entry.margin == 2.0
    assert entry.rivals == ("a", "c") and len(entry.rivals) == RIVALS  # the runners-up, fastest first: "d" is out of the race
    assert entry.medians_s == {"b": 1e-3, "a": 2e-3, "c": 3e-3}
    assert entry.spread == 0.1
    assert (entry.device, entry.allocator, entry.batch_size, entry.signature) == ("cpu", "system", 8, signature(SPEC, (6, 6)))
    assert entry.vector_isa == "AVX2"  # the run's CPU: a native strategy's entry holds only for builds for it


def test_each_group_is_one_entry_and_unknown_layers_are_skipped() -> None:
    found = entries([row("a", 1e-3), row("b", 2e-3, batch_size=32), row("a", 3e-3, batch_size=32),
                     row("a", 1e-3, layer="stack_of_blocks")])
    assert sorted((e.batch_size, e.strategy, e.margin) for e in found) == [(8, "a", 1.0), (32, "b", 1.5)]
