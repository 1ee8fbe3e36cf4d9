"""Batched matmul: im2col (`unfold`) and one `bmm` with the per-example kernels as matrices.

Source: the approach suggested for per-sample weights in functorch#365; no public CondConv uses
it. Each example's conv becomes `(C_out/g, C_in/g·k²) @ (C_in/g·k², L)` for each of its g groups,
all in one `bmm` over B·g matrices. A 1×1 conv without padding needs no unfold (a strided view
is the column matrix), and a linear layer is one `(1, C_in) @ (C_in, C_out)` per example.
Limits: unfold materialises k² × the input, and depthwise layers become B·C tiny matrix products,
which BLAS runs poorly.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, bias_epilogue, compulsory_traffic, kernel_bytes, unfold_bytes


def not_for_depthwise(spec: LayerSpec) -> str | None:
    """The matmul strategies' answer to `unsuited_reason`: a depthwise layer has no matrix product to
    batch (each group is one channel: B·C products of a 1×k² row by a k²×H'W' matrix), so they are
    not what a model converted "to batched_matmul" should run there. Measured on
    `efficientnet_cc_b0_8e` (2-core CPU, fp32, one process, interleaved): batched_matmul in every
    layer 2.1× (b1) and 3.0× (b8) the floor, pixel_major_matmul 2.6× and 4.5×; grouped_conv 1.3×."""
    if spec.is_depthwise:
        return "is not for depthwise layers (B·C one-channel products, each a 1×k² row by a k²×H'W' matrix)"
    return None


@register_impl("batched_matmul")
class BatchedMatmul(CondConvBase):
    """im2col + one bmm over per-example kernels; 1×1 and linear skip the unfold."""

    dispatchable = True

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        return batched_matmul(self, x, routing_weights, reuse_workspace=False)

    @classmethod
    def unsuited_reason(cls, spec: LayerSpec) -> str | None:
        return not_for_depthwise(spec)

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        return batched_matmul_traffic(spec, batch_size, input_size, itemsize)


def batched_matmul_traffic(spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
    """The compulsory bytes, B mixed kernels, the unfolded columns (none for an unpadded 1×1 at
    stride 1 or a linear layer) and an out-of-place bias add."""
    return replace(
        compulsory_traffic(spec, batch_size, input_size, itemsize), kernels=kernel_bytes(spec, batch_size, itemsize),
        columns=unfold_bytes(spec, batch_size, input_size, itemsize), epilogue=bias_epilogue(spec, batch_size, input_size, itemsize),
    )


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
