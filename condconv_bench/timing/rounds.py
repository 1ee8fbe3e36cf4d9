"""Interleaved rounds inside one process: each implementation of a group once per round.

Every round times one block of each implementation, in an order shuffled afresh for the round
(Google Benchmark's random interleaving). Whatever drifts while a group is measured — another
tenant's load, the CPU clock, a background thread — then lands on all implementations alike,
and each implementation's time divided by the floor's time *in the same round* is a paired
sample of the ratio that the drift largely cancels out of. Timing one implementation for its
whole budget and then the next, as a plain timer loop does, turns the same drift into a
difference between implementations.

A block is `number` back-to-back calls, sized once per process so that a block lasts about
`block_s`, after one untimed call: without it, the first call of a block pays for what the
previous implementation left in the caches (measured here: a static depthwise conv at batch 32
took 2.0–2.2 ms or 3.0–4.2 ms per call depending on its place in the round). The clock is read
only around whole blocks and the device is synchronised before each read, so timer and launch
overheads amortise and asynchronous devices are timed to the end of their work. The garbage collector is paused while blocks run, as `timeit` does.

This is the one implementation of the protocol. The instrument's workers, the model-stage timer and
the machine's ceilings repeat the same blocks (`run_rounds`); autotune decides round by round which
strategies race on and how long their blocks are (`planned_rounds` with its own `Plan`).
"""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

Clock = Callable[[], float]
Step = Callable[[], object]

MAX_CALLS_PER_BLOCK = 100_000  # bounds a block whose one timed call was too fast to resolve


@dataclass(frozen=True)
class Round:
    """Per-call seconds of every implementation in one round, in the order they were timed."""

    per_call_s: dict[str, float]

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(self.per_call_s)


@dataclass(frozen=True)
class Block:
    """How a round times one step: `number` back-to-back calls, after one untimed call with `warm`."""

    number: int
    warm: bool = True


# Given the rounds so far, the blocks of the next round; an empty mapping ends the rounds.
Plan = Callable[[list[Round]], Mapping[str, Block]]


def times_of(rounds: Iterable[Round], key: str) -> list[float]:
    """`key`'s per-call seconds in each round that timed it."""
    return [r.per_call_s[key] for r in rounds if key in r.per_call_s]


@contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_block(step: Step, number: int, clock: Clock, sync: Callable[[], None], warm: bool = False) -> float:
    """Seconds per call over `number` consecutive calls, device work included.

    With `warm`, one untimed call runs first, so the block starts from this step's own steady
    state (its buffers and weights in the caches), whatever ran before it.
    """
    if warm:
        step()
    sync()
    started = clock()
    for _ in range(number):
        step()
    sync()
    return (clock() - started) / number


def calls_per_block(steps: dict[str, Step], block_s: float, warmup: int, clock: Clock,
                    sync: Callable[[], None]) -> dict[str, int]:
    """Warm each step up with `warmup` timed single calls, then size its block from the fastest.

    The fastest warm-up call is the least disturbed estimate of one call; a block of
    `block_s / fastest` calls then lasts about `block_s`.
    """
    numbers = {}
    with gc_paused():
        for key, step in steps.items():
            numbers[key] = calls_for(block_s, min(time_block(step, 1, clock, sync) for _ in range(max(1, warmup))))
    return numbers


def calls_for(block_s: float, seconds_per_call: float) -> int:
    """The calls that make a block of about `block_s`, at least one."""
    return int(min(MAX_CALLS_PER_BLOCK, max(1, round(block_s / max(seconds_per_call, 1e-9)))))


def run_rounds(steps: dict[str, Step], numbers: dict[str, int], rounds: int, rng: random.Random, clock: Clock,
               sync: Callable[[], None], time_limit_s: float = math.inf, min_rounds: int = 1, warm: bool = True) -> list[Round]:
    """Up to `rounds` rounds, each timing one block of `numbers[key]` calls of every step (after
    an untimed call with `warm`); fewer once `time_limit_s` has passed, but never fewer than
    `min_rounds` (which may exceed `rounds`)."""
    blocks = {key: Block(numbers[key], warm) for key in steps}
    started = clock()

    def plan(measured: list[Round]) -> Mapping[str, Block]:
        going_on = len(measured) < max(rounds, min_rounds) and (len(measured) < min_rounds or clock() - started < time_limit_s)
        return blocks if going_on else {}

    return planned_rounds(steps, plan, rng, clock, sync)


def planned_rounds(steps: dict[str, Step], plan: Plan, rng: random.Random, clock: Clock,
                   sync: Callable[[], None]) -> list[Round]:
    """Rounds while `plan` names blocks, each timing them in an order shuffled afresh from the
    last round's (a step the plan adds joins at the end before the shuffle)."""
    measured: list[Round] = []
    order: list[str] = []
    with gc_paused():
        while blocks := plan(measured):
            order = [key for key in order if key in blocks] + [key for key in blocks if key not in order]
            rng.shuffle(order)
            measured.append(Round({key: time_block(steps[key], blocks[key].number, clock, sync, blocks[key].warm)
                                   for key in order}))
    return measured
