"""The `condconv-bench` command: a thin click shell over the library.

Every command parses options, calls one library function and renders what it returns. Errors of
the `CondConvBenchError` family become `error: …` lines on stderr and the error's exit code
(0 ok, 1 equivalence failure or regression, 2 bad input), never a traceback; a row a reader sets
aside (`RowSetAside`) becomes one `warning: …` line.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any, get_args

import click
import pandas as pd
from pydantic import ValidationError

from condconv_bench.gate.ab.gate import run_ab_gate
from condconv_bench.gate.baseline import load_snapshot, save_baseline
from condconv_bench.gate.compare import compare_snapshots
from condconv_bench.errors import EXIT_FAILURE, CondConvBenchError, ResultsError, RunInterruptedError
from condconv_bench.dispatch.cache import CACHE_VARIABLE, machine_cache
from condconv_bench.dispatch.table import DispatchTable, default_table
from condconv_bench.gate.baseline_gate import run_gate
from condconv_bench.measure import allocators
from condconv_bench.measure.allocators import ALLOCATORS
from condconv_bench.phase_profile import profile_phases
from condconv_bench.phases import PHASES
from condconv_bench.registry import list_impls
from condconv_bench.report import ab as ab_report
from condconv_bench import formatting
from condconv_bench.report import RUN_FORMATS, tables, verdicts, write_report
from condconv_bench.report.reproducibility import reproducibility
from condconv_bench.results import RunDirectory, merge_runs
from condconv_bench.set_aside import RowSetAside
from condconv_bench.runner import default_output, run_suite
from condconv_bench.selection import CaseFilter, Shard
from condconv_bench.case import Case
from condconv_bench.settings import ABSettings, Comparison, GateSettings, MeasureSettings
from condconv_bench.suite import GateSection, load_suite, shipped_suites
from condconv_bench.tune import tune, tune_model


_show_warning = warnings.showwarning


def _show_set_aside(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    if issubclass(category, RowSetAside):
        click.echo(f"warning: {message}", err=True)
    else:
        _show_warning(message, category, *args, **kwargs)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", RowSetAside)
                warnings.showwarning = _show_set_aside
                return super().invoke(ctx)
        except CondConvBenchError as exc:
            for line in str(exc).splitlines():
                click.echo(f"error: {line}", err=True)
            ctx.exit(exc.exit_code)


class _ProgressBar:
    """Runner listener that draws `n/N`, the current case and an ETA on stderr."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def _ensure(self, total: int) -> Any:
        if self.bar is None:
            self.bar = click.progressbar(
                length=total, label=self.label, show_pos=True, show_eta=True, file=sys.stderr,
                item_show_func=lambda case: case.id if case else None,
            )
            self.bar.__enter__()
        return self.bar

    def case_started(self, index: int, total: int, case: Case) -> None:
        bar = self._ensure(total)
        bar.update(index - 1 - bar.pos, case)

    def timing_started(self, groups: int, budget_s: float) -> None:
        pass  # the bar keeps showing the last case probed until the sweep's rows arrive

    def case_finished(self, index: int, total: int, case: Case, row: dict[str, Any]) -> None:
        bar = self._ensure(total)
        bar.update(index - bar.pos, case)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


class _ProgressLines:
    """Runner listener for a log (stderr is not a terminal, where a bar draws nothing): a line per
    group probed and per sweep timed, each with the elapsed time and what is left."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.group: tuple[Any, ...] | None = None

    def _say(self, text: str) -> None:
        click.echo(f"[{formatting.duration(time.monotonic() - self.started)}] {self.label}: {text}", err=True)

    def case_started(self, index: int, total: int, case: Case) -> None:
        if case.group == self.group:
            return
        self.group = case.group
        elapsed = time.monotonic() - self.started
        left = f"; probes left about {formatting.duration(elapsed / (index - 1) * (total - index + 1))}" if index > 1 else ""
        self._say(f"probing case {index}/{total} ({case.layer} b{case.batch_size} {case.device} {case.dtype} {case.mode}){left}")

    def timing_started(self, groups: int, budget_s: float) -> None:
        self._say(f"timing {groups} groups in the worker processes: at most {formatting.duration(groups * budget_s)} "
                  f"({budget_s:g} s budget per group)")

    def case_finished(self, index: int, total: int, case: Case, row: dict[str, Any]) -> None:
        if index == total:
            self._say(f"{total}/{total} cases done")

    def close(self) -> None:
        pass


def _progress(label: str, quiet: bool) -> _ProgressBar | _ProgressLines | None:
    """A bar on a terminal, lines in a log, nothing with --quiet."""
    if quiet:
        return None
    return _ProgressBar(label) if sys.stderr.isatty() else _ProgressLines(label)


def summary_table(frame: pd.DataFrame) -> str:
    """Per layer and batch size: the fastest implementation and its ratios, as plain text."""
    shown = tables.headline_display(frame)
    return shown.to_string(index=False) if not shown.empty else "no implementation produced a verified latency"


_MEASURE, _GATE, _AB = MeasureSettings(), GateSettings(), ABSettings()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="condconv-bench")
def main() -> None:
    """Benchmark, verify and compare CondConv implementations.

    Exit codes: 0 ok; 1 an equivalence failure, a regression, or (run --strict) an error row;
    2 bad input (malformed suite or results, unknown implementation, unavailable device or
    allocator); 130 a run stopped with Ctrl-C (resume it with --resume).
    """


@main.command()
@click.argument("suite")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Run directory [default: reports/<suite>-<timestamp>].")
@click.option("--resume", is_flag=True, help="Continue the run in --output, skipping finished cases.")
@click.option("--shard", help="Run only slice i of N (e.g. 2/4); merge shards with `merge`.")
@click.option("--impl", "impls", multiple=True, help="Only this implementation (repeatable).")
@click.option("--device", "devices", multiple=True, help="Only this device (repeatable).")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, help="Only this batch size (repeatable).")
@click.option("--layer", "layers", multiple=True, help="Only this layer (repeatable).")
@click.option("--dtype", "dtypes", multiple=True, help="Only this dtype (repeatable).")
@click.option("--mode", "modes", multiple=True, help="Only this mode, inference or training (repeatable).")
@click.option("--strict", is_flag=True, help="Exit 1 if any case ended in an error.")
@click.option("--profile", is_flag=True, help="Also record torch.profiler traces per case into RUN_DIR/traces.")
@click.option("--no-report", is_flag=True, help="Do not write RUN_DIR/report.html at the end.")
@click.option("--processes", type=click.IntRange(1, 64), help=f"Worker processes that each time every group [suite's timing.processes, else {_MEASURE.processes}].")
@click.option("--allocator", type=click.Choice(ALLOCATORS), help=f"Allocator of the worker processes [suite's timing.allocator, else {_MEASURE.allocator}].")
@click.option("-q", "--quiet", is_flag=True, help="No progress (a bar on a terminal, a line per group in a log).")
def run(suite: str, output: Path | None, resume: bool, shard: str | None, impls: tuple[str, ...],
        devices: tuple[str, ...], batch_sizes: tuple[int, ...], layers: tuple[str, ...], dtypes: tuple[str, ...],
        modes: tuple[str, ...], strict: bool, profile: bool, no_report: bool, processes: int | None, allocator: str | None, quiet: bool) -> None:
    """Run SUITE (a YAML file, or the name of a shipped suite) and write a run directory.

    Each group (a layer at one batch size, device, dtype, mode, memory format and thread count) is
    timed in interleaved rounds in several fresh worker processes, until every ratio to the static
    floor is known within the suite's precision or its time budget is spent.
    """
    if resume and output is None:
        raise CondConvBenchError("--resume needs -o/--output: the run directory to continue")
    loaded = load_suite(suite)
    output = output or default_output(loaded)
    progress = _progress(loaded.name, quiet)
    try:
        outcome = run_suite(
            loaded, output, resume=resume, shard=Shard.parse(shard) if shard else None,
            case_filter=CaseFilter(impls, devices, batch_sizes, layers, dtypes, modes), listener=progress, profile=profile,
            processes=processes, allocator=allocator,
        )
    except KeyboardInterrupt:
        raise RunInterruptedError(
            f"interrupted: the finished cases are in {output}; continue with: condconv-bench run {suite} -o {output} --resume"
        ) from None
    finally:
        if progress is not None:
            progress.close()
    counts = outcome.counts
    frame = outcome.run.results()
    click.echo(summary_table(frame))
    click.echo(
        f"\n{outcome.total} cases: {counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} errors"
        + (f", {outcome.already_done} already done" if outcome.already_done else "")
        + f"; results in {outcome.run.path}"
    )
    if not no_report:
        click.echo(f"report: {write_report([outcome.run.path], None, 'html')}")
    for _, row in frame[frame["status"] == "error"].iterrows():
        click.echo(f"error row: {row['case_id']}: {row['reason']}", err=True)
    for case_id in outcome.equivalence_failures:
        click.echo(f"equivalence failure: {case_id}", err=True)
    if outcome.equivalence_failures or (strict and counts["error"]):
        sys.exit(EXIT_FAILURE)


def phase_table(profiled: list[Any]) -> str:
    """One line per case: the step's time and each phase's share of it."""
    rows = []
    for item in profiled:
        case, breakdown = item.case, item.breakdown
        row: dict[str, Any] = {"case": f"{case.impl} b{case.batch_size} {case.device} {case.dtype} {case.mode}"}
        if breakdown is None:
            row["step"] = f"not profiled: {item.reason}"
        else:
            row["step"] = formatting.seconds(breakdown.step_us * 1e-6)
            for phase in PHASES:
                share = breakdown.phases.get(phase, 0.0) / breakdown.step_us if breakdown.step_us else 0.0
                row[phase] = f"{share:.0%}" if share >= 0.005 else "-"
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.drop(columns=[c for c in frame.columns if (frame[c].fillna("-") == "-").all()]).fillna("").to_string(index=False)


@main.command("profile")
@click.argument("suite")
@click.option("--layer", "layers", multiple=True, required=True, help="The layer to profile (repeatable).")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, required=True, help="Its batch size (repeatable).")
@click.option("--impl", "impls", multiple=True, help="Only this implementation (repeatable).")
@click.option("--device", "devices", multiple=True, help="Only this device (repeatable).")
@click.option("--dtype", "dtypes", multiple=True, help="Only this dtype (repeatable).")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["inference", "training"]), help="Only this mode (repeatable).")
def profile_command(suite: str, layers: tuple[str, ...], batch_sizes: tuple[int, ...], impls: tuple[str, ...],
                    devices: tuple[str, ...], dtypes: tuple[str, ...], modes: tuple[str, ...]) -> None:
    """Where each strategy's step goes for one layer and batch size of SUITE, measured here.

    Each case is built and warmed up as in a run, then a few steps are profiled and their time is
    split into phases (routing, mixing, layout, product, epilogue, backward, overhead) from the
    profiler's operator events; shares are of the profiled step. Nothing is written.
    """
    profiled = profile_phases(suite, CaseFilter(impls, devices, batch_sizes, layers, dtypes, modes))
    click.echo(phase_table(profiled))


@main.command("trace-diff")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("control")
@click.argument("test")
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Operators to show.")
def trace_diff_command(run_dir: Path, control: str, test: str, top: int) -> None:
    """Compare the traces of two profiled cases of RUN_DIR (case ids), operator by operator.

    HolisticTraceAnalysis's TraceDiff (install the `hta` extra) on the traces `run --profile`
    wrote: calls and total µs per operator in each, and the differences TEST − CONTROL.
    """
    from condconv_bench.trace_diff import diff_traces

    click.echo(diff_traces(run_dir, control, test).head(top).to_string())


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="File to write [default: RUN_DIR/report.html for html; stdout for markdown and csv].")
@click.option("--format", "fmt", type=click.Choice(list(RUN_FORMATS)), default="html", show_default=True)
def report(run_dirs: tuple[Path, ...], output: Path | None, fmt: str) -> None:
    """Report one or more run directories; several are compared side by side."""
    if fmt == "html" and output is None and len(run_dirs) > 1:
        raise CondConvBenchError("-o/--output is required to report several runs as html")
    written = write_report(list(run_dirs), output, fmt)
    click.echo(f"wrote {written}" if isinstance(written, Path) else written, nl=isinstance(written, Path))


@main.command()
@click.argument("suite")
def validate(suite: str) -> None:
    """Check SUITE without running it."""
    loaded = load_suite(suite)
    cases = loaded.cases()
    click.echo(
        f"{loaded.path}: ok — {len(cases)} cases: {len(loaded.layers)} layers, "
        f"{len({c.impl for c in cases})} implementations, devices {', '.join(sorted({c.device for c in cases}))}"
    )


@main.command("list")
def list_command() -> None:
    """Show implementations (with availability) and shipped suites."""
    click.echo("Implementations:")
    for info in list_impls():
        status = "available" if info.available else f"unavailable: {info.unavailable_reason}"
        role = " (the floor)" if info.is_floor else ""
        click.echo(f"  {info.key:<18} {info.description}{role}  [{status}]")
    click.echo("\nAllocators for the worker processes (run --allocator):")
    for name, reason in allocators.available().items():
        click.echo(f"  {name:<18} {'available' if reason is None else f'unavailable: {reason}'}")
    click.echo("\nWhere strategy='auto' looks, in this order (autotune measures, then keeps its choices in the first):")
    cache = machine_cache()
    if cache.path is None:
        click.echo(f"  autotune cache     off (${CACHE_VARIABLE})")
    else:
        try:
            state = f"{len(DispatchTable.load(cache.path).entries)} entries" if cache.path.exists() else "nothing measured yet"
        except ResultsError as exc:  # as the layers treat it: measured afresh and replaced, never fatal
            state = f"unreadable, autotune measures afresh and replaces it: {exc}"
        click.echo(f"  autotune cache     {cache.path} ({state}; this machine and torch build only)")
    table = default_table()
    click.echo(f"  dispatch table     {table.source or '(none)'}")
    if table.measured_on:
        click.echo(f"                     measured on {table.measured_on}")
    for line in table.provenance():
        click.echo(f"                     {line}")
    click.echo("\nShipped suites (run by name or path):")
    for name, path in sorted(shipped_suites().items()):
        suite = load_suite(path)
        click.echo(f"  {name:<18} {len(suite.cases()):>4} cases  {suite.model.description.strip().splitlines()[0] if suite.model.description else ''}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Merged run directory.")
def merge(run_dirs: tuple[Path, ...], output: Path) -> None:
    """Merge the run directories of a suite's shards into one."""
    merged = merge_runs(list(run_dirs), output)
    click.echo(f"merged {len(run_dirs)} runs, {len(merged.results())} cases, into {merged.path}")


def _gate_settings(run_dir: Path, overrides: dict[str, Any]) -> GateSettings:
    """The current run's suite settings, overridden by the options given on the command line."""
    suite_settings = RunDirectory.open(run_dir).metadata()["suite"].get("gate", {}) if run_dir.is_dir() else {}
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return GateSection.model_validate({**suite_settings, **given}).settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        raise CondConvBenchError(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}") from None




def _threshold_options(command: Any) -> Any:
    """The options of the baseline gate and `compare`; unset, each takes the suite's `gate:` value, else the default."""
    for option in reversed([
        click.option("--time-threshold", type=float, help=f"Relative slowdown that counts [suite's gate:, else {_GATE.time_threshold:g}]."),
        click.option("--memory-threshold", type=float, help=f"Relative peak-memory growth that counts [suite's gate:, else {_GATE.memory_threshold:g}]."),
        click.option("--alpha", type=float, help=f"Significance level of the Mann-Whitney U test [suite's gate:, else {_GATE.alpha:g}]."),
        click.option("--comparison", type=click.Choice(get_args(Comparison)),
                     help=f"Raw latencies, or latencies over the floor of their own run [suite's gate:, else {_GATE.comparison}]."),
    ]):
        command = option(command)
    return command


@main.group()
def baseline() -> None:
    """Baseline files for the regression gate."""


@baseline.command("save")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Baseline file, e.g. baselines/smoke-cpu.json.")
def baseline_save(run_dirs: tuple[Path, ...], output: Path) -> None:
    """Save the figures of RUN_DIRS (each case from its fastest run) as a small, reviewable baseline."""
    written = save_baseline(list(run_dirs), output)
    click.echo(f"wrote {written} ({len(load_snapshot(written).cases)} cases)")


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("current", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(list(verdicts.RENDERERS)), default="text", show_default=True)
@_threshold_options
def compare(base: Path, current: Path, fmt: str, **overrides: Any) -> None:
    """Compare CURRENT with BASE (each a run directory or a baseline file), case by case.

    For two run directories, it first prints how well they reproduce each other: the share of
    cases whose ratio to the floor agrees within ±5%, the worst moves, in how many groups
    the tied-fastest sets agree, and whether the cases that moved were flagged unstable.
    """
    comparison = compare_snapshots(load_snapshot(base), load_snapshot(current), _gate_settings(current, overrides))
    if fmt == "text" and base.is_dir() and current.is_dir():
        agreement = reproducibility(RunDirectory.open(base).results(), RunDirectory.open(current).results())
        click.echo("\n".join(agreement.lines()) + "\n")
    click.echo(verdicts.RENDERERS[fmt](comparison, True, None))


class _GateGroup(click.Group):
    """`gate ab` and `gate baseline`; the single command they replace still parses, with a deprecation line.

    `gate --against REF [options]` becomes `gate ab REF [options]`, and `gate RUN_DIR... --baseline
    FILE [options]` becomes `gate baseline RUN_DIR... --baseline FILE [options]`.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and (args[0] in self.commands or args[0] in ctx.help_option_names):
            return super().parse_args(ctx, args)
        rewritten, ref = [], None
        for index, arg in enumerate(args):
            if arg == "--against" and index + 1 < len(args):
                ref = args[index + 1]
            elif arg.startswith("--against="):
                ref = arg.partition("=")[2]
            elif not (index > 0 and args[index - 1] == "--against"):
                rewritten.append(arg)
        if ref is not None:
            new = ["ab", ref, *rewritten]
        elif args:
            new = ["baseline", *rewritten]
        else:
            return super().parse_args(ctx, args)
        click.echo(f"warning: this spelling of gate is deprecated and goes in the next release; use: condconv-bench gate {' '.join(new)}",
                   err=True)
        return super().parse_args(ctx, new)


@main.group(cls=_GateGroup)
def gate() -> None:
    """Pass (exit 0) or fail (exit 1) a change; exit 2 for bad input.

    \b
    gate ab REF                              the working tree against git revision REF, measured here side by side
    gate baseline RUN_DIR... --baseline FILE a run against a committed snapshot

    A/B measures the working tree's implementations and REF's in the same rounds of the same
    worker processes and counts their instructions under callgrind: it judges latency on any
    machine. A baseline gate compares FLOPs, equivalence, errors and memory anywhere, and latency
    only on the machine that made the baseline.
    """


@gate.command("ab")
@click.argument("ref")
@click.option("--suite", default="smoke", show_default=True, help="The suite to measure (a shipped name or a path).")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), help="The git repository [the one around the current directory].")
@click.option("--processes", type=click.IntRange(1, 64), help=f"Worker processes [suite's timing.processes, else {_MEASURE.processes}].")
@click.option("--allocator", type=click.Choice(ALLOCATORS), help=f"Allocator of the worker processes [suite's timing.allocator, else {_MEASURE.allocator}].")
@click.option("--time-threshold", type=float, default=_AB.time_threshold, show_default=True,
              help="Relative slowdown of the paired ratio head / base that fails.")
@click.option("--instruction-threshold", type=float, default=_AB.instruction_threshold, show_default=True,
              help="Relative growth of instructions per step that fails.")
@click.option("--instruction-min-delta", type=click.IntRange(min=0), default=_AB.instruction_min_delta, show_default=True,
              help="And the growth must exceed this many instructions per step (one step's jitter).")
@click.option("--alpha", type=float, default=_AB.alpha, show_default=True, help="Significance level of the Wilcoxon signed-rank test.")
@click.option("--no-instructions", is_flag=True, help="Skip the callgrind instruction counts.")
@click.option("--format", "fmt", type=click.Choice(list(ab_report.RENDERERS)), default="text", show_default=True)
@click.option("--all", "everything", is_flag=True, help="List every case, not only those that changed.")
def gate_ab(ref: str, suite: str, repo: Path | None, processes: int | None, allocator: str | None, time_threshold: float,
            instruction_threshold: float, instruction_min_delta: int, alpha: float, no_instructions: bool, fmt: str,
            everything: bool) -> None:
    """Gate the working tree against git revision REF, both measured here side by side."""
    if not (time_threshold > 0 and instruction_threshold > 0 and 0 < alpha < 1):
        raise CondConvBenchError("gate ab: --time-threshold and --instruction-threshold must be positive, --alpha within (0, 1)")
    thresholds = ABSettings(time_threshold, instruction_threshold, instruction_min_delta, alpha)
    result = run_ab_gate(ref, suite, repo, thresholds, processes, allocator, not no_instructions)
    click.echo(ab_report.RENDERERS[fmt](result, everything))
    sys.exit(result.exit_code)


@gate.command("baseline")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", "baseline_path", required=True, type=click.Path(path_type=Path),
              help="The baseline file (or run directory) to gate RUN_DIRS against.")
@click.option("--no-latency", is_flag=True, help="Compare only FLOPs, equivalence, errors and memory.")
@click.option("--fail-on-improvement", is_flag=True, help="Also fail when a case got faster (or smaller) beyond the thresholds.")
@click.option("--format", "fmt", type=click.Choice(list(verdicts.RENDERERS)), default="text", show_default=True)
@click.option("--all", "everything", is_flag=True, help="List every case, not only those that changed.")
@_threshold_options
def gate_baseline(run_dirs: tuple[Path, ...], baseline_path: Path, no_latency: bool, fail_on_improvement: bool, fmt: str,
                  everything: bool, **overrides: Any) -> None:
    """Gate RUN_DIRS (each case from its fastest run) against a baseline file or run directory."""
    result = run_gate(list(run_dirs), baseline_path, _gate_settings(run_dirs[0], overrides), fail_on_improvement, latency=not no_latency)
    click.echo(verdicts.RENDERERS[fmt](result.comparison, everything, list(result.failures)))
    sys.exit(result.exit_code)


@main.command("tune-model")
@click.argument("model")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, required=True, help="A batch size the model will serve (repeatable).")
@click.option("--input-size", type=int, default=224, show_default=True, help="Height and width of its input images.")
@click.option("--in-channels", type=int, default=3, show_default=True, help="Channels of its input images.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["inference", "training"]), help="Inference, training, or both (repeatable) [inference].")
@click.option("--budget", type=float, help="Tuning budget per layer signature, seconds [autotune's default].")
def tune_model_command(model: str, batch_sizes: tuple[int, ...], input_size: int, in_channels: int, modes: tuple[str, ...],
                       budget: float | None) -> None:
    """Autotune MODEL's CondConv layers here, into this machine's autotune cache.

    MODEL is timm:NAME or package.module:callable. One first call per mode and batch size, in this
    process: the cache file then holds every layer signature the model meets, for machines with
    this fingerprint (and torch build) to ship with the model; each still confirms what it reads.
    """
    if any(b < 1 for b in batch_sizes) or input_size < 1 or in_channels < 1 or (budget is not None and budget <= 0):
        raise CondConvBenchError("tune-model: --batch-size, --input-size, --in-channels and --budget must be positive")
    layers, calls, cache = tune_model(model, batch_sizes, input_size, modes or ("inference",), budget, in_channels)
    click.echo(f"{model}: {layers} CondConv layers converted to autotune")
    for call in calls:
        click.echo(f"  {call.mode:<9} batch {call.batch_size:>4}: first call {call.seconds:6.2f} s, "
                   f"{call.measured} signatures tuned, {call.confirmed} confirmed from the cache")
    click.echo(f"autotune cache: {cache}")


@main.command("tune")
@click.argument("suite")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Dispatch table to write (JSON).")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), help="Where the measurements go [default: reports/tune-<suite>-<timestamp>].")
@click.option("--from-run", type=click.Path(file_okay=False, path_type=Path), help="Build the table from this earlier run of SUITE instead of measuring.")
@click.option("--device", "devices", multiple=True, help="Only this device (repeatable).")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, help="Only this batch size (repeatable).")
@click.option("--layer", "layers", multiple=True, help="Only this layer (repeatable).")
@click.option("--allocator", type=click.Choice(ALLOCATORS), help=f"Allocator of the worker processes [suite's timing.allocator, else {_MEASURE.allocator}]; "
              "glibc tunes for a plain Python process.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def tune_command(suite: str, output: Path, run_dir: Path | None, from_run: Path | None, devices: tuple[str, ...],
                 batch_sizes: tuple[int, ...], layers: tuple[str, ...], allocator: str | None, quiet: bool) -> None:
    """Build a dispatch table for `auto` from SUITE's measurements on this machine.

    Use it with CondConv2d(..., dispatch_table=FILE) or CONDCONV_BENCH_DISPATCH=FILE; measured
    here, it also fills this machine's autotune cache, which `autotune` layers read first.
    """
    loaded = load_suite(suite)
    default = default_output(loaded)
    target = from_run or run_dir or default.with_name("tune-" + default.name)
    progress = _progress(f"tune {loaded.name}", quiet or from_run is not None)
    try:
        table, cache = tune(loaded, output, target, reuse_run=from_run is not None,
                            case_filter=CaseFilter((), devices, batch_sizes, layers), listener=progress, allocator=allocator)
    finally:
        if progress is not None:
            progress.close()
    chosen = pd.Series([e.strategy for e in table.entries]).value_counts()
    click.echo(f"wrote {output}: {len(table.entries)} entries from {target} ("
               + ", ".join(f"{key} {n}" for key, n in chosen.items()) + ")")
    click.echo(f"autotune cache: {cache}" if cache else "autotune cache: not written (the run comes from another machine or torch, or the cache is off)")
