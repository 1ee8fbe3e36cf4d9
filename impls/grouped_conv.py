"""Batch-as-groups: one `(B, E) @ (E, P)` mix, then one conv with `groups = g·B` on `(1, B·C, H, W)`.

Source: timm `CondConv2d` and most DynamicConv/ODConv ports; `torch.vmap(F.conv2d)` lowers to
the same thing. One launch for the whole batch, but it writes and reads a B·P tensor of
per-example kernels, and each kernel element is reused only H'·W' times. `groups` depends on the
batch size, so static-graph exports (ONNX) bake the batch size in and compilers specialise on it.
A linear layer is run the same way, as a 1×1 conv on a 1×1 image with `groups = B`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.registry import register_impl


@register_impl("grouped_conv")
class GroupedConv(CondConvBase):
    """Fold the batch into groups: one mix, one grouped conv (timm, DynamicConv ports)."""

    batch_fixed_export = "folds the batch into the convolution's groups, which ONNX's Conv takes as a fixed attribute"
    dispatchable = True

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        batch = x.shape[0]
        kernels = self.mixed_kernels(routing_weights)
        bias = self.mixed_bias(routing_weights)
        bias = None if bias is None else bias.reshape(-1)
        if spec.kind == "linear":
            folded = x.reshape(1, batch * spec.in_channels, 1, 1)
            kernels = kernels.reshape(batch * spec.out_channels, spec.in_channels, 1, 1)
            return F.conv2d(folded, kernels, bias, groups=batch).view(batch, spec.out_channels)
        folded = x.reshape(1, batch * spec.in_channels, *x.shape[2:])
        kernels = kernels.reshape(batch * spec.out_channels, *spec.expert_shape[1:])
        out = F.conv2d(
            folded, kernels, bias,
            stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=spec.groups * batch,
        )
        return out.view(batch, spec.out_channels, *out.shape[2:])
