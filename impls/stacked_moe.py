"""Stacked mixture of experts: one static conv on `[α_1 x; …; α_E x]` with the experts' kernels
concatenated along the input channels.

Source: the identity `Σ_e α_e (W_e ∗ x) = [W_1 … W_E] ∗ [α_1 x; …; α_E x]`, which holds by the
linearity of convolution; seen in no public code. Exact by linearity, it needs no per-example weights and no batch-dependent
`groups`, so static-graph exports and compilers see one fixed conv whatever the batch size. It
costs E× the conv MACs on an E× larger input; the concatenated kernel is built once per weight
version (`expert_layout`), like a prepacked weight.

Prediction, written before measuring: on CPU it loses ~E× on every conv of the mobile suite
(their convs dwarf the kernel mixing it avoids), and wins on the fully-connected classifier,
where kernel mixing itself costs E× the linear's MACs per example, so that one large GEMM with
K = E·C_in is the cheapest exact form (expected ≥ 2× faster than grouped_conv there at batch ≥ 8).
Measured (mobile suite, 2-core CPU, fp32): the classifier at 0.82×, 0.11× and 0.05× of
grouped_conv's latency at batch 1, 8 and 32 (the fastest strategy there at every batch size), and
2.9–112× slower than the fastest strategy on the convs — as predicted on both counts.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from condconv_bench.core.flops import AnalyticMacs, expert_products_macs
from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, bias_epilogue, compulsory_traffic, input_bytes


def _concatenate_experts(weight: torch.Tensor) -> torch.Tensor:
    """(E, C_out, C_in/g, *k) → (C_out, E·C_in/g, *k): expert e's slice of input channels per group."""
    experts, out_channels = weight.shape[:2]
    return weight.transpose(0, 1).reshape(out_channels, experts * weight.shape[2], *weight.shape[3:])


@register_impl("stacked_moe")
class StackedMoE(CondConvBase):
    """One static conv over routing-scaled stacked inputs (E× MACs, no per-example weights)."""

    dispatchable = True
    materialises_kernels = False

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        batch, experts, groups = x.shape[0], spec.num_experts, spec.groups
        kernel = self.expert_layout("stacked", _concatenate_experts)
        bias = self.mixed_bias(routing_weights)
        if spec.kind == "linear":
            stacked = (routing_weights.unsqueeze(2) * x.unsqueeze(1)).reshape(batch, experts * spec.in_channels)
            out = F.linear(stacked, kernel)
            return out if bias is None else out + bias
        spatial = x.shape[2:]
        per_group = x.reshape(batch, groups, 1, spec.in_channels // groups, *spatial)
        scale = routing_weights.view(batch, 1, experts, 1, 1, 1)
        stacked = (scale * per_group).reshape(batch, groups * experts * (spec.in_channels // groups), *spatial)
        out = F.conv2d(stacked, kernel, None, spec.stride, spec.padding, spec.dilation, groups)
        return out if bias is None else out + bias.view(batch, -1, 1, 1)

    @classmethod
    def analytic_macs(cls, spec: LayerSpec, batch_size: int, input_size: Pair) -> AnalyticMacs:
        """E× the conv on the stacked input; only the bias is mixed."""
        return expert_products_macs(spec, batch_size, input_size)

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        """The compulsory bytes (the concatenated experts are cached across calls), the E× stacked
        input, and where there is bias its B mixed vectors and an out-of-place add."""
        return replace(
            compulsory_traffic(spec, batch_size, input_size, itemsize),
            kernels=batch_size * spec.out_channels * itemsize if spec.bias else 0,
            expanded=spec.num_experts * input_bytes(spec, batch_size, input_size, itemsize),
            epilogue=bias_epilogue(spec, batch_size, input_size, itemsize),
        )
