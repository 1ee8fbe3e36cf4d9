"""Cases → result rows, a sweep of groups at a time, each sweep's rows persisted before the next.

For every case the untimed probes (`probes`) run here, in the runner's process; then the
sweep's groups are timed by the instrument (`measure`): interleaved rounds in fresh worker
processes, until their ratios are precise or their budgets are spent; each case's row
(`rows`) is appended to the run directory as soon as its sweep is measured. A case that cannot
run is `skipped` with the reason; one that fails is an `error` row with the message; neither stops
the suite. The run's metadata records the suite, the environment and the machine's ceilings
(`machine.ceilings`). Nothing here prints: progress goes to an optional listener, which the CLI turns
into a progress bar or progress lines.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

from condconv_bench.core.case import Case, Role
from condconv_bench.machine.devices import device_unavailable_reason, warm_up_device
from condconv_bench.dispatch.cache import FRESH_MACHINE, cache_off
from condconv_bench.machine.environment import describe_environment
from condconv_bench.errors import CondConvBenchError, ResultsError
from condconv_bench.cases.inputs import seed_of
from condconv_bench.core.limits import CaseWork, Ceilings, case_limits
from condconv_bench.machine.ceilings import (SENTINELS, best_ceilings, fastest_sentinels, matmul_peaks_of, memory_bandwidths_of,
                                             sentinel_best_seconds, sentinel_entry)
from condconv_bench.machine import allocators
from condconv_bench.measure.group import GroupMeasurement, GroupTiming, measure_groups
from condconv_bench.measure.pool import WorkerPool
from condconv_bench.measure.protocol import Visit
from condconv_bench.run.exports import Exports
from condconv_bench.run.probes import GroupContext, probe_case
from condconv_bench.runtimes.catalog import describe_runtimes
from condconv_bench.run.columns import SCHEMA_VERSION
from condconv_bench.run.directory import RunDirectory
from condconv_bench.run.lock import writer_lock
from condconv_bench.run.rows import limit_columns, record_timing
from condconv_bench.suite.selection import CaseFilter, Shard
from condconv_bench.settings import MeasureSettings
from condconv_bench.suite.grid import Suite
from condconv_bench.suite.loader import load_suite


class CaseListener(Protocol):
    """Receives progress; the CLI's progress bar (a terminal) and progress lines (a log) implement it."""

    def run_started(self, cases: list[Case]) -> None: ...

    def case_started(self, index: int, total: int, case: Case) -> None: ...

    def timing_started(self, groups: int, budget_s: float) -> None: ...

    def case_finished(self, index: int, total: int, case: Case, row: dict[str, Any]) -> None: ...


@dataclass
class RunOutcome:
    """What a run did, for the CLI's summary and exit code."""

    run: RunDirectory
    total: int
    already_done: int
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "skipped": 0, "error": 0})
    equivalence_failures: list[str] = field(default_factory=list)


def _measurement(cases: list[Case], rows: dict[str, dict[str, Any]], suite: Suite,
                 settings: MeasureSettings, exports: Exports, sentinel: str | None) -> GroupMeasurement | None:
    """The timing of a group's probed cases, with `sentinel` beside them, ready to be measured; None
    when none of them can run."""
    timed = [case for case in cases if rows[case.id]["status"] == "ok"]
    if not timed:
        return None
    classes = {case.id: case.workload.impl_class(case.impl) for case in timed}
    roles = {case.id: rows[case.id]["role"] for case in timed}
    floor = next((case_id for case_id, role in roles.items() if role == Role.FLOOR), None)
    candidates = {c for c, role in roles.items() if role == Role.STRATEGY and rows[c].get("equivalent") is True}
    dispatchers = {c for c, role in roles.items() if role == Role.DISPATCHER}
    graphs = {case.id: str(path) for case in timed if (path := exports.graph_of(case)) is not None}
    visit = Visit(tuple(timed), classes, suite.model.seed, settings.rounds, settings.block_s, settings.warmup,
                  seed_of(suite.model.seed, *timed[0].group), graphs=graphs, sentinel=sentinel)
    return GroupMeasurement(visit, settings, floor=floor, candidates=candidates, dispatchers=dispatchers)


def default_output(suite: Suite) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", suite.name).strip("_.") or "suite"
    return Path("reports") / f"{slug}-{stamp}"


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
        "matmul_peaks": matmul_peaks_of(cases),
        "memory_bandwidths": memory_bandwidths_of(cases),
        "runtimes": describe_runtimes({case.runtime for case in cases}),
    }
    return RunDirectory.create(output, metadata)


def _measure_ceilings_again(run: RunDirectory, cases: list[Case]) -> None:
    """After a sweep's timing, the ceilings once more, kept as the best of all measurements
    (`best_ceilings` says why): a run's limits are then read from ceilings sampled across it.
    The sweep's timed rows are not yet written, so a device error here (a GPU a case left broken,
    out of memory) keeps the earlier ceilings instead of losing them."""
    metadata = run.metadata()
    try:
        peaks, bandwidths = matmul_peaks_of(cases, passes=1), memory_bandwidths_of(cases, passes=1)
    except RuntimeError:
        return
    run.update_metadata(matmul_peaks=best_ceilings(metadata.get("matmul_peaks", []), peaks),
                        memory_bandwidths=best_ceilings(metadata.get("memory_bandwidths", []), bandwidths))


def _record_sentinels(run: RunDirectory, timed: list[GroupMeasurement], measured: list[GroupTiming]) -> None:
    """Each sentinel's fastest block in the sweep's rounds, kept in `run.json` as the fastest of the run so far."""
    fastest = [sentinel_entry(m.visit.sentinel, m.cases[0], t.sentinel_fastest_s)
               for m, t in zip(timed, measured) if t.sentinel_fastest_s is not None]
    if fastest:
        run.update_metadata(sentinels=fastest_sentinels(run.metadata().get("sentinels", []), fastest))


def _sentinel_of(case: Case, works: dict[str, CaseWork], rows: dict[str, dict[str, Any]], metadata: dict[str, Any]) -> str | None:
    """The ceiling that binds the group's CondConv compulsory limit (the floor's is the plain
    layer's), where it has a sentinel for the rounds to time (none where the group has no limits:
    models, training)."""
    ceilings = Ceilings.from_metadata(metadata, case.device, case.dtype, case.threads)
    work = next((work for case_id, work in works.items() if rows[case_id]["role"] != Role.FLOOR), None)
    binding = None if ceilings is None or work is None else case_limits(work, ceilings).binding_ceiling
    return binding if binding in SENTINELS else None


def _add_limits(rows: dict[str, dict[str, Any]], works: dict[str, CaseWork], metadata: dict[str, Any], sentinel: str | None) -> None:
    """Each row's limits, read from the run's best ceilings for its context (none before version
    4), and the fastest time of the sentinel timed beside it."""
    for case_id, work in works.items():
        row = rows[case_id]
        ceilings = Ceilings.from_metadata(metadata, row["device"], row["dtype"], int(row["threads"]))
        if ceilings is not None:
            row.update(limit_columns(case_limits(work, ceilings)))
            if sentinel is not None:
                row.update(sentinel=sentinel, sentinel_best_s=sentinel_best_seconds(metadata, row["device"], row["dtype"], int(row["threads"]), sentinel))


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
    pool = WorkerPool(settings.processes, settings.allocator, FRESH_MACHINE)
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
    exports = Exports(run.exports_dir, cases, suite.model.seed)
    if listener:
        listener.run_started([case for case in cases if case.id not in done])
    with pool:
        groups = _groups(cases)
        for start in range(0, len(groups), settings.sweep_groups):
            ceilings_so_far = run.metadata()
            probed = []  # per group of this sweep: its cases not yet in the run, their rows, its measurement
            for group in groups[start : start + settings.sweep_groups]:
                missing = [case for case in group if case.id not in done]
                if not missing:
                    continue
                first = group[0]
                if (first.device, first.dtype) not in warmed and device_unavailable_reason(torch.device(first.device)) is None:
                    warm_up_device(torch.device(first.device), first.torch_dtype)
                    warmed.add((first.device, first.dtype))
                ctx = GroupContext(first, suite.model.seed, exports)
                rows = {}
                for case in group:
                    if listener:
                        listener.case_started(position[case.id], len(cases), case)
                    rows[case.id], profile_record = probe_case(case, ctx, run.traces_dir if profile and case in missing else None)
                    if profile_record is not None:
                        run.append_profile(profile_record)
                sentinel = _sentinel_of(first, ctx.works, rows, ceilings_so_far)
                probed.append((missing, rows, _measurement(group, rows, suite, settings, exports, sentinel), ctx, sentinel))
            timed = [m for _, _, m, _, _ in probed if m is not None]
            if listener and timed:
                listener.timing_started(len(timed), settings.budget_s)
            measured = measure_groups(pool, timed)
            if timed:
                _measure_ceilings_again(run, [case for group in groups[start : start + settings.sweep_groups] for case in group])
                _record_sentinels(run, timed, measured)
            metadata, measured = run.metadata(), iter(measured)
            for missing, rows, measurement, ctx, sentinel in probed:
                _add_limits(rows, ctx.works, metadata, sentinel)
                timings = record_timing(next(measured), rows) if measurement is not None else {}
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

