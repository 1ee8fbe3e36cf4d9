"""Batched matmul: im2col (`unfold`) and one `bmm` with the per-example kernels as matrices.

Source: the approach suggested for per-sample weights in functorch#365; no public CondConv uses
it. Each example's conv becomes `(C_out/g, C_in/g·k²) @ (C_in/g·k², L)` for each of its g groups,
all in one `bmm` over B·g matrices. A 1×1 conv without padding needs no unfold (a strided view
is the column matrix), and a linear layer is one `(1, C_in) @ (C_in, C_out)` per example.
Limits: unfold materialises k² × the input, and depthwise layers become B·C tiny matrix products,
which BLAS runs poorly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from condconv_bench.layer import CondConvBase
from condconv_bench.registry import register_impl


@register_impl("batched_matmul")
class BatchedMatmul(CondConvBase):
    """im2col + one bmm over per-example kernels; 1×1 and linear skip the unfold."""

    dispatchable = True

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        return batched_matmul(self, x, routing_weights, reuse_workspace=False)


def batched_matmul(layer: CondConvBase, x: torch.Tensor, routing_weights: torch.Tensor, reuse_workspace: bool) -> torch.Tensor:
    """The strategy itself, shared with `workspace_matmul` (which reuses the kernels' buffer)."""
    spec = layer.spec
    batch = x.shape[0]
    kernels = layer.mixed_kernels(routing_weights, reuse_workspace)
    bias = layer.mixed_bias(routing_weights)
    if spec.kind == "linear":
        out = torch.bmm(x.unsqueeze(1), kernels.transpose(1, 2)).squeeze(1)
        return out if bias is None else out + bias
    out_h, out_w = spec.output_size(x.shape[2:])
    if spec.is_pointwise:
        columns = x[:, :, :: spec.stride[0], :: spec.stride[1]].reshape(batch, spec.in_channels, -1)
    else:
        columns = F.unfold(x, spec.kernel_size, spec.dilation, spec.padding, spec.stride)
    groups = spec.groups
    columns = columns.reshape(batch * groups, columns.shape[1] // groups, -1)
    matrices = kernels.reshape(batch * groups, spec.out_channels // groups, -1)
    out = torch.bmm(matrices, columns).view(batch, spec.out_channels, out_h, out_w)
    return out if bias is None else out + bias.view(batch, -1, 1, 1)
