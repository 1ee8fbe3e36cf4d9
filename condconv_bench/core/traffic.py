"""Bytes a CondConv forward pass moves: the compulsory traffic and each strategy's own.

Beside `flops` (the MACs), this is the other half of a roofline. A `Traffic` is the size of each
buffer one forward call touches, in bytes, split by purpose. The buffers every exact strategy
must touch — the input and the routing parameters read, all E experts read (at batch 1 that is
E× a static layer's weights), the output written — are *compulsory* and count once. What a
strategy materialises on the way — per-example kernels, im2col columns, E× inputs or outputs,
transposed or concatenated copies, an out-of-place bias add — is written once and read once
again, so it counts twice in `moved`. Caches that live across calls (a re-laid-out copy of the
experts built once per weight version) are read like the experts and add nothing.

The formulas use the layer's shape only (P = C_out·C_in/g·kh·kw elements per kernel, L = H'·W'
output pixels, B examples, E experts, `itemsize` bytes per element):

- input `B·C_in·H·W`, output `B·C_out·L`, experts `E·(P + C_out if bias)`;
- routing `E·C_in + E` parameters read and `B·E` weights written (the pooling re-reads the input,
  which the input already counts);
- per-example kernels `B·(P + C_out if bias)`; im2col columns `B·C_in·kh·kw·L`.

Every strategy declares its own `analytic_bytes` next to its `analytic_macs`; tests compare the
model with the tensors a forward call really allocates.
"""

from __future__ import annotations

from dataclasses import dataclass

from condconv_bench.core.spec import LayerSpec, Pair


@dataclass(frozen=True)
class Traffic:
    """Bytes of the buffers one forward call touches, by purpose."""

    input: int
    output: int
    experts: int  # all E experts (and their bias): the static layer reads one
    routing: int  # routing parameters read, routing weights written
    kernels: int = 0  # materialised per-example kernels (and mixed bias)
    columns: int = 0  # im2col / unfold buffers, strided gathers of the input
    expanded: int = 0  # E× inputs (stacked_moe) or E× outputs (naive_moe)
    copies: int = 0  # transposed or concatenated copies of the output
    epilogue: int = 0  # output-sized temporaries of an out-of-place bias add

    @property
    def compulsory(self) -> int:
        """What any exact computation of this layer must read or write once."""
        return self.input + self.output + self.experts + self.routing

    @property
    def intermediate(self) -> int:
        """What the strategy materialises on top: each such buffer is written, then read."""
        return self.kernels + self.columns + self.expanded + self.copies + self.epilogue

    @property
    def moved(self) -> int:
        """Bytes moved to and from memory: compulsory once, intermediates twice."""
        return self.compulsory + 2 * self.intermediate


def input_bytes(spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> int:
    height, width = (1, 1) if spec.kind == "linear" else input_size
    return batch_size * spec.in_channels * height * width * itemsize


def output_bytes(spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> int:
    out_h, out_w = spec.output_size(input_size)
    return batch_size * spec.out_channels * out_h * out_w * itemsize


def kernel_bytes(spec: LayerSpec, count: int, itemsize: int) -> int:
    """`count` kernels with their bias: E experts, B mixed kernels, or one static kernel."""
    return count * (spec.kernel_numel + (spec.out_channels if spec.bias else 0)) * itemsize


def routing_bytes(spec: LayerSpec, batch_size: int, itemsize: int) -> int:
    return (spec.num_experts * (spec.in_channels + 1) + batch_size * spec.num_experts) * itemsize


def unfold_bytes(spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> int:
    """The input as columns for a matrix product: none for a linear layer or an unpadded 1×1 conv
    at stride 1 (a view), the strided gather of a 1×1 conv at stride > 1, im2col otherwise."""
    if spec.kind == "linear" or (spec.is_pointwise and spec.stride == (1, 1)):
        return 0
    out_h, out_w = spec.output_size(input_size)
    taps = 1 if spec.is_pointwise else spec.kernel_size[0] * spec.kernel_size[1]
    return batch_size * spec.in_channels * taps * out_h * out_w * itemsize


def compulsory_traffic(spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
    """The bytes any exact CondConv strategy must move: every expert read once, input, routing, output."""
    return Traffic(
        input=input_bytes(spec, batch_size, input_size, itemsize),
        output=output_bytes(spec, batch_size, input_size, itemsize),
        experts=kernel_bytes(spec, spec.num_experts, itemsize),
        routing=routing_bytes(spec, batch_size, itemsize),
    )


def bias_epilogue(spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> int:
    """An out-of-place `out + bias` writes a second output-sized tensor where the layer has bias."""
    return output_bytes(spec, batch_size, input_size, itemsize) if spec.bias else 0
