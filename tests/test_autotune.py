"""`autotune`: measured choices in the user's process, the per-machine cache and its confirmation,
the quiet default path, and the new strategies."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from condconv_bench import CondConv2d, CondConvLinear, LayerSpec, set_autotune
from condconv_bench.dispatch import autotuning, cache
from condconv_bench.dispatch import dispatching_layers as auto_module
from condconv_bench.dispatch.table import DispatchTable
from condconv_bench.core.equivalence import check_equivalence
from condconv_bench.impls import chunked_matmul
from condconv_bench.impls.grouped_conv import GroupedConv
from condconv_bench.machine import allocators
from condconv_bench.core.registry import create_impl, dispatchable_impls
from condconv_bench.errors import ImplUnavailableError

from conftest import needs_cpp_compiler
from test_auto import entry, query


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
    cache._cache_for.cache_clear()


class FakeClock:
    """Time that passes only when a planted strategy runs: exact, load-free timings."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def costing(clock: FakeClock, seconds: dict[str, float]) -> dict[str, type]:
    """grouped_conv under several names, each advancing `clock` by its own cost per call (a
    callable cost may vary from call to call)."""

    def strategy(name: str) -> type:
        def conditional_forward(self, x, routing_weights):
            cost = seconds[name]
            clock.now += cost() if callable(cost) else cost
            return GroupedConv.conditional_forward(self, x, routing_weights)

        return type(name, (GroupedConv,), {"conditional_forward": conditional_forward})

    return {name: strategy(name) for name in seconds}


def planted_entry(strategy: str, rivals: tuple[str, ...], x: torch.Tensor, spec: LayerSpec, recorded_s: float = 1e-3) -> None:
    """A cache file holding `strategy` as this machine's choice for `x`, as an earlier process wrote
    it, with `recorded_s` as the strategy's measured time."""
    measured = query(x.shape[0], spec, tuple(x.shape[2:]))
    DispatchTable([measured.entry(strategy, 1.3, "autotune", rivals, {strategy: recorded_s}, 0.01, 0.5)]).save(cache.cache_path())
    fresh_process_cache()


@pytest.mark.timing
def test_autotune_measures_and_never_picks_a_planted_slow_strategy(monkeypatch) -> None:
    only(monkeypatch, {"grouped_conv": GroupedConv, "spinning": SpinningGroupedConv})
    layer = CondConv2d(8, 16, 3, padding=1, num_experts=4, strategy="autotune", tuning_budget_s=0.2)
    with torch.no_grad():
        layer(torch.randn(4, 8, 6, 6))
    tuning = layer.last_tuning
    assert layer.last_strategy == tuning.strategy == "grouped_conv"
    assert "spinning" in tuning.pruned or tuning.medians_s["spinning"] > 1.5 * tuning.medians_s["grouped_conv"]
    assert tuning.seconds < 2.0  # ends early once one finalist is left


def test_a_strategy_is_prepared_before_its_first_timed_call_and_one_that_cannot_be_is_no_candidate(monkeypatch) -> None:
    """A native strategy builds its code in `prepare` (tens of seconds the first time on a machine):
    in a first timed call that build would look hopeless and be pruned for good; where it cannot
    be built at all (no compiler), autotune and auto must go on without it."""
    clock = FakeClock()
    strategies = costing(clock, {"quick": 1e-3, "slow": 3e-3, "unbuildable": 1e-4})
    building = {"quick": 30.0}  # the first call of "quick" would pay for its build, but prepare pays it untimed

    def prepare(cls) -> None:
        if cls.__name__ == "unbuildable":
            raise ImplUnavailableError("the planted kernel cannot be built here (no compiler)")
        clock.now += building.pop(cls.__name__, 0.0)

    for cls in strategies.values():
        cls.prepare = classmethod(prepare)
    only(monkeypatch, strategies)
    monkeypatch.setattr(autotuning, "default_clock", clock)
    layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune")
    with torch.no_grad():
        layer(torch.randn(2, 8, 5, 5))
    assert layer.last_strategy == "quick" and "quick" not in layer.last_tuning.pruned and not building
    assert "unbuildable" not in {*layer.last_tuning.medians_s, *layer.last_tuning.pruned}


def test_the_choice_is_cached_per_signature_and_survives_the_process(monkeypatch) -> None:
    clock = FakeClock()  # exact timings: a loaded machine must not make the choice noisy (unsaved) or drifted (re-tuned)
    only(monkeypatch, costing(clock, {"quick": 1e-3, "middling": 1.6e-3, "slow": 3e-3}))
    monkeypatch.setattr(autotuning, "default_clock", clock)
    layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune")
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        layer(x)
        first = layer.last_tuning
        layer.last_tuning = None
        layer(x)
    assert first is not None and layer.last_tuning is None  # the second call measured nothing
    document = json.loads(cache.cache_path().read_text())
    (saved,) = document["entries"]
    assert (saved["strategy"], saved["batch_size"], saved["allocator"]) == (first.strategy, 2, allocators.current())

    assert saved["rivals"] and saved["medians_s"][first.strategy] > 0 and saved["load"] != -1.0  # the evidence

    fresh_process_cache()  # as a new process would: only the file remains
    monkeypatch.setattr(autotuning, "measure", lambda *a, **k: pytest.fail("tuned afresh although the cache file knows this signature"))
    again = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune")
    with torch.no_grad():
        again(x)
        assert again.choose(x) == again.last_strategy  # what torch.compile bakes in while tracing
    raced = set(again.last_tuning.medians_s)
    assert again.last_tuning.confirmed == first.strategy and raced >= {first.strategy, *saved["rivals"]}  # raced before trusted
    assert again.last_strategy in raced


def test_a_cached_choice_now_twice_as_slow_is_replaced_within_the_confirmation_budget(monkeypatch) -> None:
    clock = FakeClock()
    only(monkeypatch, costing(clock, {"fast": 1e-3, "slow": 2e-3, "other": 3e-3}))
    monkeypatch.setattr(autotuning, "default_clock", clock)
    spec = LayerSpec("conv2d", 8, 16, 4, kernel_size=3, padding=1)
    x = torch.randn(4, 8, 6, 6)
    planted_entry("slow", ("fast",), x, spec, recorded_s=2e-3)  # it runs as it did; its rival got faster
    layer = CondConv2d(8, 16, 3, padding=1, num_experts=4, strategy="autotune", tuning_budget_s=0.25)
    with torch.no_grad():
        layer(x)
    confirmation = layer.last_tuning
    assert layer.last_strategy == "fast" and confirmation.confirmed == "slow"
    assert confirmation.medians_s == {"slow": pytest.approx(2e-3), "fast": pytest.approx(1e-3)}
    assert confirmation.seconds <= autotuning.BUDGET_SLACK * 0.25 * autotuning.CONFIRM_SHARE  # its share of the budget, not a tuning
    (saved,) = json.loads(cache.cache_path().read_text())["entries"]
    assert saved["strategy"] == "fast" and saved["rivals"] == ["slow"]  # the next process starts from the fast one
    fresh_process_cache()
    again = CondConv2d(8, 16, 3, padding=1, num_experts=4, strategy="autotune", tuning_budget_s=0.05)
    with torch.no_grad():
        again(x)
    assert again.last_strategy == "fast" and again.last_tuning.confirmed == "fast"


def test_a_cached_choice_that_now_runs_at_another_speed_than_recorded_is_tuned_afresh(monkeypatch) -> None:
    clock = FakeClock()
    only(monkeypatch, costing(clock, {"best": 1e-3, "cached": 2e-3, "rival": 2.5e-3}))
    monkeypatch.setattr(autotuning, "default_clock", clock)
    spec = LayerSpec("conv2d", 8, 16, 4)
    x = torch.randn(2, 8, 5, 5)
    planted_entry("cached", ("rival",), x, spec, recorded_s=1e-3)  # tuned in another state: its rivals are suspect too
    layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.05)
    with torch.no_grad():
        layer(x)
    assert layer.last_strategy == "best" and layer.last_tuning.confirmed is None  # a full tuning found the unrecorded one


def test_a_cached_choice_that_holds_is_trusted_after_one_confirmation_per_process(monkeypatch) -> None:
    clock = FakeClock()
    only(monkeypatch, costing(clock, {"fast": 1e-3, "slow": 2e-3}))
    monkeypatch.setattr(autotuning, "default_clock", clock)
    spec = LayerSpec("conv2d", 8, 16, 4)
    x = torch.randn(2, 8, 5, 5)
    planted_entry("fast", ("slow",), x, spec)
    before = cache.cache_path().read_text()
    layers = [CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.05) for _ in range(3)]
    with torch.no_grad():
        for layer in layers:  # a model's layers of one signature
            layer(x)
    assert [layer.last_strategy for layer in layers] == ["fast"] * 3
    assert layers[0].last_tuning.confirmed == "fast" and layers[1].last_tuning is None and layers[2].last_tuning is None
    assert cache.cache_path().read_text() == before  # a confirmation that holds rewrites nothing


def test_a_tuning_too_noisy_to_separate_the_candidates_is_kept_for_the_process_only(monkeypatch) -> None:
    clock = FakeClock()
    draws = random.Random(1)
    only(monkeypatch, costing(clock, {"jumpy": lambda: draws.uniform(1e-3, 4e-3), "steady": 2.0e-3}))
    monkeypatch.setattr(autotuning, "default_clock", clock)
    layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.1)
    with torch.no_grad():
        layer(torch.randn(2, 8, 5, 5))
    assert layer.last_tuning.noisy and layer.last_strategy in ("jumpy", "steady")
    assert not cache.cache_path().exists()  # not persisted: another process measures afresh
    clock_only = FakeClock()
    only(monkeypatch, costing(clock_only, {"quick": 1.0e-3, "steady": 2.0e-3}))
    monkeypatch.setattr(autotuning, "default_clock", clock_only)
    quiet = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.1)
    with torch.no_grad():
        quiet(torch.randn(3, 8, 5, 5))
    assert not quiet.last_tuning.noisy and cache.cache_path().exists()  # the same layer on a quiet machine is persisted


def test_the_budget_holds_when_every_call_is_slow(monkeypatch) -> None:
    clock = FakeClock()
    only(monkeypatch, costing(clock, {f"s{i}": 0.04 + 0.001 * i for i in range(6)}))
    monkeypatch.setattr(autotuning, "default_clock", clock)
    layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.3)
    with torch.no_grad():
        layer(torch.randn(2, 8, 5, 5))
    measured = layer.last_tuning
    assert measured.seconds <= autotuning.BUDGET_SLACK * 0.3
    assert measured.strategy == "s0"  # the likeliest goes first, and the budget still separates it


@pytest.mark.parametrize(("hopeless_s", "calls_made"), [
    (9e-3, 2),  # short enough to be a fast strategy's preempted call: a second call confirms it
    (20e-3, 1),  # too long for that: repeating it would cost what the factor saves
])
def test_a_candidate_slow_in_every_call_drops_before_the_rounds(monkeypatch, hopeless_s, calls_made) -> None:
    clock = FakeClock()
    calls = {"quick": 0, "hopeless": 0}
    costs = {"quick": 1e-3, "hopeless": hopeless_s}

    def counted(name):
        def cost():
            calls[name] += 1
            return costs[name]
        return cost

    only(monkeypatch, costing(clock, {name: counted(name) for name in costs}))
    monkeypatch.setattr(autotuning, "default_clock", clock)
    layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.05)
    with torch.no_grad():
        layer(torch.randn(2, 8, 5, 5))
    assert layer.last_strategy == "quick" and "hopeless" in layer.last_tuning.pruned
    assert calls["hopeless"] == calls_made


@pytest.mark.parametrize("preempted_call", [1, 2, 4, 25])  # the first call, the settled one, in the first round's block, in the second's
def test_one_preempted_call_does_not_drop_the_fastest_strategy(monkeypatch, preempted_call) -> None:
    """On a loaded machine the OS may stall any one call; a stall only adds time, so a strategy
    must not be pruned on a call that later calls contradict."""
    clock = FakeClock()
    calls = {"quick": 0}

    def quick() -> float:
        calls["quick"] += 1
        return 5e-3 if calls["quick"] == preempted_call else 0.1e-3  # a stall of a few scheduler slices

    only(monkeypatch, costing(clock, {"steady": 0.13e-3, "quick": quick}))  # within the first round's 1.5x, not the later 1.25x
    monkeypatch.setattr(autotuning, "default_clock", clock)
    layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.2)
    with torch.no_grad():
        layer(torch.randn(2, 8, 5, 5))
    assert layer.last_strategy == "quick", layer.last_tuning


def test_training_tuning_includes_the_routing_weights_gradient(monkeypatch) -> None:
    seen = []

    class Recording(GroupedConv):
        def conditional_forward(self, x, routing_weights):
            seen.append(routing_weights.requires_grad)
            return GroupedConv.conditional_forward(self, x, routing_weights)

    only(monkeypatch, {"recording": Recording, "grouped_conv": GroupedConv})
    layer = CondConv2d(6, 8, 1, num_experts=3, strategy="autotune")
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    routing = torch.sigmoid(torch.nn.Linear(6, 3)(x.mean((2, 3))))  # a block's shared routing, as in a model
    layer(x, routing)
    assert seen and all(seen)  # the tuned step differentiates the routing weights too, as the model's backward does


@pytest.mark.timing
def test_a_choice_measured_fast_in_one_process_and_slow_in_the_next_is_replaced(tmp_path) -> None:
    script = tmp_path / "tune_once.py"
    script.write_text(textwrap.dedent('''
        import os, sys, time
        import torch
        from condconv_bench import CondConv2d
        from condconv_bench.dispatch import dispatching_layers as auto_module
        from condconv_bench.impls.grouped_conv import GroupedConv

        def spinning(name):
            def conditional_forward(self, x, routing_weights):
                until = time.perf_counter() + float(os.environ[name.upper() + "_SPIN"])
                while time.perf_counter() < until:
                    pass
                return GroupedConv.conditional_forward(self, x, routing_weights)
            return type(name, (GroupedConv,), {"conditional_forward": conditional_forward})

        torch.set_num_threads(1)  # a tiny conv on a loaded machine: no threads spinning for a core
        strategies = {name: spinning(name) for name in ("plain", "tricky")}
        auto_module.dispatchable_impls = lambda: strategies
        layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.2)
        with torch.no_grad():
            layer(torch.randn(2, 8, 5, 5))
        print(layer.last_strategy, layer.last_tuning.confirmed)
    '''))
    env = {**os.environ, cache.CACHE_VARIABLE: str(tmp_path / "cache.json")}

    def process(plain_spin: float, tricky_spin: float) -> list[str]:
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=120,
                                env={**env, "PLAIN_SPIN": str(plain_spin), "TRICKY_SPIN": str(tricky_spin)})
        return result.stdout.split()

    assert process(0.003, 0.0) == ["tricky", "None"]  # artificially fast in the first process: tuned, cached
    second = process(0.0, 0.003)  # normal in the second: 3 ms slower than recorded, so it drifted and is tuned afresh
    assert second[0] == "plain" and second[1] in ("tricky", "None")
    assert process(0.0, 0.003)[0] == "plain"  # and stays replaced (persisted unless that moment was noisy)


def test_the_default_layer_is_quiet_in_a_plain_process(tmp_path) -> None:
    program = textwrap.dedent('''
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import torch
            from condconv_bench import CondConv2d, CondConvLinear
            with torch.no_grad():
                CondConv2d(112, 672, 1, bias=False)(torch.randn(2, 112, 14, 14))
                CondConvLinear(1280, 1000)(torch.randn(2, 1280))
            CondConv2d(16, 16, 3, padding=1, groups=16)(torch.randn(2, 16, 7, 7)).sum().backward()
        print([f"{w.filename}: {w.message}" for w in caught if "condconv_bench" in w.filename or "condconv_bench" in str(w.message)])
    ''')
    env = {**os.environ, cache.CACHE_VARIABLE: str(tmp_path / "cache.json")}
    env.pop("PYTHONWARNINGS", None)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=120, env=env)
    assert result.stdout.strip() == "[]", result.stdout
    assert not (tmp_path / "cache.json").exists()  # the default measures nothing and writes nothing


def test_auto_prefers_what_this_machine_measured_over_the_table(monkeypatch) -> None:
    spec = LayerSpec("conv2d", 8, 16, 4)
    x = torch.randn(2, 8, 5, 5)
    table = DispatchTable([entry("grouped_conv", 2, spec, size=(5, 5))])
    assert CondConv2d(8, 16, 1, num_experts=4, dispatch_table=table).choose(x) == "grouped_conv"
    planted_entry("pixel_major_matmul", ("grouped_conv",), x, spec)
    layer = CondConv2d(8, 16, 1, num_experts=4, dispatch_table=table)
    with torch.no_grad():
        layer(x)
    assert layer.last_strategy == "pixel_major_matmul" and layer.last_tuning is None  # looked up, never measured


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


def test_a_broken_cache_file_costs_a_measurement_not_the_model(monkeypatch) -> None:
    clock = FakeClock()
    only(monkeypatch, costing(clock, {"fast": 1e-3, "slow": 2e-3}))
    monkeypatch.setattr(autotuning, "default_clock", clock)  # a quiet machine: the measurement is persisted
    cache.cache_path().write_bytes(b"\xff not json")
    fresh_process_cache()
    layer = CondConv2d(8, 8, 1, num_experts=2, strategy="autotune")
    with pytest.warns(UserWarning, match="autotuning afresh"), torch.no_grad():
        layer(torch.randn(2, 8, 4, 4))
    assert layer.last_tuning is not None
    assert json.loads(cache.cache_path().read_text())["entries"][0]["strategy"] == layer.last_strategy


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
    strategy, tied = autotuning.pick({"grouped_conv": 1.015e-3, "batched_matmul": 1.0e-3, "naive_moe": 5e-3})
    assert (strategy, tied) == ("batched_matmul", ("batched_matmul", "grouped_conv"))
    strategy, tied = autotuning.pick({"grouped_conv": 1.0e-3, "batched_matmul": 1.03e-3})
    assert (strategy, tied) == ("grouped_conv", ("grouped_conv",))


@pytest.mark.parametrize("training", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("spec, size", [
    (LayerSpec("conv2d", 8, 12, 4), (5, 5)),
    (LayerSpec("conv2d", 8, 12, 4, kernel_size=3, padding=1, groups=2, bias=True), (6, 5)),
    (LayerSpec("linear", 16, 10, 4, bias=True), (1, 1)),
], ids=["pointwise", "grouped_bias", "linear"])
def test_chunked_matmul_matches_the_oracle_over_several_chunks(monkeypatch, spec, size, training) -> None:
    monkeypatch.setattr(chunked_matmul, "_l2_budget_bytes", lambda: 1)  # one example per chunk
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


@pytest.mark.timing
@pytest.mark.slow
@needs_cpp_compiler
def test_tuning_for_compile_measures_compiled_variants_and_the_graph_uses_their_choice(monkeypatch) -> None:
    only(monkeypatch, {"grouped_conv": GroupedConv, "batched_matmul": dispatchable_impls()["batched_matmul"]})
    # Real timings (a fake clock cannot pass through a compiled graph): a loaded CI machine's spread
    # must not leave the choice unsaved, since what is under test is what was measured and baked in.
    monkeypatch.setattr(autotuning, "NOISY_SPREAD", float("inf"))
    set_autotune(True, budget_s=0.05, compiled=True)
    torch.manual_seed(0)
    layer = CondConv2d(8, 16, 1, num_experts=4)
    x = torch.randn(4, 8, 5, 5)
    with torch.no_grad():
        expected = layer(x)  # the eager warm-up call tunes for compilation
        tuning = layer.last_tuning
        assert tuning is not None and tuning.compile_s > 0 and set(tuning.medians_s) | set(tuning.pruned) == {"grouped_conv", "batched_matmul"}
        (saved,) = json.loads(cache.cache_path().read_text())["entries"]
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
    conv = autotuning.cheap_enough(strategies, LayerSpec("conv2d", 64, 64, 8), 8, (14, 14))
    assert {"naive_moe", "stacked_moe"}.isdisjoint(conv) and {"grouped_conv", "pixel_major_matmul"} <= set(conv)
    linear = autotuning.cheap_enough(strategies, LayerSpec("linear", 1280, 1000, 8), 8, (1, 1))
    assert "stacked_moe" in linear  # E·P MACs, as much as mixing the kernels: the classifier's fastest


def test_tune_model_fills_the_cache_a_fleet_ships_and_the_next_process_confirms_it(monkeypatch) -> None:
    from click.testing import CliRunner

    from condconv_bench.cli import main

    clock = FakeClock()  # exact timings: a loaded CI machine must not make a choice noisy or drifted
    only(monkeypatch, costing(clock, {"quick": 1e-3, "grouped_conv": 2e-3}))  # the tiny net builds with grouped_conv
    monkeypatch.setattr(autotuning, "default_clock", clock)
    result = CliRunner().invoke(main, ["tune-model", "tiny_models:tiny_condconv_net", "--batch-size", "1", "--batch-size", "2",
                                       "--input-size", "15", "--budget", "0.02"])
    assert result.exit_code == 0, result.output
    assert result.output.count("2 signatures tuned, 0 confirmed") == 2  # its two CondConv layers, at each batch size
    entries = json.loads(cache.cache_path().read_text())["entries"]
    assert {e["batch_size"] for e in entries} == {1, 2} and all(e["mode"] == "inference" for e in entries)
    assert {e["strategy"] for e in entries} == {"quick"}
    fresh_process_cache()  # another machine of the fleet, with the shipped file
    monkeypatch.setattr(autotuning, "measure", lambda *a, **k: pytest.fail("tuned afresh although the shipped cache holds the signature"))
    again = CliRunner().invoke(main, ["tune-model", "tiny_models:tiny_condconv_net", "--batch-size", "1", "--input-size", "15",
                                      "--budget", "0.02"])
    assert again.exit_code == 0 and "0 signatures tuned, 2 confirmed" in again.output, again.output
    off = CliRunner().invoke(main, ["tune-model", "tiny_models:tiny_condconv_net", "--batch-size", "1"],
                             env={cache.CACHE_VARIABLE: "off"})
    assert off.exit_code == 2 and "cache is off" in off.output


@pytest.mark.parametrize(("costs", "expected"), [
    ({"quick": 1e-3, "slow": 1.5e-3}, "quick"),  # clearly slower: settled
    ({"b_first": 1.0e-3, "a_second": 1.005e-3}, "a_second"),  # clearly tied: settled, the first by name
])
def test_rounds_stop_once_they_have_settled_the_answer(monkeypatch, costs, expected) -> None:
    clock = FakeClock()
    only(monkeypatch, costing(clock, costs))
    monkeypatch.setattr(autotuning, "default_clock", clock)
    layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.5)
    with torch.no_grad():
        layer(torch.randn(2, 8, 5, 5))
    assert layer.last_strategy == expected
    assert layer.last_tuning.rounds <= autotuning.SETTLE_ROUNDS and layer.last_tuning.seconds < 0.1  # far inside the budget


def test_rounds_go_on_while_the_answer_is_open(monkeypatch) -> None:
    clock = FakeClock()
    draws = random.Random(3)
    only(monkeypatch, costing(clock, {"one": lambda: draws.uniform(0.85e-3, 1.15e-3), "two": lambda: draws.uniform(0.85e-3, 1.15e-3)}))
    monkeypatch.setattr(autotuning, "default_clock", clock)
    layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.2)
    with torch.no_grad():
        layer(torch.randn(2, 8, 5, 5))
    assert layer.last_tuning.rounds > autotuning.SETTLE_ROUNDS and layer.last_tuning.seconds > 0.1  # the budget, spent


def test_list_reports_a_broken_cache_file_instead_of_failing() -> None:
    from click.testing import CliRunner

    from condconv_bench.cli import main

    cache.cache_path().write_bytes(b"\xff not json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, in the listing, not also as a Python warning
        result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0 and "unreadable, autotune measures afresh" in result.output, result.output


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")  # torch.jit is what fvcore uses
def test_a_jit_trace_reuses_the_choice_and_never_measures(monkeypatch) -> None:
    """fvcore counts FLOPs through torch.jit.trace, whose sizes are tensors: the choice made for an
    input must be found again there, and a tracer (which records every op) must not see a tuning."""
    layer = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.05).eval()
    x = torch.randn(3, 8, 5, 5)
    with torch.inference_mode():
        layer(x)
    chosen = layer.last_strategy
    monkeypatch.setattr(autotuning, "measure", lambda *a, **k: pytest.fail("measured while torch.jit traced"))
    monkeypatch.setattr(autotuning, "confirm", lambda *a, **k: pytest.fail("measured while torch.jit traced"))
    monkeypatch.setattr(layer, "choose", lambda x: pytest.fail("chose afresh although this input has a choice"))
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)
        assert layer.last_strategy == chosen and len(layer._choices) == 1
        assert torch.allclose(traced(x), layer(x), rtol=1e-4, atol=1e-5)
    fresh = CondConv2d(8, 16, 1, num_experts=4, strategy="autotune", tuning_budget_s=0.05).eval()
    with torch.no_grad():
        torch.jit.trace(fresh, torch.randn(2, 8, 5, 5), check_trace=False)  # traced first: chosen without measuring
