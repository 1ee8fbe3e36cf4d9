"""Two profiled cases' traces compared operator by operator, by HolisticTraceAnalysis.

HTA is what PyTorch points to now that torch-tb-profiler is deprecated; its
`TraceDiff.compare_traces` counts each operator's calls and total duration in two traces and
their differences, which is what one asks of two strategies of the same layer ("where does
batched_matmul spend the time grouped_conv does not?"). It reads the Kineto JSON that `run
--profile` writes, CPU events included, so no trace parsing is written here. HTA is an optional
extra (`pip install -e ".[hta]"`; it installs jupyterlab and plotly, but no torch).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pandas as pd

from condconv_bench.errors import CondConvBenchError
from condconv_bench.run.directory import RunDirectory

DIFF_COLUMNS = ["counts_control", "duration_us_control", "counts_test", "duration_us_test", "diff_counts", "diff_duration_us"]


def _trace_file(run: RunDirectory, case_id: str) -> Path:
    record = next((r for r in run.profiles() if r.get("case_id") == case_id), None)
    if record is None or not record.get("trace_file") or not (run.traces_dir / record["trace_file"]).is_file():
        raise CondConvBenchError(f"{run.path}: no trace of case {case_id} (was it run with --profile?)")
    return run.traces_dir / record["trace_file"]


def diff_traces(run_dir: str | Path, control: str, test: str) -> pd.DataFrame:
    """Per operator (CPU events of the recorded steps): calls and total µs in each case's trace and
    the differences test − control, largest absolute duration difference first."""
    try:
        from hta.common.trace import Trace
        from hta.trace_diff import DeviceType, LabeledTrace, TraceDiff
    except ImportError:
        raise CondConvBenchError('trace-diff needs HolisticTraceAnalysis: pip install -e ".[hta]"') from None
    run = RunDirectory.open(run_dir)
    files = {label: _trace_file(run, case_id) for label, case_id in (("control", control), ("test", test))}
    logging.getLogger("hta").setLevel(logging.ERROR)  # HTA logs every parsing step at INFO
    labelled = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="hta")  # its pandas deprecation warnings are not the user's
        for label, path in files.items():
            trace = Trace(trace_files={0: path.name}, trace_dir=str(path.parent))
            trace.parse_traces()
            labelled[label] = LabeledTrace(label=label, t=trace)
        frame = TraceDiff.compare_traces(labelled["control"], labelled["test"], device_type=DeviceType.CPU)
    frame = frame.rename(columns={
        "control_counts": "counts_control", "control_total_duration": "duration_us_control", "test_counts": "counts_test",
        "test_total_duration": "duration_us_test", "diff_duration": "diff_duration_us",
    })[DIFF_COLUMNS]
    return frame.reindex(frame["diff_duration_us"].abs().sort_values(ascending=False).index)
