"""Fan-out mixture of experts: one static conv whose output channels are every expert's, then one mixing product.

Source: naive_moe's identity `Σ_e α_e (W_e ∗ x)`, shaped for an exported graph. The E experts'
kernels are stacked as E× the output channels of one static conv (for a depthwise layer, E
outputs per input channel: a depthwise conv with a channel multiplier, which runtimes and
oneDNN run as an ordinary depthwise conv), so the weight is a constant the runtime prepacks,
`groups` is the layer's own and nothing depends on the batch size; then each example's E outputs
per channel are mixed by one broadcast `MatMul` with its routing weights.

Why it exists: in ONNX Runtime no shipped strategy both keeps a dynamic batch and runs depthwise
layers well. Batch-as-groups bakes the batch into `Conv.group`; the matmul strategies make B·C
one-channel products of depthwise layers; `stacked_moe` runs a grouped conv with E input channels
per group, which runtimes handle poorly; `naive_moe` runs E convs and 2E elementwise passes over
the output. This costs E× the conv MACs like naive_moe, in one conv and one product (README,
"Deploying", has the measured figures).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.flops import AnalyticMacs, conv_macs, routing_macs
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, compulsory_traffic, output_bytes


def _fanned_out(weight: torch.Tensor) -> torch.Tensor:
    """(E, C_out, C_in/g, *k) → (C_out·E, C_in/g, *k): each output channel's E experts side by side,
    so that a group's output channels stay that group's (grouped convs split outputs in order)."""
    return weight.transpose(0, 1).reshape(-1, *weight.shape[2:])


@register_impl("fanout_moe")
class FanoutMoE(CondConvBase):
    """One static conv with E× the output channels, then the experts' outputs mixed by one matmul."""

    dispatchable = True
    materialises_kernels = False

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        spec, batch = self.spec, x.shape[0]
        weight = self.expert_layout("fanned_out", _fanned_out)
        bias = None if self.bias is None else self.bias.transpose(0, 1).reshape(-1)
        fanned = self.static_op(x, weight, bias)  # (B, C_out·E, *spatial)
        spatial = fanned.shape[2:]
        experts = fanned.reshape(batch, spec.out_channels, spec.num_experts, -1)  # (B, C_out, E, L)
        mixed = torch.matmul(routing_weights.view(batch, 1, 1, spec.num_experts), experts)  # (B, C_out, 1, L)
        return mixed.reshape(batch, spec.out_channels, *spatial)

    @classmethod
    def analytic_macs(cls, spec: LayerSpec, batch_size: int, input_size: Pair) -> AnalyticMacs:
        """E× the conv's MACs in one conv, and E MACs per output element to mix the experts' outputs."""
        conv = conv_macs(spec, batch_size, input_size)
        outputs = conv * spec.out_channels // spec.kernel_numel
        return AnalyticMacs(routing_macs(spec, batch_size), spec.num_experts * outputs, spec.num_experts * conv)

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        """The compulsory bytes and the E output-sized results of the one conv, written then read."""
        return replace(compulsory_traffic(spec, batch_size, input_size, itemsize),
                       expanded=spec.num_experts * output_bytes(spec, batch_size, input_size, itemsize))
