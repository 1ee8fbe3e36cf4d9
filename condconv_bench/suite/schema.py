"""The shape of a suite file: pydantic models of its keys, types and bounds.

This is what a suite may say, not what it means: unknown keys, wrong types, empty lists and
out-of-range numbers are refused here; what only this project can check (impossible layers,
implementation and model names) is `workloads` and `names`. The `timing:` and `gate:` sections are
derived from the fields of `settings.MeasureSettings` and `settings.GateSettings`, so a setting
is declared once, with its bounds and any other name a suite may give it (`block_time` for
`block_s`), and every setting the instrument takes can be set from a suite.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, create_model

from condconv_bench.machine.allocators import ALLOCATORS
from condconv_bench.runtimes.catalog import RuntimeName
from condconv_bench.settings import GateSettings, MeasureSettings

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
_STRICT = {int: StrictInt, float: Number, str: StrictStr}  # a YAML `true` is no count, a `"3"` no number


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Section(_Model):
    """A suite section derived from a settings dataclass (`_section_of`)."""

    settings_type: ClassVar[type]

    def _settings(self, **overrides: Any) -> Any:
        hints = typing.get_type_hints(self.settings_type)
        values = {**self.model_dump(), **{key: value for key, value in overrides.items() if value is not None}}
        return self.settings_type(**{key: float(value) if hints[key] is float else value for key, value in values.items()})


def _section_of(settings_type: type, choices: dict[str, Any]) -> type[_Section]:
    """A pydantic section with one key per field of `settings_type`: its default, its bounds, its
    aliases; `choices` gives the type of a field whose values are named elsewhere (the allocators)."""
    hints = typing.get_type_hints(settings_type)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(settings_type):
        kind = choices.get(field.name) or _STRICT.get(hints[field.name], hints[field.name])
        aliases = field.metadata.get("aliases", ())
        alias = AliasChoices(field.name, *aliases) if aliases else None
        fields[field.name] = (Annotated[kind, Field(validation_alias=alias, **field.metadata.get("bounds", {}))], field.default)
    section = create_model(f"{settings_type.__name__}Section", __base__=_Section, **fields)
    section.settings_type = settings_type
    return section


class TimingSection(_section_of(MeasureSettings, {"allocator": Literal[*ALLOCATORS]})):  # type: ignore[misc, valid-type]
    """A suite's `timing:` keys: the instrument's `MeasureSettings`."""

    def settings(self, processes: int | None = None, allocator: str | None = None) -> MeasureSettings:
        """The instrument's settings, with the command line's `processes` and `allocator` overriding the suite's."""
        return self._settings(processes=processes, allocator=allocator)


class GateSection(_section_of(GateSettings, {})):  # type: ignore[misc]
    """A suite's `gate:` keys (or the command line's): the baseline gate's `GateSettings`."""

    def settings(self) -> GateSettings:
        return self._settings()


class AxisOverrides(_Model):
    batch_sizes: list[PositiveInt] | None = Field(default=None, min_length=1)
    dtypes: list[DType] | None = Field(default=None, min_length=1)
    modes: list[Mode] | None = Field(default=None, min_length=1)
    runtimes: list[RuntimeName] | None = Field(default=None, min_length=1)


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
    runtimes: list[RuntimeName] = Field(default=["eager"], min_length=1)
    threads: list[PositiveInt] | None = Field(default=None, min_length=1)
    memory_formats: list[MemoryFormat] = Field(default=["contiguous"], min_length=1)
    timing: TimingSection = TimingSection()
    gate: GateSection = GateSection()
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] = 0


SECTIONS = (SuiteModel, LayerEntry, DeviceEntry, TimingSection, GateSection, StageEntry)


def aliases() -> dict[str, str]:
    """Each other name a suite may give a setting → the setting's own name."""
    return {alias: name for section in SECTIONS for name, field in section.model_fields.items()
            if isinstance(field.validation_alias, AliasChoices) for alias in field.validation_alias.choices[1:]}


def all_keys() -> list[str]:
    """Every key a suite may write anywhere, for did-you-mean hints."""
    return sorted({name for section in SECTIONS for name in section.model_fields} | set(aliases()))


def device_of(entry: str | DeviceEntry) -> tuple[str, AxisOverrides | None]:
    """A `devices` item as (device, its axis overrides or None)."""
    return (entry, None) if isinstance(entry, str) else (entry.name, entry)
