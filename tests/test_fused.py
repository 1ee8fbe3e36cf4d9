"""The fused strategy's native paths against a float64 reference, its refusals, and its build.

The parametrised registry tests (test_oracle, test_contexts) check fused on the shared scenarios;
these cover what only its native code has: each path (1×1 channels-last and NCHW, linear,
depthwise, unfolded k×k), odd sizes that leave tails in its 64-channel blocks and 6-row stripes,
non-contiguous inputs, and the gradients its backward computes without mixed kernels. The
kernel is compiled once per machine and cached, so only the first session on a machine pays it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from condconv_bench import LayerSpec, create_impl, get_impl, list_impls
from condconv_bench.errors import ImplUnavailableError
from condconv_bench.machine import native_build

if get_impl("fused").unavailable_reason() is not None:
    pytest.skip(f"fused is unavailable here: {get_impl('fused').unavailable_reason()}", allow_module_level=True)


def reference(layer, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per example: the kernel mixed in float64, then F.conv2d / F.linear."""
    spec = layer.spec
    w, a = layer.weight.double(), alpha.double()
    bias = None if layer.bias is None else layer.bias.double()
    outs = []
    for b in range(x.shape[0]):
        kernel = (a[b] @ w.reshape(spec.num_experts, -1)).view(spec.expert_shape)
        mixed_bias = None if bias is None else a[b] @ bias
        xb = x[b : b + 1].double()
        outs.append(F.linear(xb, kernel, mixed_bias) if spec.kind == "linear" else F.conv2d(xb, kernel, mixed_bias, **spec.conv_kwargs()))
    return torch.cat(outs)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def make_x(shape: tuple[int, ...], layout: str) -> torch.Tensor:
    if layout == "noncontig":  # a strided slice: neither NCHW- nor channels_last-contiguous
        return torch.randn(shape[0], shape[1] * 2, shape[2] + 1, shape[3])[:, ::2, 1:, :]
    x = torch.randn(shape)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def layer_and_alpha(spec: LayerSpec, batch: int):
    torch.manual_seed(0)
    layer = create_impl("fused", spec)
    return layer, torch.rand(batch, spec.num_experts) * 0.5 + 0.05


def check_forward(spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    layer, alpha = layer_and_alpha(spec, x.shape[0])
    with torch.no_grad():
        out = layer(x, alpha)
    expected = reference(layer, x, alpha)
    assert out.shape == expected.shape and rel_err(out, expected) < 1e-5
    return out


# C_in 520 takes three K-chunks (the last with a tail past whole 32-float runs; in NCHW because
# batch 5 is two groups of examples, 8 experts at 7x7 are worth it and a chunk's 442 KB fit a 512 KB L2); C_out 70 and 130 leave column tails;
# batch 5 is a group of 4 examples and one more; 7x7 and 9x9 leave one pixel past whole vectors
# (NCHW computes it as dot products), 14x14 four; 4 examples of 168 channels at 14x14 are more
# than 512 KB of input, which NCHW takes in its wider row blocks.
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize(("cin", "cout", "hw", "batch", "bias"), [(7, 13, 5, 1, True), (64, 70, 3, 5, False),
                                                                  (520, 67, 7, 5, True), (3, 130, 9, 3, False),
                                                                  (56, 50, 7, 3, True), (37, 20, 14, 2, False),
                                                                  (168, 70, 14, 4, True), (16, 70, 7, 2, True)])
def test_pointwise_forward(layout, cin, cout, hw, batch, bias) -> None:
    out = check_forward(LayerSpec("conv2d", cin, cout, 8, bias=bias), make_x((batch, cin, hw, hw), layout))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


# One and two examples take whole 64-column blocks in one and two passes over K (70 and 129 outputs:
# whole blocks and a tail); a channels-last 7x7 image leaves one pixel row past stripes of 6 the same way;
# 7 examples are a stripe of 6, whose first chunk of a whole block also prefetches the block's rows, and one.
@pytest.mark.parametrize(("cin", "cout", "batch", "bias"), [(7, 13, 1, True), (200, 33, 7, False), (600, 130, 3, True),
                                                           (130, 70, 1, False), (64, 129, 2, True), (96, 70, 7, True)])
def test_linear_forward(cin, cout, batch, bias) -> None:
    check_forward(LayerSpec("linear", cin, cout, 3, bias=bias), torch.randn(batch, cin))


# C, H, W, k, stride, padding, dilation: k 3 and 5 at stride 1 and 2 (and 3), rows of 7 and 14
# pixels (blocks of 7), of 11 and 9 (blocks of 8 whose last runs into the next row, and past the last
# row), of 3 and 5 (blocks of 4), dilated, padding beyond the taps' reach, channel tails past an
# 8- and a 16-channel vector and a 64-channel block.
DEPTHWISE = [(7, 5, 5, 3, 1, 1, 1), (13, 5, 6, 5, 2, 2, 1), (70, 9, 7, 5, 1, 2, 1), (33, 8, 8, 3, 2, 1, 2),
             (5, 6, 3, 3, 1, 3, 1), (20, 10, 11, 3, 1, 1, 1), (40, 9, 19, 3, 2, 1, 1), (17, 14, 14, 5, 1, 2, 1),
             (24, 11, 26, 3, 3, 1, 1)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: "C{}_{}x{}_k{}_s{}_p{}_d{}".format(*c))
def test_depthwise_forward(layout, case) -> None:
    c, h, w, k, s, p, d = case
    spec = LayerSpec("conv2d", c, c, 3, kernel_size=k, stride=s, padding=p, dilation=d, groups=c, bias=c % 2 == 1)
    out = check_forward(spec, make_x((3, c, h, w), layout))
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def test_depthwise_forward_mixes_the_examples_of_a_block_in_groups() -> None:
    """Batch 9 over the threads: a share mixes a group of 4 examples of a block, then the rest, and
    shares start and end inside an example's channel blocks (70 channels: a block and a tail)."""
    spec = LayerSpec("conv2d", 70, 70, 3, kernel_size=5, padding=2, groups=70, bias=True)
    check_forward(spec, make_x((9, 70, 7, 7), "nchw"))
    check_forward(spec, make_x((9, 70, 7, 7), "channels_last"))


# cin, cout, hw, k, stride, padding, dilation: k×k, strided, a strided 1×1, a padded 1×1, dilated.
KXK = [(7, 13, 5, 3, 1, 1, 1), (6, 9, 8, 3, 2, 0, 1), (5, 70, 7, 1, 2, 0, 1), (5, 8, 4, 1, 1, 1, 1), (4, 6, 9, 3, 1, 2, 2)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", KXK, ids=lambda c: "{}to{}_{}_k{}_s{}_p{}_d{}".format(*c))
def test_kxk_forward(layout, case) -> None:
    cin, cout, hw, k, s, p, d = case
    spec = LayerSpec("conv2d", cin, cout, 3, kernel_size=k, stride=s, padding=p, dilation=d, bias=True)
    check_forward(spec, make_x((2, cin, hw, hw), layout))


def check_backward(spec: LayerSpec, x: torch.Tensor) -> None:
    """Gradients of x, the experts, their bias and routing weights given from outside."""
    layer, alpha = layer_and_alpha(spec, x.shape[0])
    x = x.detach().requires_grad_()
    alpha = alpha.requires_grad_()
    out = layer(x, alpha)
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = {name: t.detach().double().requires_grad_() for name, t in
              (("x", x), ("weight", layer.weight), ("bias", layer.bias), ("alpha", alpha)) if t is not None}
    batch = x.shape[0]
    kernels = (leaves["alpha"] @ leaves["weight"].reshape(spec.num_experts, -1)).view(batch, *spec.expert_shape)
    outs = []
    for b in range(batch):
        mixed_bias = leaves["alpha"][b] @ leaves["bias"] if "bias" in leaves else None
        xb = leaves["x"][b : b + 1]
        outs.append(F.linear(xb, kernels[b], mixed_bias) if spec.kind == "linear" else F.conv2d(xb, kernels[b], mixed_bias, **spec.conv_kwargs()))
    torch.cat(outs).backward(grad.double())
    actual = {"x": x.grad, "weight": layer.weight.grad, "bias": None if layer.bias is None else layer.bias.grad, "alpha": alpha.grad}
    for name, leaf in leaves.items():
        assert actual[name] is not None, name
        assert rel_err(actual[name], leaf.grad) < 1e-5, name


@pytest.mark.parametrize(("spec", "shape", "layout"), [
    (LayerSpec("conv2d", 7, 13, 3, bias=True), (3, 7, 5, 5), "channels_last"),
    (LayerSpec("conv2d", 7, 13, 3), (1, 7, 5, 5), "nchw"),
    # NCHW grad_x mixes the experts transposed: 50 input channels are a 48-row block and a tail
    (LayerSpec("conv2d", 50, 70, 3, bias=True), (2, 50, 5, 5), "nchw"),
    # ... and 300 output channels are two K chunks of that product at batch 5
    (LayerSpec("conv2d", 20, 300, 3), (5, 20, 3, 3), "nchw"),
    (LayerSpec("linear", 7, 13, 3, bias=True), (3, 7), "nchw"),
    (LayerSpec("conv2d", 7, 7, 3, kernel_size=3, stride=2, padding=1, groups=7, bias=True), (2, 7, 6, 6), "channels_last"),
    (LayerSpec("conv2d", 7, 5, 3, kernel_size=3, padding=1, bias=True), (2, 7, 6, 6), "nchw"),
    # stride 1: grad_x is the native kernel on the flipped taps (the next two: an unpadded layer,
    # where the transposed padding is d·(k−1)−p, and an over-padded one, which takes the scatter)
    (LayerSpec("conv2d", 20, 20, 3, kernel_size=5, padding=2, groups=20, bias=True), (3, 20, 7, 6), "channels_last"),
    (LayerSpec("conv2d", 70, 70, 4, kernel_size=3, padding=2, dilation=2, groups=70), (2, 70, 9, 9), "nchw"),
    (LayerSpec("conv2d", 9, 9, 2, kernel_size=3, groups=9), (2, 9, 6, 5), "channels_last"),
    (LayerSpec("conv2d", 9, 9, 2, kernel_size=3, padding=3, groups=9), (2, 9, 6, 5), "nchw"),
    # other strides and paddings: grad_x is the native scatter through the mixed taps (3×3 and 5×5
    # in registers, other sizes in memory; 70 channels leave a tail in the 64-channel blocks)
    (LayerSpec("conv2d", 70, 70, 3, kernel_size=5, stride=2, padding=2, groups=70, bias=True), (2, 70, 9, 9), "nchw"),
    (LayerSpec("conv2d", 18, 18, 2, kernel_size=7, stride=(2, 1), padding=(3, 1), dilation=(2, 1), groups=18), (2, 18, 11, 8),
     "channels_last"),
], ids=["pointwise_cl", "pointwise_b1", "pointwise_nchw_tails", "pointwise_nchw_chunked", "linear", "depthwise_s2", "k3", "depthwise_5x5_cl", "depthwise_dilated",
        "depthwise_unpadded", "depthwise_overpadded", "depthwise_5x5_s2_nchw", "depthwise_7x7_asymmetric"])
def test_backward_with_routing_weight_gradients(spec, shape, layout) -> None:
    check_backward(spec, make_x(shape, layout) if len(shape) == 4 else torch.randn(shape))


def test_a_cached_layout_sees_in_place_updates_and_inference_mode_weights() -> None:
    spec = LayerSpec("conv2d", 7, 13, 3)
    layer, alpha = layer_and_alpha(spec, 2)
    x = make_x((2, 7, 4, 4), "channels_last")
    with torch.no_grad():
        layer(x, alpha)
        layer.weight.mul_(-2)
        assert rel_err(layer(x, alpha), reference(layer, x, alpha)) < 1e-5
    with torch.inference_mode():
        made_there = create_impl("fused", spec)
        made_there(x, alpha)
        made_there.weight.mul_(3)  # no version counter: the layout is rebuilt every call
        assert rel_err(made_there(x, alpha), reference(made_there, x, alpha)) < 1e-5


BF16_REASON = get_impl("fused").unsupported_reason(LayerSpec("conv2d", 8, 8, 3), torch.device("cpu"), torch.bfloat16)
needs_bf16 = pytest.mark.skipif(BF16_REASON is not None, reason=BF16_REASON or "")


# bf16 products of bf16 inputs and a bf16 mixed kernel, summed in fp32, then rounded once: the
# error is a few bf16 roundings (2^-8 each), far below what a wrong tile or pair order gives (~1).
BF16_TOLERANCE = 2e-2


@needs_bf16
@pytest.mark.parametrize(("spec", "shape", "layout"), [
    (LayerSpec("conv2d", 600, 130, 8, bias=True), (5, 600, 7, 7), "channels_last"),  # 3 K chunks, column tail, 4+1 examples
    (LayerSpec("conv2d", 7, 13, 3), (1, 7, 5, 5), "channels_last"),  # odd K: padded to a whole pair
    (LayerSpec("conv2d", 64, 70, 4, bias=True), (3, 64, 3, 3), "nchw"),
    (LayerSpec("conv2d", 64, 70, 4), (2, 64, 4, 4), "noncontig"),
    (LayerSpec("linear", 1281, 130, 8, bias=True), (7, 1281), "nchw"),  # odd K, two 6-row stripes
    (LayerSpec("linear", 200, 33, 4), (1, 200), "nchw"),
    (LayerSpec("conv2d", 70, 70, 4, kernel_size=5, stride=2, padding=2, groups=70, bias=True), (2, 70, 9, 9), "channels_last"),
    (LayerSpec("conv2d", 8, 12, 3, kernel_size=3, padding=1), (3, 8, 7, 6), "nchw"),
], ids=["pointwise_cl", "pointwise_odd_k", "pointwise_nchw", "pointwise_noncontig", "linear", "linear_b1", "depthwise", "k3"])
def test_bfloat16_matches_the_float64_reference_in_the_input_layout(spec, shape, layout) -> None:
    layer, alpha = layer_and_alpha(spec, shape[0])
    x = make_x(shape, layout) if len(shape) == 4 else torch.randn(shape)
    layer = layer.to(torch.bfloat16)
    x, alpha = x.to(torch.bfloat16), alpha.to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x, alpha)
    expected = reference(layer, x, alpha)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last" and len(shape) == 4)
    assert rel_err(out, expected) < BF16_TOLERANCE


@needs_bf16
@pytest.mark.parametrize("spec", [LayerSpec("conv2d", 24, 40, 4, bias=True), LayerSpec("linear", 24, 40, 4, bias=True),
                                  LayerSpec("conv2d", 24, 24, 4, kernel_size=3, padding=1, groups=24, bias=True)],
                         ids=["pointwise", "linear", "depthwise"])
def test_bfloat16_gradients_match_the_float32_ones(spec) -> None:
    """The backward is torch ops and the forward kernels on the gradient: in bf16 it must give
    float32's gradients up to bf16's precision."""
    torch.manual_seed(0)
    shape = (3, 24, 6, 6) if spec.kind == "conv2d" else (3, 24)
    x32 = torch.randn(shape).contiguous(memory_format=torch.channels_last) if len(shape) == 4 else torch.randn(shape)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)
        layer = create_impl("fused", spec).to(dtype)
        x = x32.to(dtype).detach().requires_grad_()
        out = layer(x)
        out.backward(torch.ones_like(out))
        grads[dtype] = {"x": x.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}
    for name, expected in grads[torch.float32].items():
        assert grads[torch.bfloat16][name].dtype == torch.bfloat16
        assert rel_err(grads[torch.bfloat16][name], expected.double()) < 3e-2, name


def test_without_avx512_bf16_bfloat16_is_refused_with_the_reason(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    reason = get_impl("fused").unsupported_reason(LayerSpec("conv2d", 8, 8, 3), torch.device("cpu"), torch.bfloat16)
    assert reason is not None and "AVX512-BF16" in reason


@pytest.mark.parametrize(("spec", "dtype", "device", "fragment"), [
    (LayerSpec("conv2d", 8, 8, 3), torch.float16, "cpu", "no float16 kernel"),
    (LayerSpec("conv2d", 8, 8, 3), torch.float32, "cuda", "CPU-only"),
    (LayerSpec("conv2d", 8, 12, 3, kernel_size=3, groups=4), torch.float32, "cpu", "no kernel for grouped layers (groups=4)"),
    (LayerSpec("conv2d", 8, 16, 3, kernel_size=3, groups=8), torch.float32, "cpu", "only groups 1 and depthwise"),
])
def test_what_it_refuses_is_declared_in_one_line(spec, dtype, device, fragment) -> None:
    reason = get_impl("fused").unsupported_reason(spec, torch.device(device), dtype)
    assert reason is not None and fragment in reason and "\n" not in reason


def test_a_call_it_refuses_raises_the_declared_reason_and_convert_is_told_grouped_layers_are_unsuited() -> None:
    grouped = LayerSpec("conv2d", 8, 12, 3, kernel_size=3, groups=4)
    assert "grouped" in get_impl("fused").unsuited_reason(grouped)
    assert get_impl("fused").unsuited_reason(LayerSpec("conv2d", 8, 8, 3, kernel_size=3, groups=8)) is None
    with pytest.raises(ImplUnavailableError, match="grouped layers"):
        create_impl("fused", grouped)(torch.randn(2, 8, 5, 5))
    with pytest.raises(ImplUnavailableError, match="float32 and bfloat16 only"):
        create_impl("fused", LayerSpec("conv2d", 8, 8, 3)).double()(torch.randn(2, 8, 5, 5, dtype=torch.float64))


def test_traffic_reads_the_experts_once_and_writes_no_kernels() -> None:
    fused = get_impl("fused")
    spec = LayerSpec("conv2d", 192, 1152, 8)
    traffic = fused.analytic_bytes(spec, 8, (7, 7), 4)
    assert traffic.kernels == 0 and traffic.columns == 0 and traffic.moved == traffic.compulsory
    assert get_impl("batched_matmul").analytic_bytes(spec, 8, (7, 7), 4).moved > traffic.moved
    assert not fused.materialises_kernels and create_impl("fused", spec).kernel_bytes(8) == 0
    linear = LayerSpec("linear", 1280, 1000, 8)
    assert fused.analytic_macs(linear, 4, (1, 1)).conv == 8 * 4 * 1280 * 1000


def test_the_flop_counters_agree_with_its_analytic_count() -> None:
    from condconv_bench.core.flops import count_flops

    for spec, shape in ((LayerSpec("conv2d", 8, 16, 4, kernel_size=3, padding=1, bias=True), (2, 8, 5, 5)),
                        (LayerSpec("linear", 16, 12, 4, bias=True), (3, 16))):
        layer = create_impl("fused", spec)
        counts = count_flops(layer, torch.randn(shape), None, layer.cost(shape[0], shape[2:] if len(shape) == 4 else (1, 1)))
        assert counts.agree, counts.problems


def test_listed_with_how_it_was_built() -> None:
    create_impl("fused", LayerSpec("conv2d", 4, 4, 2))  # built or loaded by now
    info = next(i for i in list_impls() if i.key == "fused")
    assert info.available and "native, " in info.description and str(native_build.cache_root()) in info.description


def test_without_a_compiler_it_is_listed_unavailable_with_the_reason(monkeypatch) -> None:
    monkeypatch.setattr(native_build, "compiler", lambda: None)
    monkeypatch.setattr(native_build, "_loaded", {})  # a fresh process: a kernel already loaded runs without a compiler
    info = next(i for i in list_impls() if i.key == "fused")
    assert not info.available and "needs a C++ compiler" in info.unavailable_reason
    assert "static" in {i.key for i in list_impls(available_only=True)}  # listing still works
    assert "fused" not in {i.key for i in list_impls(available_only=True)}


def test_without_ninja_it_is_unavailable_and_a_first_build_raises_the_reason(monkeypatch, tmp_path) -> None:
    real_which = native_build.shutil.which
    monkeypatch.setattr(native_build.shutil, "which", lambda name: None if name == "ninja" else real_which(name))
    monkeypatch.setattr(native_build, "_loaded", {})  # as in a fresh process
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # and a machine that has built nothing
    assert "needs ninja" in get_impl("fused").unavailable_reason()
    with pytest.raises(ImplUnavailableError, match="needs ninja"):
        create_impl("fused", LayerSpec("conv2d", 4, 4, 2))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_torch_compile_calls_the_native_kernel_at_inference_and_the_composition_in_training(monkeypatch, layout) -> None:
    import torch._dynamo

    import condconv_bench.impls.fused as fused

    calls = []
    real = fused._forward
    monkeypatch.setattr(fused, "_forward", lambda *args: calls.append(args[0]) or real(*args))
    torch._dynamo.reset()
    spec = LayerSpec("conv2d", 16, 24, 4, bias=True)
    layer, alpha = layer_and_alpha(spec, 3)
    x = make_x((3, 16, 5, 5), layout)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        out = compiled(x, alpha)
    assert len(calls) == 1 and rel_err(out, reference(layer, x, alpha)) < 1e-5  # one native call, no composition
    assert out.stride() == layer(x, alpha).stride()
    calls.clear()
    x.requires_grad_(True)
    compiled(x, alpha).sum().backward()
    assert calls == [] and x.grad is not None  # training differentiates the composition
