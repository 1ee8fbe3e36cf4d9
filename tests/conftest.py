"""Shared fixtures: small layer scenarios that cover the shapes CondConv meets in real networks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from condconv_bench import LayerSpec
from condconv_bench.core import registry
from condconv_bench.dispatch import cache, switch


@dataclass(frozen=True)
class Scenario:
    """A layer, an input and the options that change how an implementation must handle it."""

    name: str
    spec: LayerSpec
    input_size: tuple[int, int] = (1, 1)
    batch_size: int = 2
    routing_given: bool = False
    channels_last: bool = False

    def inputs(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.spec.input_shape(self.batch_size, self.input_size), generator=generator)
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last)
        routing = None
        if self.routing_given:
            routing = torch.rand(self.batch_size, self.spec.num_experts, generator=generator) + 0.05
        return x.to(dtype), None if routing is None else routing.to(dtype)


def conv(cin: int, cout: int, **kwargs) -> LayerSpec:
    kwargs.setdefault("num_experts", 4)
    return LayerSpec("conv2d", cin, cout, **kwargs)


SCENARIOS = [
    Scenario("pointwise", conv(8, 16), (7, 7), batch_size=3),
    Scenario("pointwise_b1", conv(8, 16, bias=True), (7, 7), batch_size=1),
    Scenario("pointwise_stride2", conv(8, 8, stride=2), (9, 9)),
    Scenario("k3_bias_odd", conv(8, 12, kernel_size=3, padding=1, bias=True), (9, 7), batch_size=3),
    Scenario("k3_routing_given", conv(8, 12, kernel_size=3, padding=1), (6, 6), routing_given=True),
    Scenario("dw5_stride2", conv(12, 12, kernel_size=5, stride=2, padding=2, groups=12), (11, 11)),
    Scenario("dw5_stride2_b1_bias", conv(12, 12, kernel_size=5, stride=2, padding=2, groups=12, bias=True), (11, 11), batch_size=1),
    Scenario("dilated", conv(6, 8, kernel_size=3, padding=2, dilation=2), (10, 10)),
    Scenario("grouped", conv(8, 12, kernel_size=3, padding=1, groups=4), (6, 5), batch_size=3),
    Scenario("softmax_routing", conv(8, 8, kernel_size=3, padding=1, routing="softmax", temperature=30.0), (5, 5)),
    Scenario("channels_last", conv(8, 16, kernel_size=3, padding=1, bias=True), (6, 6), channels_last=True),
    Scenario("channels_last_pointwise", conv(8, 16), (6, 6), batch_size=3, channels_last=True),
    Scenario("linear", LayerSpec("linear", 32, 10, num_experts=4, bias=True), batch_size=3),
    Scenario("linear_b1_softmax", LayerSpec("linear", 32, 10, num_experts=8, routing="softmax"), batch_size=1),
    Scenario("linear_routing_given", LayerSpec("linear", 16, 24, num_experts=4), routing_given=True),
]


@pytest.fixture(params=SCENARIOS, ids=lambda s: s.name)
def scenario(request) -> Scenario:
    return request.param


@pytest.fixture
def isolated_registry(monkeypatch) -> dict:
    """A registry copy a test may change (the returned dict) without leaking keys into other tests."""
    registry._load_sources()
    copy = dict(registry._registry)
    monkeypatch.setattr(registry, "_registry", copy)
    return copy


@pytest.fixture(autouse=True)
def private_autotune(tmp_path, monkeypatch) -> None:
    """Every test autotunes into its own cache file (never the user's), with a short budget: the
    oracle tests check what `autotune` computes, not how well it chooses."""
    monkeypatch.setenv(cache.CACHE_VARIABLE, str(tmp_path / "autotune-cache.json"))
    monkeypatch.delenv(switch.AUTOTUNE_VARIABLE, raising=False)
    monkeypatch.setattr(switch, "_switch", {"enabled": False, "budget_s": 0.05, "compiled": False})


@pytest.fixture(scope="session", autouse=True)
def fixed_ceilings():
    """Runs measure memory bandwidth and the dense and depthwise peaks in several seconds a pass; tests
    that do not read them get fixed figures (the test suite runs dozens of suites, module fixtures
    too, so this holds from the session's start). Yields the measuring functions it replaced, which
    `real_ceilings` restores."""
    from condconv_bench.machine import ceilings

    fixed = {"memory_bandwidths": lambda device, threads: {"dram_bytes_per_s": 3e10, "llc_bytes_per_s": 1.5e11, "llc_bytes": 32 * 2**20},
             "depthwise_peak_flops": lambda device, dtype, threads: 3e10,
             "dense_peak_flops": lambda device, dtype, threads: 1e11,
             "sentinel_work": lambda kind, device: 1.0}  # no sentinel's rate raises the fixed figures
    measuring = {name: getattr(ceilings, name) for name in fixed}
    with pytest.MonkeyPatch.context() as patch:
        for name, replacement in fixed.items():
            patch.setattr(ceilings, name, replacement)
        yield measuring


@pytest.fixture(autouse=True)
def measured_ceilings_where_marked(request, fixed_ceilings, monkeypatch) -> None:
    """A test marked `real_ceilings` measures the machine's ceilings."""
    if request.node.get_closest_marker("real_ceilings"):
        from condconv_bench.machine import ceilings

        for name, measuring in fixed_ceilings.items():
            monkeypatch.setattr(ceilings, name, measuring)


def _cpp_compiler_missing() -> str | None:
    """Why inductor cannot compile for the CPU here (no C++ compiler), or None."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # inductor raises its own, non-public types
        return f"torch.compile needs a C++ compiler for CPU: {str(exc).splitlines()[0]}"
    return None


# torch.compile tests on a machine without a C++ compiler say why they did not run.
CPP_COMPILER_MISSING = _cpp_compiler_missing()
needs_cpp_compiler = pytest.mark.skipif(CPP_COMPILER_MISSING is not None, reason=CPP_COMPILER_MISSING or "")
