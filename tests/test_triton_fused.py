"""The Triton strategy against the float64 oracle, on a GPU where there is one and otherwise on the
CPU through Triton's interpreter (`TRITON_INTERPRET=1`), which runs the same kernels with NumPy.

The registry-parametrised tests (test_oracle, test_contexts) see `triton_fused` only where CUDA
is present; these run it everywhere Triton is installed: every shared scenario forward and
backward, shapes that span several tiles with tails in each, strided, channels_last and
non-contiguous inputs, bias, bfloat16 and float16, and its refusals. And each kernel is compiled
for a Hopper GPU by Triton's compiler, which needs no GPU, so what only the GPU compiler rejects
fails here too.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from condconv_bench import LayerSpec, convert, create_impl, get_impl, list_impls
from condconv_bench.core.equivalence import RELATIVE_TOLERANCE, check_equivalence
from condconv_bench.core.flops import count_flops
from condconv_bench.errors import ImplUnavailableError

from conftest import SCENARIOS, Scenario
from tiny_models import TinyCondConvNet

pytest.importorskip("triton", reason="Triton is an optional extra (pip install -e '.[triton]'; the dev extra includes it)")

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True, scope="module")
def triton_runs_here():
    """On a machine without a GPU, the interpreter, for this module only (the kernels are first
    imported here, so they are imported interpreted)."""
    with pytest.MonkeyPatch.context() as patch:
        if not ON_GPU:
            patch.setenv("TRITON_INTERPRET", "1")
        yield


def layer(spec: LayerSpec, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_impl("triton_fused", spec).to(DEVICE, dtype)


def check(module: torch.nn.Module, x: torch.Tensor, routing: torch.Tensor | None = None, backward: bool = True):
    """The float64 oracle's verdict on forward (and backward, with a fixed output gradient)."""
    x = x.to(DEVICE)
    routing = None if routing is None else routing.to(DEVICE)
    grad_output = None
    if backward:
        with torch.no_grad():
            shape = module(x, routing).shape
        grad_output = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, x.dtype)
    return check_equivalence(module, x, routing, grad_output)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_matches_the_float64_oracle_forward_and_backward(scenario: Scenario) -> None:
    x, routing = scenario.inputs()
    report = check(layer(scenario.spec), x, routing)
    names = {c.name for c in report.comparisons}
    assert {"output", "grad_input", "grad_weight"} <= names
    assert ("grad_bias" in names) == scenario.spec.bias
    assert ("grad_routing_weights" in names) == scenario.routing_given
    assert report.passed and report.max_rel_error < RELATIVE_TOLERANCE[torch.float32], report


def _strided(shape: tuple[int, ...]) -> torch.Tensor:
    """Neither NCHW- nor channels_last-contiguous (every other channel, one row dropped), made on
    the device: a copy to it would be contiguous again."""
    x = torch.randn(shape[0], shape[1] * 2, shape[2] + 1, shape[3], device=DEVICE)[:, ::2, 1:, :]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    return x


# Past one tile in every dimension (tiles are 16-64 wide) with tails: 81 pixels, 72-160 channels,
# groups with several channel tiles each, and height and width that differ in every setting.
LARGE = [
    pytest.param(LayerSpec("conv2d", 72, 80, 3), (2, 72, 9, 9), id="pointwise_72_80"),
    pytest.param(LayerSpec("conv2d", 40, 40, 3, kernel_size=3, stride=2, padding=1, groups=40, bias=True), (2, 40, 10, 10), id="depthwise_s2"),
    pytest.param(LayerSpec("conv2d", 36, 40, 3, kernel_size=3, padding=1, groups=2, bias=True), (2, 36, 9, 9), id="grouped_k3"),
    pytest.param(LayerSpec("conv2d", 4, 160, 3, kernel_size=3, padding=1, groups=2), (2, 4, 5, 5), id="grouped_wide_out"),
    pytest.param(LayerSpec("conv2d", 160, 8, 3, groups=2, bias=True), (2, 160, 5, 5), id="grouped_wide_in"),
    pytest.param(LayerSpec("conv2d", 9, 130, 3, kernel_size=3, stride=2, padding=2, dilation=2), (3, 9, 8, 7), id="k3_dilated_s2"),
    pytest.param(LayerSpec("conv2d", 6, 10, 3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=True),
                 (2, 6, 9, 7), id="unequal_h_w"),
]


@pytest.mark.parametrize("layout", ["strided", "channels_last"])
@pytest.mark.parametrize(("spec", "shape"), LARGE)
def test_several_tiles_with_tails_and_any_input_layout(spec: LayerSpec, shape: tuple[int, ...], layout: str) -> None:
    x = _strided(shape) if layout == "strided" else torch.randn(shape, device=DEVICE).contiguous(memory_format=torch.channels_last)
    report = check(layer(spec), x)
    assert report.passed and report.max_rel_error < RELATIVE_TOLERANCE[torch.float32], report


def test_a_linear_layer_over_several_example_tiles() -> None:
    report = check(layer(LayerSpec("linear", 70, 130, 3, bias=True)), torch.randn(70, 70))  # tiles hold 64 examples
    assert report.passed, report


def test_outputs_keep_the_inputs_memory_format() -> None:
    x = torch.randn(2, 8, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = layer(LayerSpec("conv2d", 8, 16, 4, kernel_size=3, padding=1))(x)
    assert out.is_contiguous(memory_format=torch.channels_last)


# Every kernel in bfloat16 (whose products the interpreter needs widened); float16 where a kernel
# multiplies with tl.dot in it (the depthwise kernels multiply in float32 whatever the dtype).
@pytest.mark.parametrize(("dtype", "name"), [
    *((torch.bfloat16, name) for name in ("k3_bias_odd", "dw5_stride2", "channels_last_pointwise", "linear")),
    *((torch.float16, name) for name in ("k3_bias_odd", "linear")),
], ids=lambda value: {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(value, value))
def test_low_precision_matches_the_oracle_forward_and_backward(dtype: torch.dtype, name: str) -> None:
    scenario = next(s for s in SCENARIOS if s.name == name)
    x, routing = scenario.inputs(dtype)
    report = check(layer(scenario.spec, dtype), x, routing)
    assert report.passed, report


def test_the_kernels_run_not_a_torch_composition(monkeypatch) -> None:
    """A planted error in the kernel's launcher must reach the output, or the oracle checked the
    fallback the tracers see instead."""
    from condconv_bench.impls.triton_fused import kernels

    real = kernels.conv
    monkeypatch.setattr(kernels, "conv", lambda *args, **kwargs: real(*args, **kwargs).mul_(1.01))
    scenario = next(s for s in SCENARIOS if s.name == "k3_bias_odd")
    x, _ = scenario.inputs()
    report = check(layer(scenario.spec), x, backward=False)
    assert not report.passed and report.max_rel_error > 5e-3


def test_what_it_refuses_is_declared_in_one_line_and_raised_by_a_call() -> None:
    spec = LayerSpec("conv2d", 8, 8, 3)
    reason = get_impl("triton_fused").unsupported_reason(spec, DEVICE, torch.float64)
    assert reason == "triton_fused has kernels for float32, bfloat16 and float16, not float64"
    with pytest.raises(ImplUnavailableError, match="not float64"):
        layer(spec, torch.float64)(torch.randn(2, 8, 5, 5, device=DEVICE, dtype=torch.float64))


def test_without_a_gpu_or_the_interpreter_it_is_unavailable_with_the_reason(monkeypatch) -> None:
    if not ON_GPU:
        monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = next(i for i in list_impls() if i.key == "triton_fused")
    assert not info.available and "needs a CUDA GPU (TRITON_INTERPRET=1 runs it on the CPU" in info.unavailable_reason
    reason = get_impl("triton_fused").unsupported_reason(LayerSpec("conv2d", 8, 8, 3), torch.device("cpu"), torch.float32)
    assert reason.startswith("triton_fused needs a CUDA GPU") and "\n" not in reason


@pytest.mark.parametrize(("found", "version", "fragment"), [(False, "3.9.0", "pip install -e '.[triton]'"),
                                                           (True, "3.2.0", "needs Triton ≥ 3.4, found 3.2.0")])
def test_without_a_recent_triton_it_is_unavailable_in_one_line(monkeypatch, found: bool, version: str, fragment: str) -> None:
    import triton

    from condconv_bench.impls import triton_fused

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: real(name, *args) if found or name != "triton" else None)
    monkeypatch.setattr(triton, "__version__", version)
    triton_fused._triton_refusal.cache_clear()  # the answer is kept for the process: here the process "changes"
    try:
        reason = get_impl("triton_fused").unavailable_reason()
    finally:
        triton_fused._triton_refusal.cache_clear()
    assert fragment in reason and "\n" not in reason


def test_traffic_writes_no_kernels_and_the_flop_counters_agree_with_its_count() -> None:
    strategy = get_impl("triton_fused")
    spec = LayerSpec("conv2d", 192, 1152, 8, kernel_size=3, padding=1)
    traffic = strategy.analytic_bytes(spec, 8, (7, 7), 2)
    assert traffic.kernels == traffic.columns == 0 and traffic.moved == traffic.compulsory
    assert not strategy.materialises_kernels
    for small, shape in ((LayerSpec("conv2d", 8, 16, 4, kernel_size=3, padding=1, bias=True), (2, 8, 5, 5)),
                         (LayerSpec("linear", 16, 12, 4, bias=True), (3, 16))):
        module = layer(small).cpu()  # the counters trace the composition, on any device
        counts = count_flops(module, torch.randn(shape), None, module.cost(shape[0], shape[2:] if len(shape) == 4 else (1, 1)))
        assert counts.agree, counts.problems


def test_convert_runs_a_model_on_it_and_it_agrees_with_the_original() -> None:
    from condconv_bench.machine.devices import use_exact_float32

    use_exact_float32(DEVICE)  # the original's cuDNN convolutions would otherwise use TF32 on a GPU
    torch.manual_seed(0)
    model = TinyCondConvNet().eval().to(DEVICE)
    x = torch.randn(3, 3, 16, 16, device=DEVICE)
    converted, replaced = convert(model, "triton_fused", copy=True)
    assert {r.strategy for r in replaced} == {"triton_fused"} and len(replaced) == 2
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)


# Each kernel with the constexpr switches and dtypes it is launched with, compiled to a GPU's
# machine code by Triton's own compiler (ptxas ships in its wheel): no GPU is needed to find a
# kernel that the interpreter runs but the compiler rejects.
COMPILED = [
    *(("_implicit_gemm", dtype, {"TRANSPOSED": transposed, "HAS_BIAS": not transposed, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32})
      for dtype in ("fp32", "bf16", "fp16") for transposed in (False, True)),
    *(("_implicit_gemm_weight_grad", dtype, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}) for dtype in ("fp32", "bf16", "fp16")),
    *(("_depthwise", dtype, {"TRANSPOSED": transposed, "HAS_BIAS": not transposed, "BLOCK_M": 64, "BLOCK_C": 32})
      for dtype in ("fp32", "bf16") for transposed in (False, True)),
    ("_depthwise_weight_grad", "fp32", {"BLOCK_M": 64, "BLOCK_C": 32}),
    *(("_linear", dtype, {"HAS_BIAS": True, "BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_K": 32}) for dtype in ("fp32", "bf16", "fp16")),
]


@pytest.fixture(scope="module")
def compilable_kernels(triton_runs_here):
    """The kernels module loaded afresh, for the GPU: this module's copy is the interpreter's."""
    from condconv_bench.impls.triton_fused import kernels

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        spec = importlib.util.spec_from_file_location("triton_fused_kernels_for_the_gpu", kernels.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("kernel", "dtype", "constexprs"), COMPILED, ids=[f"{k}-{d}-{i}" for i, (k, d, _) in enumerate(COMPILED)])
def test_the_kernels_compile_for_a_hopper_gpu(compilable_kernels, kernel: str, dtype: str, constexprs: dict) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = getattr(compilable_kernels, kernel)
    constexprs = {**constexprs, "WIDEN": False} if "WIDEN" in fn.arg_names else constexprs
    pointers = {"src", "experts", "alpha", "bias", "dst", "grad", "x", "out"}
    signature = {p.name: "constexpr" if p.is_constexpr else "*fp32" if p.name == "per_example" else f"*{dtype}" if p.name in pointers else "i32"
                 for p in fn.params}
    binary = compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                     options={"enable_fp_fusion": True})
    assert binary.asm["cubin"]
    if dtype == "fp32":  # IEEE products, as the float32 oracle needs: no TF32 instruction anywhere
        assert "tf32" not in binary.asm["ptx"]
