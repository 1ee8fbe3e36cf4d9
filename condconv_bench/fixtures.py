"""Seeded parameters, inputs and the timed step of a case, built the same way in every process.

The runner probes a case (equivalence, FLOPs, memory) in its own process and times it in worker
processes; both build the module, load the layer's one parameter set and draw the group's inputs
from here, so every process measures exactly the same tensors. Seeds derive from the suite's
seed and the case's identity, never from the order in which cases run.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from condconv_bench.dispatch.cache import forget_this_process

if TYPE_CHECKING:
    from condconv_bench.case import Case


def seed_of(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


@dataclass
class GroupInputs:
    """Seeded tensors of one group, shared by every implementation in it."""

    x: torch.Tensor
    routing_weights: torch.Tensor | None
    grad_output: torch.Tensor | None

    @classmethod
    def draw(cls, case: Case, seed: int, device: torch.device) -> GroupInputs:
        workload, batch = case.workload, case.batch_size
        generator = torch.Generator().manual_seed(seed_of(seed, case.layer, batch))
        x = torch.randn(workload.input_shape(batch), generator=generator)
        routing = torch.rand(batch, workload.num_experts, generator=generator) if workload.routing_given else None
        grad_output = torch.randn(workload.output_shape(batch), generator=generator) if case.mode == "training" else None

        def place(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=case.torch_dtype)

        return cls(place(x), place(routing), place(grad_output))

    def formatted_x(self, case: Case) -> torch.Tensor:
        """The input in the case's memory format."""
        return self.x.contiguous(memory_format=torch.channels_last) if case.memory_format == "channels_last" else self.x


def layer_state(case: Case, seed: int) -> dict[str, torch.Tensor]:
    """The shared parameter set of the case's layer (the same for every implementation)."""
    return case.workload.initial_state(torch.Generator().manual_seed(seed_of(seed, case.layer)))


def build_module(case: Case, cls: type[nn.Module], state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """The case's implementation with the layer's parameters, on its device and dtype, in its mode.

    What autotuning measured in this process before is forgotten first: an `autotune` case's
    first call then costs what it costs a fresh process, whatever cases of the same layer
    signatures this process built before (the runs' processes have no cache file to read).
    """
    forget_this_process()
    return case.workload.instantiate(cls, state).to(device=device, dtype=case.torch_dtype).train(case.mode == "training")


def step_function(module: nn.Module, x: torch.Tensor, inputs: GroupInputs, mode: str) -> Callable[[], Any]:
    """One timed step: a forward (inference) or a forward and backward (training).

    Call it under `grad_mode(mode)`: inference runs in `torch.inference_mode`, as deployed models do.
    """
    routing = inputs.routing_weights
    if mode == "inference":
        return (lambda: module(x)) if routing is None else (lambda: module(x, routing))
    x = x.detach().requires_grad_(True)
    routing = None if routing is None else routing.detach().requires_grad_(True)
    wrt = [x, *module.parameters(), *([routing] if routing is not None else [])]
    grad_output = inputs.grad_output

    def train_step() -> object:
        out = module(x) if routing is None else module(x, routing)
        return torch.autograd.grad(out, wrt, grad_output, allow_unused=True)

    return train_step


def grad_mode(mode: str) -> Any:
    """The autograd context a step of `mode` runs in."""
    return torch.inference_mode() if mode == "inference" else torch.enable_grad()


def use_exact_float32(device: torch.device) -> bool | None:
    """Turn TF32 off in cuDNN and cuBLAS on CUDA, so `float32` means IEEE float32 in every strategy.

    By default cuDNN convolutions run float32 in TF32 on tensor cores while cuBLAS matmuls do not,
    so conv-based strategies (and the static floor) would get a 10-bit mantissa and matmul-based
    ones full precision: a float32 ranking would compare different arithmetic. Returns whether
    TF32 is allowed now (False) on CUDA, for the result row; None elsewhere, where it does not apply.
    """
    if device.type != "cuda":
        return None
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return False


def warm_up_device(device: torch.device, dtype: torch.dtype) -> None:
    """One small conv and one batched matmul, so that library handles (cuDNN, cuBLAS) and lazily
    loaded kernels are ready before the first case's cold first call is timed."""
    x = torch.randn(2, 8, 8, 8, device=device, dtype=dtype)
    torch.nn.functional.conv2d(x, torch.randn(8, 8, 3, 3, device=device, dtype=dtype), padding=1)
    torch.bmm(x.view(2, 8, 64), x.view(2, 64, 8))
    synchronize(device)


class CompileFellBackError(RuntimeError):
    """A compiling implementation's first call built no graph: it would be timed running eager."""


def _compiled_graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def first_call(step: Callable[[], Any], compiles: bool, device: torch.device) -> int:
    """Run a case's cold first call (where a compiling implementation compiles) and return the
    torch.compile graphs it built; raises `CompileFellBackError` if a compiling one built none."""
    graphs_before = _compiled_graph_count()
    step()
    synchronize(device)
    graphs = _compiled_graph_count() - graphs_before
    if compiles and not graphs:
        raise CompileFellBackError("torch.compile built no graph on the first call, so it would time eager code")
    return graphs


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dispatched(module: nn.Module) -> str | None:
    """What a dispatching implementation (`auto`) ran, e.g. `batched_matmul` or `grouped_conv×8 stacked_moe×16`;
    choices that no measurement backed are marked `(rule of thumb)`."""
    chosen = Counter(
        m.last_strategy + (" (rule of thumb)" if m.last_guessed else "")
        for m in module.modules() if getattr(m, "last_strategy", None)
    )
    if not chosen:
        return None
    if len(chosen) == 1 and sum(chosen.values()) == 1:
        return next(iter(chosen))
    return " ".join(f"{key}×{n}" for key, n in sorted(chosen.items()))
