"""Reports from run directories: `tables` computes DataFrames, one module renders each format.

`RUN_FORMATS` names the formats of a report of runs and the module that renders each (`html`,
`markdown`, `csv`, each with a `render(runs, ...)`); the comparisons have theirs beside their
renderers (`verdicts.RENDERERS` for `compare` and `gate baseline`, `ab.RENDERERS` for `gate ab`).
The command line offers exactly these names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from condconv_bench.atomic import write_text_atomically
from condconv_bench.report.runs import load_runs


@dataclass(frozen=True)
class RunFormat:
    module: str  # under condconv_bench.report, imported only when used (html loads seaborn and matplotlib)
    writes_page: bool  # html writes a page with its plots beside it; the text formats return their text


RUN_FORMATS = {"html": RunFormat("html", True), "markdown": RunFormat("markdown", False), "csv": RunFormat("csv", False)}


def write_report(run_dirs: list[Path], output: Path | None, fmt: str = "html") -> str | Path:
    """Render the runs in `fmt`; returns the file written, or the text when `output` is None (text formats)."""
    runs = load_runs(run_dirs)
    chosen = RUN_FORMATS[fmt]
    renderer = importlib.import_module(f".{chosen.module}", __package__)
    if chosen.writes_page:
        return renderer.render(runs, output or Path(run_dirs[0]) / "report.html")
    text = renderer.render(runs)
    return text if output is None else write_text_atomically(output, text)
