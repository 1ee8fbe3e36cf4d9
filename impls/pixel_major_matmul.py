"""batched_matmul turned around: each example's product is `(H'W' × K) @ (K × C_out)`, pixel-major.

Source: this project's CPU measurements. batched_matmul computes `(C_out × K) @ (K × H'W')`; on
the 7×7 layers of EfficientNet-B0 that is a GEMM with only 49 columns, which oneDNN/MKL run far
below their peak. Swapping the operands (the input's transpose is a free view, the experts are
laid out as `(K, C_out)` once per weight version, so the mixed kernels come out already
transposed) gives the GEMM a long `C_out` side instead. The output of a layer without groups is
the `(B, H'W', C_out)` result viewed as NCHW, i.e. a channels-last tensor with no copy; grouped
layers are copied back to NCHW. Exact: the same sums in another order.

Prediction, written before measuring it in the suite: at batch 8 and 32 on the 7×7 1×1 layers,
0.80–0.90× batched_matmul's latency; at 14×14 within noise of it; slow on depthwise layers, where
it is B·C tiny products like batched_matmul. Measured (prototype, 2-core CPU, fp32, interleaved,
glibc thresholds fixed): 0.72–0.92× of batched_matmul on the six 1×1 shapes of stages 5–7.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from condconv_bench.impls.batched_matmul import not_for_depthwise
from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, bias_epilogue, compulsory_traffic, kernel_bytes, output_bytes, unfold_bytes


def experts_pixel_major(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(E, C_out, C_in/g, kh, kw) → (E, P) laid out per group as (K, C_out/g), K = C_in/g·kh·kw."""
    experts, out_channels = weight.shape[:2]
    per_group = weight.reshape(experts, groups, out_channels // groups, -1)
    return per_group.transpose(2, 3).reshape(experts, -1)


def columns_pixel_major(layer: CondConvBase, x: torch.Tensor) -> torch.Tensor:
    """The input as `(B·g, H'W', K)`: a view for an unpadded 1×1 layer, an unfold otherwise."""
    spec = layer.spec
    batch = x.shape[0]
    if spec.is_pointwise and spec.groups == 1:
        # permute, then merge the spatial dims: the gradient comes back as the canonical channels-last
        # layout (batch stride H'W'·C_in even at batch 1), as the output does (see `as_output`)
        return x[:, :, :: spec.stride[0], :: spec.stride[1]].permute(0, 2, 3, 1).reshape(batch, -1, spec.in_channels)
    if spec.is_pointwise:
        columns = x[:, :, :: spec.stride[0], :: spec.stride[1]].reshape(batch, spec.in_channels, -1)
    else:
        columns = F.unfold(x, spec.kernel_size, spec.dilation, spec.padding, spec.stride)
    return columns.reshape(batch * spec.groups, columns.shape[1] // spec.groups, -1).transpose(1, 2)


def as_output(layer: CondConvBase, products: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`(B·g, H'W', C_out/g)` products as the layer's `(B, C_out, H', W')` output, bias added.

    Ungrouped, the output is the products viewed as channels-last with the canonical strides
    `(H'W'·C_out, 1, W'·C_out, C_out)`, batch stride included even at batch 1: torch 2.13's CPU
    batch-norm backward computes wrong gradients (relative error ~1.4) for a batch-1 input whose
    batch stride is anything else, such as the `C_out` a `reshape` gives that size-1 dimension
    (found by a training case of `efficientnet_cc_b0_8e` at batch 1; `tests/test_convert.py`). The
    input gradient is kept canonical the same way (`columns_pixel_major`)."""
    spec = layer.spec
    batch = x.shape[0]
    out_h, out_w = spec.output_size(x.shape[2:])
    if spec.groups == 1:
        out = products.view(batch, out_h, out_w, spec.out_channels).permute(0, 3, 1, 2)
    else:
        per_group = products.view(batch, spec.groups, out_h * out_w, spec.out_channels // spec.groups)
        out = per_group.permute(0, 1, 3, 2).reshape(batch, spec.out_channels, out_h, out_w)
    return out if bias is None else out + bias.view(batch, -1, 1, 1)


def pixel_major_kernels(layer: CondConvBase, routing_weights: torch.Tensor) -> torch.Tensor:
    """Per-example kernels `(B'·g, K, C_out/g)` of the B' examples routed, mixed straight into the
    transposed layout."""
    spec = layer.spec
    experts = layer.expert_layout("pixel_major", lambda w: experts_pixel_major(w, spec.groups))
    return (routing_weights @ experts).view(routing_weights.shape[0] * spec.groups, -1, spec.out_channels // spec.groups)


@register_impl("pixel_major_matmul")
class PixelMajorMatmul(CondConvBase):
    """bmm of `(H'W' × K) @ (K × C_out)` per example: a long GEMM side on small images."""

    dispatchable = True

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        kernels = pixel_major_kernels(self, routing_weights)
        bias = self.mixed_bias(routing_weights)
        if self.spec.kind == "linear":
            out = torch.bmm(x.unsqueeze(1), kernels).squeeze(1)
            return out if bias is None else out + bias
        return as_output(self, torch.bmm(columns_pixel_major(self, x), kernels), x, bias)

    @classmethod
    def unsuited_reason(cls, spec: LayerSpec) -> str | None:
        return not_for_depthwise(spec)

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        return pixel_major_traffic(spec, batch_size, input_size, itemsize)


def pixel_major_traffic(spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
    """batched_matmul's bytes (the experts' transposed layout is cached across calls), plus the
    copy back to NCHW that a grouped layer's pixel-major output needs (a view when each group has
    one output channel, as in a depthwise layer, or the output one pixel)."""
    out_h, out_w = spec.output_size(input_size)
    regrouped = spec.kind == "conv2d" and spec.groups > 1 and spec.out_channels > spec.groups and out_h * out_w > 1
    return replace(
        compulsory_traffic(spec, batch_size, input_size, itemsize), kernels=kernel_bytes(spec, batch_size, itemsize),
        columns=unfold_bytes(spec, batch_size, input_size, itemsize),
        copies=output_bytes(spec, batch_size, input_size, itemsize) if regrouped else 0,
        epilogue=bias_epilogue(spec, batch_size, input_size, itemsize),
    )
