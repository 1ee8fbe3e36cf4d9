"""Per-sample loop: mix one example's kernel, run one ordinary conv, repeat for every example.

Source: the TF original (`condconv_layers.py`, a graph-time loop over the batch) and
nibuiro/CondConv-pytorch. Only one mixed kernel exists at a time (memory P, not B·P), and each
conv is the library's regular fast path. Cost: B kernel mixes and B conv launches, so it loses
where launches dominate (small layers, large batches on GPU).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, compulsory_traffic, kernel_bytes, output_bytes


@register_impl("per_sample_loop")
class PerSampleLoop(CondConvBase):
    """Loop over the batch: mix one example's kernel, run one conv (TF original)."""

    batch_fixed_export = "loops over the examples in Python, so a trace unrolls the batch it saw"
    dispatchable = True
    materialises_kernels = False

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        experts = self.weight.reshape(self.spec.num_experts, -1)
        outputs = []
        for index in range(x.shape[0]):
            alpha = routing_weights[index : index + 1]
            kernel = (alpha @ experts).view(self.spec.expert_shape)
            bias = None if self.bias is None else (alpha @ self.bias).view(-1)
            outputs.append(self.static_op(x[index : index + 1], kernel, bias))
        return torch.cat(outputs)

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        """The compulsory bytes, B kernels mixed one at a time (each written, then read by its conv),
        and B per-example outputs concatenated into the output (a copy)."""
        return replace(compulsory_traffic(spec, batch_size, input_size, itemsize), kernels=kernel_bytes(spec, batch_size, itemsize),
                       copies=output_bytes(spec, batch_size, input_size, itemsize))
