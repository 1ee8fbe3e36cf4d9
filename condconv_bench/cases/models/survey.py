"""A model's survey: what running it once on the meta device tells, before anything is allocated.

The model built on the meta device and run once there (no memory,
no arithmetic), which gives the output shape, the CondConv layers' specs and the input size of
every contraction; the analytic MAC count of a case is computed from it: `routing` is what the
CondConv layers route themselves, `mixing` their kernel mixing, `conv` every other contraction of
the network (its static convs and linears, its blocks' routing layers, the CondConv layers' convs).
The survey is also where a model entry that cannot run is found, since only running the model
tells: a model or floor that cannot take the entry's `in_channels` and `input_size`, or a model
without a CondConv layer that `convert()` recognises, is a `ModelError` for every case of it
(one error row each, and the run goes on), surveyed once however many cases ask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from condconv_bench.cases.models import sources
from condconv_bench.conversion.swap import find_layers
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.errors import first_line


@dataclass(frozen=True)
class Contraction:
    """One conv / linear / CondConv layer of a model as the survey saw it (batch 1)."""

    input_size: Pair
    output_numel: int  # per example
    routes_itself: bool  # a CondConv layer called without routing weights


@dataclass(frozen=True)
class Survey:
    output_shape: tuple[int, ...]  # at batch 1
    layers: tuple[tuple[str, LayerSpec], ...]  # (path, spec) of each CondConv layer
    contractions: dict[str, Contraction]


@functools.lru_cache(maxsize=16)
def survey(source: str, input_shape: tuple[int, ...]) -> Survey | str:
    """Build `source` on the meta device and run it on a meta input of `input_shape` (batch 1); or
    why it cannot take that input (returned, not raised, so that the answer is cached too)."""
    with torch.device("meta"):
        model = sources.build_model(source).eval()
    layers = tuple((found.path, found.spec) for found in find_layers(model))
    condconv = {path for path, _ in layers}
    seen: dict[str, Contraction] = {}

    def hook(path: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            size = tuple(x.shape[-2:]) if x.dim() == 4 else (1, 1)
            routes = path in condconv and (len(args) < 2 or args[1] is None)
            seen[path] = Contraction(size, output[0].numel(), routes)  # type: ignore[arg-type]
        return record

    for path, module in model.named_modules():
        if path in condconv or isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(hook(path))
    with torch.no_grad():
        try:
            output = model(torch.empty(input_shape, device="meta"))
        except Exception as exc:  # whatever the model's own code raises on an input it cannot take
            _, channels, height, width = input_shape
            return (f"model {source!r} cannot take inputs of {channels} channels at {height}x{width} "
                    f"(in_channels, input_size): {first_line(exc)}")
    return Survey(tuple(output.shape), layers, seen)
