"""Test-only implementations, named as `fake_impls:Class` (the registry's module:Class form).

Each plants one defect that a probe or the gate must catch; none is shipped or registered.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from condconv_bench.impls.grouped_conv import GroupedConv
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, input_bytes

HUNDRED_MB = 100 * 2**20


class AllocatesHundredMB(GroupedConv):
    """grouped_conv plus a 100 MiB temporary that is written and freed inside forward."""

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        scratch = torch.ones(HUNDRED_MB, dtype=torch.uint8, device=x.device)
        out = super().conditional_forward(x, routing_weights)
        del scratch
        return out


class SlowerByHalf(GroupedConv):
    """grouped_conv, then a busy wait of half its own duration: a planted 1.5× slowdown."""

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        start = time.perf_counter()
        out = super().forward(x, routing_weights)
        deadline = time.perf_counter() + 0.5 * (time.perf_counter() - start)
        while time.perf_counter() < deadline:
            pass
        return out


class ExtraMatmul(GroupedConv):
    """grouped_conv plus a redundant mixing product: a planted FLOP increase, same output."""

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        self.mixed_kernels(routing_weights)
        return super().conditional_forward(x, routing_weights)


class WrongExpertOrder(GroupedConv):
    """grouped_conv with the experts reversed: a planted numerical error."""

    def mixed_kernels(self, routing_weights: torch.Tensor) -> torch.Tensor:
        return super().mixed_kernels(routing_weights.flip(1))


class Crashes(GroupedConv):
    """Raises on every call: a case that newly errors."""

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("planted failure")


class NotAnImplementation:
    """Not a CondConvBase subclass: the registry must refuse it."""


class DiesInWorker(GroupedConv):
    """grouped_conv in the runner's own process; exits the process inside a measurement worker."""

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        if Path(sys.argv[0]).match("measure/worker.py"):
            os._exit(3)
        return super().forward(x, routing_weights)


class CompilesNothing(GroupedConv):
    """Claims to compile but runs eagerly: what dynamo does silently once its recompile limit is hit."""

    compiles = True


class DoublesGradients(GroupedConv):
    """grouped_conv's exact output with twice its gradient: a planted backward-only error."""

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        out = super().conditional_forward(x, routing_weights)
        return out.detach() + 2 * (out - out.detach())


class CopiesInputTenTimes(GroupedConv):
    """grouped_conv after ten redundant copies of its input, declared in its traffic model: a
    planted slow algorithm whose modelled bytes and distance to the limit must rise."""

    COPIES = 10

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        for _ in range(self.COPIES):
            x = x.clone()
        return super().conditional_forward(x, routing_weights)

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        traffic = super().analytic_bytes(spec, batch_size, input_size, itemsize)
        return replace(traffic, copies=traffic.copies + cls.COPIES * input_bytes(spec, batch_size, input_size, itemsize))
