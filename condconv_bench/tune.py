"""`condconv-bench tune`: a dispatch table for this machine, from a suite's measurements.

It runs the suite's dispatchable strategies (or reads an earlier run of the same suite) and keeps,
for every layer, device, dtype, mode, thread count, memory format and batch size, the fastest one
that passed the equivalence check. Stacks of blocks are skipped: their layers are tuned one by one.
"""

from __future__ import annotations

from pathlib import Path

from condconv_bench.dispatch import DispatchTable, entries_from_results
from condconv_bench.errors import CondConvBenchError, ResultsError
from condconv_bench.registry import dispatchable_impls
from condconv_bench.results import RunDirectory
from condconv_bench.runner import CaseFilter, CaseListener, run_suite
from condconv_bench.suite import Suite
from condconv_bench.workload import LayerWorkload


def tune(suite: Suite, output: Path, run_dir: Path, *, reuse_run: bool = False, case_filter: CaseFilter | None = None,
         listener: CaseListener | None = None) -> DispatchTable:
    """Measure (unless `reuse_run`) into `run_dir`, then write the table to `output`."""
    eligible = set(dispatchable_impls())
    if reuse_run:
        if RunDirectory.open(run_dir).metadata()["suite"]["sha256"] != suite.sha256:
            raise ResultsError(f"{run_dir}: was not run from this version of {suite.path}")
    else:
        impls = tuple(sorted(eligible & {case.impl for case in suite.cases()}))
        if not impls:
            raise CondConvBenchError(f"{suite.path}: names no dispatchable strategy ({', '.join(sorted(eligible))})")
        base = case_filter or CaseFilter()
        run_suite(suite, run_dir, case_filter=CaseFilter(impls, base.devices, base.batch_sizes, base.layers), listener=listener)
    workloads = {
        layer.name: (layer.workload.spec, layer.workload.input_size)
        for layer in suite.layers if isinstance(layer.workload, LayerWorkload)
    }
    entries = entries_from_results(RunDirectory.open(run_dir).results(), workloads, eligible)
    if not entries:
        raise CondConvBenchError(f"{run_dir}: no layer case passed equivalence with a dispatchable strategy; nothing to tune")
    table = DispatchTable(entries, str(output))
    table.save(output)
    return table
