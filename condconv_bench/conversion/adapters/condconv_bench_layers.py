"""This project's own layers (`CondConv2d`, `CondConvLinear`, any registered implementation):
re-targeted to another strategy, parameters and routing kept as they are.

Every implementation shares one parameter layout (`CondConvBase`), so the state dict carries over
unchanged; a layer converted from timm's keeps having no routing of its own, and one behind TF
"SAME" padding stays so. A subclass that overrides `forward` (other than the project's own) may
compute something else and is refused, unless it is a registered implementation (the registry's
tests hold every one to the float64 oracle); so is the `static` floor, which is not CondConv.
"""

from __future__ import annotations

from torch import nn

from condconv_bench.conversion.adapters import LayerAdapter, NotExact, Target, register_adapter
from condconv_bench.core.contract import CondConvBase
from condconv_bench.layers.condconv import CondConv2d, CondConvLinear
from condconv_bench.layers.same_padding import SamePadCondConv2d
from condconv_bench.core.spec import LayerSpec


@register_adapter
class CondConvBenchLayers(LayerAdapter):
    key = "condconv_bench"

    def recognises(self, module: nn.Module) -> bool:
        return isinstance(module, CondConvBase)

    def spec(self, module: nn.Module) -> LayerSpec:
        cls = type(module)
        if cls.is_floor:
            raise NotExact(f"{cls.__qualname__} is a floor with one fixed kernel, not a CondConv layer")
        registered = "key" in cls.__dict__  # the registry sets it on the class itself: oracle-tested
        if not registered and cls.forward not in (CondConvBase.forward, SamePadCondConv2d.forward):
            raise NotExact(f"{cls.__qualname__} overrides CondConvBase.forward")
        return module.spec

    def replacement(self, module: nn.Module, spec: LayerSpec, target: Target) -> nn.Module:
        options = {"num_experts": spec.num_experts, "routing": spec.routing, "temperature": module.temperature,
                   "strategy": target.strategy, "dispatch_table": target.dispatch_table, "tuning_budget_s": target.tuning_budget_s}
        if spec.kind == "linear":
            layer: CondConvBase = CondConvLinear(spec.in_channels, spec.out_channels, spec.bias, **options)
        else:
            layer_class = SamePadCondConv2d if isinstance(module, SamePadCondConv2d) else CondConv2d
            layer = layer_class(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
                                spec.dilation, spec.groups, spec.bias, **options)
        if module.routing is None:
            layer.routing = None
        layer.to(device=module.weight.device, dtype=module.weight.dtype)
        layer.load_state_dict(module.state_dict())
        for name, parameter in module.named_parameters():
            layer.get_parameter(name).requires_grad_(parameter.requires_grad)
        return layer.train(module.training)
