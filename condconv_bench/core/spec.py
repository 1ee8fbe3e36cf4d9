"""The identity of a CondConv layer: what it computes, independent of how it is computed.

A `LayerSpec` is frozen and hashable so it can key caches and appear inside a benchmark case.
Validation lives here, once, so the suite loader, the implementations and the drop-in modules
reject the same impossible layers with the same words (each error names the field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from condconv_bench.errors import SpecError

LayerKind = Literal["conv2d", "linear"]
RoutingKind = Literal["sigmoid", "softmax"]
Pair = tuple[int, int]

LAYER_KINDS: tuple[str, ...] = ("conv2d", "linear")
ROUTING_KINDS: tuple[str, ...] = ("sigmoid", "softmax")


def as_pair(field: str, value: int | tuple[int, ...] | list[int]) -> Pair:
    """`value` as a (height, width) pair; SpecError naming `field` when it is neither an integer nor two."""
    if isinstance(value, bool):
        raise SpecError(field, f"expected an integer or a pair of integers, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return (value[0], value[1])
    raise SpecError(field, f"expected an integer or a pair of integers, got {value!r}")


@dataclass(frozen=True)
class LayerSpec:
    """A conditionally parameterised conv2d or linear layer.

    Routing follows the paper (`sigmoid`) or DynamicConv (`softmax` of logits / `temperature`).
    For `linear`, the spatial fields must keep their defaults: a fully-connected CondConv has no
    kernel, stride or groups.
    """

    kind: LayerKind
    in_channels: int
    out_channels: int
    num_experts: int = 8
    kernel_size: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    bias: bool = False
    routing: RoutingKind = "sigmoid"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for name in ("kernel_size", "stride", "padding", "dilation"):
            object.__setattr__(self, name, as_pair(name, getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise SpecError("kind", f"{self.kind!r} is not one of {', '.join(LAYER_KINDS)}")
        for name in ("in_channels", "out_channels", "num_experts", "groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(name, f"must be a positive integer, got {value!r}")
        for name, minimum in (("kernel_size", 1), ("stride", 1), ("dilation", 1), ("padding", 0)):
            if min(getattr(self, name)) < minimum:
                raise SpecError(name, f"must be >= {minimum}, got {getattr(self, name)}")
        if self.routing not in ROUTING_KINDS:
            raise SpecError("routing", f"{self.routing!r} is not one of {', '.join(ROUTING_KINDS)}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise SpecError("temperature", f"must be a positive number, got {self.temperature!r}")
        if not isinstance(self.bias, bool):
            raise SpecError("bias", f"must be true or false, got {self.bias!r}")
        if self.kind == "linear":
            defaults = {f.name: f.default for f in fields(self)}
            for name in ("kernel_size", "stride", "padding", "dilation", "groups"):
                if getattr(self, name) != defaults[name]:
                    raise SpecError(name, "a linear layer has no kernel, stride, padding, dilation or groups")
            return
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % self.groups:
                raise SpecError("groups", f"{self.groups} does not divide {name} {getattr(self, name)}")

    @property
    def expert_shape(self) -> tuple[int, ...]:
        """Shape of one expert's kernel: `(C_out, C_in/groups, kh, kw)`, or `(C_out, C_in)` for linear."""
        if self.kind == "linear":
            return (self.out_channels, self.in_channels)
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def kernel_numel(self) -> int:
        """Elements in one expert's kernel: the P of the `(B, E) @ (E, P)` mixing product."""
        return math.prod(self.expert_shape)

    @property
    def is_pointwise(self) -> bool:
        """A 1×1 conv without padding: a plain matrix product per example, no im2col needed."""
        return self.kind == "conv2d" and self.kernel_size == (1, 1) and self.padding == (0, 0)

    @property
    def is_depthwise(self) -> bool:
        return self.kind == "conv2d" and self.groups == self.in_channels and self.groups > 1

    def output_size(self, input_size: Pair) -> Pair:
        """Spatial output size of the conv for an input of `input_size` (PyTorch's formula)."""
        if self.kind == "linear":
            return (1, 1)
        out = []
        for i in range(2):
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            size = (input_size[i] + 2 * self.padding[i] - span) // self.stride[i] + 1
            out.append(size)
        if min(out) < 1:
            raise SpecError("input_size", f"{input_size} is smaller than the kernel's receptive field")
        return (out[0], out[1])

    def input_shape(self, batch_size: int, input_size: Pair) -> tuple[int, ...]:
        if self.kind == "linear":
            return (batch_size, self.in_channels)
        return (batch_size, self.in_channels, *input_size)

    def conv_kwargs(self) -> dict[str, Pair | int]:
        """Keyword arguments of `F.conv2d` for one example's conv (groups as in the spec)."""
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    def describe(self) -> str:
        """A short human label, e.g. `conv2d 672→672 k5 s2 g672 E8`."""
        if self.kind == "linear":
            return f"linear {self.in_channels}→{self.out_channels} E{self.num_experts}"
        k = "x".join(map(str, self.kernel_size)) if self.kernel_size[0] != self.kernel_size[1] else str(self.kernel_size[0])
        parts = [f"conv2d {self.in_channels}→{self.out_channels}", f"k{k}"]
        if self.stride != (1, 1):
            parts.append(f"s{self.stride[0]}")
        if self.dilation != (1, 1):
            parts.append(f"d{self.dilation[0]}")
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        parts.append(f"E{self.num_experts}")
        return " ".join(parts)
