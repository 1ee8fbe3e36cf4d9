"""triton_fused: the fused strategy on GPUs — each example's kernel tile is formed on chip, in Triton.

Idea. Every CUDA path before this one (and timm's) writes the B per-example kernels to memory
before a grouped convolution or a batched matmul. Here a program owns (output-channel tile,
pixel tile, example); at each step of the reduction it loads the E expert tiles, mixes the
example's tile `Σ_e α_be·W_e` in float32 registers and feeds it straight to `tl.dot`
(`kernels.py`). Nothing kernel-sized is written; programs that share an output-channel tile are
launched together, so that the expert tiles can come from L2 (intended; no GPU has measured it). Each program mixes its own copy of a tile,
so the mixing is repeated once per pixel tile (E/BLOCK_M extra multiply-adds per product, on
the CUDA cores); the analytic MACs count it once, like the composition the FLOP counters trace.

Paths, by layer:
- groups ≥ 1 (1×1, k×k, strided, dilated, padded, grouped): an implicit GEMM, im2col computed
  from indices, never stored. Its input gradient is the same kernel transposed: a program owns
  input pixels and reads the output gradient through each tap.
- depthwise (groups = C_in = C_out): a direct convolution over (pixel block × channel block),
  each tap's weights mixed once per block. Input gradient: the same, transposed.
- linear: one pixel per example, so mixing a kernel per example would cost as much as the E
  expert products; α scales the input tile and the E products are `tl.dot`s over a tile of
  examples at a time.
- weight and routing gradients: a kernel writes each example's weight gradient
  `G_b = g_bᵀ·im2col(x_b)` (float32, the size of the mixed kernels: the backward's only
  kernel-sized buffer); then `grad_W = αᵀ G` and `grad_α = G·Wᵀ` are two GEMMs. Linear layers
  use `fused`'s backward (torch GEMMs over the expert products, no mixed kernel).

Float32 products are IEEE (`input_precision="ieee"`, no TF32), so float32 meets the float32
oracle; bfloat16 and float16 mix and accumulate in float32.

Where it runs: CUDA devices with Triton installed (`pip install -e '.[triton]'`; CUDA builds of
torch bring it). Under `TRITON_INTERPRET=1` Triton's interpreter runs the same kernels on CPU
tensors with NumPy — slowly, for tests: that is how CI checks it on machines without a GPU.
The interpreter is chosen when the kernels are first imported and lasts for the process.

Tracers and counters see torch ops, as with `fused`: under `torch.compile`, `torch.export`,
`torch.jit.trace` and the FLOP counters it runs `fused.composition` (mix, then batch-as-groups).

Tiles are sized by the layer (16–64), not autotuned: no GPU has tuned them yet.
Source: own work (issue 28); the loop order is `fused`'s.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
from dataclasses import replace
from types import ModuleType

import torch

from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.flops import AnalyticMacs
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, compulsory_traffic
from condconv_bench.errors import ImplUnavailableError
from condconv_bench.impls.fused import Fused, composition, expert_grads, linear_backward, seen_by_tracer

INTERPRET_VARIABLE = "TRITON_INTERPRET"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# What the kernels use first appeared in Triton 3.4 (`triton.knobs`); older ones are refused in one line.
_OLDEST_TRITON = (3, 4)


def _interpreting() -> bool:
    """Whether Triton would interpret the kernels if they were imported now (its own reading of the variable)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


@functools.cache
def _triton_refusal() -> str | None:
    """Why the installed Triton cannot run the kernels, or None."""
    if importlib.util.find_spec("triton") is None:
        return "needs Triton (pip install -e '.[triton]'; CUDA builds of torch include it)"
    import triton

    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if version < _OLDEST_TRITON:
        return f"needs Triton ≥ {'.'.join(map(str, _OLDEST_TRITON))}, found {triton.__version__}"
    return None


def _kernels() -> ModuleType:
    from condconv_bench.impls.triton_fused import kernels

    return kernels


def _device_refusal(device: torch.device) -> str | None:
    """Why the kernels cannot run on `device` in this process, or None."""
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"runs on CUDA devices, not {device.type}"
    if not _interpreting():
        return f"runs on CUDA devices; on the CPU only under Triton's interpreter ({INTERPRET_VARIABLE}=1, for tests)"
    return None


@register_impl("triton_fused")
class TritonFused(CondConvBase):
    """Triton kernel: forms each example's kernel tile on chip from the experts and uses it at once."""

    materialises_kernels = False
    dispatchable = True
    batch_fixed_export = Fused.batch_fixed_export  # an exported graph holds fused's composition, not the kernels

    @classmethod
    def unavailable_reason(cls) -> str | None:
        refusal = _triton_refusal()
        if refusal is not None:
            return refusal
        if not torch.cuda.is_available() and not _interpreting():
            return f"needs a CUDA GPU ({INTERPRET_VARIABLE}=1 runs it on the CPU through Triton's interpreter, for tests)"
        return None

    @classmethod
    def unsupported_reason(cls, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> str | None:
        reason = cls.unavailable_reason() or _device_refusal(device)
        if reason is None and dtype not in _DTYPES:
            reason = f"has kernels for float32, bfloat16 and float16, not {str(dtype).removeprefix('torch.')}"
        return None if reason is None else f"triton_fused {reason}"

    @classmethod
    def analytic_macs(cls, spec: LayerSpec, batch_size: int, input_size: Pair) -> AnalyticMacs:
        return Fused.analytic_macs(spec, batch_size, input_size)

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        """The compulsory bytes and the mixed bias `(B, C_out)`: im2col is computed from indices,
        strided and channels_last inputs are read in place."""
        bias = batch_size * spec.out_channels * itemsize if spec.bias else 0
        return replace(compulsory_traffic(spec, batch_size, input_size, itemsize), kernels=bias)

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        spec, weight, bias = self.spec, self.weight, self.bias
        if seen_by_tracer():
            return composition(spec, x, weight, bias, routing_weights)
        reason = self.unsupported_reason(spec, x.device, x.dtype) or _interpreter_mismatch(x.device) or next(
            (f"triton_fused: {name} on {t.device}, x on {x.device}: the kernels read them as one device's memory"
             for name, t in (("weights", weight), ("routing weights", routing_weights)) if t.device != x.device), None)
        if reason is not None:
            raise ImplUnavailableError(reason)
        tensors = (x, weight, bias, routing_weights)
        # Triton launches on the current CUDA device: make it x's (autograd does so for backward).
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
                return _TritonFusedFunction.apply(x, weight, bias, routing_weights, spec)
            return _forward(spec, x, weight, bias, routing_weights.contiguous())


def _interpreter_mismatch(device: torch.device) -> str | None:
    """The kernels' mode is fixed at their first import: CPU tensors need them interpreted."""
    if device.type == "cpu" and not _kernels().INTERPRETED:
        return f"triton_fused: its kernels were loaded for the GPU in this process; CPU tensors need {INTERPRET_VARIABLE}=1 before the first call"
    return None


def _is_depthwise(spec: LayerSpec) -> bool:
    return spec.groups == spec.in_channels == spec.out_channels and spec.groups > 1


def _geometry(spec: LayerSpec) -> tuple[int, ...]:
    return (*spec.kernel_size, *spec.stride, *spec.padding, *spec.dilation)


def _mixed_bias(bias: torch.Tensor | None, alpha: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else (alpha @ bias).contiguous()


def _empty_like_input(x: torch.Tensor, channels: int, size: Pair) -> torch.Tensor:
    """An output in the input's memory format (channels_last stays channels_last)."""
    out = torch.empty(x.shape[0], channels, *size, device=x.device, dtype=x.dtype)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _forward(spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             alpha: torch.Tensor) -> torch.Tensor:
    kernels = _kernels()
    experts = weight.contiguous()
    if spec.kind == "linear":
        return kernels.linear(x, experts, alpha, _mixed_bias(bias, alpha))
    out = _empty_like_input(x, spec.out_channels, spec.output_size((x.shape[2], x.shape[3])))
    if _is_depthwise(spec):
        return kernels.depthwise(x, experts, alpha, _mixed_bias(bias, alpha), out, _geometry(spec), transposed=False)
    return kernels.conv(x, experts, alpha, _mixed_bias(bias, alpha), out, _geometry(spec), spec.groups, transposed=False)


class _TritonFusedFunction(torch.autograd.Function):
    """Forward and input gradient by the fused kernels; weight and routing gradients from the
    per-example weight gradients G_b (see the module's docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, spec):  # type: ignore[override]
        alpha = alpha.contiguous()
        ctx.spec = spec
        ctx.save_for_backward(x, weight, bias, alpha)
        return _forward(spec, x, weight, bias, alpha)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        spec = ctx.spec
        x, weight, bias, alpha = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if spec.kind == "linear":
            return (*linear_backward(x, weight, bias, alpha, grad.contiguous(), needs), None)
        return (*_conv_backward(spec, x, weight.contiguous(), bias, alpha, grad, needs), None)


def _conv_backward(spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha: torch.Tensor,
                   grad: torch.Tensor, needs: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (x, experts, bias, α) for a conv layer; the only kernel-sized buffer is G_b."""
    need_x, need_w, _, need_a = needs
    kernels = _kernels()
    geometry = _geometry(spec)
    grad_x = None
    if need_x:
        grad_x = _empty_like_input(x, spec.in_channels, (x.shape[2], x.shape[3]))
        if _is_depthwise(spec):
            kernels.depthwise(grad, weight, alpha, None, grad_x, geometry, transposed=True)
        else:
            kernels.conv(grad, weight, alpha, None, grad_x, geometry, spec.groups, transposed=True)
    per_example = None
    if need_w or need_a:
        if _is_depthwise(spec):
            per_example = kernels.depthwise_weight_grad(grad, x, geometry)
        else:
            per_example = kernels.conv_weight_grad(grad, x, weight, spec.groups, geometry)
    return (grad_x, *expert_grads(per_example, weight, bias, alpha, grad, needs))
