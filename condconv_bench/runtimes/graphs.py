"""An exported graph loaded into a runtime, wrapped as a module that is called like the one it came from.

The probes check its output against the float64 oracle and the workers time it through the same
step functions as an eager module, so a runtime case is measured by exactly the instrument an
eager one is. The runtime's session is created here with the case's thread count: ONNX Runtime's
intra-op threads, OpenVINO's inference threads (both with no parallelism between operators, as
torch's eager inference has none); ONNX Runtime's threads do not spin between runs, and OpenVINO
is held to float32 and tuned for latency (one request).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

Session = Callable[[list[np.ndarray]], np.ndarray]


def _onnxruntime_session(path: Path, threads: int) -> Session:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # its warnings about unused initialisers would reach the user's terminal
    # Its pool threads would spin after every run, and a group interleaves many sessions, each with
    # its own pool: the sessions not running would take the cores from the one being timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [graph_input.name for graph_input in session.get_inputs()]
    return lambda arrays: session.run(None, dict(zip(names, arrays)))[0]


def _openvino_session(path: Path, threads: int) -> Session:
    import openvino

    core = openvino.Core()
    # float32 as the case says: on a CPU with bfloat16 instructions OpenVINO would otherwise compute in bfloat16.
    settings = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", settings)
    request = compiled.create_infer_request()
    return lambda arrays: request.infer(arrays)[0].copy()  # the request reuses its output buffer


SESSIONS: dict[str, Callable[[Path, int], Session]] = {"onnxruntime": _onnxruntime_session, "openvino": _openvino_session}


class ExportedGraph(nn.Module):
    """An exported graph in `runtime`: `forward(x, routing_weights=None)` runs it on CPU tensors."""

    def __init__(self, runtime: str, path: Path, threads: int) -> None:
        super().__init__()
        self.runtime, self.path = runtime, path
        self._run = SESSIONS[runtime](path, threads)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        arrays = [t.detach().contiguous().numpy() for t in (x, routing_weights) if t is not None]
        return torch.from_numpy(self._run(arrays))

    def extra_repr(self) -> str:
        return f"{self.runtime}, {self.path.name}"
