"""EfficientNet-CondConv inverted-residual blocks, built from any CondConv implementation.

A block (timm `CondConvResidual`, TF `MBConvBlock` with CondConv): routing `sigmoid(GAP(x) · R)`
computed once from the block input and shared by its three CondConv layers — 1×1 expand, k×k
depthwise, 1×1 project — each followed by batch norm (SiLU after the first two), with
squeeze-and-excite before the projection and a residual connection when shapes allow. A stack
is the blocks of consecutive stages, the way EfficientNet's block arguments describe them: the
first block of a stage has its stride and width change, its repeats keep the width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from condconv_bench.core.flops import AnalyticMacs, conv_macs
from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.spec import LayerSpec, Pair


@dataclass(frozen=True)
class StageSpec:
    out_channels: int
    kernel_size: int
    stride: int = 1
    expand_ratio: int = 6
    se_ratio: float = 0.25
    repeats: int = 1


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual block and the spatial size of its input."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    expand_ratio: int
    se_ratio: float
    num_experts: int
    input_size: Pair

    @property
    def mid_channels(self) -> int:
        return self.in_channels * self.expand_ratio

    @property
    def se_channels(self) -> int:
        return max(1, int(self.in_channels * self.se_ratio))

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels

    def layers(self) -> tuple[tuple[str, LayerSpec, Pair], ...]:
        """(name, spec, input size) of the block's CondConv layers, in order."""
        mid, experts, k = self.mid_channels, self.num_experts, self.kernel_size
        depthwise = LayerSpec("conv2d", mid, mid, experts, kernel_size=k, stride=self.stride, padding=k // 2, groups=mid)
        return (
            ("expand", LayerSpec("conv2d", self.in_channels, mid, experts), self.input_size),
            ("depthwise", depthwise, self.input_size),
            ("project", LayerSpec("conv2d", mid, self.out_channels, experts), depthwise.output_size(self.input_size)),
        )

    @property
    def output_size(self) -> Pair:
        return self.layers()[1][1].output_size(self.input_size)


@dataclass(frozen=True)
class StackSpec:
    """Consecutive stages of CondConv blocks on an input of `input_size`."""

    in_channels: int
    input_size: Pair
    num_experts: int
    stages: tuple[StageSpec, ...]

    def blocks(self) -> tuple[BlockSpec, ...]:
        blocks, channels, size = [], self.in_channels, self.input_size
        for stage in self.stages:
            for repeat in range(stage.repeats):
                stride = stage.stride if repeat == 0 else 1
                block = BlockSpec(channels, stage.out_channels, stage.kernel_size, stride, stage.expand_ratio,
                                  stage.se_ratio, self.num_experts, size)
                blocks.append(block)
                channels, size = stage.out_channels, block.output_size
        return tuple(blocks)

    def condconv_layers(self) -> list[LayerSpec]:
        return [spec for block in self.blocks() for _, spec, _ in block.layers()]

    @property
    def out_channels(self) -> int:
        return self.stages[-1].out_channels

    @property
    def output_size(self) -> Pair:
        return self.blocks()[-1].output_size

    def describe(self) -> str:
        blocks = self.blocks()
        return (f"{len(blocks)} CondConv blocks {self.in_channels}→{self.out_channels} "
                f"@{self.input_size[0]}x{self.input_size[1]} E{self.num_experts}")


class CondConvBlock(nn.Module):
    """One EfficientNet-CondConv block whose three CondConv layers use implementation `impl`."""

    def __init__(self, block: BlockSpec, impl: type[CondConvBase]) -> None:
        super().__init__()
        self.block = block
        self.routes = not impl.is_floor  # the static floor is a plain EfficientNet block: no routing
        self.routing = nn.Linear(block.in_channels, block.num_experts)
        (_, expand, _), (_, depthwise, _), (_, project, _) = block.layers()
        self.expand, self.bn1 = impl(expand), nn.BatchNorm2d(block.mid_channels)
        self.depthwise, self.bn2 = impl(depthwise), nn.BatchNorm2d(block.mid_channels)
        self.se_reduce = nn.Conv2d(block.mid_channels, block.se_channels, 1)
        self.se_expand = nn.Conv2d(block.se_channels, block.mid_channels, 1)
        self.project, self.bn3 = impl(project), nn.BatchNorm2d(block.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = torch.sigmoid(self.routing(x.mean(dim=(2, 3)))) if self.routes else None
        y = F.silu(self.bn1(self.expand(x, routing)))
        y = F.silu(self.bn2(self.depthwise(y, routing)))
        scale = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(y.mean(dim=(2, 3), keepdim=True)))))
        y = self.bn3(self.project(y * scale, routing))
        return y + x if self.block.has_residual else y


class CondConvStack(nn.Sequential):
    """The blocks of a `StackSpec`, in order."""

    def __init__(self, spec: StackSpec, impl: type[CondConvBase]) -> None:
        super().__init__(*(CondConvBlock(block, impl) for block in spec.blocks()))
        self.spec = spec
        self.impl = impl

    def eager_module(self) -> CondConvStack:
        """The same stack with each layer's eager source, for the FLOP counters."""
        first = self[0].expand
        eager_impl = type(first.eager_module())
        if eager_impl is self.impl:
            return self
        eager = CondConvStack(self.spec, eager_impl).to(device=first.weight.device, dtype=first.weight.dtype)
        eager.load_state_dict(self.state_dict())
        return eager.train(self.training)


def stack_analytic_macs(stack: CondConvStack, batch_size: int) -> AnalyticMacs:
    """Block routing, each layer's mixing and conv as its module reports them (routing is given,
    so the layers compute none of their own), and the squeeze-and-excite convs."""
    routing = mixing = conv = 0
    for module in stack:
        block = module.block
        if module.routes:
            routing += batch_size * block.in_channels * block.num_experts
        for (name, _, input_size) in block.layers():
            macs = getattr(module, name).cost(batch_size, input_size)
            mixing += macs.mixing
            conv += macs.conv
        squeeze = LayerSpec("conv2d", block.mid_channels, block.se_channels, 1)
        excite = LayerSpec("conv2d", block.se_channels, block.mid_channels, 1)
        conv += conv_macs(squeeze, batch_size, (1, 1)) + conv_macs(excite, batch_size, (1, 1))
    return AnalyticMacs(routing, mixing, conv)
