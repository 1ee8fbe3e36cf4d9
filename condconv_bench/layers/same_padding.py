"""TensorFlow's "SAME" padding, computed per input as timm's `tf_` models do, in front of `CondConv2d`.

TF pads so that the output has `ceil(size / stride)` positions, splitting the padding
`max((ceil(size / stride) − 1) · stride + (k − 1) · dilation + 1 − size, 0)` with the smaller half
first (top, left) and the larger last (bottom, right). Where that depends on the input size (any
stride above 1, or an even receptive field), timm's `CondConv2d` marks itself `dynamic_padding` and
pads every input this way before a convolution with no padding (`timm.layers.conv2d_same`): at
stride 2 the padding is asymmetric, and on odd input sizes it differs from even ones. A fixed
symmetric padding cannot reproduce that, so `SamePadCondConv2d` pads each input, then runs the
project's layer with padding 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from condconv_bench.layers.condconv import CondConv2d
from condconv_bench.core.spec import Pair


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding of one spatial dimension of `size` under TF "SAME"."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SamePadCondConv2d(CondConv2d):
    """`CondConv2d` behind TF "SAME" padding computed from each input's size (built with padding 0)."""

    def padding_for(self, input_size: Pair) -> tuple[int, int, int, int]:
        """`F.pad`'s (left, right, top, bottom) for an input of `input_size`."""
        (kh, kw), (sh, sw), (dh, dw) = self.spec.kernel_size, self.spec.stride, self.spec.dilation
        top, bottom = same_padding(input_size[0], kh, sh, dh)
        left, right = same_padding(input_size[1], kw, sw, dw)
        return left, right, top, bottom

    def padded_size(self, input_size: Pair) -> Pair:
        """The spatial size the layer itself sees for an input of `input_size`."""
        left, right, top, bottom = self.padding_for(input_size)
        return input_size[0] + top + bottom, input_size[1] + left + right

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        if routing_weights is None:  # routing pools the input as given, before padding
            routing_weights = self.compute_routing(x)
        padding = self.padding_for((x.shape[-2], x.shape[-1]))
        if any(padding):
            x = F.pad(x, padding)
        return super().forward(x, routing_weights)
