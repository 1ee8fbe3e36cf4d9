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
"""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Callable, Iterator
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
            fastest = min(time_block(step, 1, clock, sync) for _ in range(max(1, warmup)))
            numbers[key] = int(min(MAX_CALLS_PER_BLOCK, max(1, round(block_s / max(fastest, 1e-9)))))
    return numbers


def run_rounds(steps: dict[str, Step], numbers: dict[str, int], rounds: int, rng: random.Random, clock: Clock,
               sync: Callable[[], None], time_limit_s: float = math.inf, min_rounds: int = 1) -> list[Round]:
    """Up to `rounds` rounds, each timing one block of every step in a freshly shuffled order;
    fewer once `time_limit_s` has passed, but never fewer than `min_rounds` (which may exceed `rounds`)."""
    keys = list(steps)
    measured: list[Round] = []
    started = clock()
    with gc_paused():
        while len(measured) < max(rounds, min_rounds) and (len(measured) < min_rounds or clock() - started < time_limit_s):
            rng.shuffle(keys)
            measured.append(Round({key: time_block(steps[key], numbers[key], clock, sync, warm=True) for key in keys}))
    return measured
