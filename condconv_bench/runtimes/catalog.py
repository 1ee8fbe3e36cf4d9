"""The runtimes a case may run in, what each needs installed, and what a run records about them.

`eager` is PyTorch itself. The others run the graph that `runtimes.export` writes: ONNX Runtime
(the `onnx` extra) and OpenVINO (the `openvino` extra), each on the CPU with as many threads as the
case gives torch, so that a ratio between runtimes compares runtimes and not thread counts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

EAGER = "eager"
RuntimeName = Literal["eager", "onnxruntime", "openvino"]
EXPORTER_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export(dynamo=True) imports


@dataclass(frozen=True)
class Runtime:
    """A runtime: the Python packages it needs and the extra that installs them."""

    name: str
    packages: tuple[str, ...]
    extra: str

    @property
    def install_line(self) -> str:
        return f'pip install -e ".[{self.extra}]"'

    def unavailable_reason(self) -> str | None:
        """Why this runtime cannot run here (a package missing, with the install line), or None."""
        missing = [package for package in self.packages if importlib.util.find_spec(package) is None]
        if missing:
            return f"{self.name} needs {', '.join(missing)}, not installed here: {self.install_line}"
        return None

    def versions(self) -> dict[str, str]:
        return {package: importlib.metadata.version(package) for package in self.packages}


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": Runtime("onnxruntime", (*EXPORTER_PACKAGES, "onnxruntime"), "onnx"),
    "openvino": Runtime("openvino", (*EXPORTER_PACKAGES, "openvino"), "openvino"),
}


def case_unavailable_reason(runtime: str, device: str, dtype: str, mode: str, memory_format: str) -> str | None:
    """Why a case of `runtime` cannot run in this context, or None (always None for eager)."""
    if runtime == EAGER:
        return None
    if device != "cpu":
        return f"{runtime} cases run on the CPU here, not {device}"
    if dtype != "float32":
        return f"{runtime} cases run float32 here, not {dtype}"
    if mode != "inference":
        return f"{runtime} runs exported graphs for inference only"
    if memory_format != "contiguous":
        return f"the exported graph takes a contiguous input; {runtime} chooses its own layout"
    return RUNTIMES[runtime].unavailable_reason()


def describe_runtimes(names: set[str]) -> dict[str, Any]:
    """For `run.json`: each runtime of the run with its packages' versions (None where missing) and its threads."""
    described = {}
    for name in sorted(names - {EAGER}):
        runtime = RUNTIMES[name]
        versions = {} if runtime.unavailable_reason() else runtime.versions()
        described[name] = {"versions": versions or None, "threads": "the case's threads (intra-op; inter-op 1)"}
    return described
