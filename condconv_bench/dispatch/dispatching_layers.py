"""`auto` and `autotune`: per call, the strategy measured fastest for this layer and input.

Source: this project's measurements (no public CondConv layer chooses its strategy: timm's folds
the batch into groups, the TF original loops). Either resolves once per new input signature;
later calls cost one dictionary lookup on the input's shape, strides, dtype and device. It runs
the chosen strategy's `conditional_forward` on its own parameters, so only strategies that use
nothing but the shared parameters (`dispatchable`) are candidates.

- `auto` (the default) measures nothing: it takes the choice this machine's autotune cache holds
  for the query, else the dispatch table's (`table`). It never warns: where the table came from
  and what it was measured under is what `condconv-bench list` shows.
- `autotune` measures on the first call of each new signature (`autotuning.measure`); a choice the
  per-machine cache holds from another process is confirmed first (`autotuning.confirm`: raced
  against the rivals it was measured against and the table's choice; where the choice now runs
  over `DRIFT_FACTOR` faster or slower than its entry recorded, the machine is in another state
  than when it was tuned and the layer tunes afresh), so a tuning from a bad moment cannot stick. An entry with no rival to race (none recorded, and the table agreeing) is
  measured afresh.

While a graph is exported (`torch.export`, the ONNX exporter) neither looks anything up by batch
size: each runs the strategy `deployable` names for its layer class, so that one exported graph
serves every batch; a layer fixed to a strategy that bakes the batch in says so with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from condconv_bench.dispatch import autotuning, switch
from condconv_bench.dispatch.cache import MachineCache, machine_cache
from condconv_bench.dispatch.deployable import BatchFixedExportWarning, batch_fixed_reason, deployed_strategy
from condconv_bench.dispatch.table import DispatchTable, Query, resolve_table
from condconv_bench.errors import ImplUnavailableError, UnknownImplError
from condconv_bench.core.contract import CondConvBase
from condconv_bench.machine import allocators
from condconv_bench.machine.environment import vector_isa
from condconv_bench.core.registry import dispatchable_impls, register_impl
from condconv_bench.core.spec import LayerSpec

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


def _cached_choice(cache: MachineCache, query: Query) -> str | None:
    entry = cache.lookup(query)
    return entry.strategy if entry is not None and entry.strategy in dispatchable_impls() else None


def _machine_choice(query: Query, tuned: bool, compiling: bool = False) -> str | None:
    """What this machine measured for `query` — while `compiling`, preferably among compiled
    variants. An autotuning layer (`tuned`) also sees what this process measured with the cache
    file off; an `auto` layer only the file, so that with the cache off (as in the benchmark's own
    processes) `auto` is the table alone, whatever autotuned beside it."""
    cache = machine_cache()
    if not tuned and cache.path is None:
        return None
    for tuned_query in (switch.compiled_query(query), query) if compiling else (query,):
        choice = _cached_choice(cache, tuned_query)
        if choice is not None:
            return choice
    return None


def _lookup(table: DispatchTable | str | Path | None, tuned: bool, compiling: bool, spec: LayerSpec,
            input_size: tuple[int, ...], device: str, dtype: str, grad_enabled: bool, channels_last: bool, batch_size: int) -> str:
    """The strategy for a query without measuring: this machine's choice, else the table's."""
    query = _query(spec, input_size, device, dtype, grad_enabled, channels_last, batch_size)
    return _machine_choice(query, tuned, compiling) or resolve_table(table).choose(query)


# Under torch.compile the lookup runs eagerly while tracing and its answer is baked into the graph.
# `torch.compiler.assume_constant_result(_lookup)` does exactly this by setting the marker below, but
# it imports torch._dynamo (about a second) at import time, which every model using the layer would
# pay; the marker costs nothing. tests/test_auto.py compiles the layer with fullgraph=True, which
# fails if dynamo stops honouring it. The lookup needs the input's sizes as constants: once dynamo
# makes them dynamic (by default, on the second input shape it compiles) it cannot call it, and
# without fullgraph it breaks the graph there; `torch.compile(model, dynamic=False)` keeps one
# graph per shape, each with its own choice baked in.
_lookup._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _prepared(cls: type[CondConvBase]) -> bool:
    """Whether `cls` is ready to be timed: a native strategy's first build (tens of seconds) must
    happen here, not in the first timed call, where it would look hopeless and be pruned."""
    try:
        cls.prepare()
    except ImplUnavailableError:
        return False
    return True


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
        self.last_tuning: autotuning.Tuning | None = None  # the most recent measurement this layer made
        self._choices: dict[tuple[object, ...], tuple[str, Forward]] = {}

    def autotunes(self) -> bool:
        """Whether this layer measures strategies itself: `autotune`, or `auto` under the global switch."""
        return self.strategy == "autotune" or (self.strategy == "auto" and switch.autotune_enabled())

    def _query_args(self, x: torch.Tensor) -> tuple[object, ...]:
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return (self.spec, tuple(map(int, x.shape[2:4])) if x.dim() == 4 else (1, 1), x.device.type, _dtype_name(x.dtype),
                torch.is_grad_enabled(), channels_last, int(x.shape[0]))

    def choose(self, x: torch.Tensor) -> str:
        """The strategy key this layer runs for an input like `x`, without measuring anything."""
        if self.strategy not in SELECTORS:
            return self.strategy
        return _lookup(self.dispatch_table, self.autotunes(), torch.compiler.is_compiling(), *self._query_args(x))  # type: ignore[arg-type]

    def _candidates(self, x: torch.Tensor, first: str) -> dict[str, type[CondConvBase]]:
        """The strategies worth measuring for an input like `x`, `first` (the table's pick) first."""
        supported = {k: cls for k, cls in dispatchable_impls().items()
                     if cls.runs(self.spec, x.device, x.dtype) and _prepared(cls)}
        ordered = dict(sorted(supported.items(), key=lambda item: item[0] != first))
        input_size = tuple(x.shape[2:4]) if x.dim() == 4 else (1, 1)
        return autotuning.cheap_enough(ordered, self.spec, x.shape[0], input_size)  # type: ignore[arg-type]

    def _tune(self, x: torch.Tensor, routing_weights: torch.Tensor) -> str:
        """Measure, or confirm what this machine measured before, and remember the answer."""
        query = _query(*self._query_args(x))  # type: ignore[arg-type]
        compiled = switch.for_compile()
        if compiled:  # the model is about to be compiled: this eager call tunes for that
            query = switch.compiled_query(query)
        cache = machine_cache()
        cached = _cached_choice(cache, query)
        if cached is not None and cache.trusted(query):
            return cached
        budget = self.tuning_budget_s or switch.default_budget_s()
        table_choice = resolve_table(self.dispatch_table).choose(query)
        candidates = self._candidates(x, table_choice)
        entry = cache.lookup(query)
        recorded = (*entry.rivals, table_choice) if entry else ()
        rivals = {k: candidates[k] for k in recorded if k in candidates and k != cached}
        if cached is not None and cached in candidates and rivals and not compiled:
            measured = autotuning.confirm(self, x, routing_weights, cached, rivals, candidates, budget * autotuning.CONFIRM_SHARE)
            changed = measured.strategy != cached
            if autotuning.drifted(entry, measured):  # another moment than the one measured: its rivals are suspect too
                measured = autotuning.measure(self, x, routing_weights, candidates, budget)
                changed = True
        else:
            measured = autotuning.measure(self, x, routing_weights, candidates, budget, compiled=compiled)
            changed = True
        self.last_tuning = measured
        cache.add([query.entry(measured.strategy, measured.margin, "autotune", measured.rivals, measured.evidence,
                               measured.spread, measured.load, vector_isa())], persist=changed and not measured.noisy)
        return measured.strategy

    def _resolve(self, x: torch.Tensor, routing_weights: torch.Tensor) -> tuple[str, Forward]:
        strategies = dispatchable_impls()
        self.last_guessed = False
        if self.strategy not in SELECTORS:
            key = self.strategy
        elif self.autotunes():
            key = self._tune(x, routing_weights)
        else:
            query = _query(*self._query_args(x))  # type: ignore[arg-type]
            cached, table = _machine_choice(query, tuned=False), resolve_table(self.dispatch_table)
            key = cached or table.choose(query)
            self.last_guessed = cached is None and not table.covers(query.device, query.dtype)
        self.last_strategy = key
        return key, strategies[key].conditional_forward

    def exported_strategy(self) -> str:
        """What this layer runs in an exported graph: its fixed strategy, else the deployed one for its class."""
        return deployed_strategy(self.spec) if self.strategy in SELECTORS else self.strategy

    def _exported_choice(self) -> str:
        """`exported_strategy`, with a warning where it bakes the traced batch into the graph."""
        reason = batch_fixed_reason(self.exported_strategy())
        if reason is not None:
            warnings.warn(f"{self.strategy} {reason}: the exported graph runs only at the batch size it was traced with; "
                          "convert(model, for_export=True) gives every layer a strategy that exports with a dynamic batch",
                          BatchFixedExportWarning, stacklevel=2)
        return self.exported_strategy()

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            self.last_strategy = self._exported_choice()
            return dispatchable_impls()[self.last_strategy].conditional_forward(self, x, routing_weights)
        if torch.compiler.is_compiling():  # choose while tracing; the traced graph bakes the choice in
            return dispatchable_impls()[self.choose(x)].conditional_forward(self, x, routing_weights)
        key = (x.shape, x.stride(), x.dtype, x.device, torch.is_grad_enabled(), torch.get_num_threads())
        choice = self._choices.get(key)
        if choice is None:
            if torch.jit.is_tracing():
                return self._jit_traced_forward(x, routing_weights, key)
            choice = self._choices[key] = self._resolve(x, routing_weights)
        return choice[1](self, x, routing_weights)

    def _jit_traced_forward(self, x: torch.Tensor, routing_weights: torch.Tensor, key: tuple[object, ...]) -> torch.Tensor:
        """Under torch.jit (fvcore's FLOP counter) sizes are tensors, which hash apart from ints, so
        the choice made for this input is looked up by the sizes' values; and a tracer records every
        op, so where there is none it chooses without measuring (a tuning would trace the rivals too)."""
        choice = self._choices.get((torch.Size(int(size) for size in x.shape), *key[1:]))
        forward = choice[1] if choice is not None else dispatchable_impls()[self.choose(x)].conditional_forward
        return forward(self, x, routing_weights)

    def strategy_class(self) -> type[CondConvBase]:
        if self.last_strategy is None:
            raise RuntimeError("auto has not run yet, so it has chosen no strategy")
        return dispatchable_impls()[self.last_strategy]


@register_impl("autotune")
class AutoTune(Auto):
    """auto that measures the strategies in its own process on each new input's first call."""

    default_strategy = "autotune"
