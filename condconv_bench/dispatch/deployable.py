"""What a CondConv layer runs inside an exported graph, where one graph must serve every batch size.

An exported graph (torch.export, then ONNX) is traced once. A strategy that folds the batch into a
convolution's groups or loops over the examples in Python (`CondConvBase.batch_fixed_export`) gives
a graph that runs only at the traced batch, and a dispatching layer that looks its choice up by
batch size guards on the batch the same way. So, while exporting, the dispatching layers run the
strategy `DEPLOYED` names for the layer's class instead: a choice that depends on no batch size,
among the strategies that export with a dynamic batch, measured fastest in ONNX Runtime on the
mobile suite's layers (README, "Deploying"). A layer fixed to a batch-baking strategy is exported as
asked, with a `BatchFixedExportWarning` that says so.
"""

from __future__ import annotations

from condconv_bench.core.registry import get_impl
from condconv_bench.core.spec import LayerSpec

# Per layer class, the strategy with a dynamic batch that ran fastest in ONNX Runtime on the mobile
# suite (2-core CPU, float32, 2 threads, batch 1, 8 and 32; README "Deploying" has the figures).
DEPLOYED = {"depthwise": "input_scaled_moe", "linear": "stacked_moe", "dense": "batched_matmul"}


class BatchFixedExportWarning(UserWarning):
    """A layer's strategy bakes the traced batch size into the graph being exported."""


def layer_class(spec: LayerSpec) -> str:
    if spec.kind == "linear":
        return "linear"
    return "depthwise" if spec.is_depthwise else "dense"


def deployed_strategy(spec: LayerSpec) -> str:
    """The strategy a layer of `spec` runs in an exported graph when none is fixed."""
    return DEPLOYED[layer_class(spec)]


def batch_fixed_reason(strategy: str) -> str | None:
    """Why an exported graph of `strategy` runs only at its traced batch, or None."""
    return get_impl(strategy).batch_fixed_export
