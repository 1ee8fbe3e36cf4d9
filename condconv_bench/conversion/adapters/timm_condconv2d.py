"""timm's `CondConv2d` (`timm.layers.cond_conv2d`), as used by its `efficientnet_cc_*` models.

Recognised by class name and module (`timm.…CondConv2d`, subclasses included) without importing
timm. What timm's layer computes, read from its source (timm 1.0): the experts are stored flat,
`weight` `(E, C_out · C_in/groups · kh · kw)`, optional `bias` `(E, C_out)`; `forward(x,
routing_weights)` mixes `routing_weights @ weight` (and the bias the same way) per example and
convolves with the layer's stride, dilation and groups, padded by `padding` — or, when
`dynamic_padding` is set (TF "SAME" that depends on the input size, in the `tf_` models), padded per
input as `condconv_bench.layers.same_padding` describes, with no static padding. It has no routing of its
own: its block always passes the routing weights. The replacement therefore has none either (its
state dict has exactly timm's keys, so timm checkpoints load into it), and is called the same way.
A subclass that overrides `forward` may compute something else and is refused.
"""

from __future__ import annotations

import math

from torch import nn

from condconv_bench.conversion.adapters import LayerAdapter, NotExact, Target, register_adapter
from condconv_bench.layers.condconv import CondConv2d
from condconv_bench.layers.same_padding import SamePadCondConv2d
from condconv_bench.core.spec import LayerSpec

ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "num_experts",
              "dynamic_padding", "weight", "bias")


def _timm_class(module: nn.Module) -> type | None:
    return next((c for c in type(module).__mro__ if c.__name__ == "CondConv2d" and c.__module__.split(".")[0] == "timm"), None)


def _pair(module: nn.Module, name: str) -> tuple[int, int]:
    value = getattr(module, name)
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise NotExact(f"{name} is {value!r}, not a pair of integers")
    return int(value[0]), int(value[1])


@register_adapter
class TimmCondConv2d(LayerAdapter):
    key = "timm_condconv2d"

    def recognises(self, module: nn.Module) -> bool:
        return _timm_class(module) is not None

    def spec(self, module: nn.Module) -> LayerSpec:
        base = _timm_class(module)
        missing = [name for name in ATTRIBUTES if not hasattr(module, name)]
        if missing:
            raise NotExact(f"has no {', '.join(missing)} (another timm version's CondConv2d?)")
        if type(module).forward is not base.forward:  # type: ignore[union-attr]
            raise NotExact(f"{type(module).__qualname__} overrides timm's CondConv2d.forward")
        kernel = _pair(module, "kernel_size")
        dynamic = bool(module.dynamic_padding)
        padding = (0, 0) if dynamic else _pair(module, "padding")
        spec = LayerSpec("conv2d", module.in_channels, module.out_channels, module.num_experts, kernel,
                         _pair(module, "stride"), padding, _pair(module, "dilation"), module.groups,
                         bias=module.bias is not None)
        flat = (spec.num_experts, math.prod(spec.expert_shape))
        if tuple(module.weight.shape) != flat:
            raise NotExact(f"weight has shape {tuple(module.weight.shape)}, expected the flat {flat}")
        if module.bias is not None and tuple(module.bias.shape) != (spec.num_experts, spec.out_channels):
            raise NotExact(f"bias has shape {tuple(module.bias.shape)}, expected {(spec.num_experts, spec.out_channels)}")
        return spec

    def replacement(self, module: nn.Module, spec: LayerSpec, target: Target) -> nn.Module:
        layer_class = SamePadCondConv2d if module.dynamic_padding else CondConv2d
        layer = layer_class(
            spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding, spec.dilation, spec.groups,
            spec.bias, num_experts=spec.num_experts, strategy=target.strategy, dispatch_table=target.dispatch_table,
            tuning_budget_s=target.tuning_budget_s,
        )
        layer.routing = None  # timm's layer routes nothing itself: its block passes the routing weights
        layer.to(device=module.weight.device, dtype=module.weight.dtype)
        layer.load_flat_experts(module.weight.detach(), None if module.bias is None else module.bias.detach())
        for name in ("weight", "bias"):
            source = getattr(module, name)
            if source is not None:
                getattr(layer, name).requires_grad_(source.requires_grad)
        return layer.train(module.training)
