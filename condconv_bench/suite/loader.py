"""YAML suite → validated `Suite` → the grid of frozen `Case`s it names.

The schema is pydantic (unknown keys, wrong types, empty lists), followed by the checks only this
project can make: impossible layers (via `LayerSpec`), input sizes smaller than the kernel, and
implementation names the registry does not know. Every problem becomes one line naming the file
and the key path, e.g. `suites/x.yaml: layers[3].groups: 5 does not divide in_channels 64`.

Axes resolve per layer, then per device, then for the suite (the first that sets one wins); a layer
may name its own `devices` instead of the suite's.
Cases are ordered so that one group — a layer, device, dtype, mode, batch size, memory format and
thread count — runs all its implementations back to back: ratios to the `static` floor are then
measured minutes apart at most, and the float64 oracle is computed once per group.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from condconv_bench.core.case import Case
from condconv_bench.errors import CondConvBenchError, SpecError, SuiteError
from condconv_bench.machine.allocators import ALLOCATORS
from condconv_bench.core.registry import get_impl
from condconv_bench.settings import Comparison, GateSettings, MeasureSettings
from condconv_bench.layers.blocks import StackSpec, StageSpec
from condconv_bench.core.spec import LayerSpec, as_pair
from condconv_bench.cases.workload import LayerWorkload, StackWorkload, Workload

MODEL_ONLY_IMPLS = ("as_shipped",)  # condconv_bench.cases.models.workload.AS_SHIPPED, named here without importing it

DType = Literal["float32", "bfloat16", "float16"]
Mode = Literal["inference", "training"]
MemoryFormat = Literal["contiguous", "channels_last"]
# Every integer a suite sets is bounded by what torch can index (int32 sizes), so no value can
# overflow a result file's 64-bit columns; the layer checks (LayerSpec) then reject what is impossible.
MAX_SIZE = 2**31 - 1
BoundedInt = Annotated[StrictInt, Field(ge=-MAX_SIZE, le=MAX_SIZE)]
PositiveInt = Annotated[StrictInt, Field(ge=1, le=MAX_SIZE)]
Number = StrictInt | StrictFloat
IntOrPair = BoundedInt | list[BoundedInt]
DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_MEASURE, _GATE = MeasureSettings(), GateSettings()


class TimingSection(_Model):
    """A suite's `timing:` keys, validated into the instrument's `MeasureSettings` (which holds the defaults).

    Upper bounds keep a typo from asking for days of measurement.
    """

    processes: Annotated[StrictInt, Field(ge=1, le=64)] = _MEASURE.processes
    rounds: Annotated[StrictInt, Field(ge=1, le=10_000)] = _MEASURE.rounds
    block_time: Annotated[Number, Field(gt=0, le=10)] = _MEASURE.block_s
    warmup: Annotated[StrictInt, Field(ge=0, le=1000)] = _MEASURE.warmup
    precision: Annotated[Number, Field(gt=0, lt=1)] = _MEASURE.precision
    budget: Annotated[Number, Field(gt=0, le=86_400)] = _MEASURE.budget_s
    tie_margin: Annotated[Number, Field(ge=0, lt=1)] = _MEASURE.tie_margin
    sweep_groups: Annotated[StrictInt, Field(ge=1, le=10_000)] = _MEASURE.sweep_groups
    allocator: Literal[*ALLOCATORS] = _MEASURE.allocator  # type: ignore[valid-type]

    def settings(self, processes: int | None = None, allocator: str | None = None) -> MeasureSettings:
        """The instrument's settings, with the command line's `processes` and `allocator` overriding the suite's."""
        return MeasureSettings(
            processes=processes or self.processes, rounds=self.rounds, block_s=float(self.block_time), warmup=self.warmup,
            precision=float(self.precision), budget_s=float(self.budget), tie_margin=float(self.tie_margin),
            sweep_groups=self.sweep_groups, allocator=allocator or self.allocator,
        )


class GateSection(_Model):
    """A suite's `gate:` keys (or the command line's), validated into the baseline gate's `GateSettings`."""

    time_threshold: Annotated[Number, Field(gt=0)] = _GATE.time_threshold
    time_min_delta_s: Annotated[Number, Field(ge=0)] = _GATE.time_min_delta_s
    memory_threshold: Annotated[Number, Field(gt=0)] = _GATE.memory_threshold
    memory_min_bytes: Annotated[StrictInt, Field(ge=0, le=2**62)] = _GATE.memory_min_bytes
    alpha: Annotated[Number, Field(gt=0, lt=1)] = _GATE.alpha
    comparison: Comparison = _GATE.comparison

    def settings(self) -> GateSettings:
        return GateSettings(float(self.time_threshold), float(self.time_min_delta_s), float(self.memory_threshold),
                            self.memory_min_bytes, float(self.alpha), self.comparison)


class AxisOverrides(_Model):
    batch_sizes: list[PositiveInt] | None = Field(default=None, min_length=1)
    dtypes: list[DType] | None = Field(default=None, min_length=1)
    modes: list[Mode] | None = Field(default=None, min_length=1)


class StageEntry(_Model):
    """One stage of inverted-residual blocks (EfficientNet block arguments)."""

    out_channels: PositiveInt
    kernel_size: PositiveInt
    stride: PositiveInt = 1
    expand_ratio: PositiveInt = 6
    se_ratio: Annotated[Number, Field(gt=0, le=1)] = 0.25
    repeats: PositiveInt = 1


class LayerFields(_Model):
    """The layer keys that `layer_defaults` may set for every layer."""

    kind: Literal["conv2d", "linear", "stack", "model"] = "conv2d"
    kernel_size: IntOrPair = 1
    stride: IntOrPair = 1
    padding: IntOrPair | None = None  # None: dilation·(k−1)/2, the "same" padding of MobileNet/EfficientNet
    dilation: IntOrPair = 1
    groups: PositiveInt = 1
    experts: PositiveInt = 8
    bias: StrictBool = False
    routing: Literal["sigmoid", "softmax"] = "sigmoid"
    temperature: Annotated[Number, Field(gt=0)] = 1.0
    routing_weights: Literal["computed", "given"] = "computed"
    input_size: IntOrPair | None = None


class DeviceEntry(AxisOverrides):
    name: StrictStr


class LayerEntry(LayerFields, AxisOverrides):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.\-]+$")]
    in_channels: BoundedInt | None = None  # required by every kind but model (default 3 there)
    model: StrictStr | None = None  # kind model only: timm:<name> or package.module:callable
    floor: StrictStr | None = None  # kind model only: the same network without CondConv
    out_channels: BoundedInt | None = None  # every kind but stack
    stages: list[StageEntry] | None = Field(default=None, min_length=1)  # kind stack only
    count: PositiveInt = 1  # occurrences in the network it comes from (for network-level totals)
    impls: list[StrictStr] | None = Field(default=None, min_length=1)
    devices: list[StrictStr | DeviceEntry] | None = Field(default=None, min_length=1)  # instead of the suite's


class SuiteModel(_Model):
    name: Annotated[StrictStr, Field(min_length=1)]
    description: StrictStr = ""
    layer_defaults: dict[StrictStr, Any] = {}  # any LayerFields key; validated by LayerFields
    layers: list[dict[str, Any]] = Field(min_length=1)  # validated one by one after defaults merge
    impls: list[StrictStr] = Field(min_length=1)
    batch_sizes: list[PositiveInt] = Field(min_length=1)
    devices: list[StrictStr | DeviceEntry] = Field(default=["cpu"], min_length=1)
    dtypes: list[DType] = Field(default=["float32"], min_length=1)
    modes: list[Mode] = Field(default=["inference"], min_length=1)
    threads: list[PositiveInt] | None = Field(default=None, min_length=1)
    memory_formats: list[MemoryFormat] = Field(default=["contiguous"], min_length=1)
    timing: TimingSection = TimingSection()
    gate: GateSection = GateSection()
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] = 0


_ALL_KEYS = sorted(
    {name for model in (SuiteModel, LayerEntry, DeviceEntry, TimingSection, GateSection, StageEntry) for name in model.model_fields}
)


@dataclass(frozen=True)
class Layer:
    """A named entry of a suite: what it runs (a layer or a stack of blocks) and its axis overrides."""

    name: str
    workload: Workload
    count: int
    entry: LayerEntry


@dataclass(frozen=True)
class Suite:
    """A validated suite: the model as written, its layers, and where it came from."""

    path: Path
    model: SuiteModel
    layers: tuple[Layer, ...]
    sha256: str

    @property
    def name(self) -> str:
        return self.model.name

    def cases(self) -> list[Case]:
        """The full grid, in run order (see the module docstring)."""
        cases = []
        for layer in self.layers:
            for device_entry in layer.entry.devices or self.model.devices:
                device, device_overrides = _device_entry(device_entry)
                threads = self.model.threads or [torch.get_num_threads()]
                if device != "cpu":
                    threads = threads[:1]  # host threads barely matter when the device computes
                axes = {
                    axis: getattr(layer.entry, axis) or getattr(device_overrides, axis, None) or getattr(self.model, axis)
                    for axis in ("batch_sizes", "dtypes", "modes")
                }
                formats = self.model.memory_formats if layer.workload.has_spatial_input else ["contiguous"]
                impls = layer.entry.impls or self.model.impls
                for dtype in axes["dtypes"]:
                    for mode in axes["modes"]:
                        for batch_size in axes["batch_sizes"]:
                            for memory_format in dict.fromkeys(formats):
                                for thread_count in threads:
                                    for impl in impls:
                                        cases.append(
                                            Case(
                                                layer.name, layer.workload, impl,
                                                batch_size, device, dtype, mode, thread_count, memory_format,
                                            )
                                        )
        return cases


def _device_entry(entry: str | DeviceEntry) -> tuple[str, AxisOverrides | None]:
    return (entry, None) if isinstance(entry, str) else (entry.name, entry)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which plain YAML loading silently overrides."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _path_of(loc: tuple[Any, ...], data: Any) -> str:
    """`layers[3].groups` from a pydantic location, skipping union tags that are not keys."""
    path = ""
    for part in loc:
        if isinstance(data, list) and isinstance(part, int) and part < len(data):
            path += f"[{part}]"
            data = data[part]
        elif isinstance(data, dict) and part in data:
            path += f".{part}" if path else str(part)
            data = data[part]
        elif not isinstance(data, (dict, list)):
            break  # a union tag such as 'int' or 'list[int]' under a scalar
        else:
            path += f".{part}" if path else str(part)  # a missing key
            data = None
    return path or "(top level)"


def _describe(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        close = difflib.get_close_matches(key, _ALL_KEYS, n=1)
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "string_pattern_mismatch":
        return f"may only contain letters, digits, '_', '.' and '-', got {error['input']!r}"
    message = error["msg"]
    if "input" in error and error["type"] not in ("too_short",):
        message += f", got {error['input']!r}"
    return message


def _schema_problems(exc: ValidationError, data: Any, prefix: str = "") -> list[str]:
    merged: dict[str, list[str]] = {}
    for error in exc.errors():
        path = _path_of(error["loc"], data)
        text = _describe(error)
        if text not in merged.setdefault(prefix + path, []):
            merged[prefix + path].append(text)
    return [f"{path}: {' or '.join(texts)}" for path, texts in merged.items()]


def _model(entry: LayerEntry) -> Workload:
    """A `kind: model` entry; its model is not built here (its library may be missing: the cases then skip)."""
    from condconv_bench.errors import ModelError
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
    for name in ("model", "floor"):
        value = getattr(entry, name)
        if value is not None:
            try:
                sources.split(value)
            except ModelError as exc:
                raise SpecError(name, str(exc)) from None
    return ModelWorkload(entry.model, as_pair("input_size", entry.input_size), entry.floor,
                         3 if entry.in_channels is None else entry.in_channels)


def _check_model_impls(names: list[str], entry: LayerEntry, path: str) -> list[str]:
    """What a model case can run: as_shipped, the floor (static, with a floor model), or what convert() takes."""
    from condconv_bench.core.registry import dispatchable_impls

    convertible = ("auto", "autotune", *dispatchable_impls())
    problems = []
    for index, name in enumerate(names):
        if name == "static" and entry.floor is None:
            problems.append(f"{path}[{index}]: static is a model's floor; set floor: (the network without CondConv)")
        elif name not in (*MODEL_ONLY_IMPLS, "static", *convertible):
            problems.append(f"{path}[{index}]: {name!r} cannot run a model: expected as_shipped, static, "
                            f"or a strategy convert() takes ({', '.join(convertible)})")
    return problems


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


def _layer_workload(entry: LayerEntry) -> LayerWorkload:
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


def _layer(entry: LayerEntry, path: str) -> Layer:
    try:
        if entry.kind != "model":
            for name in ("model", "floor"):
                if name in entry.model_fields_set:
                    raise SpecError(name, "only a model entry (kind: model) names a model")
            if entry.in_channels is None:
                raise SpecError("in_channels", "required key is missing")
        workload = {"stack": _stack, "model": _model}.get(entry.kind, _layer_workload)(entry)
    except SpecError as exc:
        field = {"num_experts": "experts"}.get(exc.field, exc.field)
        raise SuiteError([f"{path}.{field}: {exc.message}"]) from None
    return Layer(entry.name, workload, entry.count, entry)


def _check_impls(names: list[str], path: str, resolve_impl: Callable[[str], object]) -> list[str]:
    problems = []
    for index, name in enumerate(names):
        try:
            resolve_impl(name)
        except CondConvBenchError as exc:
            problems.append(f"{path}[{index}]: {exc}")
    return problems


def parse_suite(data: Any, source: Path, resolve_impl: Callable[[str], object] = get_impl) -> Suite:
    """Validate already-loaded YAML data; `source` names the file in every message. Implementation
    names must resolve with `resolve_impl` (an A/B gate passes another revision's registry)."""
    label = str(source)
    if not isinstance(data, dict):
        raise SuiteError([f"{label}: (top level): expected a mapping of suite keys, got {type(data).__name__}"])
    try:
        model = SuiteModel.model_validate(data)
    except ValidationError as exc:
        raise SuiteError([f"{label}: {p}" for p in _schema_problems(exc, data)]) from None
    try:
        LayerFields.model_validate(model.layer_defaults)
    except ValidationError as exc:
        raise SuiteError([f"{label}: {p}" for p in _schema_problems(exc, model.layer_defaults, "layer_defaults.")]) from None
    problems: list[str] = []
    layers: list[Layer] = []
    defaults = model.layer_defaults
    for index, raw in enumerate(model.layers):
        path = f"layers[{index}]"
        if not isinstance(raw, dict):
            problems.append(f"{label}: {path}: expected a mapping of layer keys, got {raw!r}")
            continue
        try:
            entry = LayerEntry.model_validate({**defaults, **raw})
        except ValidationError as exc:
            problems += [f"{label}: {p}" for p in _schema_problems(exc, {**defaults, **raw}, path + ".")]
            continue
        try:
            layers.append(_layer(entry, path))
        except SuiteError as exc:
            problems += [f"{label}: {p}" for p in exc.problems]
            continue
        if entry.kind == "model":
            where = f"{path}.impls" if entry.impls else "impls"
            problems += [f"{label}: {p}" for p in _check_model_impls(entry.impls or model.impls, entry, where)]
        elif entry.impls:
            problems += [f"{label}: {p}" for p in _check_impls(entry.impls, f"{path}.impls", resolve_impl)]
    names = [layer.name for layer in layers]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{label}: layers: the name {name!r} is used by more than one layer")
    resolve_top = lambda name: None if name in MODEL_ONLY_IMPLS else resolve_impl(name)  # noqa: E731
    problems += [f"{label}: {p}" for p in _check_impls(model.impls, "impls", resolve_top)]
    for layer in layers:
        if layer.entry.kind != "model" and not layer.entry.impls and set(MODEL_ONLY_IMPLS) & set(model.impls):
            problems.append(f"{label}: impls: {', '.join(MODEL_ONLY_IMPLS)} runs only model entries, and {layer.name} is a {layer.entry.kind}")
    device_lists = [("devices", model.devices)]
    device_lists += [(f"layers[{i}].devices", layer.entry.devices) for i, layer in enumerate(layers) if layer.entry.devices]
    for prefix, devices in device_lists:
        for index, entry in enumerate(devices):
            device, _ = _device_entry(entry)
            if not DEVICE_PATTERN.match(device):
                where = f"{prefix}[{index}]" + ("" if isinstance(entry, str) else ".name")
                problems.append(f"{label}: {where}: {device!r} is not a device (expected cpu, cuda, cuda:N or mps)")
    if problems:
        raise SuiteError(problems)
    digest = hashlib.sha256(yaml.safe_dump(data, sort_keys=True).encode()).hexdigest()
    return Suite(source, model, tuple(layers), digest)


def shipped_suites() -> dict[str, Path]:
    """The suites installed with the package, by name (`smoke`, `mobile`, …)."""
    folder = importlib.resources.files("condconv_bench.suites")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def resolve_suite_path(name_or_path: str | Path) -> Path:
    """A path as given if it exists, else a shipped suite's name (`mobile` → its YAML file)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    return shipped_suites().get(str(name_or_path), path)


def load_suite(name_or_path: str | Path, resolve_impl: Callable[[str], object] = get_impl) -> Suite:
    """Read, parse and validate a suite file (or a shipped suite by name)."""
    path = resolve_suite_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SuiteError([f"{path}: cannot read suite file ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError as exc:
        raise SuiteError([f"{path}: not a YAML text file (byte {exc.start} is not UTF-8)"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise SuiteError([f"{path}{where}: YAML error: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise SuiteError([f"{path}: YAML error: {exc}"]) from None
    return parse_suite(data, path, resolve_impl)
