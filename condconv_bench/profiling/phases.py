"""Where a strategy's step goes: routing, kernel mixing, layout, the product, the epilogue, backward.

Phases are read from the profiler's operator events after the fact, never marked in the code
that is timed: a `torch.profiler.record_function` label costs about 4 µs per use with no profiler
running (measured here, 2-core CPU, torch 2.13: 4.0 µs against 14 ns for an empty function), which
would be 10% of a small layer's step. Instead each outermost operator of the forward pass is
classified by its name and the shapes of its inputs (the profiler records them), which say what
it does in a CondConv layer:

- routing: the global pooling (`mean` of a 4-D input), the routing `linear` (a weight with E
  rows) and the `sigmoid`/`softmax` of `(B, E)` logits;
- mixing: a matrix product contracting the E experts (`(B, E) @ (E, P)`), kernels or bias;
- product: the conv or matrix product(s) of the layer itself;
- layout: im2col, copies, concatenations, transposes, views and allocations;
- epilogue: elementwise work around the product — bias adds, naive_moe's routing-weighted sum of
  outputs, stacked_moe's scaling of its stacked input;
- other: anything else; overhead: the step's time outside any operator (Python, dispatch).

In training, the backward's work is attributed per autograd node: `backward: product` for the
conv and matrix-product nodes (the mixing's too: the profiler cannot tell them apart),
`backward: layout` for view, copy and unfold nodes, `backward: other` for the rest. On CUDA the
phases are the device time of each operator's kernels, and overhead is not defined.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, schedule

from condconv_bench.profiling.session import profiler_session

FORWARD_PHASES = ("routing", "mixing", "layout", "product", "epilogue", "other")
BACKWARD_PHASES = ("backward: product", "backward: layout", "backward: other")
PHASES = (*FORWARD_PHASES, *BACKWARD_PHASES, "overhead")

_PRODUCTS = {"conv2d", "convolution", "_convolution", "mkldnn_convolution", "cudnn_convolution", "conv_depthwise2d",
             "_conv_depthwise2d", "_slow_conv2d_forward", "thnn_conv2d", "bmm", "mm", "matmul", "addmm", "linear", "baddbmm"}
_LAYOUT = {"im2col", "unfold", "copy_", "clone", "contiguous", "cat", "stack", "_to_copy", "to", "reshape", "_reshape_alias",
           "permute", "transpose", "t", "view", "as_strided", "expand", "select", "slice", "narrow", "unsqueeze", "squeeze",
           "flatten", "split", "chunk", "empty", "empty_like", "empty_strided", "zeros", "resize_", "alias", "unbind",
           "detach", "lift_fresh", "numpy_T", "constant_pad_nd", "pad"}
_EPILOGUE = {"add", "add_", "mul", "mul_", "sum", "div", "div_", "addcmul", "fill_", "zero_"}
_BACKWARD_PRODUCTS = ("Convolution", "Bmm", "Mm", "Addmm", "Linear", "Matmul", "Baddbmm")
_BACKWARD_LAYOUT = ("View", "Reshape", "Unsafe", "Permute", "Transpose", "Cat", "Clone", "Copy", "Im2Col", "Col2Im",
                    "Expand", "Select", "Slice", "Squeeze", "Unsqueeze", "Split", "Stack", "T", "AsStrided", "Unfold")
_BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
# wait 1 step, warm up 1, record 3, as the trace profile does.
_SCHEDULE = {"wait": 1, "warmup": 1, "active": 3, "repeat": 1}


@dataclass(frozen=True)
class PhaseBreakdown:
    """Microseconds per step in each phase; `step_us` is the whole step (host time)."""

    step_us: float
    phases: dict[str, float] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        return {"step_us": self.step_us, "phases_us": dict(self.phases)}


def _op(name: str) -> str:
    return name.removeprefix("aten::")


def classify(name: str, input_shapes: list[list[int]], num_experts: int) -> str:
    """The forward phase of one outermost operator, from its name and input shapes."""
    op = _op(name)
    shapes = [list(s) for s in input_shapes if isinstance(s, (list, tuple))]
    if op == "mean" and shapes and len(shapes[0]) == 4:
        return "routing"
    if op in ("sigmoid", "softmax", "_softmax") and shapes and shapes[0][-1:] == [num_experts]:
        return "routing"
    if op == "linear" and len(shapes) >= 2 and shapes[1][:1] == [num_experts]:
        return "routing"
    if op in ("mm", "matmul", "addmm") and len(shapes) >= 2 and shapes[0][-1:] == [num_experts] and shapes[1][:1] == [num_experts]:
        return "mixing"
    if op in _PRODUCTS:
        return "product"
    if op in _LAYOUT:
        return "layout"
    if op in _EPILOGUE:
        return "epilogue"
    return "other"


def classify_backward(node: str) -> str:
    """The backward phase of one autograd node (e.g. `ConvolutionBackward0`)."""
    kind = node.removeprefix(_BACKWARD_PREFIX).removesuffix("Backward0").removesuffix("Backward1")
    if kind.startswith(_BACKWARD_PRODUCTS):
        return "backward: product"
    if kind.startswith(_BACKWARD_LAYOUT):
        return "backward: layout"
    return "backward: other"


def outermost(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(("aten::", _BACKWARD_PREFIX)):
            return False
        parent = parent.cpu_parent
    return True


def attribute(events: Iterable[Any], num_experts: int, device_type: str, steps: int) -> PhaseBreakdown:
    """Phase times per step from a profile's events (`profile.events()`) covering `steps` steps."""
    totals = dict.fromkeys(PHASES, 0.0)
    step_us = 0.0
    cuda = device_type == "cuda"
    for event in events:
        name = event.name
        if name.startswith("ProfilerStep"):
            step_us += event.cpu_time_total
            continue
        if name.startswith(_BACKWARD_PREFIX):
            phase = classify_backward(name)
        elif name.startswith("aten::"):
            phase = classify(name, event.input_shapes or [], num_experts)
        else:
            continue
        if not outermost(event):
            continue
        totals[phase] += event.device_time_total if cuda else event.cpu_time_total
    if not cuda:
        totals["overhead"] = max(0.0, step_us - sum(totals.values()))
    return PhaseBreakdown(step_us / steps, {phase: us / steps for phase, us in totals.items() if us > 0})


def measure_phases(step: Callable[[], object], device: torch.device, num_experts: int) -> PhaseBreakdown:
    """Profile a few steps of a warm case (no trace written) and attribute their time to phases."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler_session(activities=activities, schedule=schedule(**_SCHEDULE), record_shapes=True) as prof:
        for _ in range(sum(_SCHEDULE[k] for k in ("wait", "warmup", "active"))):
            step()
            prof.step()
    return attribute(prof.events(), num_experts, device.type, _SCHEDULE["active"])


def phases_of(record: dict[str, Any]) -> dict[str, float] | None:
    """A stored record's phases (µs per step), or None when they are missing or damaged."""
    phases = record.get("phases_us")
    if not isinstance(phases, dict) or not all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in phases.items()):
        return None
    return {str(k): float(v) for k, v in phases.items()}
