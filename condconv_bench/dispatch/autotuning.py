"""Measuring the candidate strategies in the user's own process, like `torch.backends.cudnn.benchmark`.

A shipped or `tune`d dispatch table is only as right as the machine it was measured on: machines
sold under one CPU label rank the strategies differently, and so do allocators and thread counts.
A layer built with `strategy="autotune"` (or any `auto` layer while the switch is on) therefore
measures the candidates on its first call for each new input signature, on the call's own input,
within a budget (`DEFAULT_BUDGET_S` per signature, ended by `BUDGET_SLACK`× it at the latest):

- candidates are the dispatchable strategies that support the layer, device and dtype, except
  those whose analytic MACs exceed `MACS_FACTOR`× the least (`cheap_enough`: naive_moe and
  stacked_moe on convs, where they do E× the work; never on linear layers, where mixing costs as
  much); the strategy the dispatch table would pick goes first;
- pruning needs two calls that agree: a loaded machine's preemptions only ever add time, and one
  preempted call on a 2-core machine with a third process running made a 65 µs strategy look 90×
  slower than a rival spinning 2 ms a call. Each candidate is called once; a call over
  `HOPELESS_FACTOR`× the best settled call so far drops it, if a second call is over too where the
  first took under `RECHECK_BELOW_S` (a stall of a few scheduler slices could explain it) and the
  budget is not spent; a longer one decides alone, since repeating it is what the factor saves (on
  a depthwise layer at batch 32 the unfold-based strategies take 30–70 ms a call against the
  grouped conv's few). The others' second call is their first settled one — the first builds
  layouts and library primitives, which strategies share, and a depthwise conv's primitive took
  two calls to settle (560 µs, then 160–200 µs). From then on pruning reads each strategy's
  fastest settled call (`_fastest`), so that it drops only when even its least disturbed call was
  slower: one over `FIRST_PRUNE_FACTOR`× the fastest gets one more call (within the budget) and
  drops if that too is over;
- the rest are timed in interleaved rounds of ~`BLOCK_S` blocks in a fixed-seed shuffled order
  (drift lands on all of them alike); in the first rounds those whose fastest call or block is over
  `ROUND_PRUNE_FACTOR`× the best median drop, from round `MIN_ROUNDS` on (where a median outvotes
  one preempted block) those whose median is over `PRUNE_FACTOR`×, and the finalists get
  rounds while the next one ends within the budget, until `SETTLE_ROUNDS` or more rounds have settled the
  answer (`_settled`: each rival clearly slower than the best in three rounds of four, or clearly tied
  with it); one of the first `MIN_ROUNDS` that would
  overrun the deadline first drops the slowest contenders (down to two), else is not started;
  candidates not reached when the first calls of two or more have spent the budget are skipped;
- every strategy within `TIE_TOLERANCE` of the fastest median is tied, and the choice among the
  tied is fixed by name rather than by noise, so two processes agree.

A measurement whose rounds disagree about the comparison by over `NOISY_SPREAD` (interquartile
range / median of the runner-up's time over the choice's, round by round) could not separate the
candidates from the machine's noise: it is used in the process
and not written to the per-machine cache. A choice read from that cache is confirmed before it is
trusted (`confirm`): it and its recorded rivals are raced for `CONFIRM_SHARE` of the budget, and
a rival faster by more than the tie tolerance replaces it; a choice that now runs over
`DRIFT_FACTOR` faster or slower than recorded (`drifted`) is tuned afresh.

With autograd recording, a step is the forward and its backward (`torch.autograd.grad`, which
leaves `.grad` alone) to the parameters, the input and the routing weights that require a
gradient — in a model the routing weights come from the block's routing function, and their
gradient is part of the layer's backward. With `compiled`, the candidates are the inductor-compiled
variants (`dynamic=False`, each compiled once; compiling is not counted in the budget and
`Tuning.compile_s` reports it).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.dispatch.candidate_steps import candidate_step, compiled_forwards, sync_for
from condconv_bench.dispatch.table import RIVALS, Entry
from condconv_bench.timing.ratios import paired_ratios
from condconv_bench.timing.rounds import Block, Clock, Round, calls_for, gc_paused, planned_rounds, time_block, times_of
from condconv_bench.timing.samples import median, percentiles, spread

MACS_FACTOR = 4.0
HOPELESS_FACTOR = 8.0
RECHECK_BELOW_S = 0.01  # a hopeless first call shorter than this gets a second call: a preemption costs a few ms
FIRST_PRUNE_FACTOR = 3.0
ROUND_PRUNE_FACTOR = 1.5
PRUNE_FACTOR = 1.25
TIE_TOLERANCE = 0.02  # medians within 2% are tied: about a process's own round-to-round spread
NOISY_SPREAD = 0.10  # IQR / median beyond which a timing is noisy (torch.utils.benchmark warns there too)
BUDGET_SLACK = 1.5
DRIFT_FACTOR = 1.5  # a cached choice now this much faster or slower than recorded was measured in another state
CONFIRM_SHARE = 0.2
BLOCK_S = 0.002
WARM_BELOW_S = 0.02  # a block of calls shorter than this starts with an untimed call (caches matter)
MIN_ROUNDS = 3
SETTLE_ROUNDS = 5  # the fewest rounds whose quartiles may settle the answer before the budget is spent
MAX_ROUNDS = 200

default_clock: Clock = time.perf_counter  # what the layers measure with; tests swap in a fake clock


@dataclass(frozen=True)
class Tuning:
    """What one autotuning or confirmation measured: the first-call cost the user pays once per signature."""

    strategy: str
    seconds: float  # wall time of the whole measurement, warm-up calls included
    medians_s: dict[str, float]  # per-call median of each strategy that reached the last rounds
    pruned: tuple[str, ...]  # candidates dropped before the last rounds
    tied: tuple[str, ...]  # within TIE_TOLERANCE of the fastest median
    rounds: int
    spread: float = 0.0  # IQR / median of the runner-up / choice ratio over the rounds (`_spread`)
    load: float = -1.0  # 1-minute load average per CPU when it started (-1 where the OS does not say)
    rivals: tuple[str, ...] = ()  # the next fastest strategies, fastest first (what a confirmation races)
    rival_medians_s: dict[str, float] | None = None  # the last estimate of each rival's per-call time
    compile_s: float = 0.0  # inductor's compile time of the compiled variants (not in the budget)
    confirmed: str | None = None  # for a confirmation: the cached choice it raced (None for a tuning)

    @property
    def margin(self) -> float:
        """Runner-up median / the chosen one's (1.0 when one strategy reached the rounds)."""
        ranked = sorted(self.medians_s.values())
        return ranked[1] / self.medians_s[self.strategy] if len(ranked) > 1 else 1.0

    @property
    def noisy(self) -> bool:
        """Whether the rounds were too spread to trust the choice beyond this process."""
        return self.spread > NOISY_SPREAD

    @property
    def evidence(self) -> dict[str, float]:
        """The medians an entry records: the choice's and its rivals'."""
        known = {**(self.rival_medians_s or {}), **self.medians_s}
        return {key: known[key] for key in (self.strategy, *self.rivals) if key in known}


def _load_per_cpu() -> float:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return -1.0


def _block(seconds_per_call: float) -> Block:
    """A block of about BLOCK_S, warmed first where a block is short enough for caches to matter."""
    return Block(calls_for(BLOCK_S, seconds_per_call), warm=seconds_per_call < WARM_BELOW_S)


def _round_cost(estimate_s: dict[str, float], keys: list[str]) -> float:
    """What one round of `keys` will take: each block, and its warm call where there is one."""
    return sum(max(BLOCK_S, s) + (s if s < WARM_BELOW_S else 0.0) for s in (estimate_s[k] for k in keys))


def measure(layer: torch.nn.Module, x: torch.Tensor, routing_weights: torch.Tensor, candidates: dict[str, type],
            budget_s: float, clock: Clock | None = None, compiled: bool = False) -> Tuning:
    """Time `candidates` (strategy key → class, the likeliest first) on this call's input as the
    module docstring says; with `compiled`, their inductor-compiled variants. Candidates not
    reached once the budget is spent by the first calls of two or more are not measured (a layer
    whose every call is slow ends near its budget rather than after two calls of each)."""
    clock = clock or default_clock
    sync = sync_for(x)
    forwards = {key: cls.conditional_forward for key, cls in candidates.items()}
    compile_s = 0.0
    if compiled:
        forwards, compile_s = compiled_forwards(forwards, layer, x, routing_weights, clock)
    load = _load_per_cpu()
    started = clock()
    steps = {key: candidate_step(layer, forward, x, routing_weights) for key, forward in forwards.items()}
    observed: dict[str, list[float]] = {}  # every settled per-call time of each strategy: what pruning reads
    best = math.inf
    with gc_paused():
        for key, step in steps.items():
            if len(observed) >= 2 and clock() - started >= budget_s:  # two, so that a later process has a rival to race
                break
            first = time_block(step, 1, clock, sync)  # builds layouts and library primitives
            if first > HOPELESS_FACTOR * best and not (first < RECHECK_BELOW_S and clock() - started < budget_s):
                continue  # too long to be a stall, or no budget left to check
            settled = time_block(step, 1, clock, sync)
            if min(first, settled) > HOPELESS_FACTOR * best:
                continue  # the second call agrees
            observed[key] = [settled]
            best = min(best, settled)
        kept = _within(_fastest(observed), FIRST_PRUNE_FACTOR)
        for key in [k for k in observed if k not in kept]:
            if clock() - started < budget_s:  # one call is one sample: a call the OS preempted must not drop a strategy
                observed[key].append(time_block(steps[key], 1, clock, sync))
        race = _Race(observed, clock, started + budget_s, started + budget_s * BUDGET_SLACK)
        rounds = planned_rounds(steps, race, random.Random(0), clock, sync)
    estimate, contenders = race.estimate, race.contenders
    medians = {key: estimate[key] for key in contenders}
    strategy, tied = pick(medians)
    rivals = tuple(sorted((k for k in estimate if k != strategy), key=estimate.__getitem__)[:RIVALS])
    return Tuning(
        strategy=strategy, seconds=clock() - started, medians_s=medians,
        pruned=tuple(sorted(set(candidates) - set(contenders))), tied=tied, rounds=len(rounds),
        spread=_spread(rounds, strategy, rivals), load=load, rivals=rivals, rival_medians_s={k: estimate[k] for k in rivals},
        compile_s=compile_s,
    )


class _Race:
    """`measure`'s rounds as a plan: what the next round times, learnt from the rounds so far.

    Each round's blocks join every strategy's observed calls and its medians become the estimates
    that size the next blocks; the pruning rules then drop contenders, and the budget decides
    whether another round starts.
    """

    def __init__(self, observed: dict[str, list[float]], clock: Clock, budget_end: float, deadline: float) -> None:
        self.observed, self.clock, self.budget_end, self.deadline = observed, clock, budget_end, deadline
        self.estimate = _fastest(observed)  # the latest per-call estimate of each strategy, which sizes its blocks
        self.contenders = _within(self.estimate, FIRST_PRUNE_FACTOR)

    def __call__(self, rounds: list[Round]) -> Mapping[str, Block]:
        if rounds:
            self._learn(rounds)
            best = min(self.contenders, key=self.estimate.__getitem__)
            if len(rounds) >= SETTLE_ROUNDS and _settled(rounds, self.contenders, best):
                return {}
        if len(self.contenders) < 2 or len(rounds) >= MAX_ROUNDS:
            return {}
        if len(rounds) >= MIN_ROUNDS and self.clock() + _round_cost(self.estimate, self.contenders) > self.budget_end:
            return {}  # the finalists' rounds end within the budget
        while len(self.contenders) > 2 and self.clock() + _round_cost(self.estimate, self.contenders) > self.deadline:
            self.contenders.remove(max(self.contenders, key=self.estimate.__getitem__))
        if rounds and self.clock() + _round_cost(self.estimate, self.contenders) > self.deadline:
            return {}
        return {key: _block(self.estimate[key]) for key in self.contenders}

    def _learn(self, rounds: list[Round]) -> None:
        for key, seconds in rounds[-1].per_call_s.items():
            self.observed[key].append(seconds)
        self.estimate.update(_medians(rounds, self.contenders))
        if len(rounds) >= MIN_ROUNDS:  # the median of three or more rounds outvotes one preempted block
            self.contenders = _within({k: self.estimate[k] for k in self.contenders}, PRUNE_FACTOR)
        else:  # one or two blocks each: drop only a strategy whose every block was slower than the best median
            self.contenders = _within(_fastest({k: self.observed[k] for k in self.contenders}), ROUND_PRUNE_FACTOR,
                                      least=min(self.estimate[k] for k in self.contenders))


def confirm(layer: torch.nn.Module, x: torch.Tensor, routing_weights: torch.Tensor, cached: str, rivals: dict[str, type],
            candidates: dict[str, type], budget_s: float, clock: Clock | None = None) -> Tuning:
    """Race the `cached` choice against its recorded `rivals` on this call's input, at least
    MIN_ROUNDS rounds and then until `budget_s` or until the rounds have settled the answer; the
    choice holds unless a rival is faster by more than TIE_TOLERANCE, and then the fastest rival
    is the answer."""
    clock = clock or default_clock
    sync = sync_for(x)
    racing = {cached: candidates[cached], **rivals}
    keys = list(racing)
    load = _load_per_cpu()
    started = clock()
    steps = {key: candidate_step(layer, cls.conditional_forward, x, routing_weights) for key, cls in racing.items()}
    with gc_paused():
        for step in steps.values():
            step()  # builds layouts and primitives, untimed
        blocks = {key: _block(time_block(step, 1, clock, sync)) for key, step in steps.items()}

        def plan(rounds: list[Round]) -> Mapping[str, Block]:
            if len(rounds) >= SETTLE_ROUNDS:
                medians = _medians(rounds, keys)
                if _settled(rounds, keys, min(medians, key=medians.__getitem__)):
                    return {}
            going_on = len(rounds) < MIN_ROUNDS or (clock() - started < budget_s and len(rounds) < MAX_ROUNDS)
            return blocks if going_on else {}

        rounds = planned_rounds(steps, plan, random.Random(0), clock, sync)
    medians = _medians(rounds, keys)
    best = min(medians.values())
    holds = medians[cached] <= best * (1 + TIE_TOLERANCE)
    strategy, tied = (cached, tuple(sorted(k for k, m in medians.items() if m <= medians[cached] * (1 + TIE_TOLERANCE)))) \
        if holds else pick(medians)
    others = tuple(sorted((k for k in medians if k != strategy), key=medians.__getitem__))
    return Tuning(
        strategy=strategy, seconds=clock() - started, medians_s=medians, pruned=(), tied=tied, rounds=len(rounds),
        spread=_spread(rounds, strategy, others), load=load, rivals=others, confirmed=cached,
    )


def drifted(entry: Entry | None, confirmation: Tuning) -> bool:
    """Whether a confirmed choice now runs over DRIFT_FACTOR faster or slower than its entry
    recorded: the machine (load, clock, memory state) differs from when it was tuned, so the
    rivals raced may not be the ones that matter now, and a full tuning is due."""
    recorded = entry.medians_s.get(confirmation.confirmed or "") if entry is not None else None
    now = confirmation.medians_s.get(confirmation.confirmed or "")
    if not recorded or not now:
        return False
    return not 1 / DRIFT_FACTOR <= now / recorded <= DRIFT_FACTOR


def _within(seconds: dict[str, float], factor: float, least: float | None = None) -> list[str]:
    """The keys whose time is at most `factor` × `least` (by default the least of `seconds`), in their given order."""
    least = min(seconds.values()) if least is None else least
    return [key for key, value in seconds.items() if value <= factor * least]


def _fastest(observed: dict[str, list[float]]) -> dict[str, float]:
    """Each strategy's fastest per-call time so far: a machine's noise only ever adds time, so a
    strategy is pruned only when even its least disturbed call was slower."""
    return {key: min(seconds) for key, seconds in observed.items()}


def _medians(rounds: list[Round], keys: list[str]) -> dict[str, float]:
    return {key: median(times_of(rounds, key)) for key in keys}


def _settled(rounds: list[Round], contenders: list[str], best: str) -> bool:
    """Whether more rounds could not change the answer: round by round, every other contender is
    clearly slower than `best` (its time over the best's above 1 + TIE_TOLERANCE in three rounds of
    four) or clearly tied with it (within TIE_TOLERANCE either way, the middle half of the rounds)."""
    for key in contenders:
        if key == best:
            continue
        ratios = paired_ratios(rounds, key, best)
        if len(ratios) < SETTLE_ROUNDS:
            return False
        low, high = percentiles(ratios, (25, 75))
        slower = low > 1 + TIE_TOLERANCE
        tied = 1 - TIE_TOLERANCE < low and high < 1 + TIE_TOLERANCE
        if not (slower or tied):
            return False
    return True


def _spread(rounds: list[Round], key: str, rivals: tuple[str, ...]) -> float:
    """Interquartile range / median, over the rounds, of the runner-up's time divided by `key`'s
    in the same round — how much the rounds disagree about the comparison, with the drift they
    share cancelled — or of `key`'s own times where it raced no one (0 with fewer than two rounds)."""
    paired = paired_ratios(rounds, rivals[0], key) if rivals else []
    samples = paired if len(paired) >= 2 else times_of(rounds, key)
    return spread(samples) if len(samples) >= 2 else 0.0


def cheap_enough(candidates: dict[str, type], spec: LayerSpec, batch_size: int, input_size: Pair) -> dict[str, type]:
    """The candidates whose analytic MACs are within MACS_FACTOR of the least, in their given order."""
    macs = {key: cls.analytic_macs(spec, batch_size, input_size).total for key, cls in candidates.items()}
    least = min(macs.values())
    return {key: cls for key, cls in candidates.items() if macs[key] <= MACS_FACTOR * least}


def pick(medians_s: dict[str, float]) -> tuple[str, tuple[str, ...]]:
    """The choice and the tied set: every strategy within TIE_TOLERANCE of the fastest median is
    tied, and the first of them by name is chosen, so noise inside the tie cannot flip the choice."""
    best = min(medians_s.values())
    tied = tuple(sorted(key for key, median in medians_s.items() if median <= best * (1 + TIE_TOLERANCE)))
    return tied[0], tied
