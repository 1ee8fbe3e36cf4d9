"""FLOPs three ways, units labelled: fvcore (MACs), FlopCounterMode (FLOPs), and the analytic count.

fvcore counts one per multiply-accumulate and names the ops it cannot count; torch's
FlopCounterMode counts two per MAC and silently skips what it does not know. The analytic count
is each strategy's own cost model (`CondConvBase.analytic_macs`), so the three can be cross-checked:
they agree when `macs_fvcore == macs_analytic` and `flops_torch == 2 · macs_analytic`.
All three count contractions only (convs, matmuls, linears); elementwise work (pooling, sigmoid,
the routing-weighted sums) is excluded by all of them alike. Counts are for one forward pass.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from condconv_bench.core.spec import LayerSpec, Pair


@dataclass(frozen=True)
class AnalyticMacs:
    """Multiply-accumulates of a strategy's contractions, split by purpose."""

    routing: int  # GAP(x) · R
    mixing: int  # Σ_e α_e W_e (and the bias), (B, E) @ (E, P)
    conv: int  # the convolution(s) or linear product(s) themselves

    @property
    def total(self) -> int:
        return self.routing + self.mixing + self.conv


def conv_macs(spec: LayerSpec, batch_size: int, input_size: Pair) -> int:
    """MACs of one static conv/linear of this shape over the batch."""
    if spec.kind == "linear":
        return batch_size * spec.out_channels * spec.in_channels
    out_h, out_w = spec.output_size(input_size)
    return batch_size * out_h * out_w * spec.kernel_numel


def routing_macs(spec: LayerSpec, batch_size: int) -> int:
    return batch_size * spec.in_channels * spec.num_experts


def mixing_macs(spec: LayerSpec, batch_size: int) -> int:
    per_expert = spec.kernel_numel + (spec.out_channels if spec.bias else 0)
    return batch_size * spec.num_experts * per_expert


def expert_products_macs(spec: LayerSpec, batch_size: int, input_size: Pair) -> AnalyticMacs:
    """The E-products form with its bias mixed: routing, the B mixed bias vectors (where there is
    bias) and E full convs/products, one per expert (stacked_moe, input_scaled_moe, fused's linear)."""
    bias_mix = batch_size * spec.num_experts * spec.out_channels if spec.bias else 0
    return AnalyticMacs(routing_macs(spec, batch_size), bias_mix, spec.num_experts * conv_macs(spec, batch_size, input_size))


def compulsory_macs(spec: LayerSpec, batch_size: int, input_size: Pair) -> AnalyticMacs:
    """The least MACs any exact CondConv strategy needs: the routing, and the cheaper of mixing B
    kernels then one conv (`B·E·P + conv`) or E convs (`E · conv`, output- or input-side mixture).

    The mix is cheaper wherever a kernel is used at more than one output pixel; for a linear layer
    (one pixel) the E products are, which is why stacked_moe wins on the classifier.
    """
    conv = conv_macs(spec, batch_size, input_size)
    mixing = mixing_macs(spec, batch_size)
    if spec.num_experts * conv < conv + mixing:
        return AnalyticMacs(routing_macs(spec, batch_size), 0, spec.num_experts * conv)
    return AnalyticMacs(routing_macs(spec, batch_size), mixing, conv)


@dataclass(frozen=True)
class FlopCounts:
    """What the two counters saw on one forward pass, next to the analytic count."""

    macs_fvcore: int | None
    flops_torch: int | None
    analytic: AnalyticMacs
    fvcore_uncounted_ops: str  # e.g. "aten::mean×1, aten::sigmoid×1"
    problems: str  # why a counter failed or disagrees; empty when all three agree

    @property
    def agree(self) -> bool:
        return not self.problems


# fvcore also counts these by default; they are not contractions, and FlopCounterMode and the
# analytic counts leave them out, so fvcore is told to skip them too.
_FVCORE_NON_CONTRACTIONS = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
    "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d", "aten::grid_sampler",
)


def _no_macs(inputs: object, outputs: object) -> int:
    return 0  # fvcore's `None` handle only silences a warning; it keeps its own count


def _matmul_macs(inputs: list, outputs: list) -> int:
    """fvcore's matmul handle rejects `matmul(a, b, out=…)`; count from the two operands alone."""
    from fvcore.nn.jit_handles import get_shape

    a, b = get_shape(inputs[0]), get_shape(inputs[1])
    return math.prod(a) * b[-1]


def _fvcore_macs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, Counter[str]]:
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle(**{op: _no_macs for op in _FVCORE_NON_CONTRACTIONS}, **{"aten::matmul": _matmul_macs})
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit tracer chatter; what matters is recorded below
        total = int(analysis.total())
    return total, Counter(analysis.unsupported_ops())


def count_flops(
    module: torch.nn.Module,
    x: torch.Tensor,
    routing_weights: torch.Tensor | None,
    analytic: AnalyticMacs,
) -> FlopCounts:
    """Count one forward pass of `module` (pass the eager module, never a compiled wrapper)."""
    inputs = (x,) if routing_weights is None else (x, routing_weights)
    problems = []
    macs_fvcore = flops_torch = None
    uncounted = ""
    with torch.no_grad():
        try:
            macs_fvcore, unsupported = _fvcore_macs(module, inputs)
            uncounted = ", ".join(f"{op}×{n}" for op, n in sorted(unsupported.items()))
        except Exception as exc:  # fvcore traces with torch.jit, which fails on some code; record why
            problems.append(f"fvcore failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        counter = FlopCounterMode(display=False)
        with counter:
            module(*inputs)
        flops_torch = int(counter.get_total_flops())
    if macs_fvcore is not None and macs_fvcore != analytic.total:
        problems.append(f"fvcore {macs_fvcore} MAC != analytic {analytic.total} MAC")
    if flops_torch != 2 * analytic.total:
        problems.append(f"FlopCounterMode {flops_torch} FLOP != 2 × analytic {analytic.total} MAC")
    return FlopCounts(macs_fvcore, flops_torch, analytic, uncounted, "; ".join(problems))
