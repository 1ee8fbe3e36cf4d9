"""Commands that judge a change: baseline save, compare, gate ab, gate baseline."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, get_args

import click
from pydantic import ValidationError

from condconv_bench.gate.ab.gate import run_ab_gate
from condconv_bench.gate.snapshot import load_snapshot, save_baseline
from condconv_bench.gate.compare import compare_snapshots
from condconv_bench.errors import CondConvBenchError
from condconv_bench.gate.baseline_gate import run_gate
from condconv_bench.machine.allocators import ALLOCATORS
from condconv_bench.report import ab as ab_report
from condconv_bench.report import comparison as comparison_report
from condconv_bench.report.reproducibility import reproducibility
from condconv_bench.run.directory import RunDirectory
from condconv_bench.settings import ABSettings, Comparison, GateSettings
from condconv_bench.suite.schema import GateSection
from condconv_bench.cli.app import AB_DEFAULTS, GATE_DEFAULTS, MEASURE_DEFAULTS, main


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
        click.option("--time-threshold", type=float, help=f"Relative slowdown that counts [suite's gate:, else {GATE_DEFAULTS.time_threshold:g}]."),
        click.option("--memory-threshold", type=float, help=f"Relative peak-memory growth that counts [suite's gate:, else {GATE_DEFAULTS.memory_threshold:g}]."),
        click.option("--alpha", type=float, help=f"Significance level of the Mann-Whitney U test [suite's gate:, else {GATE_DEFAULTS.alpha:g}]."),
        click.option("--comparison", type=click.Choice(get_args(Comparison)),
                     help=f"Raw latencies, or latencies over the floor of their own run [suite's gate:, else {GATE_DEFAULTS.comparison}]."),
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
@click.option("--format", "fmt", type=click.Choice(list(comparison_report.RENDERERS)), default="text", show_default=True)
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
    click.echo(comparison_report.RENDERERS[fmt](comparison, True, None))


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
@click.option("--processes", type=click.IntRange(1, 64), help=f"Worker processes [suite's timing.processes, else {MEASURE_DEFAULTS.processes}].")
@click.option("--allocator", type=click.Choice(ALLOCATORS), help=f"Allocator of the worker processes [suite's timing.allocator, else {MEASURE_DEFAULTS.allocator}].")
@click.option("--time-threshold", type=float, default=AB_DEFAULTS.time_threshold, show_default=True,
              help="Relative slowdown of the paired ratio head / base that fails.")
@click.option("--instruction-threshold", type=float, default=AB_DEFAULTS.instruction_threshold, show_default=True,
              help="Relative growth of instructions per step that fails.")
@click.option("--instruction-min-delta", type=click.IntRange(min=0), default=AB_DEFAULTS.instruction_min_delta, show_default=True,
              help="And the growth must exceed this many instructions per step (one step's jitter).")
@click.option("--alpha", type=float, default=AB_DEFAULTS.alpha, show_default=True, help="Significance level of the Wilcoxon signed-rank test.")
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
@click.option("--format", "fmt", type=click.Choice(list(comparison_report.RENDERERS)), default="text", show_default=True)
@click.option("--all", "everything", is_flag=True, help="List every case, not only those that changed.")
@_threshold_options
def gate_baseline(run_dirs: tuple[Path, ...], baseline_path: Path, no_latency: bool, fail_on_improvement: bool, fmt: str,
                  everything: bool, **overrides: Any) -> None:
    """Gate RUN_DIRS (each case from its fastest run) against a baseline file or run directory."""
    result = run_gate(list(run_dirs), baseline_path, _gate_settings(run_dirs[0], overrides), fail_on_improvement, latency=not no_latency)
    click.echo(comparison_report.RENDERERS[fmt](result.comparison, everything, list(result.failures)))
    sys.exit(result.exit_code)

