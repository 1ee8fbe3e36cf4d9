"""EfficientNet-CondConv block stacks as workloads: shapes, oracle, FLOPs, and the shipped suite."""

from __future__ import annotations


import pytest
import torch
import yaml

from condconv_bench.layers.blocks import CondConvStack, StackSpec, StageSpec
from condconv_bench.core.registry import get_impl
from condconv_bench.run.runner import run_suite
from condconv_bench.suite.loader import load_suite

SMALL = StackSpec(8, (9, 9), 4, (StageSpec(12, 3, 1, 2, 0.25, 2), StageSpec(16, 5, 2, 2, 0.25, 1)))


def test_stack_expands_stages_into_blocks() -> None:
    blocks = SMALL.blocks()
    assert [(b.in_channels, b.out_channels, b.stride) for b in blocks] == [(8, 12, 1), (12, 12, 1), (12, 16, 2)]
    assert [b.has_residual for b in blocks] == [False, True, False]
    assert SMALL.output_size == (5, 5) and len(SMALL.condconv_layers()) == 9


def test_shipped_block_suite_is_efficientnet_cc_b0() -> None:
    suite = load_suite("efficientnet_cc_b0")
    (layer,) = suite.layers
    spec = layer.workload.spec
    assert len(spec.blocks()) == 8 and len(spec.condconv_layers()) == 24
    assert (spec.in_channels, spec.out_channels, spec.input_size, spec.output_size) == (80, 320, (14, 14), (7, 7))
    assert {c.impl for c in suite.cases()} >= {"grouped_conv", "auto", "static"}


def test_routing_is_shared_by_the_three_layers_of_a_block() -> None:
    stack = CondConvStack(SMALL, get_impl("grouped_conv"))
    seen = []
    for module in (stack[0].expand, stack[0].depthwise, stack[0].project):
        module.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    with torch.no_grad():
        stack(torch.randn(2, 8, 9, 9))
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2] and seen[0].shape == (2, 4)


@pytest.fixture(scope="module")
def stack_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("stack") / "stack.yaml"
    path.write_text(yaml.safe_dump({
        "name": "stack-test",
        "impls": ["static", "per_sample_loop", "grouped_conv", "batched_matmul", "naive_moe", "stacked_moe", "auto",
                  "fake_impls:DoublesGradients"],
        "batch_sizes": [2],
        "modes": ["inference", "training"],
        "threads": [1],
        "timing": {"processes": 1, "rounds": 2, "block_time": 0.001, "warmup": 0, "budget": 0.1},
        "layers": [{
            "name": "blocks", "kind": "stack", "in_channels": 8, "input_size": 9, "experts": 4,
            "stages": [{"out_channels": 12, "kernel_size": 3, "expand_ratio": 2, "repeats": 2},
                       {"out_channels": 16, "kernel_size": 5, "stride": 2, "expand_ratio": 2}],
        }],
    }))
    return run_suite(path, path.parent / "run").run.results()


def test_every_strategy_matches_the_float64_stack_forward_and_backward(stack_run) -> None:
    assert (stack_run["status"] == "ok").all(), stack_run[["case_id", "reason"]]
    condconv = stack_run[~stack_run["impl"].isin(["static", "fake_impls:DoublesGradients"])]
    assert condconv["equivalent"].all(), condconv[["case_id", "max_rel_error", "worst_tensor"]]
    # Gradients are compared too: a correct forward with doubled gradients fails in training only.
    planted = stack_run[stack_run["impl"] == "fake_impls:DoublesGradients"].set_index("mode")
    assert planted.loc["inference", "equivalent"] and not planted.loc["training", "equivalent"]
    assert planted.loc["training", "worst_tensor"].startswith("grad_")


def test_stack_flop_counters_agree_with_the_analytic_count(stack_run) -> None:
    assert stack_run["flops_agree"].all(), stack_run[["case_id", "flops_problems"]]
    static = stack_run[stack_run["impl"] == "static"].iloc[0]
    naive = stack_run[stack_run["impl"] == "naive_moe"].iloc[0]
    assert static["macs_analytic_routing"] == 0 and naive["macs_analytic_conv"] > 3 * static["macs_analytic_conv"]


def test_auto_in_a_stack_reports_its_choices(stack_run) -> None:
    auto = stack_run[stack_run["impl"] == "auto"]
    assert auto["dispatched"].str.contains("×").all()
    counts = [int(part.split("×")[1]) for part in auto["dispatched"].iloc[0].split()]
    assert sum(counts) == 9
