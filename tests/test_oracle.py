"""Every registered implementation against the float64 oracle, forward and backward.

Parametrised over the registry, so an implementation added later is checked with no new test.
"""

from __future__ import annotations

import pytest
import torch

from condconv_bench import create_impl, get_impl, list_impls
from condconv_bench.core.equivalence import RELATIVE_TOLERANCE, check_equivalence, compute_reference

from conftest import SCENARIOS, Scenario

CONDCONV_KEYS = [info.key for info in list_impls(include_floor=False, available_only=True)]
# `compiled` is grouped_conv (checked on every scenario) through inductor, which compiles each
# scenario anew (~3 s): one scenario per layer kind and memory format covers what inductor changes.
COMPILED_SCENARIOS = {"pointwise", "k3_bias_odd", "dw5_stride2", "channels_last", "linear"}


def build(key: str, scenario: Scenario, dtype: torch.dtype = torch.float32):
    reason = get_impl(key).unsupported_reason(scenario.spec, torch.device("cpu"), dtype)
    if reason is not None:  # declared, so suites skip it too (e.g. fused: float32 and groups 1 or depthwise only)
        pytest.skip(reason)
    torch.manual_seed(0)
    module = create_impl(key, scenario.spec).to(dtype)
    x, routing = scenario.inputs(dtype)
    return module, x, routing


@pytest.mark.parametrize("key", CONDCONV_KEYS)
@pytest.mark.parametrize("training", [False, True], ids=["forward", "backward"])
def test_matches_oracle_float32(key: str, scenario: Scenario, training: bool) -> None:
    if key == "compiled" and scenario.name not in COMPILED_SCENARIOS:
        pytest.skip("compiled: checked on one scenario per layer kind (COMPILED_SCENARIOS)")
    module, x, routing = build(key, scenario)
    grad_output = None
    if training:
        out_shape = compute_reference(module, x, routing).tensors["output"].shape
        grad_output = torch.randn(out_shape, generator=torch.Generator().manual_seed(1))
    report = check_equivalence(module, x, routing, grad_output)
    names = {c.name for c in report.comparisons}
    if training:
        assert {"grad_input", "grad_weight"} <= names
        assert ("grad_routing_weights" in names) == scenario.routing_given
    assert report.passed, [c for c in report.comparisons if c.rel_error > report.tolerance]
    assert report.max_rel_error < RELATIVE_TOLERANCE[torch.float32]


@pytest.mark.parametrize("key", CONDCONV_KEYS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["k3_bias_odd", "dw5_stride2", "linear"])
def test_matches_oracle_low_precision(key: str, dtype: torch.dtype, name: str) -> None:
    scenario = next(s for s in SCENARIOS if s.name == name)
    module, x, routing = build(key, scenario, dtype)
    report = check_equivalence(module, x, routing)
    assert report.passed, report


@pytest.mark.parametrize("key", CONDCONV_KEYS)
def test_one_state_dict_loads_everywhere(key: str) -> None:
    scenario = next(s for s in SCENARIOS if s.name == "k3_bias_odd")
    reason = get_impl(key).unsupported_reason(scenario.spec, torch.device("cpu"), torch.float32)
    if reason:
        pytest.skip(reason)  # e.g. compiled without a C++ compiler for inductor
    torch.manual_seed(3)
    source = create_impl("naive_moe", scenario.spec)
    target = create_impl(key, scenario.spec)
    target.load_state_dict(source.state_dict())
    x, _ = scenario.inputs()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-4, atol=1e-5)


def test_oracle_catches_a_wrong_expert_order() -> None:
    """The check must fail for a plausible bug, or it proves nothing."""
    scenario = next(s for s in SCENARIOS if s.name == "k3_bias_odd")
    module, x, routing = build("grouped_conv", scenario)
    with torch.no_grad():
        reference = compute_reference(module, x, routing)
        module.weight.copy_(module.weight.flip(0))
    report = check_equivalence(module, x, routing, reference=reference)
    assert not report.passed
    assert report.max_rel_error > 1e-2


def test_oracle_reports_nonfinite_outputs() -> None:
    scenario = next(s for s in SCENARIOS if s.name == "pointwise")
    module, x, routing = build("batched_matmul", scenario)
    reference = compute_reference(module, x, routing)
    with torch.no_grad():
        module.weight[0, 0, 0, 0, 0] = float("nan")
    report = check_equivalence(module, x, routing, reference=reference)
    assert report.has_nonfinite and not report.passed


def test_routing_given_from_outside_is_used() -> None:
    scenario = next(s for s in SCENARIOS if s.name == "k3_routing_given")
    module, x, routing = build("per_sample_loop", scenario)
    with torch.no_grad():
        given = module(x, routing)
        computed = module(x)
        scaled = module(x, routing * 2)
    assert not torch.allclose(given, computed)
    torch.testing.assert_close(scaled, given * 2, rtol=1e-5, atol=1e-5)


def test_softmax_routing_sums_to_one_and_sharpens_with_low_temperature() -> None:
    scenario = next(s for s in SCENARIOS if s.name == "softmax_routing")
    module, x, _ = build("grouped_conv", scenario)
    warm = module.compute_routing(x)
    module.temperature = 0.01
    cold = module.compute_routing(x)
    torch.testing.assert_close(warm.sum(1), torch.ones(x.shape[0]))
    assert cold.max(1).values.min() > warm.max(1).values.max()


def test_static_floor_ignores_routing_and_is_excluded() -> None:
    assert "static" not in CONDCONV_KEYS
    scenario = next(s for s in SCENARIOS if s.name == "pointwise")
    module, x, _ = build("static", scenario)
    out = module(x)
    expected = torch.nn.functional.conv2d(x, module.weight[0])
    torch.testing.assert_close(out, expected)
