"""The exported graph of each runtime case in a run, exported once and kept in `RUN_DIR/exports/`.

A strategy's graph with a dynamic batch serves every batch of its layer (the parameters are the
layer's one shared set), so it is exported and checked once per layer, strategy and runtime; only
where that fails is the module exported again at each case's batch (`runtimes.export`). The probes
ask for the export, the workers load the file it wrote: a worker never exports.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from condconv_bench.cases.inputs import GroupInputs
from condconv_bench.core.case import Case
from condconv_bench.runtimes.export import Export, export_dynamic, export_fixed


class Exports:
    """The run's exports: `of` exports (or recalls) a case's graph, `graph_of` says where it is."""

    def __init__(self, directory: Path, cases: list[Case], seed: int) -> None:
        self.directory, self.seed = directory, seed
        self._batch_sizes: dict[str, set[int]] = {}
        for case in cases:
            self._batch_sizes.setdefault(case.layer, set()).add(case.batch_size)
        self._dynamic: dict[tuple[str, ...], Export] = {}
        self._graphs: dict[str, Path] = {}

    def _inputs(self, case: Case, batch_size: int) -> tuple[torch.Tensor, ...]:
        inputs = GroupInputs.draw(replace(case, batch_size=batch_size), self.seed, torch.device("cpu"))
        return (inputs.x,) if inputs.routing_weights is None else (inputs.x, inputs.routing_weights)

    def of(self, case: Case, module: nn.Module) -> Export:
        """The export of `case`'s `module` (its eager module, parameters loaded) for its runtime."""
        folder = self.directory / case.layer
        key = (case.layer, case.impl, case.dtype, case.runtime)
        if key not in self._dynamic:
            self._dynamic[key] = export_dynamic(module, lambda batch: self._inputs(case, batch), sorted(self._batch_sizes[case.layer]),
                                                case.runtime, folder / f"{case.impl}-{case.runtime}.onnx", case.threads)
        export = self._dynamic[key]
        if export.status == "failed":
            export = export_fixed(module, self._inputs(case, case.batch_size), folder / f"{case.impl}-{case.runtime}-b{case.batch_size}.onnx", export)
        if export.path is not None:
            self._graphs[case.id] = export.path
        return export

    def graph_of(self, case: Case) -> Path | None:
        return self._graphs.get(case.id)
