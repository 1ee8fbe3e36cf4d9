"""`auto` and `autotune`: per call, the strategy measured fastest for this layer and input.

Source: this project's measurements (no public CondConv layer chooses its strategy: timm's folds
the batch into groups, the TF original loops). `auto` looks the choice up in a dispatch table,
keyed by device type, dtype, training or inference, thread count, memory format, allocator,
layer shape and batch size (`condconv_bench.dispatch`); `autotune` measures the strategies in
this process on the first call of each new input signature (`condconv_bench.autotune`) and
remembers the answer per machine. Either resolves once per new input shape; later calls cost one
dictionary lookup on the input's shape, strides, dtype and device. It runs the chosen strategy's
`conditional_forward` on its own parameters, so only strategies that use nothing but the shared
parameters (`dispatchable`) are candidates. Limit of `auto`: as good as the table, which may come
from another machine (it warns once when the table never saw this process's allocator and thread
count); `autotune` pays instead about half a second per new signature, once per machine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from condconv_bench import autotune
from condconv_bench.dispatch import DispatchTable, Query, resolve_table
from condconv_bench.errors import UnknownImplError
from condconv_bench.layer import CondConvBase
from condconv_bench.measure import allocators
from condconv_bench.registry import dispatchable_impls, register_impl
from condconv_bench.spec import LayerSpec

Forward = Callable[[CondConvBase, torch.Tensor, torch.Tensor], torch.Tensor]
SELECTORS = ("auto", "autotune")


def _dtype_name(dtype: torch.dtype) -> str:
    """The suites' and tables' name for a dtype: `torch.bfloat16` → `bfloat16`."""
    return str(dtype).removeprefix("torch.")


def _query(spec: LayerSpec, input_size: tuple[int, ...], device: str, dtype: str, grad_enabled: bool,
           channels_last: bool, batch_size: int) -> Query:
    return Query(
        spec=spec, input_size=input_size, device=device, dtype=dtype,  # type: ignore[arg-type]
        mode="training" if grad_enabled else "inference", threads=torch.get_num_threads(),
        memory_format="channels_last" if channels_last else "contiguous", allocator=allocators.current(),
        batch_size=batch_size,
    )


def _lookup(table: DispatchTable | str | Path | None, tuned: bool, compiling: bool, spec: LayerSpec,
            input_size: tuple[int, ...], device: str, dtype: str, grad_enabled: bool, channels_last: bool, batch_size: int) -> str:
    """The strategy for a query: a choice autotuned on this machine if `tuned` and there is one —
    while `compiling`, preferably one measured among compiled variants — else the table's."""
    query = _query(spec, input_size, device, dtype, grad_enabled, channels_last, batch_size)
    if tuned:
        for tuned_query in (autotune.compiled_query(query), query) if compiling else (query,):
            entry = autotune.machine_cache().lookup(tuned_query)
            if entry is not None and entry.strategy in dispatchable_impls():
                return entry.strategy
    return resolve_table(table).choose(query)


# Under torch.compile the lookup runs eagerly while tracing and its answer is baked into the graph.
# `torch.compiler.assume_constant_result(_lookup)` does exactly this by setting the marker below, but
# it imports torch._dynamo (about a second) at import time, which every model using the layer would
# pay; the marker costs nothing. tests/test_auto.py compiles the layer with fullgraph=True, which
# fails if dynamo stops honouring it. The lookup needs the input's sizes as constants: once dynamo
# makes them dynamic (by default, on the second input shape it compiles) it cannot call it, and
# without fullgraph it breaks the graph there; `torch.compile(model, dynamic=False)` keeps one
# graph per shape, each with its own choice baked in.
_lookup._dynamo_marked_constant = True  # type: ignore[attr-defined]

_warned: set[tuple[str, str, int]] = set()


class MeasuredElsewhereWarning(RuntimeWarning):
    """The dispatch table never measured this process's allocator and thread count."""


def _warn_if_measured_elsewhere(table: DispatchTable, query: Query) -> None:
    """Once per process and table: say so when the table never saw this allocator and thread count."""
    under = table.measured_under(query.device, query.dtype)
    if not under or (query.allocator, query.threads) in under:
        return
    key = (table.source, query.allocator, query.threads)
    if key in _warned:
        return
    _warned.add(key)
    seen = ", ".join(f"{allocator} with {threads} threads" for allocator, threads in sorted(under))
    warnings.warn(
        f"condconv_bench: the dispatch table {table.source or '(in memory)'} was measured under {seen}; this process runs "
        f"allocator {query.allocator} with {query.threads} threads, where other strategies may be faster. "
        "strategy='autotune' (or condconv_bench.set_autotune(True)) measures them here.",
        MeasuredElsewhereWarning, stacklevel=4,
    )


@register_impl("auto")
class Auto(CondConvBase):
    """Dispatch per call to the strategy measured fastest for this shape, device, dtype and batch."""

    is_dispatcher = True
    default_strategy = "auto"

    def __init__(self, spec: LayerSpec, strategy: str | None = None, dispatch_table: DispatchTable | str | Path | None = None,
                 tuning_budget_s: float | None = None) -> None:
        super().__init__(spec)
        strategy = strategy or self.default_strategy
        strategies = dispatchable_impls()
        if strategy not in SELECTORS and strategy not in strategies:
            raise UnknownImplError(f"strategy {strategy!r} is not one of {', '.join(SELECTORS)}, {', '.join(strategies)}")
        if tuning_budget_s is not None and tuning_budget_s <= 0:
            raise ValueError(f"tuning_budget_s must be positive, got {tuning_budget_s}")
        self.strategy = strategy
        self.dispatch_table = dispatch_table
        self.tuning_budget_s = tuning_budget_s
        self.last_strategy: str | None = None  # chosen for the most recent new input shape
        self.last_guessed = False  # whether that choice was a rule of thumb (no table entry for the device and dtype)
        self.last_tuning: autotune.Tuning | None = None  # the most recent measurement this layer made
        self._choices: dict[tuple[object, ...], tuple[str, Forward]] = {}

    def autotunes(self) -> bool:
        """Whether this layer measures strategies itself: `autotune`, or `auto` under the global switch."""
        return self.strategy == "autotune" or (self.strategy == "auto" and autotune.autotune_enabled())

    def _query_args(self, x: torch.Tensor) -> tuple[object, ...]:
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return (self.spec, tuple(x.shape[2:4]) if x.dim() == 4 else (1, 1), x.device.type, _dtype_name(x.dtype),
                torch.is_grad_enabled(), channels_last, x.shape[0])

    def choose(self, x: torch.Tensor) -> str:
        """The strategy key this layer runs for an input like `x`, without measuring anything."""
        if self.strategy not in SELECTORS:
            return self.strategy
        compiling = torch.compiler.is_compiling()
        return _lookup(self.dispatch_table, self.autotunes(), compiling, *self._query_args(x))  # type: ignore[arg-type]

    def _resolve(self, x: torch.Tensor, routing_weights: torch.Tensor) -> tuple[str, Forward]:
        strategies = dispatchable_impls()
        self.last_guessed = False
        if self.strategy not in SELECTORS:
            key = self.strategy
        elif self.autotunes():
            query = _query(*self._query_args(x))  # type: ignore[arg-type]
            compiled = autotune.for_compile()
            if compiled:  # the model is about to be compiled: this eager call tunes for that
                query = autotune.compiled_query(query)
            cache = autotune.machine_cache()
            known = cache.lookup(query)
            if known is not None and known.strategy in strategies:
                key = known.strategy
            else:
                candidates = {k: cls for k, cls in strategies.items() if cls.unsupported_reason(self.spec, x.device, x.dtype) is None}
                budget = self.tuning_budget_s or autotune.default_budget_s()
                self.last_tuning = autotune.measure(self, x, routing_weights, candidates, budget, compiled=compiled)
                key = self.last_tuning.strategy
                cache.add([query.entry(key, self.last_tuning.margin, "autotune")])
        else:
            table = resolve_table(self.dispatch_table)
            query = _query(*self._query_args(x))  # type: ignore[arg-type]
            key = table.choose(query)
            self.last_guessed = not table.covers(query.device, query.dtype)
            _warn_if_measured_elsewhere(table, query)
        self.last_strategy = key
        return key, strategies[key].conditional_forward

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # choose while tracing; the compiled graph bakes the choice in
            return dispatchable_impls()[self.choose(x)].conditional_forward(self, x, routing_weights)
        key = (x.shape, x.stride(), x.dtype, x.device, torch.is_grad_enabled(), torch.get_num_threads())
        choice = self._choices.get(key)
        if choice is None:
            choice = self._choices[key] = self._resolve(x, routing_weights)
        return choice[1](self, x, routing_weights)

    def strategy_class(self) -> type[CondConvBase]:
        if self.last_strategy is None:
            raise RuntimeError("auto has not run yet, so it has chosen no strategy")
        return dispatchable_impls()[self.last_strategy]


@register_impl("autotune")
class AutoTune(Auto):
    """auto that measures the strategies in its own process on each new input's first call."""

    default_strategy = "autotune"
