"""A whole model as a workload: as its library builds it, converted per strategy, and its floor.

Cases of a model group: `as_shipped` (the model exactly as its library builds it), every strategy,
`auto` and `autotune` (the model after `convert(model, strategy)`), and `static`, the *floor*: the
same network without CondConv (e.g. `efficientnet_b0` for `efficientnet_cc_b0_8e`), so that
converted / floor is what CondConv still costs. All of them load one seeded parameter set (the
floor its own), and every converted model is checked against the as-shipped model evaluated in
float64 on the same parameters and input (output, and in training every gradient), or, where that
does not fit in memory, against the as-shipped model in the case's dtype at a stated, looser
tolerance (the row's `reason` says so).

Shapes, the analytic MAC count and the entries that cannot run come from the model's survey
(`cases.models.survey`), made once however many cases ask.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from condconv_bench.cases import memory_estimate
from condconv_bench.core import equivalence
from condconv_bench.conversion.adapters.timm_condconv2d import TimmCondConv2d
from condconv_bench.conversion.swap import convert, find_layers
from condconv_bench.errors import ModelError
from condconv_bench.core.flops import AnalyticMacs, mixing_macs
from condconv_bench.core.contract import CondConvBase
from condconv_bench.cases.models import AS_SHIPPED, sources
from condconv_bench.cases.models.survey import Contraction, Survey, survey
from condconv_bench.core.registry import get_impl
from condconv_bench.layers.same_padding import SamePadCondConv2d
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.cases.workload import Workload

# A fixed strategy's case runs it where it is an algorithm for the layer, and timm's algorithm in the
# layers it is not for (the matmul strategies in depthwise layers, see `convert`): fixed in every
# process, so the case measures what the strategy is worth where a user would choose it, and the
# row's `dispatched` says what ran (e.g. `batched_matmul×16 grouped_conv×8`).
UNSUITED_LAYERS_RUN = "grouped_conv"
SHIPPED_ERROR_FACTOR = 4.0  # a converted model may be this much less exact than the library's own, not more
# A reference in the case's own dtype (where the float64 one does not fit) is held to this many times
# the per-dtype tolerance, by mode (training: True); see `ModelWorkload.reference`.
FALLBACK_FACTOR = {False: 2.0, True: SHIPPED_ERROR_FACTOR + 1}
ZERO_GRADIENT = 1e-12  # relative to the largest gradient element: float64 rounding noise, not a gradient
_SHIPPED, _FLOOR = "shipped.", "floor."
SHIPPED_STATE = "condconv_bench_shipped_state"  # attribute of an instantiated model: the parameters before conversion


class AsShipped(CondConvBase):
    """The model exactly as its library builds it (no layer converted)."""

    key = AS_SHIPPED

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        raise TypeError("as_shipped names a whole model's own layers; it is not a layer implementation")


def _timm_macs(module: nn.Module, contraction: Contraction, batch_size: int) -> AnalyticMacs:
    spec = TimmCondConv2d().spec(module)
    return AnalyticMacs(0, mixing_macs(spec, batch_size), batch_size * contraction.output_numel * spec.kernel_numel // spec.out_channels)


@dataclass(frozen=True)
class ModelWorkload(Workload):
    """A model built from `source`, on inputs `(B, in_channels, *input_size)`, with `floor` as its floor."""

    source: str
    input_size: Pair
    floor: str | None = None
    in_channels: int = 3

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "model"

    def describe(self) -> str:
        floor = f", floor {self.floor}" if self.floor else ""
        return f"{self.source} @{self.input_size[0]}x{self.input_size[1]}{floor}"

    @property
    def num_experts(self) -> int:
        return max(spec.num_experts for _, spec in self._survey().layers)

    def _survey(self, floor: bool = False) -> Survey:
        """The model's (or the floor's) survey; a `ModelError` where the model or its floor cannot
        take the input, or the model has no CondConv layer to convert."""
        surveys = {source: survey(source, self.input_shape(1)) for source in (self.source, self.floor) if source}
        refusal = next((s for s in surveys.values() if isinstance(s, str)), None)
        if refusal is not None:
            raise ModelError(refusal)
        if not surveys[self.source].layers:  # type: ignore[union-attr]
            raise ModelError(f"model {self.source!r} has no CondConv layer that convert() recognises "
                             "(a floor, the network without CondConv, goes under floor:)")
        return surveys[self.floor if floor else self.source]  # type: ignore[return-value, index]

    def unavailable_reason(self) -> str | None:
        return next(filter(None, (sources.unavailable_reason(s) for s in (self.source, self.floor) if s)), None)

    def impl_class(self, name: str) -> type[CondConvBase]:
        return AsShipped if name == AS_SHIPPED else get_impl(name)

    def input_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.in_channels, *self.input_size)

    def output_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, *self._survey().output_shape[1:])

    def layer_specs(self) -> list[LayerSpec]:
        return [spec for _, spec in self._survey().layers]

    def layer_inputs(self) -> list[tuple[LayerSpec, Pair]]:
        contractions = self._survey().contractions
        return [(spec, contractions[path].input_size) for path, spec in self._survey().layers]

    def _source_of(self, impl: type[CondConvBase]) -> str:
        if impl.is_floor:
            if self.floor is None:
                raise ValueError(f"{self.source} has no floor model to run as {impl.key}")
            return self.floor
        return self.source

    def build(self, impl: type[CondConvBase]) -> nn.Module:
        return self._finish(sources.build_model(self._source_of(impl)), impl)

    def _finish(self, model: nn.Module, impl: type[CondConvBase]) -> nn.Module:
        if impl is AsShipped or impl.is_floor:
            return model
        return convert(model, impl.key, elsewhere=UNSUITED_LAYERS_RUN).model

    def instantiate(self, impl: type[CondConvBase], state: dict[str, torch.Tensor]) -> nn.Module:
        """The model for `impl` with the group's parameters; a converted one also keeps the as-shipped
        parameters it was converted from, so that `reference` checks what conversion made of them
        (a reference built from the converted model's own parameters would repeat a wrong copy)."""
        prefix = _FLOOR if impl.is_floor else _SHIPPED
        model = sources.build_model(self._source_of(impl))
        loaded = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        model.load_state_dict(loaded)
        model = self._finish(model, impl)
        if not impl.is_floor:
            setattr(model, SHIPPED_STATE, loaded)
        return model

    def initial_state(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        state = {}
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        for prefix, source in ((_SHIPPED, self.source), (_FLOOR, self.floor)):
            if source is None:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                state.update({prefix + k: v for k, v in sources.build_model(source).state_dict().items()})
        return state

    def analytic_macs(self, module: nn.Module, batch_size: int) -> AnalyticMacs:
        is_floor = self.floor is not None and not find_layers(module)  # the floor is the model without CondConv
        contractions = self._survey(floor=is_floor).contractions
        routing = mixing = conv = 0
        for path, layer in module.named_modules():
            seen = contractions.get(path)
            if seen is None:
                continue
            if isinstance(layer, CondConvBase):
                size = layer.padded_size(seen.input_size) if isinstance(layer, SamePadCondConv2d) else seen.input_size
                macs = layer.cost(batch_size, size)
                routing += macs.routing if seen.routes_itself else 0
            elif TimmCondConv2d().recognises(layer):
                macs = _timm_macs(layer, seen, batch_size)
            elif isinstance(layer, (nn.Conv2d, nn.Linear)):
                per_output = layer.weight[0].numel()
                macs = AnalyticMacs(0, 0, batch_size * seen.output_numel * per_output)
            else:
                continue
            mixing += macs.mixing
            conv += macs.conv
        return AnalyticMacs(routing, mixing, conv)

    def kernel_bytes(self, module: nn.Module, batch_size: int) -> int:
        ours = super().kernel_bytes(module, batch_size)
        timm = sum(batch_size * math.prod(found.spec.expert_shape) * found.module.weight.element_size()
                   for found in find_layers(module) if isinstance(found.adapter, TimmCondConv2d))
        return ours + timm

    def eager_module(self, module: nn.Module) -> nn.Module:
        """A copy whose dispatching layers run, fixed, the strategy each chose on its first call: the
        FLOP counters trace the model under `no_grad` with symbolic shapes, where `auto` would choose
        (and `autotune` tune) anew instead of counting what was timed."""
        chosen = [(path, layer.last_strategy) for path, layer in module.named_modules()
                  if isinstance(layer, CondConvBase) and layer.is_dispatcher and getattr(layer, "last_strategy", None)]
        if not chosen:
            return module
        fixed = copy.deepcopy(module)
        for path, strategy in chosen:
            parent_path, _, name = path.rpartition(".")
            parent = fixed.get_submodule(parent_path)
            setattr(parent, name, convert(parent.get_submodule(name), strategy, elsewhere=None).model)
        return fixed

    def fallback_reference_bytes(self, batch_size: int, training: bool, dtype: torch.dtype) -> int | None:
        """The as-shipped model's tensors in the case's own dtype (see `reference`)."""
        return dtype.itemsize * memory_estimate.reference_elements(self, batch_size, training)

    def reference(self, module: nn.Module, x: torch.Tensor, routing_weights: torch.Tensor | None,
                  grad_output: torch.Tensor | None) -> equivalence.Reference:
        """The as-shipped model in float64 on `module`'s parameters, and the tolerance every case of the
        group is held to: the per-dtype one of a layer, or `SHIPPED_ERROR_FACTOR` times the as-shipped
        model's own error in the case's dtype, whichever is larger (rounding grows with a network's
        depth: timm's own float32 model reaches 1e-4 on some gradients in training).

        Where the float64 model does not fit in memory beside the case (`memory_estimate.oracle_fits`;
        `efficientnet_cc_b1_8e` at batch 32 needs about 25 GiB by that estimate), the reference is
        the as-shipped model in the case's own dtype, and the row says so. Both are then rounded, so
        the tolerance is looser and stated: two results each within `t` of the exact one differ by at
        most `2t` (inference); in training the converted model is held to `SHIPPED_ERROR_FACTOR` times
        the as-shipped one's own error, so they may differ by `(SHIPPED_ERROR_FACTOR + 1) t`
        (`FALLBACK_FACTOR`). At the per-dtype float32 tolerance this still catches a wrong weight copy:
        swapping the experts of a randomly initialised `tf_efficientnet_cc_b0_8e` moves its output
        by 1.4e-3, against 2e-4; the converted models' own differences from the float32 as-shipped
        model are about 1e-6 in inference."""
        device = torch.device("cpu") if x.device.type == "mps" else x.device
        state = getattr(module, SHIPPED_STATE, None) or module.state_dict()

        def shipped(dtype: torch.dtype) -> nn.Module:
            model = sources.build_model(self.source).to(device=x.device if dtype != torch.float64 else device, dtype=dtype)
            model.load_state_dict({k: state[k].reshape(v.shape).to(dtype) for k, v in model.state_dict().items()})
            return model.train(module.training)

        training = grad_output is not None
        per_dtype = equivalence.tolerance_for(x.dtype, x.device)
        if not memory_estimate.oracle_fits(self, x.shape[0], training, x.dtype, x.device):
            computed = equivalence.compute_module_reference(shipped(x.dtype), x, grad_output)
            tensors = {name: t for name, t in computed.tensors.items()
                       if not _zero_in_exact_arithmetic(name, t, computed, per_dtype)}
            tolerance = FALLBACK_FACTOR[training] * per_dtype
            dtype = str(x.dtype).removeprefix("torch.")
            return equivalence.Reference(tensors, tolerance, f"the as-shipped model in {dtype} (the float64 one does not "
                                         f"fit in memory), tolerance {tolerance:.0e}")
        computed = equivalence.compute_module_reference(shipped(torch.float64), x.to(device=device, dtype=torch.float64), grad_output)
        tensors = {name: t for name, t in computed.tensors.items() if not _zero_in_exact_arithmetic(name, t, computed)}
        reference = equivalence.Reference(tensors)
        own = equivalence.check_equivalence(shipped(x.dtype), x, None, grad_output, reference)
        tolerance = max(per_dtype, SHIPPED_ERROR_FACTOR * own.max_rel_error)
        return equivalence.Reference(tensors, tolerance)


def _zero_in_exact_arithmetic(name: str, tensor: torch.Tensor, reference: equivalence.Reference,
                              zero: float = ZERO_GRADIENT) -> bool:
    """A gradient that vanishes in exact arithmetic, such as a bias followed only by linear layers and
    training-mode batch norms, which remove any constant shift: its float64 value is rounding noise
    (here 1e-17 of the largest gradient), so a relative error against it means nothing and it is not
    compared. A reference in a rounded dtype leaves larger noise: `zero` is then that dtype's tolerance."""
    if not name.startswith("grad_"):
        return False
    largest = max(float(t.abs().max()) for n, t in reference.tensors.items() if n.startswith("grad_"))
    return float(tensor.abs().max()) <= zero * largest
