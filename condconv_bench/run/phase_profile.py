"""`condconv-bench profile`: where each strategy's step goes for one layer and batch size, measured here.

Every implementation of the selected cases is built, loaded with the layer's shared parameters,
fed the group's seeded inputs and warmed up by its first call, exactly as the runner does; then a
few steps are profiled and attributed to phases (`condconv_bench.profiling.phases`). Nothing is timed and
nothing is written: this is the terminal view of what `run --profile` stores per case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from condconv_bench.core.case import Case
from condconv_bench.dispatch.cache import cache_off
from condconv_bench.errors import CondConvBenchError, first_line
from condconv_bench.machine.devices import use_exact_float32
from condconv_bench.cases.inputs import GroupInputs, layer_state
from condconv_bench.cases.steps import build_module, first_call, grad_mode, step_function
from condconv_bench.profiling.phases import PhaseBreakdown, measure_phases
from condconv_bench.core.registry import get_impl
from condconv_bench.run.probes import skip_reason
from condconv_bench.runtimes.catalog import EAGER
from condconv_bench.suite.selection import CaseFilter
from condconv_bench.suite.grid import Suite
from condconv_bench.suite.loader import load_suite


@dataclass(frozen=True)
class CasePhases:
    case: Case
    breakdown: PhaseBreakdown | None
    reason: str | None  # why it was not profiled


def profile_phases(suite: Suite | str | Path, case_filter: CaseFilter) -> list[CasePhases]:
    """The phases of every eager case of `suite` that `case_filter` keeps (CondConvBenchError if
    none): phases are torch's operators, which a runtime's graph does not run."""
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    cases = [case for case in case_filter.apply(suite.cases(), suite) if case.runtime == EAGER]
    if not cases:
        raise CondConvBenchError(f"{suite.path}: no cases to profile after filters")
    with cache_off():  # as in a run: the machine's autotune cache is neither read nor filled
        return [_profile_case(case, suite.model.seed) for case in cases]


def _profile_case(case: Case, seed: int) -> CasePhases:
    """One case built, warmed up and profiled; never raises for a failing implementation."""
    device = torch.device(case.device)
    cls = get_impl(case.impl)
    reason = skip_reason(cls, case, device)
    if reason:
        return CasePhases(case, None, reason)
    previous = torch.get_num_threads()
    torch.set_num_threads(case.threads)
    try:
        module = build_module(case, cls, layer_state(case, seed), device)
        inputs = GroupInputs.draw(case, seed, device)
        step = step_function(module, inputs.formatted_x(case), inputs, case.mode)
        use_exact_float32(device)
        with grad_mode(case.mode):
            first_call(step, cls.compiles, device)
            return CasePhases(case, measure_phases(step, device, case.workload.num_experts), None)
    except Exception as exc:  # a failing implementation is reported, like an error row
        return CasePhases(case, None, first_line(exc))
    finally:
        torch.set_num_threads(previous)
