"""Phase attribution from profiler events: the rules, real strategies, the CLI view, and that
nothing in the timed path marks phases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.profiler import ProfilerActivity, profile

from condconv_bench.cli import main
from condconv_bench.profiling.phases import PHASES, classify, classify_backward, measure_phases, phases_of
from condconv_bench.core.registry import get_impl
from condconv_bench.core.spec import LayerSpec

TINY = Path(__file__).parent / "data" / "valid" / "tiny.yaml"
CPU = torch.device("cpu")


def test_operators_are_classified_by_name_and_shapes() -> None:
    experts = 4
    assert classify("aten::mean", [[2, 8, 5, 5], [], []], experts) == "routing"
    assert classify("aten::linear", [[2, 8], [4, 8], [4]], experts) == "routing"
    assert classify("aten::sigmoid", [[2, 4]], experts) == "routing"
    assert classify("aten::matmul", [[2, 4], [4, 72]], experts) == "mixing"
    assert classify("aten::mm", [[2, 4], [4, 72]], experts) == "mixing"
    assert classify("aten::bmm", [[2, 16, 72], [2, 72, 25]], experts) == "product"
    assert classify("aten::conv2d", [[1, 16, 5, 5], [32, 8, 3, 3]], experts) == "product"
    assert classify("aten::im2col", [[2, 8, 5, 5]], experts) == "layout"
    assert classify("aten::add", [[2, 16, 5, 5], [2, 16, 1, 1]], experts) == "epilogue"
    assert classify_backward("autograd::engine::evaluate_function: ConvolutionBackward0") == "backward: product"
    assert classify_backward("autograd::engine::evaluate_function: ViewBackward0") == "backward: layout"
    assert classify_backward("autograd::engine::evaluate_function: SigmoidBackward0") == "backward: other"


def _phases(impl: str, spec: LayerSpec, shape: tuple[int, ...]) -> dict[str, float]:
    module = get_impl(impl)(spec).eval()
    x = torch.randn(shape)
    with torch.inference_mode():
        module(x)
        breakdown = measure_phases(lambda: module(x), CPU, spec.num_experts)
    assert sum(breakdown.phases.values()) == pytest.approx(breakdown.step_us, rel=1e-6)
    assert set(breakdown.phases) <= set(PHASES)
    return breakdown.phases


def test_each_strategy_shows_the_phases_it_runs() -> None:
    k3 = LayerSpec("conv2d", 16, 32, 4, kernel_size=3, padding=1)
    unfolded = _phases("batched_matmul", k3, (4, 16, 12, 12))
    assert {"routing", "mixing", "layout", "product"} <= set(unfolded)
    # im2col is attributed to layout; its share of the step depends on the machine, so only its presence is asserted.
    assert unfolded["layout"] > 0
    assert {"routing", "mixing", "product"} <= set(_phases("grouped_conv", k3, (4, 16, 12, 12)))
    naive = _phases("naive_moe", k3, (4, 16, 12, 12))
    assert "mixing" not in naive and naive["epilogue"] > 0  # it mixes outputs, not kernels
    assert "routing" not in _phases("static", k3, (4, 16, 12, 12)) and "mixing" not in _phases("static", k3, (4, 16, 12, 12))


def test_training_steps_have_backward_phases() -> None:
    module = get_impl("grouped_conv")(LayerSpec("conv2d", 16, 32, 4, kernel_size=3, padding=1)).train()
    x = torch.randn(4, 16, 12, 12, requires_grad=True)

    def step() -> object:
        out = module(x)
        return torch.autograd.grad(out, [x, *module.parameters()], torch.ones_like(out))

    phases = measure_phases(step, CPU, 4).phases
    assert phases["backward: product"] > 0 and phases["product"] > 0


@pytest.mark.parametrize("impl", ["grouped_conv", "batched_matmul", "pixel_major_matmul", "naive_moe", "stacked_moe", "per_sample_loop"])
def test_nothing_in_the_timed_path_marks_phases(impl: str) -> None:
    """Phases come from the operators alone: a strategy's forward records no annotations, so what is
    timed pays nothing for them (a record_function label costs ~4 µs even with no profiler on)."""
    module = get_impl(impl)(LayerSpec("conv2d", 8, 16, 4, kernel_size=3, padding=1)).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x)
    assert not [event.name for event in prof.events() if event.is_user_annotation]


def test_a_damaged_phase_record_reads_as_missing() -> None:
    assert phases_of({"phases_us": {"product": 3.0}}) == {"product": 3.0}
    assert phases_of({"phases_us": {"product": "three"}}) is None
    assert phases_of({"phases_us": [1, 2]}) is None
    assert phases_of({}) is None


def test_profile_command_prints_one_case_per_strategy() -> None:
    result = CliRunner().invoke(main, ["profile", str(TINY), "--layer", "pw", "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "product" in lines[0] and "overhead" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["static", "grouped_conv", "per_sample_loop"]


def test_profile_command_rejects_an_unknown_layer_in_one_line() -> None:
    result = CliRunner().invoke(main, ["profile", str(TINY), "--layer", "nope", "--batch-size", "2"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: --layer nope: not in {TINY} with --batch-size 2 (it has: pw, dw3, fc)"]


def test_trace_diff_compares_two_profiled_strategies_with_hta(tmp_path: Path) -> None:
    pytest.importorskip("hta", reason="HolisticTraceAnalysis is an optional extra (pip install -e '.[hta]')")
    from condconv_bench.run.runner import run_suite
    from condconv_bench.suite.selection import CaseFilter
    from condconv_bench.report.trace_diff import diff_traces

    run_suite(TINY, tmp_path / "run", case_filter=CaseFilter(layers=("pw",), batch_sizes=(2,), devices=("cpu",)), profile=True)
    control, test = (f"pw/{impl}/b2/cpu/float32/inference/t1/contiguous" for impl in ("grouped_conv", "per_sample_loop"))
    diff = diff_traces(tmp_path / "run", control, test)
    # One grouped conv for the batch against one conv per example.
    assert (diff.loc["aten::conv2d", "counts_control"], diff.loc["aten::conv2d", "counts_test"]) == (1, 2)
    assert (diff["diff_counts"] == diff["counts_test"] - diff["counts_control"]).all()
    result = CliRunner().invoke(main, ["trace-diff", str(tmp_path / "run"), control, "nope"])
    assert result.exit_code == 2 and "no trace of case nope" in result.output
