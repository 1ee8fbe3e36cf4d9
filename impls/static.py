"""The static floor: a plain conv/linear of the same shape with one fixed kernel (expert 0).

Not CondConv (no routing, no mixing), so it is excluded from equivalence; it is the cost of the
layer CondConv replaces, and every strategy's latency is reported as a ratio to it. Ratios are
measured in the same run, which cancels the machine's speed.
"""

from __future__ import annotations

import torch

from condconv_bench.core.flops import AnalyticMacs, conv_macs
from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, input_bytes, kernel_bytes, output_bytes


@register_impl("static")
class Static(CondConvBase):
    """One plain conv/linear with a fixed kernel; not CondConv."""

    is_floor = True
    materialises_kernels = False

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.conditional_forward(x, routing_weights)

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None) -> torch.Tensor:
        return self.static_op(x, self.weight[0], None if self.bias is None else self.bias[0])

    @classmethod
    def analytic_macs(cls, spec: LayerSpec, batch_size: int, input_size: Pair) -> AnalyticMacs:
        return AnalyticMacs(0, 0, conv_macs(spec, batch_size, input_size))

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        """Input and output, one kernel (and bias) read, no routing: the plain layer."""
        return Traffic(input_bytes(spec, batch_size, input_size, itemsize), output_bytes(spec, batch_size, input_size, itemsize),
                       kernel_bytes(spec, 1, itemsize), 0)
