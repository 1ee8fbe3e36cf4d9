"""A module exported to ONNX for a runtime: with a dynamic batch where it can be, at the case's batch where it cannot.

The exporter is PyTorch's current one (`torch.onnx.export(..., dynamo=True)`). Its outcome is a
measured fact of the case (`Export.status`):

- `ok`: one graph, exported with a dynamic batch dimension, runs in the runtime at every batch it
  was checked at (the suite's batch sizes for the layer, and 1 and 2);
- `batch_fixed`: that graph did not export or did not run at another batch (batch-as-groups puts
  the batch into `Conv.group`, a fixed attribute), but the module exports at the case's own batch:
  measured so, as users ship it today, with the dynamic attempt's failure as the reason;
- `failed`: it does not export even at a fixed batch; the reason is the exporter's, in one line.

A dynamic graph is exported once per layer and strategy (its weights are the layer's one shared
parameter set, the same at every batch) and traced at batch 2: torch.export specialises a
dimension of size 1.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from condconv_bench.errors import first_line
from condconv_bench.runtimes.graphs import ExportedGraph

TRACE_BATCH = 2
CHECK_BATCHES = (1, 2)
Inputs = Callable[[int], tuple[torch.Tensor, ...]]  # the module's positional inputs at a batch size
_NODE = re.compile(r"target=torch\.ops\.([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Export:
    """How a module reached a runtime: the status, why not dynamic, the graph's operators and file."""

    status: str  # ok, batch_fixed or failed
    reason: str | None
    operators: str | None  # ONNX operator types with their counts, e.g. `Conv×1 MatMul×2`
    path: Path | None
    seconds: float  # exporting, and checking the graph at other batches


def exporter_reason(exc: BaseException) -> str:
    """One line from the exporter's chain of exceptions: the innermost error, and the PyTorch
    operator being translated when it happened (the outer messages are generic advice)."""
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    node = next((m.group(1) for e in chain if (m := _NODE.search(str(e)))), None)
    reason = _ANSI.sub("", first_line(chain[-1]))
    return f"{node}: {reason}" if node else reason


def _write_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, dynamic: bool) -> str:
    """Export `module` on `inputs` into `path`; returns the operator summary. Raises what the exporter raises."""
    batch = torch.export.Dim("batch", min=1)
    shapes = tuple({0: batch} for _ in inputs) if dynamic else None
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.CRITICAL)  # its notes (and a torchvision stand-in it trips over) are not the case's result
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, inputs, dynamo=True, dynamic_shapes=shapes, verbose=False)
    finally:
        exporter_log.setLevel(level)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    counts = Counter(node.op_type for node in program.model_proto.graph.node)
    return " ".join(f"{op}×{n}" for op, n in sorted(counts.items()))


def _runs_at(graph: ExportedGraph, inputs: Inputs, batch_sizes: list[int]) -> str | None:
    """Why the graph fails at one of `batch_sizes`, or None when it runs at every one."""
    with torch.inference_mode():
        for batch in batch_sizes:
            try:
                out = graph(*inputs(batch))
            except Exception as exc:  # the runtime's refusal is the finding
                return f"exported with a dynamic batch, it fails at batch {batch}: {first_line(exc)}"
            if out.shape[0] != batch:
                return f"exported with a dynamic batch, it returns batch {out.shape[0]} at batch {batch}"
    return None


def export_dynamic(module: nn.Module, inputs: Inputs, batch_sizes: list[int], runtime: str, path: Path, threads: int) -> Export:
    """Export `module` with a dynamic batch into `path` and check it in `runtime` at `batch_sizes`
    (and `CHECK_BATCHES`): status `ok`, or `failed` with why (the caller may then export at a fixed batch)."""
    started = time.perf_counter()
    try:
        with torch.no_grad():
            operators = _write_onnx(module, inputs(TRACE_BATCH), path, dynamic=True)
        reason = _runs_at(ExportedGraph(runtime, path, threads), inputs, sorted({*batch_sizes, *CHECK_BATCHES}))
    except Exception as exc:  # any exporter failure is the case's finding, never the run's
        return Export("failed", exporter_reason(exc), None, None, time.perf_counter() - started)
    if reason is not None:
        return Export("failed", reason, operators, None, time.perf_counter() - started)
    return Export("ok", None, operators, path, time.perf_counter() - started)


def export_fixed(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, dynamic_failure: Export) -> Export:
    """Export `module` at the batch of `inputs` after the dynamic export failed: `batch_fixed` with
    the dynamic failure as the reason, or `failed` with the exporter's reason."""
    started = time.perf_counter()
    try:
        with torch.no_grad():
            operators = _write_onnx(module, inputs, path, dynamic=False)
    except Exception as exc:  # any exporter failure is the case's finding, never the run's
        return Export("failed", exporter_reason(exc), None, None, dynamic_failure.seconds + time.perf_counter() - started)
    return Export("batch_fixed", dynamic_failure.reason, operators, path, dynamic_failure.seconds + time.perf_counter() - started)
