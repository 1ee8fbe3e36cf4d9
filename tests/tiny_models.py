"""Tiny hand-built models for the model-workload tests, named in suites as `tiny_models:<callable>`."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from condconv_bench.layers.condconv import CondConv2d


class TinyCondConvNet(nn.Module):
    """A stem conv, one CondConv block whose routing is shared by its two CondConv layers, and a head;
    `without_condconv` makes the same network with plain convs (its floor)."""

    def __init__(self, condconv: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.condconv = condconv
        if condconv:
            self.routing = nn.Linear(8, 4)
            self.expand = CondConv2d(8, 16, 1, bias=False, num_experts=4, strategy="grouped_conv")
            self.depthwise = CondConv2d(16, 16, 3, padding=1, groups=16, bias=True, num_experts=4, strategy="grouped_conv")
        else:
            self.expand = nn.Conv2d(8, 16, 1, bias=False)
            self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.stem(x))
        if self.condconv:
            routing = torch.sigmoid(self.routing(x.mean(dim=(2, 3))))
            x = self.depthwise(F.silu(self.expand(x, routing)), routing)
        else:
            x = self.depthwise(F.silu(self.expand(x)))
        return self.head(F.silu(self.bn(x)).mean(dim=(2, 3)))


def tiny_condconv_net() -> nn.Module:
    return TinyCondConvNet()


def tiny_floor_net() -> nn.Module:
    return TinyCondConvNet(condconv=False)


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _staged(condconv: bool) -> nn.Module:
    """A stem, two stages of blocks (a sequence of sequences, as timm's `blocks`) and a head."""
    def conv(cin: int, cout: int, k: int, groups: int = 1) -> nn.Module:
        if condconv:
            return CondConv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False, num_experts=4, strategy="grouped_conv")
        return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)

    stage = lambda width: nn.Sequential(nn.Sequential(conv(width, 2 * width, 1), nn.SiLU(), conv(2 * width, 2 * width, 3, 2 * width),
                                                      nn.SiLU(), conv(2 * width, width, 1)))
    return nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 8, 3, stride=2, padding=1), blocks=nn.Sequential(stage(8), stage(8)),
                                     head=nn.Sequential(_Flatten(), nn.Linear(8, 10))))


def tiny_staged_net() -> nn.Module:
    return _staged(condconv=True)


def tiny_staged_floor() -> nn.Module:
    return _staged(condconv=False)


class _Unpadded(nn.Module):
    """A 3×3 CondConv layer without padding and a head: an input smaller than 3×3 is one it cannot take."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = CondConv2d(3, 8, 3, num_experts=4, strategy="grouped_conv")
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def tiny_unpadded_net() -> nn.Module:
    return _Unpadded()
