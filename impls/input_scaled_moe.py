"""Input-scaled mixture of experts: E static convs on the routing-scaled input, summed: `Σ_e W_e ∗ (α_e x)`.

Source: the naive mixture `Σ_e α_e (W_e ∗ x)` (naive_moe) with each routing weight moved through
its conv, which linearity allows; written for deployment (issue 27). Exact, no per-example
weights, no batch-dependent `groups`, so one exported graph serves every batch; it still costs E×
the conv MACs, like naive_moe.

Why it is shaped so: in an inference runtime the convs run with constant weights, and ONNX
Runtime then runs a depthwise conv in its blocked-channel (NCHWc) kernel, about 7× faster than
any depthwise conv whose weights are computed in the graph (a per-example kernel as the weight:
measured 876 µs against 123 µs for 480 channels at 14×14, k5, batch 1). With `α_e` on the conv's
*output*, as naive_moe has it, every expert's output is reordered back from the blocked layout,
scaled and added separately. With `α_e` on its *input*, each conv's output goes straight into the
next conv's accumulation (ONNX Runtime fuses `conv + running sum` into the blocked conv), so the
E partial outputs never leave the blocked layout; the price is E input-sized scalings instead of
E output-sized ones. So the routing weights scale whichever side of the conv is smaller per
example: the input where it is no larger than the output (stride 1 depthwise, widening 1×1),
the output otherwise (a stride-2 conv's input is 4× its output; there this is naive_moe).

Measured (2-core AMD EPYC, torch 2.13.0+cpu, onnxruntime 1.32.0, float32, 2 intra-op threads;
one graph with a dynamic batch per layer; `condconv-bench run suites/mobile.yaml --device cpu
--runtime onnxruntime` on the five depthwise layers at batch 1, 8 and 32, a shared machine): its
ratio to the static layer exported the same way 5.6–7.6× (geometric mean 6.59×) on the stride-1
layers against naive_moe's 6.7–11.9× (8.40×) in the same rounds, faster in all 12 of them; on
the stride-2 layer it runs naive_moe's form (4.6–6.0×, equal). Three more invocations of a script
interleaving the two in one process agreed (faster in 36 of 36 stride-1 cases, 1.05–1.66×).
README "Deploying" has the table. Eagerly it gains nothing: a short check at batch 8 (480 and 1152
channels, 2 threads) had it at 0.79–0.98× naive_moe's speed; mobile runs it there too.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.flops import AnalyticMacs, expert_products_macs
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, bias_epilogue, compulsory_traffic, input_bytes, output_bytes


def scales_input(spec: LayerSpec, input_size: Pair) -> bool:
    """Whether the routing weights scale the input (no larger than the output per example) or the output."""
    if spec.kind == "linear":
        return spec.in_channels <= spec.out_channels
    out_h, out_w = spec.output_size(input_size)
    return spec.in_channels * input_size[0] * input_size[1] <= spec.out_channels * out_h * out_w


@register_impl("input_scaled_moe")
class InputScaledMoE(CondConvBase):
    """E static convs on the routing-scaled input, summed (E× MACs; the output scaled where smaller)."""

    dispatchable = True
    materialises_kernels = False

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        trailing = (1,) * (x.dim() - 2)
        on_input = scales_input(self.spec, tuple(x.shape[2:]) if x.dim() == 4 else (1, 1))
        out = None
        for expert in range(self.spec.num_experts):
            alpha = routing_weights[:, expert].view(-1, 1, *trailing)
            if on_input:
                term = self.static_op(x * alpha, self.weight[expert], None)
            else:
                term = self.static_op(x, self.weight[expert], None) * alpha
            out = term if out is None else term + out  # the conv first: a runtime fuses the add into it
        bias = self.mixed_bias(routing_weights)
        return out if bias is None else out + bias.view(-1, self.spec.out_channels, *trailing)

    @classmethod
    def analytic_macs(cls, spec: LayerSpec, batch_size: int, input_size: Pair) -> AnalyticMacs:
        """E full convs (one per expert); only the bias is mixed."""
        return expert_products_macs(spec, batch_size, input_size)

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        """The compulsory bytes; E scaled inputs, E conv outputs and E−1 running sums (the last is the
        output) where the input is scaled, naive_moe's 3E−2 output-sized temporaries where the output
        is; with bias, its B mixed vectors and an out-of-place add."""
        experts = spec.num_experts
        out = output_bytes(spec, batch_size, input_size, itemsize)
        if scales_input(spec, input_size):
            expanded = experts * input_bytes(spec, batch_size, input_size, itemsize) + (2 * experts - 2) * out
        else:
            expanded = (3 * experts - 2) * out
        return replace(compulsory_traffic(spec, batch_size, input_size, itemsize), expanded=expanded,
                       kernels=batch_size * spec.out_channels * itemsize if spec.bias else 0,
                       epilogue=bias_epilogue(spec, batch_size, input_size, itemsize))
