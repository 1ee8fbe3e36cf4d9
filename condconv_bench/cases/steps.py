"""The module and the timed step of a case, built the same way in every process, and its cold first call.

A step is what one timed call runs: a forward in inference, a forward and backward in training.
The first call is separate because it is where a compiling implementation compiles (and must
build a graph, or it would be timed running eager) and where a dispatcher decides what it runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from condconv_bench.machine.devices import synchronize
from condconv_bench.dispatch.cache import forget_this_process
from condconv_bench.cases.inputs import GroupInputs

if TYPE_CHECKING:
    from condconv_bench.core.case import Case


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
