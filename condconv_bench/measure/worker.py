"""A measurement worker: a fresh process that times the groups the runner sends it.

Started by `condconv_bench.measure.pool` as `python -m condconv_bench.measure.worker`. It reads
`Visit`s from stdin and answers `VisitResult`s on the original stdout; anything else that would
print there (a library's warning, a native log line) is sent to stderr instead, so it cannot
corrupt the answers. Its allocator policy comes from the environment it was started with, which
is why timing happens in workers and never in the runner's own long-lived process.

A runtime case loads the graph file the runner's probes exported (`Visit.graphs`) into its
runtime and times that; a worker never exports.

A group stays built between visits, so a second visit of the same group costs no compile and no
warm-up; the next group replaces it.
"""

from __future__ import annotations

import importlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import condconv_bench.cases.workload  # noqa: F401  (imported before `READY`, not during the first visit)
from condconv_bench.errors import first_line
from condconv_bench.machine.devices import synchronize, use_exact_float32
from condconv_bench.cases.inputs import GroupInputs, layer_state
from condconv_bench.machine.ceilings import sentinel_step
from condconv_bench.measure.protocol import BUILDING, SENTINEL_KEY, READY, SETUP_VARIABLE, TIMING, Visit, VisitResult, read_message, write_message
from condconv_bench.cases.steps import build_module, dispatched, first_call, grad_mode, step_function
from condconv_bench.runtimes.catalog import EAGER
from condconv_bench.runtimes.graphs import ExportedGraph
from condconv_bench.timing.rounds import Step, calls_per_block, run_rounds

STDIN = 0


@dataclass
class BuiltGroup:
    key: tuple[str, ...]
    mode: str
    device: torch.device
    steps: dict[str, Step] = field(default_factory=dict)
    calls_per_block: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    dispatched: dict[str, str] = field(default_factory=dict)


def build_group(visit: Visit) -> BuiltGroup:
    """Every implementation of the group, called once (compiling where it compiles) and warmed up,
    and the visit's sentinel beside them."""
    first = visit.cases[0]
    device = torch.device(first.device)
    torch.set_num_threads(first.threads)
    group = BuiltGroup(tuple(case.id for case in visit.cases), first.mode, device)
    state = layer_state(first, visit.seed)
    inputs = GroupInputs.draw(first, visit.seed, device)
    x = inputs.formatted_x(first)
    sync = lambda: synchronize(device)  # noqa: E731
    use_exact_float32(device)
    for case in visit.cases:
        _log(BUILDING + case.id)
        try:
            # Built outside inference mode, as a user's model is: parameters stay ordinary tensors.
            eager = case.runtime == EAGER
            module = build_module(case, visit.classes[case.id], state, device) if eager else ExportedGraph(
                case.runtime, Path(visit.graphs[case.id]), case.threads)
            step = step_function(module, x, inputs, case.mode)
            with grad_mode(case.mode):
                first_call(step, visit.classes[case.id].compiles and eager, device)
                group.calls_per_block.update(calls_per_block({case.id: step}, visit.block_s, visit.warmup, time.perf_counter, sync))
            group.steps[case.id] = step
            choice = dispatched(module)
            if choice is not None:
                group.dispatched[case.id] = choice
        except Exception as exc:  # the implementation under test failed here: report it, time the others
            group.errors[case.id] = first_line(exc)
    if visit.sentinel is not None and group.steps:
        sentinel = sentinel_step(visit.sentinel, device, first.torch_dtype)
        group.calls_per_block.update(calls_per_block({SENTINEL_KEY: sentinel}, visit.block_s, visit.warmup, time.perf_counter, sync))
        group.steps[SENTINEL_KEY] = sentinel
    return group


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _serve(visit: Visit, group: BuiltGroup | None) -> tuple[VisitResult, BuiltGroup]:
    started = time.perf_counter()
    key = tuple(case.id for case in visit.cases)
    setup_s = 0.0
    built_here = group is None or group.key != key
    if built_here:
        group = None  # release the previous group's tensors before building the next
        group = build_group(visit)
        setup_s = time.perf_counter() - started
    sync = lambda: synchronize(group.device)  # noqa: E731
    _log(TIMING)
    try:
        with grad_mode(group.mode):
            rounds = run_rounds(group.steps, group.calls_per_block, visit.rounds, random.Random(visit.shuffle_seed),
                                time.perf_counter, sync, visit.time_limit_s, visit.min_rounds)
    except Exception as exc:  # a step that passed its warm-up failed later: no round of this visit is complete
        return VisitResult(os.getpid(), [], group.calls_per_block, group.errors, setup_s, failure=first_line(exc)), group
    return VisitResult(os.getpid(), rounds, dict(group.calls_per_block), dict(group.errors), setup_s,
                       dispatched=dict(group.dispatched) if built_here else {}), group


def _run_setup() -> None:
    """The setup hook the pool's starter named (`SETUP_VARIABLE`), before any visit names a class."""
    hook = os.environ.get(SETUP_VARIABLE)
    if hook:
        module, _, function = hook.partition(":")
        getattr(importlib.import_module(module), function)()


def main() -> None:
    _run_setup()
    answers = os.dup(1)
    os.dup2(2, 1)
    write_message(answers, READY)
    group = None
    while True:
        try:
            visit = read_message(STDIN)
        except EOFError:
            return
        if visit is None:
            return
        result, group = _serve(visit, group)
        write_message(answers, result)


if __name__ == "__main__":
    main()
