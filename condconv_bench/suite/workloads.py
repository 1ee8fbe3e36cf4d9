"""A validated layer entry → the workload it runs: a layer, a stack of blocks, or a whole model.

Here are the checks only this project can make on an entry's shape: the keys each kind needs or
refuses, impossible layers (via `LayerSpec`, whose `num_experts` a suite calls `experts`) and input
sizes smaller than the kernel. A model is not built here (its library may be missing, and
building one takes seconds); its names are resolved by `names`.
"""

from __future__ import annotations

from condconv_bench.cases.workload import LayerWorkload, StackWorkload, Workload
from condconv_bench.core.spec import LayerSpec, as_pair
from condconv_bench.errors import ModelError, SpecError, SuiteError
from condconv_bench.layers.blocks import StackSpec, StageSpec
from condconv_bench.suite.schema import LayerEntry

_SUITE_NAMES = {"num_experts": "experts"}  # LayerSpec's field → the suite key that sets it


def _model(entry: LayerEntry) -> Workload:
    from condconv_bench.cases.models import sources
    from condconv_bench.cases.models.workload import ModelWorkload

    if entry.model is None:
        raise SpecError("model", "a model entry needs model: timm:<model name> or package.module:callable")
    if entry.input_size is None:
        raise SpecError("input_size", "a model needs input_size (an integer or [height, width])")
    for name in ("out_channels", "stages", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
                 "experts", "routing", "temperature", "routing_weights"):
        if name in entry.model_fields_set:
            raise SpecError(name, "a model takes its layers from the model itself")
    in_channels = 3 if entry.in_channels is None else entry.in_channels
    if in_channels < 1:
        raise SpecError("in_channels", f"must be positive, got {in_channels}")
    for name in ("model", "floor"):
        value = getattr(entry, name)
        if value is not None:
            try:
                sources.split(value)
            except ModelError as exc:
                raise SpecError(name, str(exc)) from None
    return ModelWorkload(entry.model, as_pair("input_size", entry.input_size), entry.floor, in_channels)


def _stack(entry: LayerEntry) -> StackWorkload:
    if entry.stages is None:
        raise SpecError("stages", "a stack needs stages (out_channels, kernel_size, stride, expand_ratio, se_ratio, repeats)")
    if entry.input_size is None:
        raise SpecError("input_size", "a stack needs input_size (an integer or [height, width])")
    for name in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias"):
        if name in entry.model_fields_set:
            raise SpecError(name, "a stack takes its shapes from stages; set them there")
    stages = tuple(StageSpec(**{**stage.model_dump(), "se_ratio": float(stage.se_ratio)}) for stage in entry.stages)
    spec = StackSpec(entry.in_channels, as_pair("input_size", entry.input_size), entry.experts, stages)
    for block in spec.blocks():
        for _, layer, size in block.layers():
            layer.output_size(size)
    return StackWorkload(spec)


def _layer(entry: LayerEntry) -> LayerWorkload:
    if entry.out_channels is None:
        raise SpecError("out_channels", "required for conv2d and linear layers")
    if entry.stages is not None:
        raise SpecError("stages", "only a stack has stages")
    kernel, dilation = as_pair("kernel_size", entry.kernel_size), as_pair("dilation", entry.dilation)
    same_padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation)) if entry.kind == "conv2d" else (0, 0)
    spec = LayerSpec(
        entry.kind, entry.in_channels, entry.out_channels, num_experts=entry.experts, kernel_size=kernel,
        stride=as_pair("stride", entry.stride), padding=same_padding if entry.padding is None else as_pair("padding", entry.padding),
        dilation=dilation, groups=entry.groups, bias=entry.bias, routing=entry.routing,
        temperature=float(entry.temperature),
    )
    if entry.kind == "linear":
        if entry.input_size is not None:
            raise SpecError("input_size", "a linear layer takes (batch, in_channels) inputs, not an image size")
        return LayerWorkload(spec, (1, 1), entry.routing_weights == "given")
    if entry.input_size is None:
        raise SpecError("input_size", "a conv2d layer needs input_size (an integer or [height, width])")
    input_size = as_pair("input_size", entry.input_size)
    spec.output_size(input_size)
    return LayerWorkload(spec, input_size, entry.routing_weights == "given")


def workload_of(entry: LayerEntry, path: str) -> Workload:
    """The workload `entry` (at key path `path`, e.g. `layers[3]`) runs; a `SuiteError` naming the key otherwise."""
    try:
        if entry.kind != "model":
            for name in ("model", "floor"):
                if name in entry.model_fields_set:
                    raise SpecError(name, "only a model entry (kind: model) names a model")
            if entry.in_channels is None:
                raise SpecError("in_channels", "required key is missing")
        return {"stack": _stack, "model": _model}.get(entry.kind, _layer)(entry)
    except SpecError as exc:
        raise SuiteError([f"{path}.{_SUITE_NAMES.get(exc.field, exc.field)}: {exc.message}"]) from None
