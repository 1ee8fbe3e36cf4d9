"""torch.profiler traces per case, in the layout the TensorBoard profiler plugin reads.

`tensorboard_trace_handler` writes `<worker>.<time_ns>.pt.trace.json` into `RUN_DIR/traces/`;
`tensorboard --logdir RUN_DIR/traces` (with torch-tb-profiler) shows them, and Perfetto UI or
chrome://tracing opens the same JSON. Profiling runs after a case's timing, on its own steps, so
the profiler's overhead never reaches the latency figures. The top operators of each profile and
its phases (`condconv_bench.profiling.phases`: routing, mixing, layout, product, …) are kept as data for
the report.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler_util import FunctionEventAvg
from torch.profiler import ProfilerActivity, schedule, tensorboard_trace_handler

from condconv_bench.profiling.phases import attribute
from condconv_bench.profiling.session import profiler_session

TOP_OPERATORS = 10
# wait 1 step, warm up 1, record 3: enough steps for stable operator totals on a warm case.
_SCHEDULE = {"wait": 1, "warmup": 1, "active": 3, "repeat": 1}


def worker_name(case_id: str) -> str:
    """A trace file prefix the plugin parses back: no dots (they delimit the span) or slashes."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", case_id).strip("-")


def _self_time_column(device: torch.device) -> str:
    """The per-operator self time on `device`; torch before 2.4 names the CUDA one `self_cuda_time_total`."""
    if device.type != "cuda":
        return "self_cpu_time_total"
    return "self_device_time_total" if hasattr(FunctionEventAvg, "self_device_time_total") else "self_cuda_time_total"


def record_profile(case_id: str, step: Callable[[], object], traces_dir: Path, device: torch.device, num_experts: int) -> dict[str, Any]:
    """Profile a few steps of one case; returns its trace file, top operators by self time and
    time per phase (`phases_us`, µs per step; `step_us`)."""
    traces_dir.mkdir(parents=True, exist_ok=True)
    name = worker_name(case_id)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = sum(_SCHEDULE[k] for k in ("wait", "warmup", "active"))
    with profiler_session(
        activities=activities,
        schedule=schedule(**_SCHEDULE),
        on_trace_ready=tensorboard_trace_handler(str(traces_dir), worker_name=name),
        record_shapes=True,
        profile_memory=True,
    ) as prof:
        for _ in range(steps):
            step()
            prof.step()
    device_time = _self_time_column(device)
    averages = sorted(
        (e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")),  # the step marker itself
        key=lambda e: getattr(e, device_time),
        reverse=True,
    )
    active = _SCHEDULE["active"]
    top = [
        {
            "name": event.key,
            "calls_per_step": event.count / active,
            "self_time_us_per_step": getattr(event, device_time) / active,
            "total_cpu_time_us_per_step": event.cpu_time_total / active,
        }
        for event in averages[:TOP_OPERATORS]
    ]
    traces = sorted(traces_dir.glob(f"{name}.*.pt.trace.json"), key=lambda p: p.stat().st_mtime)
    phases = attribute(prof.events(), num_experts, device.type, active).as_record()
    return {"case_id": case_id, "trace_file": traces[-1].name if traces else None, "top_operators": top, **phases}
