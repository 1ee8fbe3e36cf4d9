"""The instrument: interleaved rounds, two-level intervals, ties, stopping, and worker processes.

Rounds and group verdicts run against a fake clock and a fake pool, so every expectation is
exact; one test runs real worker processes end to end.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from condconv_bench.machine import allocators
from condconv_bench.machine.allocators import AllocatorUnavailableError, worker_environment
from condconv_bench.measure.group import GroupMeasurement, GroupTiming, measure_groups
from condconv_bench.settings import MeasureSettings
from condconv_bench.measure.pool import WorkerFailure
from condconv_bench.measure.protocol import SENTINEL_KEY, Visit, VisitResult, read_message, write_message
from condconv_bench.timing.ratios import Interval, hierarchical_interval, is_tied
from condconv_bench.timing.rounds import Block, Round, calls_per_block, planned_rounds, run_rounds
from condconv_bench.run.directory import RunDirectory
from condconv_bench.run.rows import record_timing
from condconv_bench.run.runner import run_suite
from condconv_bench.suite.selection import CaseFilter

TINY = Path(__file__).parent / "data" / "valid" / "tiny.yaml"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def costing(self, seconds_at: float | callable) -> callable:
        """A step that advances the clock by a fixed cost, or by `cost(now)` for a drifting machine."""
        cost = seconds_at if callable(seconds_at) else (lambda now: seconds_at)

        def step() -> None:
            self.now += cost(self.now)

        return step


def no_sync() -> None:
    pass


def test_blocks_are_sized_from_the_fastest_warmup_call() -> None:
    clock = FakeClock()
    steps = {"slow": clock.costing(1e-3), "fast": clock.costing(2e-4), "huge": clock.costing(0.5)}
    assert calls_per_block(steps, 0.01, 2, clock, no_sync) == {"slow": 10, "fast": 50, "huge": 1}


def test_every_round_times_every_step_once_in_a_shuffled_order() -> None:
    clock = FakeClock()
    steps = {"a": clock.costing(1e-3), "b": clock.costing(2e-3), "c": clock.costing(5e-4)}
    rounds = run_rounds(steps, {"a": 3, "b": 2, "c": 7}, 12, random.Random(0), clock, no_sync)
    assert len(rounds) == 12
    for measured in rounds:
        assert sorted(measured.order) == ["a", "b", "c"]
        assert measured.per_call_s == pytest.approx({"a": 1e-3, "b": 2e-3, "c": 5e-4})
    assert len({r.order for r in rounds}) > 1
    assert clock.now == pytest.approx(12 * (4e-3 + 6e-3 + 4e-3))  # each block after one untimed call


def test_rounds_stop_at_the_time_limit_but_not_before_the_minimum() -> None:
    clock = FakeClock()
    steps = {"a": clock.costing(1e-3), "b": clock.costing(3e-3)}  # a round lasts 8 ms (untimed calls included)
    assert len(run_rounds(steps, {"a": 1, "b": 1}, 50, random.Random(0), clock, no_sync, time_limit_s=0.02)) == 3
    assert len(run_rounds(steps, {"a": 1, "b": 1}, 50, random.Random(0), clock, no_sync, time_limit_s=0.02, min_rounds=5)) == 5
    assert len(run_rounds(steps, {"a": 1, "b": 1}, 2, random.Random(0), clock, no_sync, time_limit_s=1.0)) == 2


def test_a_plan_changes_the_blocks_and_the_steps_between_rounds() -> None:
    """What autotune's pruning rests on: the plan sees every round so far and names the next one's blocks."""
    clock = FakeClock()
    steps = {"a": clock.costing(1e-3), "b": clock.costing(2e-3), "c": clock.costing(5e-4)}
    seen = []

    def plan(measured: list[Round]) -> dict[str, Block]:
        seen.append(len(measured))
        if len(measured) < 2:
            return {key: Block(1) for key in steps}
        return {"c": Block(4, warm=False), "a": Block(2, warm=False)} if len(measured) < 5 else {}

    rounds = planned_rounds(steps, plan, random.Random(0), clock, no_sync)
    assert seen == [0, 1, 2, 3, 4, 5]  # asked before every round and once more to end them
    assert [sorted(r.order) for r in rounds] == [["a", "b", "c"]] * 2 + [["a", "c"]] * 3
    assert all(r.per_call_s == pytest.approx({"a": 1e-3, "b": 2e-3, "c": 5e-4}) for r in rounds[:2])
    assert all(r.per_call_s == pytest.approx({"a": 1e-3, "c": 5e-4}) for r in rounds[2:])
    assert clock.now == pytest.approx(2 * 2 * 3.5e-3 + 3 * (2e-3 + 2e-3))  # the last rounds' blocks start cold


def test_paired_ratios_cancel_a_machine_that_slows_down_while_measuring() -> None:
    # The machine slows down linearly, about 2× over the measurement; `b` is truly 2× `a`.
    clock = FakeClock()
    steps = {"a": clock.costing(lambda now: 1e-3 * (1 + now)), "b": clock.costing(lambda now: 2e-3 * (1 + now))}
    rounds = run_rounds(steps, {"a": 10, "b": 5}, 30, random.Random(1), clock, no_sync)
    paired = np.array([r.per_call_s["b"] / r.per_call_s["a"] for r in rounds])
    assert np.median(paired) == pytest.approx(2.0, rel=0.02)
    # Timing all of `a` and then all of `b` would blame the drift on `b`:
    first_half = np.median([r.per_call_s["a"] for r in rounds[:15]])
    second_half = np.median([r.per_call_s["b"] for r in rounds[15:]])
    assert second_half / first_half > 2.5


def test_interval_of_agreeing_processes_is_tight_and_of_disagreeing_ones_covers_both() -> None:
    rng = np.random.default_rng(0)
    steady = hierarchical_interval(np.full(30, 1.5), np.repeat([0, 1, 2], 10), rng)
    assert (steady.estimate, steady.low, steady.high) == (1.5, 1.5, 1.5)
    assert steady.relative_half_width == 0
    # Two processes at 1.0, one at 1.3 (a process-level effect): the interval must reach both.
    values = np.concatenate([np.full(10, 1.0), np.full(10, 1.0), np.full(10, 1.3)])
    split = hierarchical_interval(values, np.repeat([0, 1, 2], 10), rng)
    assert split.low == pytest.approx(1.0) and split.high == pytest.approx(1.3)
    # The same values as one process' rounds give a narrow interval: the process level matters.
    pooled = hierarchical_interval(values, np.zeros(30, dtype=int), rng)
    assert pooled.high < 1.3


def test_tie_rule_uses_the_lower_end_of_the_interval() -> None:
    assert is_tied(Interval(1.05, 1.01, 1.09), margin=0.02)
    assert is_tied(Interval(1.03, 1.02, 1.04), margin=0.02)
    assert not is_tied(Interval(1.06, 1.03, 1.09), margin=0.02)
    assert not is_tied(Interval(1.03, 1.005, 1.05), margin=0.0)


@dataclass
class FakePool:
    """Workers that return fixed per-call times per process, advancing a fake clock as real ones would."""

    latencies: list[dict[str, float]]  # per process: case id (and SENTINEL_KEY, for a visit that names one) → seconds per call
    clock: FakeClock
    jitter: float = 0.0  # alternating ± per round, so intervals never close
    failures: dict[int, object] | None = None
    visits: int = 0

    @property
    def size(self) -> int:
        return len(self.latencies)

    def visit(self, index: int, visit: Visit, timeout_s: float) -> object:
        self.visits += 1
        if self.failures and index in self.failures:
            return self.failures[index]
        ids = [case.id for case in visit.cases] + ([SENTINEL_KEY] if visit.sentinel else [])
        rounds = []
        for r in range(max(visit.rounds, visit.min_rounds)):
            sign = 1 if r % 2 else -1
            rounds.append(Round({cid: self.latencies[index][cid] * (1 + sign * self.jitter * (cid != "floor")) for cid in ids}))
            self.clock.now += sum(self.latencies[index][cid] for cid in ids) * 10
        return VisitResult(pid=100 + index, rounds=rounds, calls_per_block={cid: 10 for cid in ids})


def visit_of(*case_ids: str, rounds: int = 5, device: str = "cpu", sentinel: str | None = None) -> Visit:
    cases = tuple(SimpleNamespace(id=cid, device=device) for cid in case_ids)
    return Visit(cases, {}, 0, rounds, 0.005, 0, 0, sentinel=sentinel)


def measure_group(pool, visit: Visit, settings: MeasureSettings, *, clock, **roles) -> GroupTiming:
    """One group measured alone: its sweep is a single pass over the workers."""
    return measure_groups(pool, [GroupMeasurement(visit, settings, **roles)], clock)[0]


ROLES = dict(floor="floor", candidates={"a", "b", "c"}, dispatchers={"auto"})


def test_steady_group_stops_after_one_pass_with_exact_ratios_and_ties() -> None:
    clock = FakeClock()
    per_process = {"floor": 1e-3, "a": 2e-3, "b": 2.02e-3, "c": 2.5e-3, "auto": 2e-3}
    pool = FakePool([per_process, per_process], clock)
    measured = measure_group(pool, visit_of(*per_process), MeasureSettings(budget_s=100), clock=clock, **ROLES)
    assert measured.passes == 1 and pool.visits == 2
    assert measured.stopped_because == "every ratio within ±2%"
    verdicts = measured.cases
    assert verdicts["a"].vs_floor == Interval(2.0, 2.0, 2.0)
    assert verdicts["c"].vs_floor.estimate == pytest.approx(2.5)
    assert verdicts["floor"].vs_floor is None and verdicts["floor"].tied_fastest is None
    assert verdicts["a"].tied_fastest and verdicts["b"].tied_fastest  # 1% slower: within the tie margin
    assert verdicts["c"].tied_fastest is False and verdicts["c"].vs_best.estimate == pytest.approx(1.25)
    assert verdicts["auto"].tied_fastest and verdicts["auto"].vs_best.estimate == pytest.approx(1.0)
    assert not any(v.unstable for v in verdicts.values())
    timing = verdicts["a"].timing
    assert len(timing.times_s) == 10 and set(timing.process) == {0, 1} and timing.number_per_run == 10


def test_a_sentinel_timed_beside_the_group_gives_each_case_its_paired_ratio_to_it() -> None:
    clock = FakeClock()
    quiet = {"floor": 1e-3, "a": 2e-3, SENTINEL_KEY: 5e-4}
    loaded = {key: 2 * seconds for key, seconds in quiet.items()}  # another tenant halves the machine's speed in one worker
    measured = measure_group(FakePool([quiet, loaded], clock), visit_of("floor", "a", sentinel="dense"),
                             MeasureSettings(budget_s=100), clock=clock, **ROLES)
    assert set(measured.cases) == {"floor", "a"}  # the sentinel is no case
    assert measured.cases["a"].vs_sentinel == pytest.approx(4.0) and measured.cases["floor"].vs_sentinel == pytest.approx(2.0)
    assert measured.sentinel_median_s == pytest.approx(7.5e-4)
    alone = measure_group(FakePool([quiet, loaded], clock), visit_of("floor", "a"), MeasureSettings(budget_s=100), clock=clock, **ROLES)
    assert alone.cases["a"].vs_sentinel is None and alone.sentinel_median_s is None


def test_a_group_measured_while_the_machine_ran_twice_as_slow_keeps_its_ratio_to_the_sentinel() -> None:
    recorded = {}
    for slowdown in (1.0, 2.0):
        clock = FakeClock()
        per_call = {"floor": 1e-3 * slowdown, "a": 2e-3 * slowdown, SENTINEL_KEY: 5e-4 * slowdown}
        measured = measure_group(FakePool([per_call, per_call], clock), visit_of("floor", "a", sentinel="dense"),
                                 MeasureSettings(budget_s=100), clock=clock, **ROLES)
        rows = {case_id: {"status": "ok", "wall_s": 0.0, "batch_size": 8, "limit_s": 2.5e-4, "limit_own_s": 5e-4,
                          "macs_analytic": 10**6, "bytes_modelled": 10**6, "sentinel_best_s": 5e-4} for case_id in ("floor", "a")}
        record_timing(measured, rows)
        assert rows["a"]["latency_median_s"] == pytest.approx(2e-3 * slowdown)
        assert rows["a"]["sentinel_median_s"] == pytest.approx(5e-4 * slowdown)
        recorded[slowdown] = (rows["a"]["vs_sentinel"], rows["a"]["vs_limit"], rows["a"]["vs_limit_own"])
    assert recorded[1.0] == (pytest.approx(4.0), pytest.approx(8.0), pytest.approx(4.0))
    assert recorded[2.0] == (pytest.approx(4.0), pytest.approx(16.0), pytest.approx(8.0))  # the limit stays an upper bound: latency over it


def test_a_sweep_visits_every_group_in_one_worker_before_the_next_worker() -> None:
    clock = FakeClock()
    per_process = {"floor": 1e-3, "a": 2e-3, "g2_floor": 1e-3, "g2_a": 3e-3}
    pool = FakePool([per_process, per_process], clock)
    order = []
    visit = pool.visit
    pool.visit = lambda index, v, timeout_s: order.append((index, v.cases[0].id)) or visit(index, v, timeout_s)
    groups = [GroupMeasurement(visit_of("floor", "a"), MeasureSettings(budget_s=100), floor="floor", candidates={"a"}, dispatchers=set()),
              GroupMeasurement(visit_of("g2_floor", "g2_a"), MeasureSettings(budget_s=100), floor="g2_floor",
                               candidates={"g2_a"}, dispatchers=set())]
    first, second = measure_groups(pool, groups, clock)
    assert order == [(0, "floor"), (0, "g2_floor"), (1, "floor"), (1, "g2_floor")]
    assert first.cases["a"].vs_floor.estimate == pytest.approx(2.0) and second.cases["g2_a"].vs_floor.estimate == pytest.approx(3.0)


def test_disagreeing_processes_make_the_case_unstable() -> None:
    clock = FakeClock()
    first = {"floor": 1e-3, "a": 2e-3}
    second = {"floor": 1e-3, "a": 2.6e-3}  # a process-level effect, e.g. no huge pages in this one
    measured = measure_group(FakePool([first, second], clock), visit_of("floor", "a"), MeasureSettings(budget_s=0.001),
                             clock=clock, floor="floor", candidates={"a"}, dispatchers=set())
    verdict = measured.cases["a"]
    assert verdict.unstable and verdict.process_spread == pytest.approx(1.3)
    assert verdict.vs_floor.low == pytest.approx(2.0) and verdict.vs_floor.high == pytest.approx(2.6)


def test_imprecise_group_measures_more_passes_until_the_budget_is_spent() -> None:
    clock = FakeClock()
    per_process = {"floor": 1e-3, "a": 2e-3}
    pool = FakePool([per_process, per_process], clock, jitter=0.2)
    # One visit advances the clock by 5 rounds × 3 ms × 10 = 0.15 s, a pass by 0.3 s.
    measured = measure_group(pool, visit_of("floor", "a"), MeasureSettings(budget_s=1.0), clock=clock,
                             floor="floor", candidates={"a"}, dispatchers=set())
    assert measured.stopped_because == "time budget"
    assert measured.passes == 3  # after 0.9 s another 0.3 s pass would overrun 1.0 s
    assert len(measured.cases["a"].timing.times_s) == 3 * 2 * 5


def test_a_gpu_group_gets_at_least_thirty_samples_per_case() -> None:
    clock = FakeClock()
    per_process = {"floor": 1e-4, "a": 2e-4}
    pool = FakePool([per_process, per_process], clock)
    measured = measure_group(pool, visit_of("floor", "a", device="cuda", rounds=5), MeasureSettings(budget_s=0.0),
                             clock=clock, floor="floor", candidates={"a"}, dispatchers=set())
    assert measured.passes == 1 and len(measured.cases["a"].timing.times_s) == 30
    on_cpu = measure_group(FakePool([per_process, per_process], clock), visit_of("floor", "a", rounds=5),
                           MeasureSettings(budget_s=0.0), clock=clock, floor="floor", candidates={"a"}, dispatchers=set())
    assert len(on_cpu.cases["a"].timing.times_s) == 10


def test_failed_visits_become_error_reasons_and_others_still_count() -> None:
    clock = FakeClock()
    per_process = {"floor": 1e-3, "a": 2e-3}
    pool = FakePool([per_process, per_process], clock, failures={1: WorkerFailure("worker process died (signal 9)")})
    measured = measure_group(pool, visit_of("floor", "a"), MeasureSettings(budget_s=0.001), clock=clock,
                             floor="floor", candidates={"a"}, dispatchers=set())
    assert set(measured.cases) == {"floor", "a"} and measured.cases["a"].timing.processes == 1
    dead = FakePool([per_process], clock, failures={0: WorkerFailure("worker process died (signal 9)")})
    measured = measure_group(dead, visit_of("floor", "a"), MeasureSettings(), clock=clock,
                             floor="floor", candidates={"a"}, dispatchers=set())
    assert measured.cases == {} and measured.errors == {"floor": "worker process died (signal 9)", "a": "worker process died (signal 9)"}


def test_messages_cross_a_pipe_and_a_silent_peer_times_out() -> None:
    read_end, write_end = os.pipe()
    try:
        result = VisitResult(pid=7, rounds=[Round({"a": 1.5e-3})], calls_per_block={"a": 3}, errors={"b": "RuntimeError: x"})
        write_message(write_end, result)
        assert read_message(read_end) == result
        with pytest.raises(TimeoutError):
            read_message(read_end, deadline=0.0)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_allocator_policies_set_the_worker_environment(monkeypatch) -> None:
    user = {"PATH": "/bin", "LD_PRELOAD": "libmine.so", "MALLOC_MMAP_THRESHOLD_": "4096"}
    fixed = worker_environment("fixed", user)
    assert fixed["MALLOC_MMAP_THRESHOLD_"] == str(2**30) and fixed["MALLOC_TRIM_THRESHOLD_"] == str(2**30)
    assert "LD_PRELOAD" not in fixed and fixed["PATH"] == "/bin"
    glibc = worker_environment("glibc", user)
    assert "MALLOC_MMAP_THRESHOLD_" not in glibc and "LD_PRELOAD" not in glibc
    monkeypatch.setattr(allocators.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(AllocatorUnavailableError, match="apt-get install libjemalloc2"):
        worker_environment("jemalloc", user)
    monkeypatch.setattr(allocators.ctypes.util, "find_library", lambda name: f"lib{name}.so.2" if name == "jemalloc" else None)
    assert worker_environment("jemalloc", user)["LD_PRELOAD"] == "libjemalloc.so.2"
    with pytest.raises(AllocatorUnavailableError, match="expected one of"):
        worker_environment("mimalloc", user)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> RunDirectory:
    out = tmp_path_factory.mktemp("measure") / "run"
    run_suite(TINY, out, case_filter=CaseFilter(layers=("pw", "fc"), devices=("cpu",)), processes=2)
    return RunDirectory.open(out)


def test_real_worker_processes_each_measure_every_case(two_process_run: RunDirectory) -> None:
    frame = two_process_run.results()
    assert (frame["status"] == "ok").all()
    assert (frame["processes"] == 2).all()
    samples = two_process_run.samples()
    for case_id, timing in samples.items():
        assert set(timing.process) == {0, 1}, case_id
        assert len(timing.times_s) == len(timing.process) == len(timing.round)
    floors = frame[frame["role"] == "floor"]
    assert set(floors["impl"]) == {"static"} and floors["vs_floor"].isna().all()
    others = frame[frame["role"] != "floor"]
    assert others["vs_floor"].notna().all()
    assert (others["vs_floor_ci_low"] <= others["vs_floor"]).all() and (others["vs_floor"] <= others["vs_floor_ci_high"]).all()
    for _, group in frame.groupby(["layer", "mode", "batch_size"]):
        assert group["tied_fastest"].fillna(False).astype(bool).any()
    meta = two_process_run.metadata()
    assert meta["allocator"]["name"] == "fixed" and meta["measurement"]["processes"] == 2


def test_a_case_that_kills_its_worker_is_an_error_and_its_group_is_still_timed(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data.update(devices=["cpu"], batch_sizes=[2], layers=[
        {"name": "pw", "in_channels": 4, "out_channels": 8, "input_size": 5, "impls": ["static", "grouped_conv", "fake_impls:DiesInWorker"]},
        {"name": "fc", "kind": "linear", "in_channels": 8, "out_channels": 4},
    ])
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(data))
    frame = run_suite(suite, tmp_path / "run", processes=2).run.results().set_index("impl")
    pw = frame[frame["layer"] == "pw"]
    assert pw.loc["fake_impls:DiesInWorker", "status"] == "error"
    assert pw.loc["fake_impls:DiesInWorker", "reason"].startswith("worker process died (exit code 3)")
    assert pw.loc["fake_impls:DiesInWorker", "macs_analytic"] > 0  # the probes' figures are kept
    assert (pw.drop(index="fake_impls:DiesInWorker")["status"] == "ok").all()
    assert (frame[frame["layer"] == "fc"]["status"] == "ok").all()
