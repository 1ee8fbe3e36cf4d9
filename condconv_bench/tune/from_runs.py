"""`condconv-bench tune` and `tune-model`: a dispatch table, or this machine's autotune cache, ahead of use.

It runs the suite's dispatchable strategies (or reads an earlier run of the same suite) and keeps,
for every layer, device, dtype, mode, thread count, memory format, allocator and batch size, the
fastest one that passed the equivalence check. Stacks of blocks are skipped: their layers are tuned
one by one. When the run was measured on this machine with this torch, its entries also go to the
per-machine autotune cache (`condconv_bench.dispatch.cache`), so `autotune` layers start tuned.

`tune_model` fills that cache for one model instead: it converts the model's CondConv layers to
`autotune` and makes one first call per mode and batch size, in this process, so that every
layer signature the model meets there is measured once (identical layers share a signature). A
serving fleet of machines with one fingerprint can ship the resulting file with the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from condconv_bench.dispatch.cache import machine_cache
from condconv_bench.conversion.swap import convert
from condconv_bench.dispatch.dispatching_layers import Auto
from condconv_bench.dispatch.table import DispatchTable
from condconv_bench.machine.environment import describe_environment, machine_differences, vector_isa
from condconv_bench.errors import CondConvBenchError, ModelError, ResultsError
from condconv_bench.cases.models.sources import build_model
from condconv_bench.core.registry import dispatchable_impls
from condconv_bench.run.directory import RunDirectory
from condconv_bench.run.runner import CaseListener, run_suite
from condconv_bench.suite.selection import CaseFilter
from condconv_bench.suite.grid import Suite
from condconv_bench.tune.measured_entries import entries_from_results
from condconv_bench.cases.workload import LayerWorkload


def tune(suite: Suite, output: Path, run_dir: Path, *, reuse_run: bool = False, case_filter: CaseFilter | None = None,
         listener: CaseListener | None = None, allocator: str | None = None) -> tuple[DispatchTable, Path | None]:
    """Measure (unless `reuse_run`) into `run_dir` with workers under `allocator`, then write the
    table to `output`; returns it and the autotune cache it also went to (None if it did not)."""
    eligible = set(dispatchable_impls())
    if reuse_run:
        if RunDirectory.open(run_dir).metadata()["suite"]["sha256"] != suite.sha256:
            raise ResultsError(f"{run_dir}: was not run from this version of {suite.path}")
    else:
        impls = tuple(sorted(eligible & {case.impl for case in suite.cases()}))
        if not impls:
            raise CondConvBenchError(f"{suite.path}: names no dispatchable strategy ({', '.join(sorted(eligible))})")
        base = case_filter or CaseFilter()
        run_suite(suite, run_dir, case_filter=CaseFilter(impls, base.devices, base.batch_sizes, base.layers), listener=listener,
                  allocator=allocator)
    workloads = {
        layer.name: (layer.workload.spec, layer.workload.input_size)
        for layer in suite.layers if isinstance(layer.workload, LayerWorkload)
    }
    run = RunDirectory.open(run_dir)
    metadata = run.metadata()
    measured_under = (metadata.get("allocator") or {}).get("name", "not recorded")
    environment = metadata.get("environment") or {}
    same_machine = not machine_differences(environment, describe_environment())
    # Runs before `vector_isa` was recorded: this CPU's, when the run's machine fingerprint is this one's.
    isa = environment.get("vector_isa") or (vector_isa() if same_machine else "")
    entries = entries_from_results(run.results(), workloads, eligible, measured_under, isa)
    if not entries:
        raise CondConvBenchError(f"{run_dir}: no layer case passed equivalence with a dispatchable strategy; nothing to tune")
    table = DispatchTable(entries, str(output))
    table.save(output)
    cache = machine_cache()
    if not same_machine or cache.path is None:
        return table, None
    cache.add(entries)
    return table, cache.path


@dataclass(frozen=True)
class ModelCall:
    """One first call of a converted model: what its layers measured, and what it cost."""

    mode: str
    batch_size: int
    seconds: float  # wall time of the call (with the backward in training), tuning included
    measured: int  # signatures tuned afresh
    confirmed: int  # signatures the cache already held, confirmed by a race


def tune_model(source: str, batch_sizes: tuple[int, ...], input_size: int, modes: tuple[str, ...],
               budget_s: float | None = None, in_channels: int = 3) -> tuple[int, list[ModelCall], Path]:
    """Autotune every CondConv layer of the model `source` (`timm:NAME` or `package.module:callable`)
    for each mode and batch size, into this machine's autotune cache; returns the number of layers
    converted, one `ModelCall` per mode and batch size, and the cache file."""
    cache = machine_cache()
    if cache.path is None:
        raise CondConvBenchError("the autotune cache is off (CONDCONV_BENCH_CACHE=off): tune-model would measure for nothing")
    model = build_model(source)
    replaced = convert(model, "autotune", tuning_budget_s=budget_s).replaced
    if not replaced:
        raise ModelError(f"model {source!r}: has no CondConv layer to tune")
    layers = [m for m in model.modules() if isinstance(m, Auto)]
    calls = []
    for mode in modes:
        model.train(mode == "training")
        for batch_size in batch_sizes:
            for layer in layers:
                layer.last_tuning = None
            x = torch.randn(batch_size, in_channels, input_size, input_size)
            started = time.perf_counter()
            with torch.set_grad_enabled(mode == "training"):
                out = model(x)
                if mode == "training":
                    out.float().sum().backward()
            tunings = [layer.last_tuning for layer in layers if layer.last_tuning is not None]
            calls.append(ModelCall(mode, batch_size, time.perf_counter() - started,
                                   sum(t.confirmed is None for t in tunings), sum(t.confirmed is not None for t in tunings)))
    return len(replaced), calls, cache.path
