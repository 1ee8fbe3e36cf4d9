"""The self-contained HTML report: tables and plots of one or more runs in a single file.

Plots are embedded as PNG data URIs (no network needed to open the file) and also written as
PNG files in `plots/` beside the report, for slides and papers. The page is rendered by a Jinja2
template with autoescaping on, so every name that comes from a suite or result file is escaped.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from condconv_bench import __version__
from condconv_bench.atomic import write_bytes_atomically, write_text_atomically
from condconv_bench import formatting
from condconv_bench.core.limits import Ceilings
from condconv_bench.report import deployment, plots, tables
from condconv_bench.report.model_tables import ModelTable, model_tables
from condconv_bench.report.runs import LoadedRun, comparison_summary, cross_run


@dataclass(frozen=True)
class Figure:
    title: str
    file: str  # relative to the report
    data_uri: str


@dataclass(frozen=True)
class Context:
    """One device/dtype/mode/threads combination of a run: its plots."""

    label: str
    figures: list[Figure]


@dataclass(frozen=True)
class Deployment:
    """One context's deployment tables (`report.deployment`): the strategy × runtime matrix, the
    fastest deployable strategy per layer and batch, and the same per layer class."""

    label: str
    matrix: pd.DataFrame
    fastest: pd.DataFrame
    by_class: pd.DataFrame


def _deployment(frame: pd.DataFrame) -> list[Deployment]:
    sections = []
    for label, rows in deployment.settings(frame):
        fastest = deployment.fastest_deployable(rows)
        sections.append(Deployment(label, deployment.matrix(rows), fastest, deployment.by_layer_class(fastest)))
    return sections


@dataclass
class RunSection:
    run: LoadedRun
    headline: pd.DataFrame
    headline_absent: str
    context_columns: list[str]
    by_impl: pd.DataFrame
    contexts: list[Context]
    macs: pd.DataFrame
    flops_disagreements: pd.DataFrame
    flops_checked: int
    equivalence: pd.DataFrame
    equivalence_failures: pd.DataFrame
    noisy: pd.DataFrame
    measured_count: int
    not_measured: pd.DataFrame
    compile_times: pd.DataFrame
    profiles: list[dict[str, Any]] = field(default_factory=list)
    models: list[ModelTable] = field(default_factory=list)
    deployment: list[Deployment] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "run"


def _figures(run: LoadedRun, context_label: str, rows: pd.DataFrame, plots_dir: Path, report_dir: Path, prefix: str) -> list[Figure]:
    colours = plots.palette(list(dict.fromkeys(run.results["impl"])))
    first = rows.iloc[0]
    peak = run.matmul_peak(first["device"], first["dtype"], int(first["threads"]))
    drawn = {
        "latency_vs_batch": ("Latency vs batch size", plots.latency_vs_batch(rows, colours)),
        "speed_vs_floor": ("Speed relative to the static floor", plots.speed_vs_floor(rows)),
    }
    if rows["peak_memory_bytes"].notna().any():  # a runtime's allocations are outside torch's profiler
        drawn["peak_memory"] = ("Peak memory", plots.peak_memory(rows, colours))
    if not tables.achieved_flops(rows).empty:  # forward FLOPs only: nothing to show for training rows
        drawn["achieved_gflops"] = ("Achieved GFLOP/s and the machine's matmul peak", plots.achieved_gflops(rows, colours, peak))
    ceilings = Ceilings.from_metadata(run.metadata, first["device"], first["dtype"], int(first["threads"]))
    if ceilings is not None and rows["achieved_gflop_per_s"].notna().any():
        drawn["roofline"] = ("Roofline: achieved GFLOP/s against arithmetic intensity, under the measured ceilings",
                             plots.roofline(rows, colours, ceilings))
    shares = tables.phase_shares(rows, run.profiles)
    if not shares.empty:
        drawn["phases"] = ("Phases of each profiled step (routing, mixing, layout, product, epilogue, backward, overhead)",
                           plots.phase_bars(shares))
    figures = []
    for kind, (title, figure) in drawn.items():
        png = plots.to_png(figure)
        path = plots_dir / f"{prefix}{'-' + _slug(context_label) if context_label else ''}-{kind}.png"
        write_bytes_atomically(path, png)
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        figures.append(Figure(title, os.path.relpath(path, report_dir), uri))
    return figures


def _profiles(run: LoadedRun, report_dir: Path) -> list[dict[str, Any]]:
    profiles = []
    for record in run.profiles:
        trace = record.get("trace_file")
        link = os.path.relpath(run.path / "traces" / trace, report_dir) if trace else None
        profiles.append({**record, "trace_link": link})
    return profiles


def build_section(run: LoadedRun, plots_dir: Path, report_dir: Path, prefix: str) -> RunSection:
    frame = run.results
    headline = tables.headline(frame)
    measured = tables.measured(frame)
    return RunSection(
        run=run,
        headline=headline,
        headline_absent=tables.headline_absent(frame),
        context_columns=tables.varying(headline, tables.CONTEXT_COLUMNS) if not headline.empty else [],
        by_impl=tables.geomean_by_impl(frame) if not measured.empty else pd.DataFrame(),
        contexts=[Context(label, _figures(run, label, rows, plots_dir, report_dir, prefix)) for label, rows in tables.contexts(frame)],
        macs=tables.macs_per_example(frame),
        flops_disagreements=tables.flops_disagreements(frame),
        flops_checked=int(frame["flops_agree"].notna().sum()),
        equivalence=tables.equivalence_summary(frame),
        equivalence_failures=tables.equivalence_failures(frame),
        noisy=tables.noisy_cases(frame),
        measured_count=len(measured),
        not_measured=tables.not_measured(frame),
        compile_times=tables.compile_times(frame),
        profiles=_profiles(run, report_dir),
        models=model_tables(frame),
        deployment=_deployment(frame),
    )


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("condconv_bench.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        seconds=formatting.seconds, ratio=formatting.ratio, size=formatting.size,
        count=formatting.count, sci=formatting.scientific, interval=formatting.interval, flag=formatting.flag,
    )
    env.globals["isna"] = pd.isna
    return env


def render(runs: list[LoadedRun], output: Path) -> Path:
    """Write the report for `runs` to `output` (and its plots to `plots/` beside it)."""
    report_dir = output.parent
    plots_dir = report_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        build_section(run, plots_dir, report_dir, f"{index + 1}-{_slug(run.suite_name)}" if len(runs) > 1 else _slug(run.suite_name))
        for index, run in enumerate(runs)
    ]
    comparison, variants = cross_run(runs)
    html = _environment().get_template("report.html.j2").render(
        title=", ".join(dict.fromkeys(run.suite_name for run in runs)),
        sections=sections,
        comparison=comparison,
        variants=variants,
        comparison_summary=comparison_summary(comparison, variants),
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        version=__version__,
    )
    return write_text_atomically(output, html)

