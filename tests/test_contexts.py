"""Every context a drop-in layer meets, for every dispatchable strategy and both selectors.

Parametrised over the registry, so a new strategy is checked with no new test. Each context
compares the layer's output with the float64 oracle computed from the layer's parameters as they
are at that moment, so a cached layout or workspace that went stale fails here. Training with
backward and reduced precision are checked for every implementation in `test_oracle.py`.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from condconv_bench.dispatch.dispatching_layers import SELECTORS
from condconv_bench.core.equivalence import RELATIVE_TOLERANCE, compare, compute_reference
from condconv_bench.core.registry import create_impl, dispatchable_impls, get_impl
from condconv_bench.core.spec import LayerSpec

KEYS = [*dispatchable_impls(), *SELECTORS]
CONV = LayerSpec("conv2d", 6, 8, 3, kernel_size=3, stride=2, padding=1, dilation=1, groups=2, bias=True)
LINEAR = LayerSpec("linear", 10, 7, 3, bias=True)
SPECS = {"conv": CONV, "linear": LINEAR}


def inputs(spec: LayerSpec, batch_size: int = 3) -> torch.Tensor:
    return torch.randn(spec.input_shape(batch_size, (7, 6)) if spec.kind == "conv2d" else (batch_size, spec.in_channels),
                       generator=torch.Generator().manual_seed(1))


def built(key: str, spec: LayerSpec) -> torch.nn.Module:
    reason = get_impl(key).unsupported_reason(spec, torch.device("cpu"), torch.float32)
    if reason is not None:  # declared, so suites and `auto` skip it too (fused: groups 1 or depthwise only)
        pytest.skip(reason)
    torch.manual_seed(0)
    return create_impl(key, spec)


def assert_matches_oracle(layer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    expected = compute_reference(layer, x).tensors["output"]
    comparison = compare("output", out, expected)
    assert comparison.rel_error <= RELATIVE_TOLERANCE[x.dtype], comparison


@pytest.fixture(params=KEYS)
def key(request) -> str:
    return request.param


@pytest.fixture(params=list(SPECS), ids=list(SPECS))
def spec(request) -> LayerSpec:
    return SPECS[request.param]


def test_built_and_called_under_inference_mode_and_updated_in_place_there(key, spec) -> None:
    x = inputs(spec)
    with torch.inference_mode():
        layer = built(key, spec).eval()
        assert_matches_oracle(layer, x, layer(x))
        layer.weight.mul_(-0.5)  # weights made in inference mode have no version counter to tell a layout stale
        assert_matches_oracle(layer, x, layer(x))


def test_in_place_updates_and_loaded_weights_between_calls_are_seen(key, spec) -> None:
    layer = built(key, spec).eval()
    x = inputs(spec)
    with torch.no_grad():
        layer(x)
        layer.weight.add_(torch.randn_like(layer.weight))
        assert_matches_oracle(layer, x, layer(x))
        layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
        assert_matches_oracle(layer, x, layer(x))


def test_meta_device_init_then_to_empty_and_load_state_dict(key, spec) -> None:
    state = built(key, spec).state_dict()
    with torch.device("meta"):
        layer = built(key, spec)
    layer.to_empty(device="cpu").load_state_dict(state)
    x = inputs(spec)
    with torch.no_grad():
        assert_matches_oracle(layer.eval(), x, layer(x))


def test_deepcopy_and_pickle_after_calls(key, spec) -> None:
    layer = built(key, spec).eval()
    x = inputs(spec)
    with torch.no_grad():
        layer(x)
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert_matches_oracle(twin, x, twin(x))
            twin.weight.mul_(2.0)  # the copy's caches are its own
            assert_matches_oracle(twin, x, twin(x))
        assert_matches_oracle(layer, x, layer(x))


def test_channels_last_input(key) -> None:
    layer = built(key, CONV).eval()
    x = inputs(CONV).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_matches_oracle(layer, x, layer(x))


def test_torch_export(key, spec) -> None:
    layer = built(key, spec).eval()
    x = inputs(spec)
    exported = torch.export.export(layer, (x,))
    with torch.no_grad():
        assert_matches_oracle(layer, x, exported.module()(x))


@pytest.mark.slow
def test_torch_compile_without_dynamic_shapes(key) -> None:
    import torch._dynamo

    torch._dynamo.reset()  # each strategy's graph from scratch, not a recompile of the last test's
    layer = built(key, CONV).eval()
    x = inputs(CONV)
    compiled = torch.compile(layer, dynamic=False, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_matches_oracle(layer, x, compiled(x))
