"""Reports from run directories: `tables` computes DataFrames, one module renders each format."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd

from condconv_bench.atomic import write_text_atomically
from condconv_bench.report.runs import load_runs

ReportFormat = Literal["html", "markdown", "csv"]


def write_report(run_dirs: list[Path], output: Path | None, fmt: ReportFormat = "html") -> str | Path:
    """Render the runs in `fmt`; returns the file written, or the text when `output` is None (markdown, csv)."""
    runs = load_runs(run_dirs)
    if fmt == "html":
        from condconv_bench.report.html import render_html  # seaborn and matplotlib load only when needed

        return render_html(runs, output or Path(run_dirs[0]) / "report.html")
    if fmt == "markdown":
        from condconv_bench.report.markdown import render_markdown

        text = render_markdown(runs)
    else:
        text = pd.concat([run.results.assign(run=run.label) for run in runs], ignore_index=True).to_csv(index=False)
    if output is None:
        return text
    return write_text_atomically(output, text)
