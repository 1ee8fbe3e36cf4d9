"""Every row of one or more runs as one CSV table, each row tagged with its run's label (for pandas, spreadsheets)."""

from __future__ import annotations

import pandas as pd

from condconv_bench.report.runs import LoadedRun


def render(runs: list[LoadedRun]) -> str:
    return pd.concat([run.results.assign(run=run.label) for run in runs], ignore_index=True).to_csv(index=False)
