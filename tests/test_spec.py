from __future__ import annotations

import pytest

from condconv_bench import LayerSpec
from condconv_bench.errors import SpecError


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        (dict(kind="conv2d", in_channels=64, out_channels=64, groups=5), "groups", "does not divide in_channels 64"),
        (dict(kind="conv2d", in_channels=8, out_channels=6, groups=4), "groups", "does not divide out_channels 6"),
        (dict(kind="conv2d", in_channels=8, out_channels=8, num_experts=0), "num_experts", "positive integer"),
        (dict(kind="conv2d", in_channels=8, out_channels=8, padding=-1), "padding", ">= 0"),
        (dict(kind="conv2d", in_channels=8, out_channels=8, stride=0), "stride", ">= 1"),
        (dict(kind="conv2d", in_channels=8, out_channels=8, kernel_size=(3, 3, 3)), "kernel_size", "pair"),
        (dict(kind="conv2d", in_channels=0, out_channels=8), "in_channels", "positive integer"),
        (dict(kind="conv2d", in_channels=8, out_channels=8, routing="relu"), "routing", "sigmoid, softmax"),
        (dict(kind="conv2d", in_channels=8, out_channels=8, temperature=0), "temperature", "positive"),
        (dict(kind="conv3d", in_channels=8, out_channels=8), "kind", "conv2d, linear"),
        (dict(kind="linear", in_channels=8, out_channels=8, kernel_size=3), "kernel_size", "linear layer"),
        (dict(kind="conv2d", in_channels=8, out_channels=8, bias="yes"), "bias", "true or false"),
    ],
)
def test_impossible_specs_name_the_field(kwargs, field, fragment) -> None:
    with pytest.raises(SpecError) as info:
        LayerSpec(**kwargs)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_shapes_and_output_size() -> None:
    spec = LayerSpec("conv2d", 672, 672, kernel_size=5, stride=2, padding=2, groups=672)
    assert spec.expert_shape == (672, 1, 5, 5)
    assert spec.kernel_numel == 672 * 25
    assert spec.output_size((14, 14)) == (7, 7)
    assert spec.is_depthwise and not spec.is_pointwise
    assert LayerSpec("linear", 1280, 1000).expert_shape == (1000, 1280)


def test_input_smaller_than_kernel_is_rejected() -> None:
    spec = LayerSpec("conv2d", 4, 4, kernel_size=5)
    with pytest.raises(SpecError, match="input_size"):
        spec.output_size((3, 3))


def test_spec_is_hashable_and_normalised() -> None:
    a = LayerSpec("conv2d", 8, 8, kernel_size=3, padding=[1, 1])
    b = LayerSpec("conv2d", 8, 8, kernel_size=(3, 3), padding=1)
    assert a == b and hash(a) == hash(b)
