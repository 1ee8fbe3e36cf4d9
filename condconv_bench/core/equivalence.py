"""Do two implementations compute the same function? Checked against a float64 oracle.

The oracle evaluates the defining formula `y = Σ_e α_e (W_e ∗ x) + Σ_e α_e b_e` in float64 from
the implementation's own parameters and input (upcast, so input rounding is not counted as
error), independent of any strategy's kernel mixing. Forward outputs and, for training, the
gradients of the input, expert weights and bias, routing parameters and any routing weights
given from outside are compared by norm-wise relative error, with tolerances per dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.spec import LayerSpec

# Tolerances on the norm-wise relative error ‖y − ref‖ / ‖ref‖, per compute dtype.
# A product summed over K terms in a format with unit roundoff u has a norm-wise error that grows
# like √K·u for random data (worst case K·u); K reaches ~10⁴ (C_in·k² forward, B·H'·W' for weight
# gradients), and the result is rounded to the output format once more, and the mixed kernels once
# before the conv. So the bound is a small multiple of u·√K, with headroom for reordered sums:
#   float32  u = 6.0e-8  → √K·u ≈ 6e-6;   1e-4 leaves ~15× headroom and still catches a wrong index
#   float16  u = 4.9e-4  → rounding of kernels and output alone ≈ 1e-3;     5e-3
#   bfloat16 u = 3.9e-3  → rounding of kernels and output alone ≈ 6e-3;     3e-2
# Any real bug (a wrong expert, a transposed kernel, a dropped bias) gives errors of order 1e-1–1.
RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
    torch.float64: 1e-10,
}
# CUDA runs float32 convs (and matmuls, if allowed) in TF32, whose 10-bit mantissa (u = 4.9e-4)
# behaves like float16 for the products.
TF32_RELATIVE_TOLERANCE = 5e-3


def tolerance_for(dtype: torch.dtype, device: torch.device) -> float:
    """The relative-error tolerance for outputs computed in `dtype` on `device`."""
    if dtype == torch.float32 and device.type == "cuda" and (
        torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    ):
        return TF32_RELATIVE_TOLERANCE
    return RELATIVE_TOLERANCE[dtype]


@dataclass(frozen=True)
class TensorComparison:
    """One tensor compared with its float64 reference."""

    name: str
    rel_error: float
    max_abs_error: float
    nonfinite: bool


@dataclass(frozen=True)
class EquivalenceReport:
    """All comparisons of one implementation on one input, and the tolerance they were held to."""

    comparisons: tuple[TensorComparison, ...]
    tolerance: float
    checked_against: str | None = None  # what the reference was where it is not the float64 oracle

    @property
    def max_rel_error(self) -> float:
        return max(c.rel_error for c in self.comparisons)

    @property
    def max_abs_error(self) -> float:
        return max(c.max_abs_error for c in self.comparisons)

    @property
    def has_nonfinite(self) -> bool:
        return any(c.nonfinite for c in self.comparisons)

    @property
    def worst(self) -> str:
        """Name of the tensor with the largest relative error (e.g. `grad_weight`)."""
        return max(self.comparisons, key=lambda c: c.rel_error).name

    @property
    def passed(self) -> bool:
        return not self.has_nonfinite and self.max_rel_error <= self.tolerance


@dataclass(frozen=True)
class Reference:
    """Oracle output and gradients (float64), keyed like `EquivalenceReport` names, and the tolerance
    to hold them to when the per-dtype one does not fit (a whole model's, see `condconv_bench.cases.models`)."""

    tensors: dict[str, torch.Tensor]
    tolerance: float | None = None
    checked_against: str | None = None  # None: the float64 oracle; else what the tensors are, for the row


def _oracle_device(device: torch.device) -> torch.device:
    # MPS has no float64; CPU and CUDA compute the oracle where the data already is.
    return torch.device("cpu") if device.type == "mps" else device


def reference_output(
    spec: LayerSpec,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    routing_weights: torch.Tensor,
) -> torch.Tensor:
    """The defining formula, one static op per expert: `Σ_e α_e (W_e ∗ x + b_e)`."""
    trailing = (1,) * (x.dim() - 2)
    out = torch.zeros((), dtype=x.dtype, device=x.device)
    for e in range(spec.num_experts):
        expert_bias = None if bias is None else bias[e]
        if spec.kind == "linear":
            y = F.linear(x, weight[e], expert_bias)
        else:
            y = F.conv2d(x, weight[e], expert_bias, **spec.conv_kwargs())
        out = out + routing_weights[:, e].view(-1, 1, *trailing) * y
    return out


def compute_reference(
    module: CondConvBase,
    x: torch.Tensor,
    routing_weights: torch.Tensor | None = None,
    grad_output: torch.Tensor | None = None,
) -> Reference:
    """Float64 output of the defining formula, and its gradients when `grad_output` is given."""
    device = _oracle_device(x.device)
    track = grad_output is not None

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=torch.float64).contiguous().requires_grad_(track)

    leaves = {"input": leaf(x), "weight": leaf(module.weight)}
    if module.bias is not None:
        leaves["bias"] = leaf(module.bias)
    if routing_weights is None:
        leaves["routing.weight"] = leaf(module.routing.weight)
        leaves["routing.bias"] = leaf(module.routing.bias)
        xin = leaves["input"]
        pooled = xin.mean(dim=(2, 3)) if module.spec.kind == "conv2d" else xin
        logits = F.linear(pooled, leaves["routing.weight"], leaves["routing.bias"])
        if module.spec.routing == "softmax":
            alpha = torch.softmax(logits / module.temperature, dim=1)
        else:
            alpha = torch.sigmoid(logits)
    else:
        leaves["routing_weights"] = leaf(routing_weights)
        alpha = leaves["routing_weights"]
    out = reference_output(module.spec, leaves["input"], leaves["weight"], leaves.get("bias"), alpha)
    tensors = {"output": out.detach()}
    if track:
        out.backward(grad_output.to(device=device, dtype=torch.float64))
        tensors.update({f"grad_{name}": t.grad for name, t in leaves.items()})
    return Reference(tensors)


def compare(name: str, actual: torch.Tensor | None, expected: torch.Tensor) -> TensorComparison:
    """Norm-wise relative error, max absolute error and non-finite values of `actual`.

    A missing tensor (a gradient that never reached a parameter) counts as an infinite error. A
    tensor of another shape with as many elements is compared in the reference's shape, row-major,
    as `CondConvBase.load_flat_experts` maps flat experts.
    """
    if actual is None:
        return TensorComparison(name, float("inf"), float("inf"), False)
    a = actual.detach().to(device=expected.device, dtype=torch.float64)
    if a.shape != expected.shape and a.numel() == expected.numel():
        a = a.reshape(expected.shape)  # one parameter in another layout: timm's flat experts, ours 5-D
    diff = a - expected
    finite = bool(torch.isfinite(a).all())
    denom = float(torch.linalg.vector_norm(expected))
    numer = float(torch.linalg.vector_norm(diff)) if finite else float("inf")
    rel = numer / denom if denom > 0 else numer
    max_abs = float(diff.abs().max()) if finite else float("inf")
    return TensorComparison(name, rel, max_abs, not finite)


def compute_module_reference(
    reference: torch.nn.Module, x: torch.Tensor, grad_output: torch.Tensor | None = None
) -> Reference:
    """Output, and with `grad_output` the gradients, of a float64 `reference` module on `x`.

    Used where the reference is a whole module (a stack of blocks) rather than one formula;
    gradient names follow `implementation_tensors` (`grad_input`, `grad_<parameter name>`).
    """
    return Reference({k: v for k, v in implementation_tensors(reference, x, None, grad_output).items() if v is not None})


def implementation_tensors(
    module: torch.nn.Module,
    x: torch.Tensor,
    routing_weights: torch.Tensor | None = None,
    grad_output: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """A module's output and, with `grad_output`, the gradients of its input, routing weights
    (when given) and every parameter, named like the oracle's (`grad_weight`, `grad_routing.bias`…)."""
    track = grad_output is not None
    x = x.detach().requires_grad_(track)
    given = None if routing_weights is None else routing_weights.detach().requires_grad_(track)
    module.zero_grad(set_to_none=True)
    with torch.enable_grad() if track else torch.inference_mode():
        out = module(x) if given is None else module(x, given)
    tensors: dict[str, torch.Tensor | None] = {"output": out.detach()}
    if track:
        out.backward(grad_output.to(out.dtype))
        tensors["grad_input"] = x.grad
        if given is not None:
            tensors["grad_routing_weights"] = given.grad
        tensors.update({f"grad_{name}": p.grad for name, p in module.named_parameters()})
    return tensors


def check_equivalence(
    module: torch.nn.Module,
    x: torch.Tensor,
    routing_weights: torch.Tensor | None = None,
    grad_output: torch.Tensor | None = None,
    reference: Reference | None = None,
) -> EquivalenceReport:
    """Compare `module` with the oracle on `x`; pass `grad_output` to compare gradients too.

    `reference` lets a caller compute the oracle once for several implementations that share
    parameters and input (the runner does).
    """
    if reference is None:
        reference = compute_reference(module, x, routing_weights, grad_output)
    actual = implementation_tensors(module, x, routing_weights, grad_output)
    comparisons = tuple(compare(name, actual.get(name), ref) for name, ref in reference.tensors.items())
    return EquivalenceReport(comparisons, reference.tolerance or tolerance_for(x.dtype, x.device), reference.checked_against)
