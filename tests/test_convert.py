"""convert(): exact replacement of timm's and our CondConv layers, refusals, and the equivalence check that catches a bad copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condconv_bench import CondConv2d, CondConvBenchError, convert, get_impl
from condconv_bench.conversion.adapters import timm_condconv2d
from condconv_bench.core.equivalence import RELATIVE_TOLERANCE
from condconv_bench.errors import UnmappableLayerError
from condconv_bench.cases.models.sources import import_timm
from condconv_bench.layers.same_padding import SamePadCondConv2d

timm = import_timm()  # timm is part of the test install ([dev] pulls [models]); the stand-in where torchvision cannot load
from timm.layers import CondConv2d as TimmCondConv2d  # noqa: E402


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Block(nn.Module):
    """A block of timm CondConv layers sharing routing, as timm's CondConvResidual calls them."""

    def __init__(self, *layers: nn.Module, experts: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.routing = nn.Linear(layers[0].in_channels, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = torch.sigmoid(self.routing(x.mean(dim=(2, 3))))
        for layer in self.layers:
            x = F.silu(layer(x, routing))
        return x


UNUSUAL = {
    "bias_groups": lambda: TimmCondConv2d(8, 12, 3, padding=1, groups=4, bias=True, num_experts=3),
    "dilation": lambda: TimmCondConv2d(8, 8, 3, padding=2, dilation=2, num_experts=4),
    "same_stride2": lambda: TimmCondConv2d(8, 16, 3, stride=2, padding="same", bias=True, num_experts=4),
    "same_even_kernel": lambda: TimmCondConv2d(8, 8, 4, padding="same", groups=8, num_experts=2),
    "same_stride2_dilated": lambda: TimmCondConv2d(8, 8, 5, stride=2, padding="same", dilation=2, groups=2, num_experts=4),
}


@pytest.mark.parametrize("name", list(UNUSUAL))
@pytest.mark.parametrize("size", [(15, 16), (17, 13)])
def test_unusual_timm_layers_convert_exactly(name: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    layer = UNUSUAL[name]()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_()
    block = Block(layer, experts=layer.num_experts).eval()
    x = torch.randn(2, 8, *size)
    with torch.no_grad():
        expected = block(x)
        converted, replaced = convert(block, "batched_matmul", copy=True, elsewhere=None)
        actual = converted(x)
    assert [r.path for r in replaced] == ["layers.0"] and replaced[0].from_class == "timm.layers.cond_conv2d.CondConv2d"
    assert isinstance(converted.layers[0], SamePadCondConv2d) == layer.dynamic_padding
    assert actual.shape == expected.shape and relative_error(actual, expected) < 1e-5
    assert isinstance(block.layers[0], TimmCondConv2d), "copy=True must leave the model alone"


def test_tf_same_padding_is_asymmetric_at_stride_2() -> None:
    layer = SamePadCondConv2d(4, 4, 3, stride=2, num_experts=2)
    assert layer.padding_for((16, 15)) == (1, 1, 0, 1)  # (left, right, top, bottom): even sizes pad after only


@pytest.fixture(scope="module")
def efficientnet_cc() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("efficientnet_cc_b0_4e").eval()


def test_a_timm_model_converts_in_place_and_agrees(efficientnet_cc: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = efficientnet_cc(x)
    model, replaced = convert(efficientnet_cc, "per_sample_loop", copy=True)
    assert len(replaced) == 24 and {r.strategy for r in replaced} == {"per_sample_loop"}
    assert set(model.state_dict()) == set(efficientnet_cc.state_dict()), "timm's checkpoints must load into it"
    same = convert(model, "grouped_conv")
    assert same.model is model and len(same.replaced) == 24, "our own layers re-target in place"
    with torch.no_grad():
        assert relative_error(model(x), expected) < 1e-4


PLANTED = {
    "experts_swapped": lambda w: w.flip(0),
    "kernel_transposed": lambda w: w.transpose(-1, -2),
}


@pytest.mark.parametrize("plant", list(PLANTED))
def test_a_wrong_weight_copy_fails_the_equivalence_tolerance(efficientnet_cc: nn.Module, plant: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """What the runner's equivalence check relies on: a plausible adapter bug moves the output past the tolerance.

    At random initialisation every routing weight is close to sigmoid(0) = 0.5, so swapping experts
    changes a whole model's output by only ~10× the float32 tolerance: still caught, by less margin
    than a transposed kernel (the hand-built layers above use normal weights, where it is obvious).
    """
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = efficientnet_cc(x)
    original = timm_condconv2d.TimmCondConv2d.replacement

    def planted(self, module, spec, target):
        layer = original(self, module, spec, target)
        with torch.no_grad():
            layer.weight.copy_(PLANTED[plant](layer.weight).contiguous())
        return layer

    monkeypatch.setattr(timm_condconv2d.TimmCondConv2d, "replacement", planted)
    model, _ = convert(efficientnet_cc, "grouped_conv", copy=True)
    with torch.no_grad():
        assert relative_error(model(x), expected) > 3 * RELATIVE_TOLERANCE[torch.float32]


def test_an_unmappable_layer_is_refused_with_one_line_and_nothing_changes() -> None:
    class PaddedDifferently(TimmCondConv2d):
        def forward(self, x, routing_weights):
            return super().forward(F.pad(x, (1, 0, 1, 0)), routing_weights)

    block = Block(TimmCondConv2d(8, 8, 1, num_experts=2), PaddedDifferently(8, 8, 3, padding=1, num_experts=2), experts=2)
    with pytest.raises(UnmappableLayerError) as caught:
        convert(block, "grouped_conv")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("layers.1 (") and "overrides timm's CondConv2d.forward" in message
    assert isinstance(caught.value, CondConvBenchError)
    assert isinstance(block.layers[0], TimmCondConv2d), "a refused model is left as it was"


def test_the_static_floor_is_not_converted() -> None:
    from condconv_bench.core.spec import LayerSpec

    with pytest.raises(UnmappableLayerError, match="not a CondConv layer"):
        convert(nn.Sequential(get_impl("static")(LayerSpec("conv2d", 4, 4, 2))), "auto")


def test_own_layers_keep_their_routing_and_shared_modules_stay_shared() -> None:
    layer = CondConv2d(6, 6, 3, padding=1, num_experts=3, strategy="grouped_conv")
    model = nn.Sequential(layer, nn.SiLU(), layer)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        expected = model(x)
        converted, replaced = convert(model, "stacked_moe")
        assert len(replaced) == 1 and converted[0] is converted[2] and converted[0].strategy == "stacked_moe"
        assert relative_error(converted(x), expected) < 1e-5


def test_a_fixed_matmul_strategy_runs_only_where_it_is_an_algorithm_and_the_record_says_so(efficientnet_cc: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = efficientnet_cc(x)
    model, replaced = convert(efficientnet_cc, "pixel_major_matmul", copy=True, elsewhere="grouped_conv")
    depthwise = [r for r in replaced if r.spec.is_depthwise]
    assert len(depthwise) == 8 and {r.strategy for r in depthwise} == {"grouped_conv"}
    assert all(r.reason.startswith("pixel_major_matmul is not for depthwise layers") for r in depthwise)
    others = [r for r in replaced if not r.spec.is_depthwise]
    assert len(others) == 16 and {(r.strategy, r.reason) for r in others} == {("pixel_major_matmul", None)}
    assert {model.get_submodule(r.path).strategy for r in replaced} == {"pixel_major_matmul", "grouped_conv"}
    with torch.no_grad():
        assert relative_error(model(x), expected) < 1e-4
    assert {r.strategy for r in convert(efficientnet_cc, "batched_matmul", copy=True).replaced if r.spec.is_depthwise} == {"auto"}
    assert {r.strategy for r in convert(efficientnet_cc, "batched_matmul", copy=True, elsewhere=None).replaced} == {"batched_matmul"}
    assert {r.strategy for r in convert(efficientnet_cc, "grouped_conv", copy=True).replaced} == {"grouped_conv"}, \
        "a strategy for every kind of layer runs everywhere"


@pytest.mark.parametrize("strategy", sorted(__import__("condconv_bench.core.registry", fromlist=["x"]).dispatchable_impls()))
@pytest.mark.parametrize("batch", [1, 2])
def test_batch_norms_around_any_strategy_train_like_around_timms_layer(strategy: str, batch: int) -> None:
    """What a converted model's training relies on: the batch norms before and after each layer get
    the same gradients whatever strides the strategy's output and input gradient have. torch's CPU
    batch-norm backward is wrong for a batch-1 channels-last tensor with a non-canonical batch
    stride, which pixel_major_matmul's output and input gradient once had (relative errors 1–4 on
    efficientnet_cc_b0_8e in training at batch 1)."""
    unavailable = get_impl(strategy).unavailable_reason()
    if unavailable:
        pytest.skip(unavailable)  # a native strategy without a compiler
    torch.manual_seed(0)
    timm_layer = TimmCondConv2d(16, 24, 1, num_experts=4)
    block = Block(timm_layer, experts=4)
    block.layers.append(nn.BatchNorm2d(24))
    block.before = nn.BatchNorm2d(16)  # its backward gets the layer's input gradient
    x, grad = torch.randn(batch, 16, 5, 5), torch.randn(batch, 24, 5, 5)
    converted = convert(block, strategy, copy=True, elsewhere=None).model

    def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
        model.zero_grad()
        h = model.before(x)
        routing = torch.sigmoid(model.routing(h.mean(dim=(2, 3))))
        model.layers[1](model.layers[0](h, routing)).backward(grad)
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    expected, actual = gradients(block), gradients(converted)
    errors = {name: relative_error(actual[name].reshape(g.shape), g) for name, g in expected.items()}
    assert max(errors.values()) < 1e-4, errors
