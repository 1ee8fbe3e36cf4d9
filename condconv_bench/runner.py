"""Cases → result rows, a sweep of groups at a time, each sweep's rows persisted before the next.

For every case of a group the runner builds the implementation, loads the layer's one shared
parameter set, draws the group's seeded inputs (`fixtures`) and runs the untimed probes in a
fixed order: the cold first call (compile time), equivalence against the float64 oracle, FLOP
counts, peak memory. Then the sweep's groups are timed by the instrument (`measure`): interleaved
rounds in fresh worker processes, until their ratios are precise or their budgets are spent. A case
that cannot run is `skipped` with the reason; one that fails is an `error` row with the message;
neither stops the suite. Nothing here prints: progress goes to an optional listener, which the
CLI turns into a progress bar.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from condconv_bench import equivalence, flops, memory
from condconv_bench.case import TORCH_DTYPES, Case, Role, role_of
from condconv_bench.dispatch.cache import cache_off
from condconv_bench.environment import describe_environment
from condconv_bench.errors import CondConvBenchError, DeviceUnavailableError, ImplUnavailableError, ResultsError, first_line
from condconv_bench.fixtures import (
    CompileFellBackError, GroupInputs, build_module, dispatched, first_call, grad_mode, layer_state, seed_of, step_function,
    use_exact_float32, warm_up_device,
)
from condconv_bench.footprint import memory_reason
from condconv_bench.layer import CondConvBase
from condconv_bench.limits import Ceilings, distance_columns, limit_columns
from condconv_bench.machine_peak import dense_peak_flops, depthwise_peak_flops, matmul_peak_flops, memory_bandwidths
from condconv_bench.measure import allocators
from condconv_bench.measure.group import CaseTiming, GroupMeasurement, GroupTiming, measure_groups
from condconv_bench.settings import MeasureSettings
from condconv_bench.measure.pool import WorkerPool
from condconv_bench.measure.protocol import Visit
from condconv_bench.measure.ratios import Interval
from condconv_bench.profile import record_profile
from condconv_bench.results import SCHEMA_VERSION, RunDirectory, writer_lock
from condconv_bench.suite import Suite, load_suite
from condconv_bench.timing import Timing
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
    dtypes: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()

    def apply(self, cases: list[Case], suite: Suite) -> list[Case]:
        for option, values, attribute in (
            ("--impl", self.impls, "impl"),
            ("--device", self.devices, "device"),
            ("--batch-size", self.batch_sizes, "batch_size"),
            ("--layer", self.layers, "layer"),
            ("--dtype", self.dtypes, "dtype"),
            ("--mode", self.modes, "mode"),
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


def skip_reason(cls: type[CondConvBase], case: Case, device: torch.device) -> str | None:
    """Why `case` cannot run here (no such device, implementation unavailable, layer unsupported,
    more memory than is available), or None."""
    unsupported = (cls.unsupported_reason(spec, device, case.torch_dtype) for spec in case.workload.layer_specs())
    return (device_unavailable_reason(device) or case.workload.unavailable_reason() or cls.unavailable_reason()
            or next(filter(None, unsupported), None) or memory_reason(case, device))


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


class _GroupContext:
    """The layer's parameters, the group's inputs and its float64 oracle, each built once per group
    and only when a case of the group gets to run (a skipped device never allocates)."""

    def __init__(self, case: Case, seed: int, ceilings: Ceilings | None = None) -> None:
        self._case, self._seed = case, seed
        self.ceilings = ceilings  # the run's measured ceilings for the group's context, for its limits
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
    dispatched: str | None  # what a dispatching implementation (auto) ran
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
            graphs = first_call(step, cls.compiles, device)
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


def _probe(case: Case, cls: type[CondConvBase], device: torch.device, ctx: _GroupContext, row: dict[str, Any],
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
    step = step_function(module, x, inputs, case.mode)

    row.update(asdict(_first_call(cls, module, step, case, device, row)))
    row.update(asdict(_sizes(case, module, inputs, x.element_size())))
    if role_of(cls) is not Role.FLOOR:
        reference = ctx.reference(workload, module)
        row.update(equivalence.check_equivalence(module, x, inputs.routing_weights, inputs.grad_output, reference).columns())
    analytic = workload.analytic_macs(module, case.batch_size)
    row.update(flops.count_flops(workload.eager_module(module), x, inputs.routing_weights, analytic).columns())
    work = workload.work(module, case.batch_size) if case.mode == "inference" else None
    if work is not None and ctx.ceilings is not None:
        row.update(limit_columns(work, ctx.ceilings))
    with grad_mode(case.mode):
        row["peak_memory_bytes"] = memory.peak_memory_bytes(step, device)
        return record_profile(case.id, step, traces_dir, device, workload.num_experts) if traces_dir is not None else None


def probe_case(case: Case, ctx: _GroupContext, traces_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One case's untimed probes; never raises for a failing implementation (the row says what happened).

    Returns the row (status `ok` means ready to be timed) and, when `traces_dir` is given, the
    profile record.
    """
    row = _identity(case)
    started = time.perf_counter()
    device = torch.device(case.device)
    cls = case.workload.impl_class(case.impl)
    row["role"] = str(role_of(cls))
    profile_record = None
    reason = skip_reason(cls, case, device)
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


def _interval_columns(prefix: str, interval: Interval | None) -> dict[str, float | None]:
    if interval is None:
        return {}
    return {prefix: interval.estimate, f"{prefix}_ci_low": interval.low, f"{prefix}_ci_high": interval.high}


def _timing_columns(verdict: CaseTiming, batch_size: int) -> dict[str, Any]:
    timing = verdict.timing
    return {
        "latency_median_s": timing.median_s, "latency_iqr_s": timing.iqr_s, "latency_p10_s": timing.p10_s,
        "latency_p90_s": timing.p90_s, "latency_mean_s": timing.mean_s, "n_measurements": len(timing.times_s),
        "number_per_run": timing.number_per_run, "processes": timing.processes, "noisy": verdict.unstable,
        "process_spread": verdict.process_spread, "throughput_per_s": batch_size / timing.median_s,
        "timed_s": float(sum(timing.times_s)) * timing.number_per_run, "tied_fastest": verdict.tied_fastest,
        **_interval_columns("vs_floor", verdict.vs_floor), **_interval_columns("vs_best", verdict.vs_best),
    }


def _measurement(cases: list[Case], rows: dict[str, dict[str, Any]], suite: Suite,
                 settings: MeasureSettings) -> GroupMeasurement | None:
    """The timing of a group's probed cases, ready to be measured; None when none of them can run."""
    timed = [case for case in cases if rows[case.id]["status"] == "ok"]
    if not timed:
        return None
    classes = {case.id: case.workload.impl_class(case.impl) for case in timed}
    roles = {case.id: rows[case.id]["role"] for case in timed}
    floor = next((case_id for case_id, role in roles.items() if role == Role.FLOOR), None)
    candidates = {c for c, role in roles.items() if role == Role.STRATEGY and rows[c].get("equivalent") is True}
    dispatchers = {c for c, role in roles.items() if role == Role.DISPATCHER}
    visit = Visit(tuple(timed), classes, suite.model.seed, settings.rounds, settings.block_s, settings.warmup,
                  seed_of(suite.model.seed, *timed[0].group))
    return GroupMeasurement(visit, settings, floor=floor, candidates=candidates, dispatchers=dispatchers)


def _record_timing(measured: GroupTiming, rows: dict[str, dict[str, Any]]) -> dict[str, Timing]:
    """Add each timed case's verdict (or its failure) to its row; returns the raw samples."""
    timed = [case_id for case_id, row in rows.items() if row["status"] == "ok"]
    share = measured.elapsed_s / len(timed)
    for case_id in timed:
        row = rows[case_id]
        row["wall_s"] += share
        if case_id in measured.cases:
            row.update(_timing_columns(measured.cases[case_id], row["batch_size"]), stopped_because=measured.stopped_because)
            row.update(distance_columns(row))
            if case_id in measured.dispatched:
                row["dispatched"] = _dispatch_summary(measured.dispatched[case_id])
        else:
            row.update(status="error", reason=measured.errors[case_id])
    return {case_id: verdict.timing for case_id, verdict in measured.cases.items()}


def _dispatch_summary(builds: Counter[str]) -> str:
    """What a dispatcher ran in the timed workers: `pixel_major_matmul` when every build agreed,
    else each choice with its share of the builds, most frequent first (`a 5/7; b 2/7`)."""
    if len(builds) == 1:
        return next(iter(builds))
    total = sum(builds.values())
    return "; ".join(f"{choice} {count}/{total}" for choice, count in sorted(builds.items(), key=lambda item: (-item[1], item[0])))


def default_output(suite: Suite) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", suite.name).strip("_.") or "suite"
    return Path("reports") / f"{slug}-{stamp}"


# Ceilings are upper bounds, and another process's burst only ever lowers a measurement (once, a
# 2-thread LLC copy measured 0.8 GB/s against 100 GB/s a minute before): each is taken as the best
# of a few passes over all of them, so a burst must last the whole measurement to lower it.
CEILING_PASSES = 3


def _best(measure: Callable[[], float]) -> float:
    return max(measure() for _ in range(CEILING_PASSES))


def _matmul_peaks(cases: list[Case]) -> list[dict[str, Any]]:
    """The machine's matmul, dense and depthwise-conv FLOP/s for each device, dtype and thread count the cases use."""
    peaks = []
    for device, dtype, threads in dict.fromkeys((c.device, c.dtype, c.threads) for c in cases):
        if device_unavailable_reason(torch.device(device)) is None:
            target, torch_dtype = torch.device(device), TORCH_DTYPES[dtype]
            peaks.append({"device": device, "dtype": dtype, "threads": threads,
                          "flops_per_s": matmul_peak_flops(target, torch_dtype, threads),
                          "dense_flops_per_s": _best(lambda: dense_peak_flops(target, torch_dtype, threads)),
                          "depthwise_flops_per_s": _best(lambda: depthwise_peak_flops(target, torch_dtype, threads))})
    return peaks


def _memory_bandwidths(cases: list[Case]) -> list[dict[str, Any]]:
    """The machine's DRAM and last-level-cache bandwidth for each device and thread count the cases use."""
    measured = []
    for device, threads in dict.fromkeys((c.device, c.threads) for c in cases):
        if device_unavailable_reason(torch.device(device)) is None:
            passes = [memory_bandwidths(torch.device(device), threads) for _ in range(CEILING_PASSES)]
            best = {key: max(p[key] for p in passes) for key in ("dram_bytes_per_s", "llc_bytes_per_s")}
            measured.append({"device": device, "threads": threads, **passes[0], **best})
    return measured


def _open_run(suite: Suite, output: Path, resume: bool, shard: Shard | None, cases: list[Case]) -> RunDirectory:
    if resume and (output / "results.csv").exists():
        run = RunDirectory.open(output)
        metadata = run.metadata()
        if metadata["schema_version"] != SCHEMA_VERSION:
            raise ResultsError(f"{output}: was written by an older condconv-bench (schema {metadata['schema_version']}); start a new run")
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
        "memory_bandwidths": _memory_bandwidths(cases),
    }
    return RunDirectory.create(output, metadata)


def _groups(cases: list[Case]) -> list[list[Case]]:
    """Cases split into their groups, in run order (a suite lists each group's cases together)."""
    groups: dict[tuple[Any, ...], list[Case]] = {}
    for case in cases:
        groups.setdefault(case.group, []).append(case)
    return list(groups.values())


def run_suite(
    suite: Suite | str | Path,
    output: str | Path | None = None,
    *,
    resume: bool = False,
    shard: Shard | None = None,
    case_filter: CaseFilter | None = None,
    listener: CaseListener | None = None,
    profile: bool = False,
    processes: int | None = None,
    allocator: str | None = None,
) -> RunOutcome:
    """Run a suite (or its filtered shard) into a run directory and return what happened.

    A sweep of groups at a time: every case's untimed probes run here, then the sweep's groups are
    timed in `processes` worker processes (the suite's setting if None) under `allocator`
    (likewise), and their rows are appended at once. A resumed run measures again any group with
    a missing case and appends only the missing rows. With `profile`, each case is also profiled into `RUN_DIR/traces/`.
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
    settings = suite.model.timing.settings(processes, allocator)
    pool = WorkerPool(settings.processes, settings.allocator)
    output = Path(output) if output else default_output(suite)
    # Like the workers, the probes neither read nor fill the machine's autotune cache: a run
    # measures what a fresh machine gets.
    with writer_lock(output), cache_off():
        return _run_cases(suite, cases, settings, pool, _open_run(suite, output, resume, shard, cases), listener, profile)


def _run_cases(suite: Suite, cases: list[Case], settings: MeasureSettings, pool: WorkerPool,
               run: RunDirectory, listener: CaseListener | None, profile: bool) -> RunOutcome:
    """The run's loop over sweeps of groups: probes here, timing in the pool, rows appended per sweep."""
    run.update_metadata(allocator=allocators.describe(settings.allocator), measurement=asdict(settings))
    done = run.completed_case_ids()
    outcome = RunOutcome(run, len(cases), len(done & {case.id for case in cases}))
    position = {case.id: index for index, case in enumerate(cases, start=1)}
    warmed: set[tuple[str, str]] = set()
    with pool:
        groups = _groups(cases)
        for start in range(0, len(groups), settings.sweep_groups):
            probed = []  # per group of this sweep: its cases not yet in the run, their rows, its measurement
            for group in groups[start : start + settings.sweep_groups]:
                missing = [case for case in group if case.id not in done]
                if not missing:
                    continue
                first = group[0]
                if (first.device, first.dtype) not in warmed and device_unavailable_reason(torch.device(first.device)) is None:
                    warm_up_device(torch.device(first.device), first.torch_dtype)
                    warmed.add((first.device, first.dtype))
                ctx = _GroupContext(first, suite.model.seed, Ceilings.from_metadata(run.metadata(), first.device, first.dtype, first.threads))
                rows = {}
                for case in group:
                    if listener:
                        listener.case_started(position[case.id], len(cases), case)
                    rows[case.id], profile_record = probe_case(case, ctx, run.traces_dir if profile and case in missing else None)
                    if profile_record is not None:
                        run.append_profile(profile_record)
                probed.append((missing, rows, _measurement(group, rows, suite, settings)))
            measured = iter(measure_groups(pool, [m for _, _, m in probed if m is not None]))
            for missing, rows, measurement in probed:
                timings = _record_timing(next(measured), rows) if measurement is not None else {}
                for case in missing:
                    row = rows[case.id]
                    run.append(row, timings.get(case.id))
                    outcome.counts[row["status"]] += 1
                    if row.get("equivalent") is False:
                        outcome.equivalence_failures.append(case.id)
                    if listener:
                        listener.case_finished(position[case.id], len(cases), case, row)
    run.update_metadata(finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return outcome
