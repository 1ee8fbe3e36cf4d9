"""`auto`: per call, the strategy a dispatch table measured fastest for this layer and input.

Source: this project's measurements (no public CondConv layer chooses its strategy: timm's folds
the batch into groups, the TF original loops). The choice is keyed by device type, dtype,
training or inference, thread count, memory format, layer shape and batch size
(`condconv_bench.dispatch`), and resolved once per new input shape; later calls cost one
dictionary lookup on the input's shape, strides, dtype and device. It runs the chosen strategy's
`conditional_forward` on its own parameters, so only strategies that use nothing but the shared
parameters (`dispatchable`) are candidates. Limit: as good as the table; for a machine the
shipped tables never saw, `condconv-bench tune` builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from condconv_bench.dispatch import DispatchTable, Query, resolve_table
from condconv_bench.errors import UnknownImplError
from condconv_bench.layer import CondConvBase
from condconv_bench.registry import dispatchable_impls, register_impl
from condconv_bench.spec import LayerSpec

Forward = Callable[[CondConvBase, torch.Tensor, torch.Tensor], torch.Tensor]


def _dtype_name(dtype: torch.dtype) -> str:
    """The suites' and tables' name for a dtype: `torch.bfloat16` → `bfloat16`."""
    return str(dtype).removeprefix("torch.")


def _lookup(table: DispatchTable | str | Path | None, spec: LayerSpec, input_size: tuple[int, ...], device: str,
            dtype: str, grad_enabled: bool, channels_last: bool, batch_size: int) -> str:
    query = Query(
        spec=spec, input_size=input_size, device=device, dtype=dtype,  # type: ignore[arg-type]
        mode="training" if grad_enabled else "inference", threads=torch.get_num_threads(),
        memory_format="channels_last" if channels_last else "contiguous", batch_size=batch_size,
    )
    return resolve_table(table).choose(query)


# Under torch.compile the lookup runs eagerly while tracing and its answer is baked into the graph.
# `torch.compiler.assume_constant_result(_lookup)` does exactly this by setting the marker below, but
# it imports torch._dynamo (about a second) at import time, which every model using the layer would
# pay; the marker costs nothing. tests/test_auto.py compiles the layer with fullgraph=True, which
# fails if dynamo stops honouring it.
_lookup._dynamo_marked_constant = True  # type: ignore[attr-defined]


@register_impl("auto")
class Auto(CondConvBase):
    """Dispatch per call to the strategy measured fastest for this shape, device, dtype and batch."""

    is_dispatcher = True

    def __init__(self, spec: LayerSpec, strategy: str = "auto", dispatch_table: DispatchTable | str | Path | None = None) -> None:
        super().__init__(spec)
        strategies = dispatchable_impls()
        if strategy != "auto" and strategy not in strategies:
            raise UnknownImplError(f"strategy {strategy!r} is not one of auto, {', '.join(strategies)}")
        self.strategy = strategy
        self.dispatch_table = dispatch_table
        self.last_strategy: str | None = None  # chosen for the most recent new input shape
        self.last_guessed = False  # whether that choice was a rule of thumb (no table entry for the device and dtype)
        self._choices: dict[tuple[object, ...], tuple[str, Forward]] = {}

    def choose(self, x: torch.Tensor) -> str:
        """The strategy key this layer runs for an input like `x` (resolved now, not cached)."""
        if self.strategy != "auto":
            return self.strategy
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return _lookup(
            self.dispatch_table, self.spec, tuple(x.shape[2:4]) if x.dim() == 4 else (1, 1), x.device.type,
            _dtype_name(x.dtype), torch.is_grad_enabled(), channels_last, x.shape[0],
        )

    def _resolve(self, x: torch.Tensor) -> tuple[str, Forward]:
        key = self.choose(x)
        self.last_strategy = key
        dtype = _dtype_name(x.dtype)
        self.last_guessed = self.strategy == "auto" and not resolve_table(self.dispatch_table).covers(x.device.type, dtype)
        return key, dispatchable_impls()[key].conditional_forward

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # choose while tracing; the compiled graph bakes the choice in
            return dispatchable_impls()[self.choose(x)].conditional_forward(self, x, routing_weights)
        key = (x.shape, x.stride(), x.dtype, x.device, torch.is_grad_enabled(), torch.get_num_threads())
        choice = self._choices.get(key)
        if choice is None:
            choice = self._choices[key] = self._resolve(x)
        return choice[1](self, x, routing_weights)

    def strategy_class(self) -> type[CondConvBase]:
        if self.last_strategy is None:
            raise RuntimeError("auto has not run yet, so it has chosen no strategy")
        return dispatchable_impls()[self.last_strategy]
