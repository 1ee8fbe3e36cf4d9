"""A case's untimed probes, in its runner's process: can it run here, its first call, sizes, equivalence, FLOPs, limits, memory.

For every case of a group the probes build the implementation, load the layer's one shared
parameter set, draw the group's seeded inputs and run in a fixed order: the cold first call
(compile time), the tensors' sizes, equivalence against the float64 oracle, FLOP counts, the
compulsory limit, peak memory. Latency is measured afterwards, in the worker processes. A case
that cannot run is `skipped` with the reason; one that fails is an `error` row with the message.

A case of a runtime other than eager first exports the strategy (`run.exports`); the graph then
takes the module's place in the first call and the equivalence check, a strategy that does not
export at all is `skipped` with the exporter's reason, and peak memory is not probed (the
runtime allocates outside torch's profiler).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from condconv_bench.core import equivalence, flops
from condconv_bench.profiling import peak_memory
from condconv_bench.core.case import Case, Role, role_of
from condconv_bench.machine.devices import device_unavailable_reason, use_exact_float32
from condconv_bench.errors import ImplUnavailableError, ModelError, first_line
from condconv_bench.cases.inputs import GroupInputs, layer_state
from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.limits import CaseWork
from condconv_bench.cases.memory_estimate import memory_reason
from condconv_bench.profiling.traces import record_profile
from condconv_bench.run.exports import Exports
from condconv_bench.run.rows import equivalence_columns, export_columns, flop_columns, identity_columns
from condconv_bench.runtimes.catalog import EAGER, case_unavailable_reason
from condconv_bench.runtimes.graphs import ExportedGraph
from condconv_bench.cases.steps import CompileFellBackError, build_module, dispatched, first_call, grad_mode, step_function
from condconv_bench.cases.workload import Workload
from condconv_bench.dispatch.dispatching_layers import Auto


def skip_reason(cls: type[CondConvBase], case: Case, device: torch.device) -> str | None:
    """Why `case` cannot run here (no such device, implementation unavailable, layer unsupported,
    more memory than is available), or None."""
    reason = (device_unavailable_reason(device) or case_unavailable_reason(case.runtime, case.device, case.dtype, case.mode, case.memory_format)
              or case.workload.unavailable_reason() or cls.unavailable_reason())
    if reason:
        return reason  # before the layers are asked for: a model's are known only where its library imports
    unsupported = (cls.unsupported_reason(spec, device, case.torch_dtype) for spec in case.workload.layer_specs())
    return next(filter(None, unsupported), None) or memory_reason(case, device)


class GroupContext:
    """The layer's parameters, the group's inputs and its float64 oracle, each built once per group
    and only when a case of the group gets to run (a skipped device never allocates)."""

    def __init__(self, case: Case, seed: int, exports: Exports | None = None) -> None:
        self._case, self._seed = case, seed
        self.works: dict[str, CaseWork] = {}  # per case id: the work its limits are read from, once the ceilings are known
        self.exports = exports  # the run's exported graphs, for a runtime case
        self._reference: equivalence.Reference | None = None

    @cached_property
    def state(self) -> dict[str, torch.Tensor]:
        return layer_state(self._case, self._seed)

    @cached_property
    def inputs(self) -> GroupInputs:
        return GroupInputs.draw(self._case, self._seed, torch.device(self._case.device))

    def reference(self, workload: Workload, module: nn.Module) -> equivalence.Reference:
        if self._reference is None:
            inputs = self.inputs
            self._reference = workload.reference(module, inputs.x, inputs.routing_weights, inputs.grad_output)
        return self._reference


@dataclass(frozen=True)
class FirstCall:
    """The cold first call of a case's step, timed apart from its latency."""

    first_call_s: float
    compiled_graphs: int  # graphs torch.compile built during it (0 when eager)
    probed_dispatch: str | None  # what a dispatcher ran here: the timed workers choose again (`dispatched`)
    tf32: bool | None  # CUDA only: whether float32 may use TF32 (turned off before the call)


@dataclass(frozen=True)
class Sizes:
    """The bytes a case's tensors take, from their shapes (not measured)."""

    input_bytes: int
    output_bytes: int
    param_bytes: int
    kernel_bytes: int  # per-example kernels the strategy materialises (B·P), 0 if none


def _first_call(cls: type[CondConvBase], module: nn.Module, step: Callable[[], Any], case: Case, device: torch.device,
                row: dict[str, Any]) -> FirstCall:
    tf32 = use_exact_float32(device)
    with grad_mode(case.mode):
        started = time.perf_counter()
        try:
            graphs = first_call(step, cls.compiles and case.runtime == EAGER, device)
        except CompileFellBackError:
            row.update(compiled_graphs=0, tf32=tf32)
            raise
        return FirstCall(time.perf_counter() - started, graphs, dispatched(module), tf32)


def _sizes(case: Case, module: nn.Module, inputs: GroupInputs, element: int) -> Sizes:
    workload = case.workload
    return Sizes(
        input_bytes=inputs.x.numel() * element,
        output_bytes=math.prod(workload.output_shape(case.batch_size)) * element,
        param_bytes=sum(p.numel() * p.element_size() for p in module.parameters()),
        kernel_bytes=workload.kernel_bytes(module, case.batch_size),
    )


def _probe(case: Case, cls: type[CondConvBase], device: torch.device, ctx: GroupContext, row: dict[str, Any],
           traces_dir: Path | None) -> dict[str, Any] | None:
    """Fill `row` with the untimed probes' results as they arrive, so an error keeps what was measured.

    Each probe returns a typed result whose cells go into the row: the cold first call (compile
    time), the tensors' sizes, equivalence against the float64 oracle, FLOP counts and peak
    memory, all in this process; latency is measured afterwards in the worker processes.
    """
    workload = case.workload
    module = build_module(case, cls, ctx.state, device)
    inputs = ctx.inputs
    x = inputs.formatted_x(case)
    runs = module if case.runtime == EAGER else _exported(case, module, ctx, row)
    step = step_function(runs, x, inputs, case.mode)

    row.update(asdict(_first_call(cls, module, step, case, device, row)))
    row.update(asdict(_sizes(case, module, inputs, x.element_size())))
    if role_of(cls) is not Role.FLOOR:
        reference = ctx.reference(workload, module)
        row.update(equivalence_columns(equivalence.check_equivalence(runs, x, inputs.routing_weights, inputs.grad_output, reference)))
    analytic = workload.analytic_macs(module, case.batch_size)
    row.update(flop_columns(flops.count_flops(workload.eager_module(module), x, inputs.routing_weights, analytic)))
    work = workload.work(module, case.batch_size) if case.mode == "inference" else None
    if work is not None:
        ctx.works[case.id] = work
    if case.runtime != EAGER:
        return None
    with grad_mode(case.mode):
        row["peak_memory_bytes"] = peak_memory.peak_memory_bytes(step, device)
        return record_profile(case.id, step, traces_dir, device, workload.num_experts) if traces_dir is not None else None


class ExportFailedError(ImplUnavailableError):
    """The strategy does not export for the case's runtime, even at a fixed batch: the row is skipped with the exporter's reason."""


def _exported(case: Case, module: nn.Module, ctx: GroupContext, row: dict[str, Any]) -> ExportedGraph:
    """The case's graph in its runtime; the export's outcome goes into `row` first."""
    if ctx.exports is None:
        raise ValueError("a runtime case needs the run's exports (GroupContext.exports)")
    export = ctx.exports.of(case, module)
    for layer in module.modules():  # the row's dispatch, FLOPs and limits describe what the graph runs
        if isinstance(layer, Auto):
            layer.last_strategy = layer.exported_strategy()
    row.update(export_columns(export))
    if export.path is None:
        raise ExportFailedError(f"does not export for {case.runtime}: {export.reason}")
    return ExportedGraph(case.runtime, export.path, case.threads)


def probe_case(case: Case, ctx: GroupContext, traces_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One case's untimed probes; never raises for a failing implementation (the row says what happened).

    Returns the row (status `ok` means ready to be timed) and, when `traces_dir` is given, the
    profile record.
    """
    row = identity_columns(case)
    started = time.perf_counter()
    device = torch.device(case.device)
    cls = case.workload.impl_class(case.impl)
    row["role"] = str(role_of(cls))
    profile_record = None
    try:
        reason = skip_reason(cls, case, device)
    except ModelError as exc:  # a model that cannot take the case's input: every case of it says so, the run goes on
        row.update(status="error", reason=first_line(exc), wall_s=time.perf_counter() - started)
        return row, None
    if reason:
        row.update(status="skipped", reason=reason)
    else:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(case.threads)
        try:
            profile_record = _probe(case, cls, device, ctx, row, traces_dir)
            row["status"] = "ok"
        except ImplUnavailableError as exc:
            row.update(status="skipped", reason=str(exc))
        except Exception as exc:  # any failure of the implementation under test becomes an error row
            row.update(status="error", reason=first_line(exc))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            torch.set_num_threads(previous_threads)
    row["wall_s"] = time.perf_counter() - started
    return row, profile_record
