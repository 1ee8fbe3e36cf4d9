"""Commands that run suites and read their run directories: run, validate, merge, report, profile, trace-diff."""

from __future__ import annotations

import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import pandas as pd

from condconv_bench.errors import EXIT_FAILURE, CondConvBenchError, RunInterruptedError
from condconv_bench.machine.allocators import ALLOCATORS
from condconv_bench.profiling.model_stages import stage_reports
from condconv_bench.run.phase_profile import profile_phases
from condconv_bench.profiling.phases import PHASES
from condconv_bench import formatting
from condconv_bench.report import RUN_FORMATS, tables, write_report
from condconv_bench.run.merge import merge_runs
from condconv_bench.run.runner import default_output, run_suite
from condconv_bench.suite.selection import CaseFilter, Shard
from condconv_bench.suite.loader import load_suite
from condconv_bench.cli.progress import progress_for
from condconv_bench.cli.app import MEASURE_DEFAULTS, main


def summary_table(frame: pd.DataFrame) -> str:
    """Per layer and batch size: the fastest implementation and its ratios, as plain text."""
    shown = tables.headline_display(frame)
    return shown.to_string(index=False) if not shown.empty else tables.headline_absent(frame)


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
@click.option("--runtime", "runtimes", multiple=True, help="Only this runtime: eager, onnxruntime or openvino (repeatable).")
@click.option("--strict", is_flag=True, help="Exit 1 if any case ended in an error.")
@click.option("--profile", is_flag=True, help="Also record torch.profiler traces per case into RUN_DIR/traces.")
@click.option("--no-report", is_flag=True, help="Do not write RUN_DIR/report.html at the end.")
@click.option("--processes", type=click.IntRange(1, 64), help=f"Worker processes that each time every group [suite's timing.processes, else {MEASURE_DEFAULTS.processes}].")
@click.option("--allocator", type=click.Choice(ALLOCATORS), help=f"Allocator of the worker processes [suite's timing.allocator, else {MEASURE_DEFAULTS.allocator}].")
@click.option("-q", "--quiet", is_flag=True, help="No progress (a bar on a terminal, a line per group in a log).")
def run(suite: str, output: Path | None, resume: bool, shard: str | None, impls: tuple[str, ...],
        devices: tuple[str, ...], batch_sizes: tuple[int, ...], layers: tuple[str, ...], dtypes: tuple[str, ...],
        modes: tuple[str, ...], runtimes: tuple[str, ...], strict: bool, profile: bool, no_report: bool, processes: int | None, allocator: str | None, quiet: bool) -> None:
    """Run SUITE (a YAML file, or the name of a shipped suite) and write a run directory.

    Each group (a layer at one batch size, device, dtype, mode, memory format, thread count and runtime) is
    timed in interleaved rounds in several fresh worker processes, until every ratio to the static
    floor is known within the suite's precision or its time budget is spent.
    """
    if resume and output is None:
        raise CondConvBenchError("--resume needs -o/--output: the run directory to continue")
    loaded = load_suite(suite)
    output = output or default_output(loaded)
    progress = progress_for(loaded.name, quiet)
    try:
        outcome = run_suite(
            loaded, output, resume=resume, shard=Shard.parse(shard) if shard else None,
            case_filter=CaseFilter(impls, devices, batch_sizes, layers, dtypes, modes, runtimes), listener=progress, profile=profile,
            processes=processes, allocator=allocator,
        )
    except KeyboardInterrupt:
        # The run has stopped and says so: from here on a SIGINT changes nothing. Ignored rather than
        # left to Python, whose shutdown puts SIGINT back to the default action, so that a late one
        # would end the process by the signal after the message, not with 130 (seen once in CI).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    # One line per reason and layer: a model entry that cannot run errs in every case with one reason.
    for (layer, reason), rows in frame[frame["status"] == "error"].groupby(["layer", "reason"], sort=False):
        where = rows["case_id"].iloc[0] if len(rows) == 1 else f"{layer}, {len(rows)} cases"
        click.echo(f"error row: {where}: {reason}", err=True)
    for case_id in outcome.equivalence_failures:
        click.echo(f"equivalence failure: {case_id}", err=True)
    if outcome.equivalence_failures or (strict and counts["error"]):
        sys.exit(EXIT_FAILURE)


@main.command()
@click.argument("suite")
def validate(suite: str) -> None:
    """Check SUITE without running it, and show the timing settings it runs with."""
    loaded = load_suite(suite)
    cases = loaded.cases()
    click.echo(
        f"{loaded.path}: ok — {len(cases)} cases: {len(loaded.layers)} layers, "
        f"{len({c.impl for c in cases})} implementations, devices {', '.join(sorted({c.device for c in cases}))}, "
        f"runtimes {', '.join(dict.fromkeys(c.runtime for c in cases))}"
    )
    click.echo("timing: " + ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                                      for key, value in asdict(loaded.model.timing.settings()).items()))


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Merged run directory.")
def merge(run_dirs: tuple[Path, ...], output: Path) -> None:
    """Merge the run directories of a suite's shards into one."""
    merged = merge_runs(list(run_dirs), output)
    click.echo(f"merged {len(run_dirs)} runs, {len(merged.results())} cases, into {merged.path}")


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


@main.command("model-stages")
@click.argument("model")
@click.argument("floor")
@click.option("--batch-size", "batch_sizes", multiple=True, type=click.IntRange(min=1), default=(8,), show_default=True,
              help="Batch size (repeatable).")
@click.option("--input-size", type=click.IntRange(min=1), default=224, show_default=True, help="Height and width of the input images.")
@click.option("--strategy", default="autotune", show_default=True, help="What convert() gives the CondConv layers.")
@click.option("--rounds", type=click.IntRange(min=1), default=15, show_default=True, help="Interleaved rounds of both models.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads [torch's default here].")
@click.option("--layers", is_flag=True, help="One row per CondConv layer (and what it ran) instead of per stage.")
def model_stages_command(model: str, floor: str, batch_sizes: tuple[int, ...], input_size: int, strategy: str, rounds: int,
                         threads: int | None, layers: bool) -> None:
    """Where converted / floor's time goes in MODEL, stage by stage, against FLOOR (the same network without CondConv).

    Both models run in interleaved rounds in this process with a clock hook on every stage; one
    profiled pass splits each stage's difference into phases. Inference only; nothing is written.
    """
    for report in stage_reports(model, floor, batch_sizes, input_size, strategy, rounds, threads, layers):
        click.echo(f"\n{report.title}\n\n{report.table}")


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
    from condconv_bench.report.trace_diff import diff_traces

    click.echo(diff_traces(run_dir, control, test).head(top).to_string())

