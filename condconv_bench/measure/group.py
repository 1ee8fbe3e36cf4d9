"""Groups measured to a verdict: visits to every worker, repeated until the ratios are precise.

A *pass* visits each worker once for `rounds` interleaved rounds, or fewer where the group is
slow: the first pass shares the group's time budget between the workers (at least
`MIN_ROUNDS_PER_VISIT` rounds each) and runs as a sweep over several groups (`measure_groups`).
After each pass every implementation's ratio to the floor gets its two-level interval
(`ratios`); measuring stops as soon as all of them are within ±`precision`, or when another pass
would not fit the group's time budget. The first pass always runs in full, so every case has
samples from every worker.

The verdict per case: its latency samples, its ratio to the floor, its ratio to the fastest
strategy with the tie decision, the spread between processes, and whether the case is
*unstable*: a ratio whose interval or process spread is too wide for a second invocation to
confirm it.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from condconv_bench.measure.protocol import SENTINEL_KEY, Visit, VisitResult
from condconv_bench.timing.ratios import BOOTSTRAP_SEED, Interval, hierarchical_interval, is_tied, paired_ratios, process_medians
from condconv_bench.timing.rounds import Round
from condconv_bench.settings import MeasureSettings
from condconv_bench.timing.samples import Timing, median

UNSTABLE_HALF_WIDTH = 0.05  # a ratio known no better than ±5% is flagged
UNSTABLE_PROCESS_SPREAD = 1.10  # workers whose medians differ by more than 10% are flagged
VISIT_TIMEOUT_S = 600.0  # a visit includes the first call, which compiles for `compiled`
MIN_ROUNDS_PER_VISIT = 3  # every worker contributes a few paired samples, however slow the group
# A GPU group's rounds are short, so it can afford enough samples for a rank test (the gate's);
# a single synchronised block per case, as a plain blocked timer gives, cannot show a regression.
MIN_SAMPLES_ON_DEVICE = 30


class Pool(Protocol):
    size: int

    def visit(self, index: int, visit: Visit, timeout_s: float) -> object: ...


@dataclass(frozen=True)
class CaseTiming:
    """The timing verdict of one case of a group."""

    timing: Timing
    vs_floor: Interval | None
    vs_best: Interval | None
    tied_fastest: bool | None  # None for the floor, which does not compete
    process_spread: float  # max/min over workers of the median ratio to the floor (latency for the floor)
    unstable: bool
    vs_sentinel: float | None = None  # median over rounds of latency / the group's sentinel in the same round, where one was timed


@dataclass
class GroupTiming:
    """Every case's verdict, the cases that failed in a worker, and how measuring ended."""

    cases: dict[str, CaseTiming] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    # What each dispatcher ran, counted over the builds of the group in the workers: a dispatcher
    # that decides in-process (autotune) may decide differently in each.
    dispatched: dict[str, Counter[str]] = field(default_factory=dict)
    passes: int = 0
    elapsed_s: float = 0.0
    stopped_because: str = ""
    sentinel_median_s: float | None = None  # the sentinel's median time per call over the group's rounds
    sentinel_fastest_s: float | None = None  # and its fastest block


@dataclass
class _Samples:
    """Rounds collected so far, each with the worker process it came from."""

    rounds: list[tuple[int, Round]] = field(default_factory=list)
    calls_per_block: dict[str, list[int]] = field(default_factory=dict)

    def add(self, process: int, result: VisitResult) -> None:
        self.rounds += [(process, r) for r in result.rounds]
        for case_id, number in result.calls_per_block.items():
            self.calls_per_block.setdefault(case_id, []).append(number)

    def timing(self, case_id: str) -> Timing:
        picked = [(p, i, r.per_call_s[case_id]) for i, (p, r) in enumerate(self.rounds) if case_id in r.per_call_s]
        processes, rounds, times = zip(*picked)
        return Timing(tuple(times), int(median(self.calls_per_block[case_id])), tuple(processes), tuple(rounds))

    def paired(self, case_id: str, reference: str) -> tuple[np.ndarray, np.ndarray]:
        """The paired ratios of `case_id` to `reference`, and the process of each."""
        pairs = [(p, ratio) for p, r in self.rounds for ratio in paired_ratios([r], case_id, reference)]
        return np.array([v for _, v in pairs]), np.array([p for p, _ in pairs])


def _verdicts(samples: _Samples, floor: str | None, candidates: set[str], dispatchers: set[str],
              tie_margin: float) -> dict[str, CaseTiming]:
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    measured = [key for key in dict.fromkeys(key for _, r in samples.rounds for key in r.per_call_s) if key != SENTINEL_KEY]
    timings = {key: samples.timing(key) for key in measured}
    sentinel_timed = SENTINEL_KEY in samples.calls_per_block
    vs_sentinel = {key: median(samples.paired(key, SENTINEL_KEY)[0]) for key in measured} if sentinel_timed else {}
    has_floor = floor in timings
    to_floor = {key: samples.paired(key, floor) for key in measured if has_floor and key != floor}  # type: ignore[arg-type]
    vs_floor = {key: hierarchical_interval(values, processes, rng) for key, (values, processes) in to_floor.items()}
    racing = [key for key in measured if key in candidates]
    best = min(racing, key=lambda k: vs_floor[k].estimate if has_floor else timings[k].median_s, default=None)
    verdicts = {}
    for key in measured:
        vs_best = tied = None
        if best is not None and (key in candidates or key in dispatchers):
            values, processes = samples.paired(key, best)
            vs_best = hierarchical_interval(values, processes, rng) if key != best else Interval(1.0, 1.0, 1.0)
            tied = is_tied(vs_best, tie_margin)
        if key in to_floor:
            medians = process_medians(*to_floor[key])
        else:
            medians = process_medians(np.asarray(timings[key].times_s), np.asarray(timings[key].process))
        spread = float(medians.max() / medians.min())
        interval = vs_floor.get(key)
        unstable = spread > UNSTABLE_PROCESS_SPREAD or (interval is not None and interval.relative_half_width > UNSTABLE_HALF_WIDTH)
        verdicts[key] = CaseTiming(timings[key], interval, vs_best, tied, spread, unstable, vs_sentinel.get(key))
    return verdicts


def _precise(verdicts: dict[str, CaseTiming], precision: float) -> bool:
    intervals = [v.vs_floor for v in verdicts.values() if v.vs_floor is not None]
    return bool(intervals) and all(i.relative_half_width <= precision for i in intervals)


def _min_rounds(visit: Visit, processes: int) -> int:
    on_device = getattr(visit.cases[0], "device", "cpu") != "cpu"
    return max(MIN_ROUNDS_PER_VISIT, math.ceil(MIN_SAMPLES_ON_DEVICE / processes)) if on_device else MIN_ROUNDS_PER_VISIT


class GroupMeasurement:
    """One group's visits so far, its time spent, and its verdicts; `measure_groups` drives it.

    `floor`, `candidates` and `dispatchers` are case ids: the floor every ratio divides by, the
    strategies that race for fastest, and the dispatching layers judged against the fastest.
    """

    def __init__(self, visit: Visit, settings: MeasureSettings, *, floor: str | None, candidates: set[str],
                 dispatchers: set[str]) -> None:
        self.visit, self.settings = visit, settings
        self.floor, self.candidates, self.dispatchers = floor, candidates, dispatchers
        self.cases = visit.cases
        self.samples = _Samples()
        self.result = GroupTiming()
        self.failures: dict[str, str] = {}  # case id → why it failed in a worker
        self.visit_failure: str | None = None  # why a whole visit measured nothing
        self._process_of_pid: dict[int, int] = {}
        self._pass_s = 0.0  # the last pass's time in rounds (setup excluded): what another pass costs

    def visit_worker(self, pool: Pool, index: int, time_limit_s: float, clock: Callable[[], float]) -> float:
        """One visit to worker `index`; returns the seconds it spent in rounds (its setup excluded)."""
        started = clock()
        seed = self.visit.shuffle_seed + 1000 * self.result.passes + index
        visit = replace(self.visit, time_limit_s=time_limit_s, min_rounds=_min_rounds(self.visit, pool.size), shuffle_seed=seed)
        answer = pool.visit(index, visit, VISIT_TIMEOUT_S)
        culprit = getattr(answer, "culprit", None)
        while culprit is not None and len(self.visit.cases) > 1:
            # The worker died building this case: the case is the error, the others are retried.
            self.failures[culprit] = answer.reason  # type: ignore[union-attr]
            self.visit = replace(self.visit, cases=tuple(c for c in self.visit.cases if c.id != culprit))
            visit = replace(visit, cases=self.visit.cases)
            answer = pool.visit(index, visit, VISIT_TIMEOUT_S)
            culprit = getattr(answer, "culprit", None)
        spent = clock() - started
        self.result.elapsed_s += spent
        if not isinstance(answer, VisitResult):
            self.visit_failure = self.visit_failure or getattr(answer, "reason", str(answer))
            return spent
        self.visit_failure = self.visit_failure or answer.failure
        for case_id, reason in answer.errors.items():
            self.failures.setdefault(case_id, reason)
        for case_id, choice in answer.dispatched.items():
            self.result.dispatched.setdefault(case_id, Counter())[choice] += 1
        self.samples.add(self._process_of_pid.setdefault(answer.pid, len(self._process_of_pid)), answer)
        return max(spent - answer.setup_s, 0.0)

    def finish_pass(self, rounds_s: float) -> bool:
        """Record a completed pass (`rounds_s` of rounds); True when measuring should go on."""
        self.result.passes += 1
        self._pass_s = rounds_s
        settings = self.settings
        if not self.samples.rounds:
            self.result.stopped_because = "no worker measured the group"
            return False
        self.result.cases = _verdicts(self.samples, self.floor, self.candidates, self.dispatchers, settings.tie_margin)
        if SENTINEL_KEY in self.samples.calls_per_block:
            sentinel = self.samples.timing(SENTINEL_KEY)
            self.result.sentinel_median_s, self.result.sentinel_fastest_s = sentinel.median_s, min(sentinel.times_s)
        if _precise(self.result.cases, settings.precision):
            self.result.stopped_because = f"every ratio within ±{settings.precision:.0%}"
            return False
        if self.result.elapsed_s + self._pass_s > settings.budget_s:
            self.result.stopped_because = "time budget"
            return False
        if self.result.passes >= settings.max_passes:
            self.result.stopped_because = f"{settings.max_passes} passes"
            return False
        return True

    def finish(self) -> GroupTiming:
        for case in self.cases:
            if case.id not in self.result.cases:
                self.result.errors[case.id] = self.failures.get(case.id) or self.visit_failure or "not measured in any worker"
        return self.result


def measure_groups(pool: Pool, groups: list[GroupMeasurement], clock: Callable[[], float] = time.monotonic) -> list[GroupTiming]:
    """Measure several groups: a first pass as a sweep, then more passes per group while useful.

    The first pass is a *sweep*: worker 0 measures every group, then worker 1 every group, and so
    on (asv's A B C … A′ B′ C′ order over a whole benchmark suite). A group's samples then come
    from moments minutes apart instead of seconds, so a load that another tenant of the machine
    puts on it for a while lands on many groups a little instead of on one group entirely. It
    gets `budget / processes` of rounds per worker. Groups whose ratios are not yet precise then
    get further passes, one group at a time, while their budget lasts.
    """
    spent = {id(group): 0.0 for group in groups}
    for index in range(pool.size):
        for group in groups:
            spent[id(group)] += group.visit_worker(pool, index, group.settings.budget_s / pool.size, clock)
    for group in groups:
        going_on = group.finish_pass(spent[id(group)])
        while going_on:
            remaining = group.settings.budget_s - group.result.elapsed_s
            rounds_s = sum(group.visit_worker(pool, index, max(remaining, 0.0) / pool.size, clock) for index in range(pool.size))
            going_on = group.finish_pass(rounds_s)
    return [group.finish() for group in groups]

