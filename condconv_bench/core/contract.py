"""The implementation contract: one parameter layout and one routing function for every strategy.

`CondConvBase` owns the parameters in the canonical layout (expert weights `(E, *expert_shape)`,
optional expert bias `(E, C_out)`, routing `Linear(C_in, E)`), so one `state_dict` loads into
every implementation and outputs are comparable by construction. Subclasses implement only
`conditional_forward`, the part in which the strategies differ.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from condconv_bench.core.flops import AnalyticMacs, conv_macs, mixing_macs, routing_macs
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, compulsory_traffic, kernel_bytes


def initial_parameters(spec: LayerSpec, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A state dict in the canonical layout, drawn from `generator` (the global RNG if None).

    Each expert is initialised like a standalone `nn.Conv2d`/`nn.Linear` (uniform ±1/√fan_in,
    which is PyTorch's kaiming_uniform with a=√5), as timm does. Initialising the 5-D tensor at
    once, as nibuiro/CondConv-pytorch does, computes fan-in over experts and output channels and
    starts every expert about √C_out too small. The runner draws one state per layer from a seeded generator and loads it
    into every implementation, so their outputs are comparable.
    """

    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)

    fan_in = spec.kernel_numel // spec.out_channels
    state = {"weight": uniform((spec.num_experts, *spec.expert_shape), fan_in)}
    if spec.bias:
        state["bias"] = uniform((spec.num_experts, spec.out_channels), fan_in)
    state["routing.weight"] = uniform((spec.num_experts, spec.in_channels), spec.in_channels)
    state["routing.bias"] = uniform((spec.num_experts,), spec.in_channels)
    return state


class CondConvBase(nn.Module, ABC):
    """Shared parameters and routing; subclasses decide how the conditional op is computed."""

    key: ClassVar[str] = ""  # set by the registry
    is_floor: ClassVar[bool] = False  # a floor to compare against, not a CondConv (no equivalence)
    compiles: ClassVar[bool] = False  # its first call must build a torch.compile graph, or it ran eager
    is_dispatcher: ClassVar[bool] = False  # runs one of the strategies (auto): judged against the fastest, never races
    materialises_kernels: ClassVar[bool] = True  # builds B per-sample kernels (memory B·P)
    # Compiled here for this CPU (`-march=native`): its speed depends on the vector extension it
    # was built for, so a dispatch table's measurement of it holds only where that is the same.
    native: ClassVar[bool] = False
    # Its conditional_forward uses only the shared parameters and this base's helpers, so the
    # dispatching layer (`auto`) may run it on its own parameters. Only a class's own declaration
    # counts (see `registry.dispatchable_impls`): a subclass may override the helpers it calls.
    dispatchable: ClassVar[bool] = False
    # Why a graph exported from this strategy (torch.export, ONNX) runs only at the batch it was
    # traced with, or None where one graph serves every batch: a deployed model needs the latter.
    # `runtimes.export` measures it per case; tests/test_runtimes.py holds each declaration to the exporter.
    batch_fixed_export: ClassVar[str | None] = None

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.temperature = float(spec.temperature)  # mutable: DynamicConv anneals it during training
        self.weight = nn.Parameter(torch.empty(spec.num_experts, *spec.expert_shape))
        self.bias = nn.Parameter(torch.empty(spec.num_experts, spec.out_channels)) if spec.bias else None
        self.routing = nn.Linear(spec.in_channels, spec.num_experts)
        self._layouts: dict[str, tuple[tuple[object, ...], torch.Tensor]] = {}
        self._workspace: tuple[tuple[object, ...], torch.Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, value in initial_parameters(self.spec).items():
                self.get_parameter(name).copy_(value)

    @classmethod
    def description(cls) -> str:
        """One line for `condconv-bench list`: the first line of the class docstring."""
        return (cls.__doc__ or cls.__name__).strip().splitlines()[0]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this implementation cannot run on this machine at all (e.g. no compiler), or None."""
        return None

    @classmethod
    def prepare(cls) -> None:
        """Make the strategy ready to run, so that no timed call pays for it: a native strategy
        builds or loads its code here. The dispatching layers call it before timing candidates;
        it raises `ImplUnavailableError` when the strategy cannot be made ready."""

    @classmethod
    def unsupported_reason(cls, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this implementation cannot run this layer on this device and dtype, or None."""
        return None

    @classmethod
    def runs(cls, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this implementation can run this layer here: available on the machine, and the
        layer, device and dtype supported (what a dispatcher may pick among)."""
        return cls.unavailable_reason() is None and cls.unsupported_reason(spec, device, dtype) is None

    @classmethod
    def unsuited_reason(cls, spec: LayerSpec) -> str | None:
        """Why this strategy, though exact there, is not an algorithm for this kind of layer (`convert()`
        asked for it runs another in such a layer, and says so), or None."""
        return None

    @classmethod
    def analytic_macs(cls, spec: LayerSpec, batch_size: int, input_size: Pair) -> AnalyticMacs:
        """This strategy's cost model: route, mix B kernels, run one conv's worth of MACs."""
        return AnalyticMacs(routing_macs(spec, batch_size), mixing_macs(spec, batch_size), conv_macs(spec, batch_size, input_size))

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        """This strategy's traffic model (`condconv_bench.core.traffic`), beside its MACs: the compulsory
        bytes, plus the B per-example kernels (and mixed bias) written and read again when it
        materialises them, as one mix and one grouped conv do (grouped_conv)."""
        kernels = kernel_bytes(spec, batch_size, itemsize) if cls.materialises_kernels else 0
        return replace(compulsory_traffic(spec, batch_size, input_size, itemsize), kernels=kernels)

    def strategy_class(self) -> type[CondConvBase]:
        """The class whose strategy this module runs; a dispatching layer answers with its choice."""
        return type(self)

    def cost(self, batch_size: int, input_size: Pair) -> AnalyticMacs:
        """The analytic MACs of the strategy this module runs."""
        return self.strategy_class().analytic_macs(self.spec, batch_size, input_size)

    def traffic(self, batch_size: int, input_size: Pair) -> Traffic:
        """The modelled bytes of the strategy this module runs, at its parameters' element size."""
        return self.strategy_class().analytic_bytes(self.spec, batch_size, input_size, self.weight.element_size())

    def kernel_bytes(self, batch_size: int) -> int:
        """Bytes of per-example kernels one call materialises (0 for strategies that build none)."""
        if not self.strategy_class().materialises_kernels:
            return 0
        return batch_size * self.spec.kernel_numel * self.weight.element_size()

    def load_flat_experts(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Import experts stored flat, `(E, C_out·C_in/groups·kh·kw)`, as the TF original and timm
        do (timm's `CondConv2d.weight`), and optionally their `(E, C_out)` bias."""
        expected = (self.spec.num_experts, self.spec.kernel_numel)
        if tuple(weight.shape) != expected:
            raise ValueError(f"flat expert weights must have shape {expected}, got {tuple(weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(weight.reshape(self.weight.shape))
            if bias is not None:
                if self.bias is None:
                    raise ValueError("this layer was built without bias (spec.bias is False)")
                self.bias.copy_(bias)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # Accept the flat expert layout in state dicts too, so checkpoints of flat-layout ports load.
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dim() == 2 and weight.numel() == self.weight.numel():
            state_dict[prefix + "weight"] = weight.reshape(self.weight.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def eager_module(self) -> CondConvBase:
        """The module the FLOP counters trace; a compiled implementation returns its eager source."""
        return self

    def compute_routing(self, x: torch.Tensor) -> torch.Tensor:
        """Per-example expert weights `(B, E)` from the globally pooled input."""
        pooled = x.mean(dim=(2, 3)) if self.spec.kind == "conv2d" else x
        # F.linear, not the module call: at batch 1 the module call's hooks and bookkeeping cost
        # 3-6% of a 1x1 layer's whole step (measured on 112>672 @14 and 1152>192 @7).
        logits = F.linear(pooled, self.routing.weight, self.routing.bias)
        if self.spec.routing == "softmax":
            return torch.softmax(logits / self.temperature, dim=1)
        return torch.sigmoid(logits)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the layer; `routing_weights` `(B, E)` is accepted from outside when a block shares it."""
        if routing_weights is None:
            routing_weights = self.compute_routing(x)
        return self.conditional_forward(x, routing_weights)

    @abstractmethod
    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """The layer's output given routing weights `(B, E)`: where the strategies differ."""

    def mixed_kernels(self, routing_weights: torch.Tensor, reuse_workspace: bool = False) -> torch.Tensor:
        """Per-example kernels `(B, *expert_shape)` as one `(B, E) @ (E, P)` product.

        With `reuse_workspace`, and while autograd does not record, the product is written into a
        buffer kept between calls (valid until the next call), instead of a fresh allocation.
        """
        experts = self.weight.reshape(self.spec.num_experts, -1)
        recording = torch.is_grad_enabled() and (self.weight.requires_grad or routing_weights.requires_grad)
        if not reuse_workspace or recording or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return (routing_weights @ experts).view(-1, *self.spec.expert_shape)
        shape = (routing_weights.shape[0], experts.shape[1])
        key = (shape, experts.dtype, experts.device, torch.is_inference_mode_enabled())
        if self._workspace is None or self._workspace[0] != key:
            self._workspace = (key, torch.empty(shape, dtype=experts.dtype, device=experts.device))
        return torch.matmul(routing_weights, experts, out=self._workspace[1]).view(-1, *self.spec.expert_shape)

    def expert_layout(self, name: str, build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The expert weights re-laid out by `build` (e.g. concatenated), rebuilt only when they change.

        While autograd records, the layout is rebuilt on every call so gradients reach `weight`.
        Otherwise it is cached until the weights change in place, are loaded or are moved, which
        the tensor's version counter and storage pointer reveal — like a prepacked weight. Weights
        created under `torch.inference_mode` have no version counter, so nothing could tell a
        cached layout stale: theirs is rebuilt on every call (build a model outside inference mode
        and run it inside to keep the cache). While tracing, the layout is part of the graph.
        """
        weight = self.weight
        if (torch.compiler.is_compiling() or torch.compiler.is_exporting()  # first: dynamo cannot trace is_inference
                or (torch.is_grad_enabled() and weight.requires_grad) or weight.is_inference()):
            return build(weight)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        cached = self._layouts.get(name)
        if cached is None or cached[0] != key:
            cached = (key, build(weight.detach()))
            self._layouts[name] = cached
        return cached[1]

    def mixed_bias(self, routing_weights: torch.Tensor) -> torch.Tensor | None:
        """Per-example bias `(B, C_out)`, mixed like the kernels (the TF original's convention)."""
        return None if self.bias is None else routing_weights @ self.bias

    def static_op(self, x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's plain op with one kernel: `F.conv2d` or `F.linear` as the spec says."""
        if self.spec.kind == "linear":
            return F.linear(x, kernel, bias)
        return F.conv2d(x, kernel, bias, **self.spec.conv_kwargs())

    def extra_repr(self) -> str:
        return self.spec.describe() + f", routing={self.spec.routing}, bias={self.spec.bias}"
