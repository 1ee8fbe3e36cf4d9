"""Seeded parameters and inputs of a case, drawn the same way in every process.

The runner probes a case (equivalence, FLOPs, memory) in its own process and times it in worker
processes; both load the layer's one parameter set and draw the group's inputs from here, so
every process measures exactly the same tensors. Seeds derive from the suite's seed and the
case's identity, never from the order in which cases run.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from condconv_bench.core.case import Case


def seed_of(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


@dataclass
class GroupInputs:
    """Seeded tensors of one group, shared by every implementation in it."""

    x: torch.Tensor
    routing_weights: torch.Tensor | None
    grad_output: torch.Tensor | None

    @classmethod
    def draw(cls, case: Case, seed: int, device: torch.device) -> GroupInputs:
        workload, batch = case.workload, case.batch_size
        generator = torch.Generator().manual_seed(seed_of(seed, case.layer, batch))
        x = torch.randn(workload.input_shape(batch), generator=generator)
        routing = torch.rand(batch, workload.num_experts, generator=generator) if workload.routing_given else None
        grad_output = torch.randn(workload.output_shape(batch), generator=generator) if case.mode == "training" else None

        def place(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=case.torch_dtype)

        return cls(place(x), place(routing), place(grad_output))

    def formatted_x(self, case: Case) -> torch.Tensor:
        """The input in the case's memory format."""
        return self.x.contiguous(memory_format=torch.channels_last) if case.memory_format == "channels_last" else self.x


def layer_state(case: Case, seed: int) -> dict[str, torch.Tensor]:
    """The shared parameter set of the case's layer (the same for every implementation)."""
    return case.workload.initial_state(torch.Generator().manual_seed(seed_of(seed, case.layer)))
