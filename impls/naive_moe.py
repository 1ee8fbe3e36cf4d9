"""Naive mixture of experts: E static convs on the input, then the routing-weighted sum of outputs.

Source: the formulation CondConv replaces (the paper's Eq. 1 and hey-yahei's MXNet port). Exact
by linearity, needs no per-sample weights, but costs E× the conv MACs and E output-sized
temporaries: the expensive reference point that shows what CondConv saves.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from condconv_bench.core.flops import AnalyticMacs, conv_macs, routing_macs
from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, compulsory_traffic, output_bytes


@register_impl("naive_moe")
class NaiveMoE(CondConvBase):
    """E static convs and a weighted sum of their outputs (E× the conv MACs)."""

    dispatchable = True
    materialises_kernels = False

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        trailing = (1,) * (x.dim() - 2)
        out = None
        for expert in range(self.spec.num_experts):
            bias = None if self.bias is None else self.bias[expert]
            term = self.static_op(x, self.weight[expert], bias) * routing_weights[:, expert].view(-1, 1, *trailing)
            out = term if out is None else out + term
        return out

    @classmethod
    def analytic_macs(cls, spec: LayerSpec, batch_size: int, input_size: Pair) -> AnalyticMacs:
        """E full convs (one per expert) and no kernel mixing; the bias rides on each conv."""
        return AnalyticMacs(routing_macs(spec, batch_size), 0, spec.num_experts * conv_macs(spec, batch_size, input_size))

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        """The compulsory bytes and 3E−2 output-sized temporaries: E conv outputs, E of them scaled
        by α, and E−1 running sums of which the last is the output."""
        temporaries = 3 * spec.num_experts - 2
        return replace(compulsory_traffic(spec, batch_size, input_size, itemsize),
                       expanded=temporaries * output_bytes(spec, batch_size, input_size, itemsize))
