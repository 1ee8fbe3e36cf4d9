"""Cases → result rows, one at a time, each persisted before the next begins.

For every case the runner builds the implementation, loads the layer's one shared parameter set,
builds seeded inputs and hands them to the probes in a fixed order: the cold first call (compile
time), equivalence against the float64 oracle, FLOP counts, peak memory, then timing last so the
timed region sees a warm cache. A case that cannot run is `skipped` with the reason; one that
fails is an `error` row with the message; neither stops the suite. Nothing here prints: progress
goes to an optional listener, which the CLI turns into a progress bar.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from condconv_bench import equivalence, flops, memory, timing
from condconv_bench.allocator import fix_malloc_thresholds
from condconv_bench.environment import describe_environment
from condconv_bench.errors import CondConvBenchError, DeviceUnavailableError, ImplUnavailableError, ResultsError
from condconv_bench.layer import CondConvBase
from condconv_bench.registry import get_impl
from condconv_bench.results import RunDirectory
from condconv_bench.machine_peak import matmul_peak_flops
from condconv_bench.profile import record_profile
from condconv_bench.suite import TORCH_DTYPES, Case, Suite, load_suite
from condconv_bench.workload import Workload


class CaseListener(Protocol):
    """Receives progress; the CLI's progress bar implements it."""

    def case_started(self, index: int, total: int, case: Case) -> None: ...

    def case_finished(self, index: int, total: int, case: Case, row: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Shard:
    """Slice `index` of `count` (1-based), e.g. `2/4`; whole groups go to one shard."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise CondConvBenchError(f"--shard {text!r}: expected i/N, e.g. 1/4") from None
        if not 1 <= index <= count:
            raise CondConvBenchError(f"--shard {text!r}: i must be between 1 and N")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, cases: list[Case]) -> list[Case]:
        # Whole groups stay together so every strategy's ratio to `static` comes from one machine.
        groups = list(dict.fromkeys(case.group for case in cases))
        mine = {group for position, group in enumerate(groups) if position % self.count == self.index - 1}
        return [case for case in cases if case.group in mine]


@dataclass(frozen=True)
class CaseFilter:
    """Command-line narrowing of a suite; empty tuples keep everything."""

    impls: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    layers: tuple[str, ...] = ()

    def apply(self, cases: list[Case], suite: Suite) -> list[Case]:
        for option, values, attribute in (
            ("--impl", self.impls, "impl"),
            ("--device", self.devices, "device"),
            ("--batch-size", self.batch_sizes, "batch_size"),
            ("--layer", self.layers, "layer"),
        ):
            known = list(dict.fromkeys(getattr(case, attribute) for case in cases))
            for value in values:
                if value not in known:
                    raise CondConvBenchError(
                        f"{option} {value}: not in {suite.path} (it has: {', '.join(map(str, known))})"
                    )
            if values:
                cases = [case for case in cases if getattr(case, attribute) in values]
        for device in self.devices:
            reason = device_unavailable_reason(torch.device(device))
            if reason:
                raise DeviceUnavailableError(f"--device {device}: {reason}")
        return cases


@dataclass
class RunOutcome:
    """What a run did, for the CLI's summary and exit code."""

    run: RunDirectory
    total: int
    already_done: int
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "skipped": 0, "error": 0})
    equivalence_failures: list[str] = field(default_factory=list)


def device_unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine"
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _compiled_graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


@dataclass
class _Inputs:
    """Seeded tensors of one group, shared by every implementation in it."""

    x: torch.Tensor
    routing_weights: torch.Tensor | None
    grad_output: torch.Tensor | None


class _CaseContext:
    """Per-run caches: each layer's parameters and each group's inputs and oracle are built once."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._states: dict[tuple[str, Any], dict[str, torch.Tensor]] = {}
        self._group_key: tuple[Any, ...] | None = None
        self._inputs: _Inputs | None = None
        self._reference: equivalence.Reference | None = None

    def parameters(self, case: Case) -> dict[str, torch.Tensor]:
        key = (case.layer, case.workload)
        if key not in self._states:
            generator = torch.Generator().manual_seed(_seed(self.seed, case.layer))
            self._states = {key: case.workload.initial_state(generator)}  # one layer at a time
        return self._states[key]

    def inputs(self, case: Case, device: torch.device) -> _Inputs:
        key = (case.layer, case.workload, case.device, case.dtype, case.mode, case.batch_size)
        if key != self._group_key:
            workload, batch = case.workload, case.batch_size
            generator = torch.Generator().manual_seed(_seed(self.seed, case.layer, batch))
            x = torch.randn(workload.input_shape(batch), generator=generator)
            routing = torch.rand(batch, workload.num_experts, generator=generator) if workload.routing_given else None
            grad_output = torch.randn(workload.output_shape(batch), generator=generator) if case.mode == "training" else None

            def place(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t.to(device=device, dtype=case.torch_dtype)

            self._group_key = key
            self._inputs = _Inputs(place(x), place(routing), place(grad_output))
            self._reference = None
        assert self._inputs is not None
        return self._inputs

    def reference(self, workload: Workload, module: nn.Module, inputs: _Inputs) -> equivalence.Reference:
        if self._reference is None:
            self._reference = workload.reference(module, inputs.x, inputs.routing_weights, inputs.grad_output)
        return self._reference


def _step_function(module: nn.Module, x: torch.Tensor, inputs: _Inputs, case: Case) -> Callable[[], object]:
    """One timed step: a forward (inference) or a forward and backward (training)."""
    routing = inputs.routing_weights
    if case.mode == "inference":
        return (lambda: module(x)) if routing is None else (lambda: module(x, routing))
    x = x.detach().requires_grad_(True)
    routing = None if routing is None else routing.detach().requires_grad_(True)
    wrt = [x, *module.parameters(), *([routing] if routing is not None else [])]
    grad_output = inputs.grad_output

    def train_step() -> object:
        out = module(x) if routing is None else module(x, routing)
        return torch.autograd.grad(out, wrt, grad_output, allow_unused=True)

    return train_step


def _skip_reason(cls: type[CondConvBase], case: Case, device: torch.device) -> str | None:
    unsupported = (cls.unsupported_reason(spec, device, case.torch_dtype) for spec in case.workload.layer_specs())
    return device_unavailable_reason(device) or cls.unavailable_reason() or next(filter(None, unsupported), None)


def _dispatched(module: nn.Module) -> str | None:
    """What a dispatching implementation (`auto`) ran, e.g. `batched_matmul` or `grouped_conv×8 stacked_moe×16`."""
    chosen = Counter(m.last_strategy for m in module.modules() if getattr(m, "last_strategy", None))
    if not chosen:
        return None
    if len(chosen) == 1 and sum(chosen.values()) == 1:
        return next(iter(chosen))
    return " ".join(f"{key}×{n}" for key, n in sorted(chosen.items()))


def _identity(case: Case) -> dict[str, Any]:
    return {
        "case_id": case.id,
        "impl": case.impl,
        "layer": case.layer,
        "layer_desc": case.workload.describe(),
        "kind": case.workload.kind,
        "input_size": "x".join(map(str, case.workload.input_shape(1)[2:])),
        "routing_given": case.workload.routing_given,
        "batch_size": case.batch_size,
        "device": case.device,
        "dtype": case.dtype,
        "mode": case.mode,
        "threads": case.threads,
        "memory_format": case.memory_format,
    }


def _measure(case: Case, cls: type[CondConvBase], device: torch.device, ctx: _CaseContext, suite: Suite,
             row: dict[str, Any], traces_dir: Path | None) -> tuple[timing.Timing, dict[str, Any] | None]:
    """Fill `row` with every probe's figures as they arrive, so an error keeps what was measured."""
    workload = case.workload
    module = workload.build(cls)
    module.load_state_dict(ctx.parameters(case))
    module = module.to(device=device, dtype=case.torch_dtype).train(case.mode == "training")
    inputs = ctx.inputs(case, device)
    x = inputs.x.contiguous(memory_format=torch.channels_last) if case.memory_format == "channels_last" else inputs.x
    step = _step_function(module, x, inputs, case)
    element = x.element_size()
    grad_mode = torch.inference_mode() if case.mode == "inference" else torch.enable_grad()

    with grad_mode:
        graphs_before = _compiled_graph_count()
        started = time.perf_counter()
        step()
        _synchronize(device)
        row["first_call_s"] = time.perf_counter() - started
        row["compiled_graphs"] = _compiled_graph_count() - graphs_before
        row["dispatched"] = _dispatched(module)

    row["output_bytes"] = math.prod(workload.output_shape(case.batch_size)) * element
    row["param_bytes"] = sum(p.numel() * p.element_size() for p in module.parameters())
    row["input_bytes"] = inputs.x.numel() * element
    row["kernel_bytes"] = workload.kernel_bytes(module, case.batch_size)

    if not cls.is_baseline:
        report = equivalence.check_equivalence(
            module, x, inputs.routing_weights, inputs.grad_output, ctx.reference(workload, module, inputs)
        )
        row.update(
            max_rel_error=report.max_rel_error, max_abs_error=report.max_abs_error, worst_tensor=report.worst,
            tolerance=report.tolerance, equivalent=report.passed,
        )

    analytic = workload.analytic_macs(module, case.batch_size)
    counts = flops.count_flops(module.eager_module(), x, inputs.routing_weights, analytic)
    row.update(
        macs_fvcore=counts.macs_fvcore, flops_torch=counts.flops_torch, macs_analytic=analytic.total,
        macs_analytic_routing=analytic.routing, macs_analytic_mixing=analytic.mixing, macs_analytic_conv=analytic.conv,
        flops_agree=counts.agree, flops_problems=counts.problems, fvcore_uncounted_ops=counts.fvcore_uncounted_ops,
    )

    with grad_mode:
        row["peak_memory_bytes"] = memory.peak_memory_bytes(step, device)
        measured = timing.measure(
            step, threads=case.threads, min_run_time=float(suite.model.timing.min_run_time), warmup=suite.model.timing.warmup
        )
    row.update(
        latency_median_s=measured.median_s, latency_iqr_s=measured.iqr_s, latency_p10_s=measured.p10_s,
        latency_p90_s=measured.p90_s, latency_mean_s=measured.mean_s, n_measurements=len(measured.times_s),
        number_per_run=measured.number_per_run, noisy=measured.noisy,
        throughput_per_s=case.batch_size / measured.median_s, timed_s=measured.total_timed_s,
    )
    profile_record = None
    if traces_dir is not None:
        with grad_mode:
            profile_record = record_profile(case.id, step, traces_dir, device)
    return measured, profile_record


def run_case(case: Case, ctx: _CaseContext, suite: Suite,
             traces_dir: Path | None = None) -> tuple[dict[str, Any], timing.Timing | None, dict[str, Any] | None]:
    """Measure one case; never raises for a failing implementation (the row says what happened).

    Returns the row, the raw timing and, when `traces_dir` is given, the profile record.
    """
    row = _identity(case)
    started = time.perf_counter()
    device = torch.device(case.device)
    cls = get_impl(case.impl)
    measured = profile_record = None
    reason = _skip_reason(cls, case, device)
    if reason:
        row.update(status="skipped", reason=reason)
    else:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(case.threads)
        try:
            measured, profile_record = _measure(case, cls, device, ctx, suite, row, traces_dir)
            row["status"] = "ok"
        except ImplUnavailableError as exc:
            row.update(status="skipped", reason=str(exc))
        except Exception as exc:  # any failure of the implementation under test becomes an error row
            row.update(status="error", reason=_first_line(exc))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            torch.set_num_threads(previous_threads)
    row["wall_s"] = time.perf_counter() - started
    return row, measured, profile_record


def default_output(suite: Suite) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", suite.name).strip("_.") or "suite"
    return Path("reports") / f"{slug}-{stamp}"


def _matmul_peaks(cases: list[Case]) -> list[dict[str, Any]]:
    """The machine's matmul FLOP/s for each device, dtype and thread count the cases use."""
    peaks = []
    for device, dtype, threads in dict.fromkeys((c.device, c.dtype, c.threads) for c in cases):
        if device_unavailable_reason(torch.device(device)) is None:
            flops_per_s = matmul_peak_flops(torch.device(device), TORCH_DTYPES[dtype], threads)
            peaks.append({"device": device, "dtype": dtype, "threads": threads, "flops_per_s": flops_per_s})
    return peaks


def _open_run(suite: Suite, output: Path, resume: bool, shard: Shard | None, cases: list[Case]) -> RunDirectory:
    if resume and (output / "results.csv").exists():
        run = RunDirectory.open(output)
        metadata = run.metadata()
        if metadata["suite"]["sha256"] != suite.sha256:
            raise ResultsError(f"{output}: was started from a different version of {suite.path}; start a new run")
        if metadata.get("shard") != (str(shard) if shard else None):
            raise ResultsError(f"{output}: was started as shard {metadata.get('shard')}, not {shard}")
        run.drop_partial_row()
        return run
    metadata = {
        "suite": {
            "name": suite.name, "path": str(suite.path), "sha256": suite.sha256,
            "description": suite.model.description, "timing": suite.model.timing.model_dump(),
            "gate": suite.model.gate.model_dump(), "seed": suite.model.seed,
        },
        "environment": describe_environment(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shard": str(shard) if shard else None,
        "cases_total": len(cases),
        "matmul_peaks": _matmul_peaks(cases),
    }
    return RunDirectory.create(output, metadata)


def run_suite(
    suite: Suite | str | Path,
    output: str | Path | None = None,
    *,
    resume: bool = False,
    shard: Shard | None = None,
    case_filter: CaseFilter | None = None,
    listener: CaseListener | None = None,
    profile: bool = False,
) -> RunOutcome:
    """Run a suite (or its filtered shard) into a run directory and return what happened.

    With `profile`, each measured case is also profiled into `RUN_DIR/traces/` after its timing.
    """
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    cases = suite.cases()
    if case_filter is not None:
        cases = case_filter.apply(cases, suite)
    if shard is not None:
        cases = shard.select(cases)
    if not cases:
        raise CondConvBenchError(f"{suite.path}: no cases to run after filters and sharding")
    allocator = fix_malloc_thresholds() if suite.model.timing.fixed_malloc else {"policy": "default (fixed_malloc: false)"}
    run = _open_run(suite, Path(output) if output else default_output(suite), resume, shard, cases)
    run.update_metadata(allocator=allocator)
    done = run.completed_case_ids()
    outcome = RunOutcome(run, len(cases), len(done & {case.id for case in cases}))
    ctx = _CaseContext(suite.model.seed)
    for index, case in enumerate(cases, start=1):
        if case.id in done:
            continue
        if listener:
            listener.case_started(index, len(cases), case)
        row, measured, profile_record = run_case(case, ctx, suite, run.traces_dir if profile else None)
        run.append(row, measured)
        if profile_record is not None:
            run.append_profile(profile_record)
        outcome.counts[row["status"]] += 1
        if row.get("equivalent") is False:
            outcome.equivalence_failures.append(case.id)
        if listener:
            listener.case_finished(index, len(cases), case, row)
    run.update_metadata(finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return outcome
