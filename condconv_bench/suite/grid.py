"""A validated suite and the grid of frozen `Case`s it names, in run order.

Axes resolve per layer, then per device, then for the suite (the first that sets one wins); a layer
may name its own `devices` instead of the suite's. Cases are ordered so that one group — a layer,
device, dtype, mode, batch size, memory format, thread count and runtime — runs all its
implementations back to back: ratios to the floor are then measured minutes apart at most, and the float64 oracle is
computed once per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from condconv_bench.cases.workload import Workload
from condconv_bench.core.case import Case
from condconv_bench.suite.schema import LayerEntry, SuiteModel, device_of


@dataclass(frozen=True)
class Layer:
    """A named entry of a suite: what it runs (a layer, a stack of blocks, a model) and its axis overrides."""

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
                device, device_overrides = device_of(device_entry)
                threads = self.model.threads or [torch.get_num_threads()]
                if device != "cpu":
                    threads = threads[:1]  # host threads barely matter when the device computes
                axes = {
                    axis: getattr(layer.entry, axis) or getattr(device_overrides, axis, None) or getattr(self.model, axis)
                    for axis in ("batch_sizes", "dtypes", "modes", "runtimes")
                }
                formats = self.model.memory_formats if layer.workload.has_spatial_input else ["contiguous"]
                impls = layer.entry.impls or self.model.impls
                for dtype in axes["dtypes"]:
                    for mode in axes["modes"]:
                        for batch_size in axes["batch_sizes"]:
                            for memory_format in dict.fromkeys(formats):
                                for thread_count in threads:
                                    for runtime in axes["runtimes"]:
                                        for impl in impls:
                                            cases.append(
                                                Case(
                                                    layer.name, layer.workload, impl, batch_size, device, dtype,
                                                    mode, thread_count, memory_format, runtime,
                                                )
                                            )
        return cases
