"""What a case is: its identity fields, the group it belongs to, and the roles inside a group.

A *group* is one layer at one device, dtype, mode, thread count, memory format, batch size and
runtime (eager PyTorch, or an exported graph in ONNX Runtime or OpenVINO: `condconv_bench.runtimes`).
Its implementations share parameters, inputs and the float64 oracle, and are timed together in
interleaved rounds, so ratios between them are paired measurements. Inside a group each
implementation has a `Role`: the *floor* (an implementation with `is_floor`, the plain static
layer: what CondConv would cost if it cost nothing) is what every other one is divided by (the
`vs_floor` columns); a *dispatcher* (`auto`, `autotune`) runs one of the strategies, so it is
judged against the fastest instead of competing with them; every other one is a *strategy*.
Every module that needs the group or these roles takes them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from condconv_bench.cases.workload import Workload

GROUP_KEYS = ("layer", "device", "dtype", "mode", "threads", "memory_format", "batch_size", "runtime")
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Role(StrEnum):
    """An implementation's part in its group; the value is what a result row's `role` column holds."""

    FLOOR = "floor"
    DISPATCHER = "dispatcher"
    STRATEGY = "strategy"


def role_of(cls: type) -> Role:
    """The role of implementation class `cls`. An A/B gate may serve a revision from before the
    floor had one name, whose floor class says `is_baseline`: it is read the same way."""
    if getattr(cls, "is_floor", getattr(cls, "is_baseline", False)):
        return Role.FLOOR
    return Role.DISPATCHER if cls.is_dispatcher else Role.STRATEGY


@dataclass(frozen=True)
class Case:
    """One measurement: the frozen identity of a result row (what was measured, not what was seen)."""

    layer: str
    workload: Workload
    impl: str
    batch_size: int
    device: str
    dtype: str
    mode: str
    threads: int
    memory_format: str
    runtime: str = "eager"

    @property
    def group(self) -> tuple[Any, ...]:
        """Everything but the implementation, in `GROUP_KEYS` order."""
        return tuple(getattr(self, key) for key in GROUP_KEYS)

    @property
    def id(self) -> str:
        """Eager cases keep the ids they had before runtimes existed, so older runs and baselines still match."""
        return (
            f"{self.layer}/{self.impl}/b{self.batch_size}/{self.device}/{self.dtype}/{self.mode}"
            f"/t{self.threads}/{self.memory_format}" + ("" if self.runtime == "eager" else f"/{self.runtime}")
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]
