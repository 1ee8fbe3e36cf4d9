"""`autotune`: measured choices in the user's process, the per-machine cache, and the new strategies."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch

from condconv_bench import CondConv2d, CondConvLinear, DispatchTable, LayerSpec, set_autotune
from condconv_bench import autotune
from condconv_bench.equivalence import check_equivalence
from condconv_bench.impls import auto as auto_module
from condconv_bench.impls import chunked_matmul
from condconv_bench.impls.grouped_conv import GroupedConv
from condconv_bench.measure import allocators
from condconv_bench.registry import create_impl, dispatchable_impls

from test_auto import entry


class SpinningGroupedConv(GroupedConv):
    """grouped_conv plus a 2 ms spin per call: measurably the slowest, same numbers."""

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        until = time.perf_counter() + 0.002
        while time.perf_counter() < until:
            pass
        return GroupedConv.conditional_forward(self, x, routing_weights)  # run on auto's parameters, as dispatch does


def only(monkeypatch, strategies: dict[str, type]) -> None:
    monkeypatch.setattr(auto_module, "dispatchable_impls", lambda: strategies)


def fresh_process_cache() -> None:
    autotune._cache_for.cache_clear()


def test_autotune_measures_and_never_picks_a_planted_slow_strategy(monkeypatch) -> None:
    only(monkeypatch, {"grouped_conv": GroupedConv, "spinning": SpinningGroupedConv})
    layer = CondConv2d(8, 16, 3, padding=1, num_experts=4, strategy="autotune", tuning_budget_s=0.2)
    with torch.no_grad():
        layer(torch.randn(4, 8, 6, 6))
    tuning = layer.last_tuning
    assert layer.last_strategy == tuning.strategy == "grouped_conv"
    assert "spinning" in tuning.pruned or tuning.medians_s["spinning"] > 1.5 * tuning.medians_s["grouped_conv"]
    assert tuning.seconds < 2.0 and tuning.rounds >= autotune.MIN_ROUNDS  # ends early once one finalist is left


def test_the_choice_is_cached_per_signature_and_survives_the_process(monkeypatch) -> None:
    layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune")
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        layer(x)
        first = layer.last_tuning
        layer.last_tuning = None
        layer(x)
    assert first is not None and layer.last_tuning is None  # the second call measured nothing
    document = json.loads(autotune.cache_path().read_text())
    (saved,) = document["entries"]
    assert (saved["strategy"], saved["batch_size"], saved["allocator"]) == (first.strategy, 2, allocators.current())

    fresh_process_cache()  # as a new process would: only the file remains
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured although the cache file knows this signature"))
    again = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune")
    with torch.no_grad():
        again(x)
        assert again.choose(x) == first.strategy  # what torch.compile bakes in while tracing
    assert again.last_strategy == first.strategy


def test_global_switch_makes_auto_layers_built_elsewhere_autotune() -> None:
    layer = CondConvLinear(16, 8, num_experts=4)  # strategy="auto", as a model would build it
    with torch.no_grad():
        layer(torch.randn(3, 16))
    assert layer.last_tuning is None
    set_autotune(True, budget_s=0.05)
    with torch.no_grad():
        layer(torch.randn(5, 16))
    assert layer.autotunes() and layer.last_tuning is not None
    with pytest.raises(ValueError, match="budget_s"):
        set_autotune(True, budget_s=0)


def test_a_broken_cache_file_costs_a_measurement_not_the_model() -> None:
    autotune.cache_path().write_bytes(b"\xff not json")
    fresh_process_cache()
    layer = CondConv2d(8, 8, 1, num_experts=2, strategy="autotune")
    with pytest.warns(UserWarning, match="autotuning afresh"), torch.no_grad():
        layer(torch.randn(2, 8, 4, 4))
    assert layer.last_tuning is not None
    assert json.loads(autotune.cache_path().read_text())["entries"][0]["strategy"] == layer.last_strategy


def test_tuning_in_training_measures_the_backward_and_leaves_grads_alone() -> None:
    torch.manual_seed(0)
    layer = CondConv2d(6, 8, 3, padding=1, num_experts=3, strategy="autotune")
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    out = layer(x)
    assert layer.last_tuning is not None
    assert x.grad is None and all(p.grad is None for p in layer.parameters())
    assert check_equivalence(layer, x.detach()).passed
    out.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def test_ties_are_broken_by_name_not_by_noise() -> None:
    strategy, tied = autotune.pick({"grouped_conv": 1.015e-3, "batched_matmul": 1.0e-3, "naive_moe": 5e-3})
    assert (strategy, tied) == ("batched_matmul", ("batched_matmul", "grouped_conv"))
    strategy, tied = autotune.pick({"grouped_conv": 1.0e-3, "batched_matmul": 1.03e-3})
    assert (strategy, tied) == ("grouped_conv", ("grouped_conv",))


def test_table_measured_under_another_allocator_warns_once(tmp_path) -> None:
    elsewhere = "jemalloc" if allocators.current() != "jemalloc" else "glibc"
    spec = LayerSpec("conv2d", 8, 16, 4, kernel_size=3, padding=1)
    table = DispatchTable([entry("grouped_conv", 2, spec, allocator=elsewhere)], "measured-elsewhere.json")
    layer = CondConv2d(8, 16, 3, padding=1, num_experts=4, dispatch_table=table)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        layer(torch.randn(2, 8, 6, 6))
        layer(torch.randn(3, 8, 6, 6))
    messages = [str(w.message) for w in caught if "measured under" in str(w.message)]
    assert len(messages) == 1 and elsewhere in messages[0] and "autotune" in messages[0]
    at_home = DispatchTable([entry("grouped_conv", 2, spec)], "measured-here.json")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        CondConv2d(8, 16, 3, padding=1, num_experts=4, dispatch_table=at_home)(torch.randn(2, 8, 6, 6))
    assert not [w for w in caught if "measured under" in str(w.message)]


@pytest.mark.parametrize("training", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("spec, size", [
    (LayerSpec("conv2d", 8, 12, 4), (5, 5)),
    (LayerSpec("conv2d", 8, 12, 4, kernel_size=3, padding=1, groups=2, bias=True), (6, 5)),
    (LayerSpec("linear", 16, 10, 4, bias=True), (1, 1)),
], ids=["pointwise", "grouped_bias", "linear"])
def test_chunked_matmul_matches_the_oracle_over_several_chunks(monkeypatch, spec, size, training) -> None:
    monkeypatch.setattr(chunked_matmul, "_l2_bytes", lambda: 1)  # one example per chunk
    torch.manual_seed(0)
    module = create_impl("chunked_matmul", spec)
    x = torch.randn(spec.input_shape(5, size))
    assert chunked_matmul.chunk_size(module, 5, 4) == 1
    grad = torch.randn_like(create_impl("static", spec)(x)) if training else None
    report = check_equivalence(module, x, None, grad)
    assert report.passed, report


def test_pixel_major_output_of_an_ungrouped_layer_is_channels_last_without_a_copy() -> None:
    module = create_impl("pixel_major_matmul", LayerSpec("conv2d", 8, 12, 4))
    with torch.no_grad():
        out = module(torch.randn(3, 8, 5, 5))
    assert out.shape == (3, 12, 5, 5) and out.is_contiguous(memory_format=torch.channels_last)


def test_new_strategies_are_autotune_candidates() -> None:
    assert {"pixel_major_matmul", "chunked_matmul"} <= set(dispatchable_impls())


@pytest.mark.slow
def test_tuning_for_compile_measures_compiled_variants_and_the_graph_uses_their_choice(monkeypatch) -> None:
    only(monkeypatch, {"grouped_conv": GroupedConv, "batched_matmul": dispatchable_impls()["batched_matmul"]})
    set_autotune(True, budget_s=0.05, compiled=True)
    torch.manual_seed(0)
    layer = CondConv2d(8, 16, 1, num_experts=4)
    x = torch.randn(4, 8, 5, 5)
    with torch.no_grad():
        expected = layer(x)  # the eager warm-up call tunes for compilation
        tuning = layer.last_tuning
        assert tuning is not None and tuning.compile_s > 0 and set(tuning.medians_s) | set(tuning.pruned) == {"grouped_conv", "batched_matmul"}
        (saved,) = json.loads(autotune.cache_path().read_text())["entries"]
        assert saved["mode"] == "inference+compiled" and saved["strategy"] == tuning.strategy
        baked = []
        original = auto_module._lookup

        def spy(*args):
            baked.append(original(*args))
            return baked[-1]

        spy._dynamo_marked_constant = True
        monkeypatch.setattr(auto_module, "_lookup", spy)
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
    assert baked == [tuning.strategy]  # traced once, with the choice measured among compiled variants


def test_strategies_with_several_times_the_work_are_not_measured_on_convs_but_are_on_linear_layers() -> None:
    strategies = dispatchable_impls()
    conv = autotune.cheap_enough(strategies, LayerSpec("conv2d", 64, 64, 8), 8, (14, 14))
    assert {"naive_moe", "stacked_moe"}.isdisjoint(conv) and {"grouped_conv", "pixel_major_matmul"} <= set(conv)
    linear = autotune.cheap_enough(strategies, LayerSpec("linear", 1280, 1000, 8), 8, (1, 1))
    assert "stacked_moe" in linear  # E·P MACs, as much as mixing the kernels: the classifier's fastest
