"""Commands about what the layers run: list (implementations, allocators, where auto looks, suites), tune, tune-model."""

from __future__ import annotations

from pathlib import Path

import click
import pandas as pd

from condconv_bench.errors import CondConvBenchError, ResultsError
from condconv_bench.dispatch.cache import CACHE_VARIABLE, cache_path
from condconv_bench.dispatch.table import DispatchTable, default_table
from condconv_bench.machine import allocators
from condconv_bench.machine.allocators import ALLOCATORS
from condconv_bench.core.registry import list_impls
from condconv_bench.run.runner import default_output
from condconv_bench.suite.selection import CaseFilter
from condconv_bench.suite.loader import load_suite, shipped_suites
from condconv_bench.tune.from_runs import tune, tune_model
from condconv_bench.cli.progress import progress_for
from condconv_bench.cli.app import MEASURE_DEFAULTS, main


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
    path = cache_path()  # the file itself: loading it as the layers do would warn about what this reports
    if path is None:
        click.echo(f"  autotune cache     off (${CACHE_VARIABLE})")
    else:
        try:
            state = f"{len(DispatchTable.load(path).entries)} entries" if path.exists() else "nothing measured yet"
        except ResultsError as exc:  # as the layers treat it: measured afresh and replaced, never fatal
            state = f"unreadable, autotune measures afresh and replaces it: {exc}"
        click.echo(f"  autotune cache     {path} ({state}; this machine and torch build only)")
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
@click.option("--allocator", type=click.Choice(ALLOCATORS), help=f"Allocator of the worker processes [suite's timing.allocator, else {MEASURE_DEFAULTS.allocator}]; "
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
    progress = progress_for(f"tune {loaded.name}", quiet or from_run is not None)
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

