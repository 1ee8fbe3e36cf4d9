"""What autotune times of a candidate strategy: one call as the caller would run it.

A strategy's cost to the caller is its forward and, with autograd recording, its backward too, so
a training step is tuned on both; with `compiled`, the candidates are the inductor-compiled
variants, compiled here once per input so that compiling stays out of the timed calls.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from condconv_bench.timing.rounds import Clock, Step

Forward = Callable[..., torch.Tensor]


def candidate_step(layer: torch.nn.Module, forward: Forward, x: torch.Tensor, routing_weights: torch.Tensor) -> Step:
    """One call of a strategy as the caller would run it: the forward, and with autograd
    recording also its backward to the parameters, input and routing weights that require a
    gradient (`torch.autograd.grad`, which leaves `.grad` alone)."""
    if not torch.is_grad_enabled():
        routing = routing_weights.detach()
        return lambda: forward(layer, x, routing)
    routing = routing_weights.detach().requires_grad_(routing_weights.requires_grad)
    inputs = [t for t in (x, routing, *layer.parameters()) if t.requires_grad]
    if not inputs:
        return lambda: forward(layer, x, routing)

    def forward_and_backward() -> object:
        out = forward(layer, x, routing)
        return torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)

    return forward_and_backward


def sync_for(x: torch.Tensor) -> Callable[[], None]:
    """What ends a timed block on `x`'s device: a CUDA synchronise, nothing on the CPU."""
    return torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)


def compiled_forwards(forwards: dict[str, Forward], layer: torch.nn.Module, x: torch.Tensor, routing_weights: torch.Tensor,
                      clock: Clock) -> tuple[dict[str, Forward], float]:
    """Each forward compiled by inductor for this input (compiled now, by one call), and the time
    that took; a strategy inductor cannot compile here is left out."""
    from condconv_bench.impls.compiled import configure_compiler

    configure_compiler()
    started = clock()
    compiled = {}
    for key, forward in forwards.items():
        function = torch.compile(forward, dynamic=False)
        try:
            function(layer, x, routing_weights)
        except Exception as exc:  # inductor raises its own types; the strategy just is not a candidate
            warnings.warn(f"condconv_bench: autotune left {key} out: inductor could not compile it ({str(exc).splitlines()[0]})",
                          stacklevel=4)
            continue
        compiled[key] = function
    return compiled, clock() - started
