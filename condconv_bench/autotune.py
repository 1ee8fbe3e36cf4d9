"""Autotuning in the user's own process, like `torch.backends.cudnn.benchmark`.

A shipped or `tune`d dispatch table is only as right as the machine it was measured on: machines
sold under one CPU label rank the strategies differently, and so do allocators and thread counts.
A layer built with `strategy="autotune"` (or any `auto` layer while `set_autotune(True)` or
`CONDCONV_BENCH_AUTOTUNE=1` is in force) therefore measures the candidate strategies on its first
call for each new input signature, in this process, on the call's own input:

- candidates are the dispatchable strategies that support the layer, device and dtype, except
  those whose analytic MACs exceed `MACS_FACTOR`× the least (naive_moe and stacked_moe on convs,
  where they do E× the work; never on linear layers, where mixing costs as much);
- each is called twice: the first call, untimed, builds its layouts and library primitives, and
  one whose second call is over `FIRST_PRUNE_FACTOR`× the fastest is dropped. Generous, because
  one call is a noisy sample: a depthwise conv's primitives take two calls to settle (measured:
  560 µs, then 160–200 µs), and strategies share primitives;
- the rest are timed in `MIN_ROUNDS` interleaved rounds of ~2 ms blocks in a fixed-seed shuffled
  order (drift lands on all of them alike); those whose median is over `PRUNE_FACTOR`× the best
  are dropped, and the finalists get more rounds until the budget (`DEFAULT_BUDGET_S` per
  signature) is spent;
- every strategy within `TIE_TOLERANCE` of the fastest median is tied, and the choice among the
  tied is fixed by name rather than by noise, so two processes agree.

With autograd recording, a step is the forward and its backward (`torch.autograd.grad`, which
leaves `.grad` alone). For a model that will run under `torch.compile`, `set_autotune(True,
compiled=True)` makes the first eager call of each signature measure the inductor-compiled
variants of the candidates instead (`dynamic=False`, each compiled once; compiling is not counted
in the budget, and `Tuning.compile_s` reports it), recorded under the mode `<mode>+compiled`, which
the lookup prefers while the model is being compiled. Choices are kept for the process and appended to a per-machine cache file,
named by a hash of the machine's fingerprint and the torch version, so the next process starts
tuned; `condconv-bench tune` writes its measurements there too. `CONDCONV_BENCH_CACHE` names
another file, or `off` for none. Under `torch.compile` no measurement is possible while tracing:
the cached choice, or else the table's, is baked into the graph.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from condconv_bench.dispatch import DispatchTable, Entry, Query
from condconv_bench.environment import machine_fingerprint
from condconv_bench.errors import ResultsError
from condconv_bench.measure.rounds import Round, gc_paused, run_rounds, time_block
from condconv_bench.spec import LayerSpec, Pair

AUTOTUNE_VARIABLE = "CONDCONV_BENCH_AUTOTUNE"
CACHE_VARIABLE = "CONDCONV_BENCH_CACHE"
DEFAULT_BUDGET_S = 0.5
MACS_FACTOR = 4.0
FIRST_PRUNE_FACTOR = 3.0
PRUNE_FACTOR = 1.25
TIE_TOLERANCE = 0.02  # medians within 2% are tied: about a process's own round-to-round spread
BLOCK_S = 0.002
MIN_ROUNDS = 3
MAX_ROUNDS = 200

Forward = Callable[..., torch.Tensor]

COMPILED_SUFFIX = "+compiled"

_switch = {"enabled": os.environ.get(AUTOTUNE_VARIABLE, "") not in ("", "0"), "budget_s": DEFAULT_BUDGET_S, "compiled": False}


def set_autotune(enabled: bool = True, budget_s: float = DEFAULT_BUDGET_S, compiled: bool = False) -> None:
    """Make every `auto` layer autotune (the switch for models built elsewhere), with this budget
    in seconds per input signature; with `compiled`, autotuning layers measure the strategies
    compiled by inductor, for a model about to be run under torch.compile."""
    if budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    _switch.update(enabled=bool(enabled), budget_s=float(budget_s), compiled=bool(compiled))


def autotune_enabled() -> bool:
    return bool(_switch["enabled"])


def default_budget_s() -> float:
    return float(_switch["budget_s"])


def for_compile() -> bool:
    """Whether autotuning measures compiled variants (set_autotune(..., compiled=True))."""
    return bool(_switch["compiled"])


def compiled_query(query: Query) -> Query:
    """The query whose entry holds the choice measured among compiled variants."""
    return replace(query, mode=query.mode + COMPILED_SUFFIX)


def machine_key() -> str:
    """16 hex digits naming this machine (its fingerprint) and this torch build."""
    identity = json.dumps({"machine": machine_fingerprint(), "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def cache_path() -> Path | None:
    """`$CONDCONV_BENCH_CACHE`, or `<XDG cache>/condconv-bench/autotune-<machine key>.json`; None for `off`."""
    override = os.environ.get(CACHE_VARIABLE)
    if override is not None:
        return None if override.strip().lower() in ("", "off") else Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "condconv-bench" / f"autotune-{machine_key()}.json"


class MachineCache:
    """The choices measured on this machine: this process's, and those the cache file holds."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries = {e.identity(): e for e in self._on_disk(warn=True)}

    def _on_disk(self, warn: bool = False) -> tuple[Entry, ...]:
        """The file's entries; none if it is missing or broken (a broken cache costs a
        re-measurement and is replaced by the next write, never the model)."""
        if self.path is None or not self.path.exists():
            return ()
        try:
            return DispatchTable.load(self.path).entries
        except ResultsError as exc:
            if warn:
                warnings.warn(f"condconv_bench: {exc}; autotuning afresh", stacklevel=4)
            return ()

    def lookup(self, query: Query) -> Entry | None:
        return self._entries.get(query.identity())

    def add(self, entries: list[Entry]) -> None:
        """Keep `entries` for this process and merge them into the file as it is now (another
        process may have added to it); a newer measurement replaces an older one of the same query."""
        for entry in entries:
            self._entries[entry.identity()] = entry
        if self.path is None:
            return
        merged = {e.identity(): e for e in self._on_disk()}
        merged.update({e.identity(): e for e in entries})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            DispatchTable(list(merged.values()), str(self.path)).save(self.path)
        except OSError as exc:
            warnings.warn(f"condconv_bench: cannot write the autotune cache {self.path} ({exc}); kept in this process only", stacklevel=3)


@contextmanager
def cache_off() -> Iterator[None]:
    """No cache file inside the block: a benchmark measures tuning itself and leaves the user's
    cache as it found it."""
    before = os.environ.get(CACHE_VARIABLE)
    os.environ[CACHE_VARIABLE] = "off"
    try:
        yield
    finally:
        if before is None:
            del os.environ[CACHE_VARIABLE]
        else:
            os.environ[CACHE_VARIABLE] = before


@functools.cache
def _cache_for(path: Path | None) -> MachineCache:
    return MachineCache(path)


def machine_cache() -> MachineCache:
    """The process-wide cache of the file `cache_path()` names now."""
    return _cache_for(cache_path())


@dataclass(frozen=True)
class Tuning:
    """What one autotuning measured: the first-call cost the user pays once per signature."""

    strategy: str
    seconds: float  # wall time of the whole tuning, warm-up calls included
    medians_s: dict[str, float]  # per-call median of each strategy that reached the rounds
    pruned: tuple[str, ...]  # candidates dropped by the call or round prunes, before the finals
    tied: tuple[str, ...]  # within TIE_TOLERANCE of the fastest median
    rounds: int
    compile_s: float = 0.0  # inductor's compile time of the compiled variants (not in the budget)

    @property
    def margin(self) -> float:
        """Runner-up median / the chosen one's (1.0 when one strategy reached the rounds)."""
        ranked = sorted(self.medians_s.values())
        return ranked[1] / self.medians_s[self.strategy] if len(ranked) > 1 else 1.0


def _step(layer: torch.nn.Module, forward: Forward, x: torch.Tensor, routing_weights: torch.Tensor) -> Callable[[], object]:
    """One call of a strategy as the caller would run it: the forward, and with autograd
    recording also its backward to the parameters and input that require a gradient."""
    if not torch.is_grad_enabled():
        return lambda: forward(layer, x, routing_weights)
    inputs = [t for t in (x, *layer.parameters()) if t.requires_grad]
    if not inputs:
        return lambda: forward(layer, x, routing_weights)

    def forward_and_backward() -> object:
        out = forward(layer, x, routing_weights)
        return torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)

    return forward_and_backward


def measure(layer: torch.nn.Module, x: torch.Tensor, routing_weights: torch.Tensor, candidates: dict[str, type],
            budget_s: float, clock: Callable[[], float] = time.perf_counter, compiled: bool = False) -> Tuning:
    """Time `candidates` (strategy key → class) on this call's input as the module docstring says;
    with `compiled`, their inductor-compiled variants, each compiled by a first call outside the budget."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    routing_weights = routing_weights.detach()
    forwards = {key: cls.conditional_forward for key, cls in candidates.items()}
    compile_s = 0.0
    if compiled:
        forwards, compile_s = _compiled_forwards(forwards, layer, x, routing_weights, clock)
    started = clock()
    steps = {key: _step(layer, forward, x, routing_weights) for key, forward in forwards.items()}
    with gc_paused():
        second_call = {key: time_block(step, 1, clock, sync, warm=True) for key, step in steps.items()}
    contenders = _within(second_call, FIRST_PRUNE_FACTOR)
    numbers = {key: max(1, round(BLOCK_S / max(second_call[key], 1e-9))) for key in contenders}
    rng = random.Random(0)
    rounds = run_rounds({key: steps[key] for key in contenders}, numbers, MIN_ROUNDS, rng, clock, sync, min_rounds=MIN_ROUNDS)
    finalists = _within(_medians(rounds, contenders), PRUNE_FACTOR)
    remaining = budget_s - (clock() - started)
    if len(finalists) > 1 and remaining > 0:
        rounds += run_rounds({key: steps[key] for key in finalists}, numbers, MAX_ROUNDS, rng, clock, sync, time_limit_s=remaining)
    medians = _medians(rounds, finalists)
    strategy, tied = pick(medians)
    return Tuning(
        strategy=strategy, seconds=clock() - started, medians_s=medians,
        pruned=tuple(sorted(set(candidates) - set(finalists))), tied=tied, rounds=len(rounds), compile_s=compile_s,
    )


def _compiled_forwards(forwards: dict[str, Forward], layer: torch.nn.Module, x: torch.Tensor, routing_weights: torch.Tensor,
                       clock: Callable[[], float]) -> tuple[dict[str, Forward], float]:
    """Each forward compiled by inductor for this input (compiled now, by one call), and the time
    that took; a strategy inductor cannot compile here is left out."""
    from condconv_bench.impls.compiled import configure_compiler

    configure_compiler()
    started = clock()
    compiled = {}
    for key, forward in forwards.items():
        function = torch.compile(forward, dynamic=False)
        try:
            function(layer, x, routing_weights)
        except Exception as exc:  # inductor raises its own types; the strategy just is not a candidate
            warnings.warn(f"condconv_bench: autotune left {key} out: inductor could not compile it ({str(exc).splitlines()[0]})",
                          stacklevel=4)
            continue
        compiled[key] = function
    return compiled, clock() - started


def _within(seconds: dict[str, float], factor: float) -> list[str]:
    """The keys whose time is at most `factor` × the least."""
    least = min(seconds.values())
    return [key for key, value in seconds.items() if value <= factor * least]


def _medians(rounds: list[Round], keys: list[str]) -> dict[str, float]:
    return {key: statistics.median(r.per_call_s[key] for r in rounds if key in r.per_call_s) for key in keys}


def cheap_enough(candidates: dict[str, type], spec: LayerSpec, batch_size: int, input_size: Pair) -> dict[str, type]:
    """The candidates whose analytic MACs are within MACS_FACTOR of the least."""
    macs = {key: cls.analytic_macs(spec, batch_size, input_size).total for key, cls in candidates.items()}
    least = min(macs.values())
    return {key: cls for key, cls in candidates.items() if macs[key] <= MACS_FACTOR * least}


def pick(medians_s: dict[str, float]) -> tuple[str, tuple[str, ...]]:
    """The choice and the tied set: every strategy within TIE_TOLERANCE of the fastest median is
    tied, and the first of them by name is chosen, so noise inside the tie cannot flip the choice."""
    best = min(medians_s.values())
    tied = tuple(sorted(key for key, median in medians_s.items() if median <= best * (1 + TIE_TOLERANCE)))
    return tied[0], tied
