"""`condconv-bench tune`: a dispatch table for this machine, from a suite's measurements.

It runs the suite's dispatchable strategies (or reads an earlier run of the same suite) and keeps,
for every layer, device, dtype, mode, thread count, memory format, allocator and batch size, the
fastest one that passed the equivalence check. Stacks of blocks are skipped: their layers are tuned
one by one. When the run was measured on this machine with this torch, its entries also go to the
per-machine autotune cache (`condconv_bench.dispatch.cache`), so `autotune` layers start tuned.
"""

from __future__ import annotations

from pathlib import Path

from condconv_bench.dispatch.cache import machine_cache
from condconv_bench.dispatch.table import DispatchTable, entries_from_results
from condconv_bench.environment import describe_environment, machine_differences
from condconv_bench.errors import CondConvBenchError, ResultsError
from condconv_bench.registry import dispatchable_impls
from condconv_bench.results import RunDirectory
from condconv_bench.runner import CaseFilter, CaseListener, run_suite
from condconv_bench.suite import Suite
from condconv_bench.workload import LayerWorkload


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
    entries = entries_from_results(run.results(), workloads, eligible, measured_under)
    if not entries:
        raise CondConvBenchError(f"{run_dir}: no layer case passed equivalence with a dispatchable strategy; nothing to tune")
    table = DispatchTable(entries, str(output))
    table.save(output)
    cache = machine_cache()
    if machine_differences(metadata.get("environment") or {}, describe_environment()) or cache.path is None:
        return table, None
    cache.add(entries)
    return table, cache.path
