"""What a benchmark case runs: one CondConv layer, or a stack of blocks built from CondConv layers.

The runner measures any `Workload` the same way: it builds the module for an implementation,
loads the workload's one shared parameter set, feeds seeded inputs, and asks the workload for
its analytic cost and its float64 reference. A layer's reference is the defining formula
(`equivalence.compute_reference`); a stack's is the same stack in float64 with every CondConv
computed by the mixture-of-experts formula.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from condconv_bench.core import equivalence
from condconv_bench.layers.blocks import CondConvStack, StackSpec, stack_analytic_macs
from condconv_bench.core.flops import AnalyticMacs, compulsory_macs
from condconv_bench.core.contract import CondConvBase, initial_parameters
from condconv_bench.core.limits import CaseWork, Work
from condconv_bench.core.registry import get_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import compulsory_traffic

REFERENCE_IMPL = "naive_moe"  # Σ_e α_e (W_e ∗ x): the defining formula, used as a stack's reference


class Workload(ABC):
    """The identity of what a case measures, independent of the implementation."""

    kind: str
    routing_given: bool = False
    spec: LayerSpec | StackSpec

    def describe(self) -> str:
        return self.spec.describe()

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    @abstractmethod
    def input_shape(self, batch_size: int) -> tuple[int, ...]: ...

    @abstractmethod
    def output_shape(self, batch_size: int) -> tuple[int, ...]: ...

    @abstractmethod
    def build(self, impl: type[CondConvBase]) -> nn.Module:
        """A freshly initialised module computing this workload with `impl`."""

    @abstractmethod
    def initial_state(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The shared parameter set every implementation loads."""

    def instantiate(self, impl: type[CondConvBase], state: dict[str, torch.Tensor]) -> nn.Module:
        """The module for `impl` with the shared parameters `state` loaded."""
        module = self.build(impl)
        module.load_state_dict(state)
        return module

    def impl_class(self, name: str) -> type[CondConvBase]:
        """The class a case's implementation name stands for (a model workload adds `as_shipped`)."""
        return get_impl(name)

    def unavailable_reason(self) -> str | None:
        """Why no case of this workload can run here (e.g. its model's library is missing), or None."""
        return None

    def fallback_reference_bytes(self, batch_size: int, training: bool, dtype: torch.dtype) -> int | None:
        """Bytes of the check `reference` falls back to where the float64 reference does not fit in
        memory (`condconv_bench.cases.memory_estimate`), or None where there is no such check: a case whose
        oracle does not fit is then skipped."""
        return None

    def eager_module(self, module: nn.Module) -> nn.Module:
        """What the FLOP counters trace for `module` (built by `build`)."""
        return module.eager_module()

    def layer_inputs(self) -> list[tuple[LayerSpec, Pair]]:
        """Each CondConv layer with the spatial size of its input, for the memory estimate."""
        size = tuple(self.input_shape(1)[2:]) or (1, 1)
        return [(spec, size) for spec in self.layer_specs()]  # type: ignore[misc]

    @abstractmethod
    def analytic_macs(self, module: nn.Module, batch_size: int) -> AnalyticMacs:
        """The cost model of the strategy `module` runs (built by `build`)."""

    def kernel_bytes(self, module: nn.Module, batch_size: int) -> int:
        """Bytes of per-example kernels one call of `module` materialises (0 if it builds none)."""
        return sum(m.kernel_bytes(batch_size) for m in module.modules() if isinstance(m, CondConvBase))

    @abstractmethod
    def reference(self, module: nn.Module, x: torch.Tensor, routing_weights: torch.Tensor | None,
                  grad_output: torch.Tensor | None) -> equivalence.Reference: ...

    def work(self, module: nn.Module, batch_size: int) -> CaseWork | None:
        """The compulsory and the strategy's own work of one forward pass, for the case's limits;
        None where no traffic model exists (`condconv_bench.core.limits`)."""
        return None

    @abstractmethod
    def layer_specs(self) -> list[LayerSpec]:
        """The CondConv layers an implementation must support to run this workload."""

    @property
    def has_spatial_input(self) -> bool:
        return len(self.input_shape(1)) == 4


@dataclass(frozen=True)
class LayerWorkload(Workload):
    """One CondConv layer on an input of `input_size`."""

    spec: LayerSpec
    input_size: Pair
    routing_given: bool = False

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.spec.kind

    def input_shape(self, batch_size: int) -> tuple[int, ...]:
        return self.spec.input_shape(batch_size, self.input_size)

    def output_shape(self, batch_size: int) -> tuple[int, ...]:
        if self.spec.kind == "linear":
            return (batch_size, self.spec.out_channels)
        return (batch_size, self.spec.out_channels, *self.spec.output_size(self.input_size))

    def build(self, impl: type[CondConvBase]) -> nn.Module:
        return impl(self.spec)

    def layer_specs(self) -> list[LayerSpec]:
        return [self.spec]

    def initial_state(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return initial_parameters(self.spec, generator)

    def analytic_macs(self, module: nn.Module, batch_size: int) -> AnalyticMacs:
        return module.cost(batch_size, self.input_size)

    def work(self, module: nn.Module, batch_size: int) -> CaseWork:
        """The floor's compulsory work is its own (it is the plain layer, not CondConv)."""
        own = Work(module.cost(batch_size, self.input_size), module.traffic(batch_size, self.input_size))
        if module.strategy_class().is_floor:
            return CaseWork(own, own, self.spec.is_depthwise)
        itemsize = module.weight.element_size()
        compulsory = Work(compulsory_macs(self.spec, batch_size, self.input_size),
                          compulsory_traffic(self.spec, batch_size, self.input_size, itemsize))
        return CaseWork(compulsory, own, self.spec.is_depthwise)

    def reference(self, module: nn.Module, x: torch.Tensor, routing_weights: torch.Tensor | None,
                  grad_output: torch.Tensor | None) -> equivalence.Reference:
        return equivalence.compute_reference(module, x, routing_weights, grad_output)


@dataclass(frozen=True)
class StackWorkload(Workload):
    """A stack of CondConv inverted-residual blocks (EfficientNet-CondConv), routing shared per block."""

    spec: StackSpec

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "stack"

    def input_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.spec.in_channels, *self.spec.input_size)

    def output_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.spec.out_channels, *self.spec.output_size)

    def build(self, impl: type[CondConvBase]) -> nn.Module:
        return CondConvStack(self.spec, impl)

    def layer_specs(self) -> list[LayerSpec]:
        return self.spec.condconv_layers()

    def initial_state(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            return CondConvStack(self.spec, get_impl(REFERENCE_IMPL)).state_dict()

    def analytic_macs(self, module: nn.Module, batch_size: int) -> AnalyticMacs:
        return stack_analytic_macs(module, batch_size)

    def reference(self, module: nn.Module, x: torch.Tensor, routing_weights: torch.Tensor | None,
                  grad_output: torch.Tensor | None) -> equivalence.Reference:
        device = torch.device("cpu") if x.device.type == "mps" else x.device
        reference = CondConvStack(self.spec, get_impl(REFERENCE_IMPL)).to(device=device, dtype=torch.float64)
        reference.load_state_dict(module.state_dict())
        reference.train(module.training)
        return equivalence.compute_module_reference(reference, x.to(device=device, dtype=torch.float64), grad_output)

